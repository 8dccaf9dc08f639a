//! One run per output folder: rank 0 holds `{output_dir}/{name}/run.lock` for as long as the run
//! lives, so that a second trainer started on the same folder (a job submitted twice, a requeued job
//! whose old incarnation still runs on a "dead" node) stops at once with exit status 2, naming the
//! holder, instead of interleaving checkpoints, `metrics.jsonl` and TensorBoard files with it.
//!
//! The file holds the holder as JSON ([`Holder`]: host, pid, Slurm job id, step, since, refreshed).
//! Two ways to hold it, picked per filesystem:
//! - **flock**: `flock(LOCK_EX | LOCK_NB)` on the file. The kernel drops the lock when the holder
//!   dies, also on SIGKILL, so a crashed run never locks its folder.
//! - **lease**, where `flock` fails with ENOLCK/EOPNOTSUPP/ENOSYS (some NFS and Lustre mounts): the
//!   folder is held while the file's `refreshed` is younger than `dist.heartbeat_timeout_s`; an older
//!   one is taken over with a warning. The hosts' clocks must roughly agree.
//!
//! A thread rewrites the file every few seconds (`refreshed`, the step that the training loop
//! publishes with [`RunLock::set_step`]). A requeued job with the same `SLURM_JOB_ID` takes its own
//! lock over; the old incarnation's refresher sees that the file no longer names it and stops, so it
//! never overwrites the new owner. At a normal end ([`Drop`]) the file is removed.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::{Config, ConfigError};
use crate::dist::Control;

/// The lock file's name inside the run folder.
pub const FILE_NAME: &str = "run.lock";

/// `FERROCLIP_TEST_RUN_LOCK=lease`, for the tests only: hold the folder by lease even where `flock`
/// works, so that the lease path is tested on any filesystem.
const TEST_MODE_VAR: &str = "FERROCLIP_TEST_RUN_LOCK";

/// How many times acquiring starts over after losing a race with another starting run.
const ATTEMPTS: usize = 20;

/// What the lock file says: who holds the folder, since when, and how far it got.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holder {
    /// The holder's machine (rank 0's host).
    pub host: String,
    /// The holder's process id on that host.
    pub pid: u32,
    /// `SLURM_JOB_ID` of the holder's job, if it ran under Slurm.
    pub slurm_job_id: Option<String>,
    /// The last step the holder finished.
    pub step: u64,
    /// When it took the folder (UTC, `2026-01-31T12:00:00.000Z`).
    pub since: String,
    /// When it last rewrote the file (UTC); a lease holder is alive while this is recent.
    pub refreshed: String,
}

impl Holder {
    /// `host gpu07, pid 4242, Slurm job 1234, since 2026-01-31T12:00:00Z (step 40, refreshed ...)`.
    pub fn describe(&self) -> String {
        let job = match &self.slurm_job_id {
            Some(j) => format!("Slurm job {j}"),
            None => "no Slurm job".into(),
        };
        format!(
            "host {}, pid {}, {job}, since {} (step {}, refreshed {})",
            self.host, self.pid, self.since, self.step, self.refreshed
        )
    }

    /// Same process incarnation: host, pid and start time (a pid alone is reused).
    fn same_process(&self, other: &Holder) -> bool {
        self.host == other.host && self.pid == other.pid && self.since == other.since
    }

    /// Another incarnation of this Slurm job (a requeue): it may take the folder over.
    fn same_job(&self, other: &Holder) -> bool {
        self.slurm_job_id.is_some() && self.slurm_job_id == other.slurm_job_id
    }
}

/// How this process asks for the folder.
#[derive(Debug, Clone)]
pub struct Settings {
    /// This process as the lock file will name it (`step`, `since`, `refreshed` are set on acquiring).
    pub host: String,
    /// This process's id.
    pub pid: u32,
    /// `SLURM_JOB_ID`, if any: the same id in the file is this job's earlier incarnation.
    pub slurm_job_id: Option<String>,
    /// A lease holder whose `refreshed` is older than this is dead (`dist.heartbeat_timeout_s`).
    pub lease_timeout: Duration,
    /// How often the holder rewrites the file.
    pub refresh_every: Duration,
    /// Hold by lease even where `flock` works (tests).
    pub force_lease: bool,
    /// The folder as the user named it, for the refusal: `{output_dir}/{name}`.
    pub folder_name: String,
}

impl Settings {
    /// For `cfg`'s run, as this process: its host, pid and `SLURM_JOB_ID`.
    pub fn for_run(cfg: &Config) -> Settings {
        let lease_timeout = Duration::from_secs(cfg.dist.heartbeat_timeout_s);
        Settings {
            host: crate::log::tensorboard::hostname(),
            pid: std::process::id(),
            slurm_job_id: std::env::var("SLURM_JOB_ID").ok().filter(|j| !j.is_empty()),
            lease_timeout,
            refresh_every: refresh_period(lease_timeout),
            force_lease: test_forces_lease(),
            folder_name: format!("{}/{}", cfg.output_dir.display(), cfg.name),
        }
    }
}

/// A few refreshes per lease, so that one slow write does not let the lease run out; every 5 s at most.
fn refresh_period(lease: Duration) -> Duration {
    (lease / 4).clamp(Duration::from_millis(50), Duration::from_secs(5))
}

fn test_forces_lease() -> bool {
    match std::env::var(TEST_MODE_VAR) {
        Ok(v) if v == "lease" => true,
        Ok(v) => {
            eprintln!("ferroclip: ignoring {TEST_MODE_VAR}=`{v}` (expected `lease`)");
            false
        }
        Err(_) => false,
    }
}

/// How the folder is held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// `flock` on the file: the kernel releases it when the process dies.
    Flock,
    /// A lease renewed by rewriting `refreshed`.
    Lease,
}

/// The folder, held. Dropping it stops the refresher and removes the lock file (if it still names
/// this process).
pub struct RunLock {
    shared: Arc<Shared>,
    refresher: Option<JoinHandle<()>>,
}

/// What the holder and its refresher thread share.
struct Shared {
    path: PathBuf,
    mode: Mode,
    /// The open lock file: in flock mode, what holds the lock (and whose inode is "ours").
    file: File,
    me: Mutex<Holder>,
    step: AtomicU64,
    /// False once the file names another process (a same-job takeover).
    owner: AtomicBool,
    stop: Mutex<bool>,
    wake: Condvar,
}

impl RunLock {
    /// Takes `run_dir` (creating it) for this process. A live holder: a [`ConfigError`] naming it
    /// (file = the lock file). I/O failures are other errors.
    pub fn acquire(run_dir: &Path, settings: &Settings) -> Result<RunLock> {
        std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let path = run_dir.join(FILE_NAME);
        let now = utc_now();
        let me = Holder {
            host: settings.host.clone(),
            pid: settings.pid,
            slurm_job_id: settings.slurm_job_id.clone(),
            step: 0,
            since: now.clone(),
            refreshed: now,
        };
        let (mode, file) = if settings.force_lease {
            (Mode::Lease, take_lease(&path, &me, settings)?)
        } else {
            match take_flock(&path, &me, settings)? {
                Some(file) => (Mode::Flock, file),
                None => (Mode::Lease, take_lease(&path, &me, settings)?),
            }
        };
        let shared = Arc::new(Shared {
            path,
            mode,
            file,
            me: Mutex::new(me),
            step: AtomicU64::new(0),
            owner: AtomicBool::new(true),
            stop: Mutex::new(false),
            wake: Condvar::new(),
        });
        let for_thread = shared.clone();
        let period = settings.refresh_every;
        let refresher = std::thread::Builder::new()
            .name("ferroclip-run-lock".into())
            .spawn(move || for_thread.refresh_until_stopped(period))
            .context("starting the run lock's refresher thread")?;
        Ok(RunLock { shared, refresher: Some(refresher) })
    }

    /// Publishes the last finished step; the next refresh writes it (an atomic store, nothing else).
    pub fn set_step(&self, step: u64) {
        self.shared.step.store(step, Ordering::Relaxed);
    }

    /// How the folder is held.
    pub fn mode(&self) -> Mode {
        self.shared.mode
    }

    /// The lock file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    /// False once another incarnation of this Slurm job has taken the folder over.
    pub fn is_owner(&self) -> bool {
        self.shared.owner.load(Ordering::Relaxed)
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        *self.shared.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        self.shared.wake.notify_all();
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        // Only our own file: after a takeover it is the new owner's. In flock mode the lock is still
        // held here, so nobody takes the file between the check and the removal; the lock itself goes
        // when `file` closes.
        if self.shared.owner.load(Ordering::Relaxed) && self.shared.still_ours().unwrap_or(false) {
            if let Err(e) = std::fs::remove_file(&self.shared.path) {
                eprintln!("ferroclip: warning: could not remove {}: {e}", self.shared.path.display());
            }
        }
    }
}

impl Shared {
    fn refresh_until_stopped(&self, period: Duration) {
        let mut stopped = self.stop.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            stopped = self.wake.wait_timeout(stopped, period).unwrap_or_else(|e| e.into_inner()).0;
            if *stopped {
                return;
            }
            match self.refresh() {
                Ok(true) => {}
                Ok(false) => {
                    self.owner.store(false, Ordering::Relaxed);
                    let now = read_holder(&self.path).map(|h| h.describe()).unwrap_or_else(|e| format!("{e:#}"));
                    eprintln!(
                        "ferroclip: warning: {} no longer names this process but {now}; this run no longer \
                         holds its folder and stopped refreshing the lock",
                        self.path.display()
                    );
                    return;
                }
                // A passing filesystem error: the next refresh tries again (a lease has several).
                Err(e) => eprintln!("ferroclip: warning: refreshing {}: {e:#}", self.path.display()),
            }
        }
    }

    /// Rewrites the file with the current step and time; false (and nothing written) when it no
    /// longer names this process.
    fn refresh(&self) -> Result<bool> {
        if !self.still_ours()? {
            return Ok(false);
        }
        let mut me = self.me.lock().unwrap_or_else(|e| e.into_inner());
        me.step = self.step.load(Ordering::Relaxed);
        me.refreshed = utc_now();
        match self.mode {
            Mode::Flock => write_in_place(&self.file, &me)?,
            Mode::Lease => {
                let tmp = write_temp(&self.path, &me)?;
                std::fs::rename(&tmp, &self.path).with_context(|| format!("replacing {}", self.path.display()))?;
            }
        }
        Ok(true)
    }

    /// Whether the path still is this process's lock: in flock mode the same inode as the locked file
    /// (a takeover renames a new file over it), in lease mode a file naming this process.
    fn still_ours(&self) -> Result<bool> {
        match self.mode {
            Mode::Flock => same_inode(&self.path, &self.file),
            Mode::Lease => {
                let me = self.me.lock().unwrap_or_else(|e| e.into_inner());
                match read_holder(&self.path) {
                    Ok(h) => Ok(h.same_process(&me)),
                    Err(e) if is_not_found(&e) => Ok(false),
                    Err(e) => Err(e),
                }
            }
        }
    }
}

/// The outcome of one `flock(LOCK_EX | LOCK_NB)`.
enum Flock {
    Taken,
    HeldByAnother,
    /// ENOLCK/EOPNOTSUPP/ENOSYS: this filesystem does not do `flock`.
    Unsupported(std::io::Error),
}

fn flock(file: &File) -> std::io::Result<Flock> {
    // SAFETY: flock on a file descriptor that `file` keeps open for the duration of the call.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(Flock::Taken);
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EWOULDBLOCK) => Ok(Flock::HeldByAnother),
        Some(libc::ENOLCK | libc::EOPNOTSUPP | libc::ENOSYS) => Ok(Flock::Unsupported(e)),
        _ => Err(e),
    }
}

/// Flock mode: the locked file, or `None` where the filesystem has no `flock` (use a lease).
fn take_flock(path: &Path, me: &Holder, settings: &Settings) -> Result<Option<File>> {
    for _ in 0..ATTEMPTS {
        let file = open_lock_file(path)?;
        match flock(&file).with_context(|| format!("flock on {}", path.display()))? {
            Flock::Unsupported(e) => {
                eprintln!(
                    "ferroclip: {} does not support flock ({e}); holding the run folder by a lease of \
                     dist.heartbeat_timeout_s = {} s instead",
                    path.display(),
                    settings.lease_timeout.as_secs()
                );
                return Ok(None);
            }
            Flock::Taken => {
                // The last holder removed the file while we waited for the lock: ours is an orphan.
                if !same_inode(path, &file)? {
                    continue;
                }
                let mut old = Vec::new();
                (&file).read_to_end(&mut old).with_context(|| format!("reading {}", path.display()))?;
                if let Ok(h) = serde_json::from_slice::<Holder>(&old) {
                    eprintln!(
                        "ferroclip: {} names {}, which no longer holds it (that process ended without \
                         releasing it); taking the run folder over",
                        path.display(),
                        h.describe()
                    );
                }
                write_in_place(&file, me)?;
                return Ok(Some(file));
            }
            Flock::HeldByAnother => {
                let holder = match read_holder(path) {
                    Ok(h) => h,
                    Err(e) if is_not_found(&e) => continue,
                    Err(e) => return Err(e),
                };
                if !me.same_job(&holder) {
                    return Err(refusal(path, &holder, settings));
                }
                warn_same_job(path, &holder);
                // The old incarnation keeps its lock on the old inode; a new file, locked before it
                // takes the name, is this run's.
                let tmp = write_temp(path, me)?;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&tmp)
                    .with_context(|| format!("opening {}", tmp.display()))?;
                match flock(&file).with_context(|| format!("flock on {}", tmp.display()))? {
                    Flock::Taken => {}
                    _ => bail!("could not lock the new lock file {}", tmp.display()),
                }
                std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
                return Ok(Some(file));
            }
        }
    }
    bail!("{}: other runs kept replacing it; could not take the run folder", path.display())
}

/// Lease mode: takes the file when it is absent, stale or this job's own; the open file.
fn take_lease(path: &Path, me: &Holder, settings: &Settings) -> Result<File> {
    for _ in 0..ATTEMPTS {
        let before = match std::fs::read(path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == ErrorKind::NotFound => {
                // Created whole under its name (a hard link fails if the name exists), so that two
                // runs starting at once cannot both believe they created it.
                let tmp = write_temp(path, me)?;
                let linked = std::fs::hard_link(&tmp, path);
                let _ = std::fs::remove_file(&tmp);
                match linked {
                    Ok(()) => return File::open(path).with_context(|| format!("opening {}", path.display())),
                    Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                    Err(e) => return Err(e).with_context(|| format!("creating {}", path.display())),
                }
            }
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        match serde_json::from_slice::<Holder>(&before) {
            Ok(holder) if me.same_job(&holder) => warn_same_job(path, &holder),
            Ok(holder) => match age(&holder.refreshed) {
                Some(age) if age < settings.lease_timeout => return Err(refusal(path, &holder, settings)),
                age => {
                    let age =
                        age.map(|a| format!("{} s ago", a.as_secs())).unwrap_or_else(|| "at an unknown time".into());
                    eprintln!(
                        "ferroclip: warning: {} names {}, refreshed {age}, longer ago than \
                         dist.heartbeat_timeout_s = {} s: taking the stale lease over",
                        path.display(),
                        holder.describe(),
                        settings.lease_timeout.as_secs()
                    );
                }
            },
            Err(e) => eprintln!("ferroclip: warning: {} is not a lock file ({e}); replacing it", path.display()),
        }
        let tmp = write_temp(path, me)?;
        // Another run may have taken it since it was read: decide again.
        if std::fs::read(path).ok().as_deref() != Some(before.as_slice()) {
            let _ = std::fs::remove_file(&tmp);
            continue;
        }
        std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
        return File::open(path).with_context(|| format!("opening {}", path.display()));
    }
    bail!("{}: other runs kept replacing it; could not take the run folder", path.display())
}

fn warn_same_job(path: &Path, old: &Holder) {
    eprintln!(
        "ferroclip: warning: {} is held by an earlier incarnation of this Slurm job ({}); taking it \
         over (a requeued job resumes its own run)",
        path.display(),
        old.describe()
    );
}

/// The refusal every rank reports: exit status 2, naming the holder and the folder.
fn refusal(path: &Path, holder: &Holder, settings: &Settings) -> anyhow::Error {
    anyhow::Error::new(ConfigError {
        file: path.display().to_string(),
        message: format!(
            "the run folder `{}` (output_dir/name) is in use by another run: {}. Two runs in one folder \
             would overwrite each other's checkpoints and logs: wait until it ends, stop it, or give \
             this run another `name`",
            settings.folder_name,
            holder.describe()
        ),
    })
}

/// True for the refusal [`RunLock::acquire`] returns (a [`ConfigError`] on the lock file).
pub fn is_refusal(e: &anyhow::Error) -> bool {
    e.downcast_ref::<ConfigError>().is_some_and(|c| Path::new(&c.file).file_name() == Some(FILE_NAME.as_ref()))
}

/// Rank 0's verdict, as it travels to the other ranks.
#[derive(Serialize, Deserialize)]
enum Verdict {
    Held,
    Refused { file: String, message: String },
    Failed(String),
}

/// Rank 0 takes `run_dir` (see [`RunLock::acquire`]) and tells every rank the outcome, so that on
/// refusal every rank returns the same [`ConfigError`] (exit status 2) instead of waiting for a
/// rank 0 that is gone. Collective: every rank calls it. `Some` on rank 0.
pub fn acquire_for_job(run_dir: &Path, settings: &Settings, control: &dyn Control) -> Result<Option<RunLock>> {
    let rank = control.rank();
    let (mine, verdict) = if rank == 0 {
        match RunLock::acquire(run_dir, settings) {
            Ok(lock) => (Ok(Some(lock)), Verdict::Held),
            Err(e) => {
                let v = match e.downcast_ref::<ConfigError>() {
                    Some(c) if is_refusal(&e) => Verdict::Refused { file: c.file.clone(), message: c.message.clone() },
                    _ => Verdict::Failed(format!("{e:#}")),
                };
                (Err(e), v)
            }
        }
    } else {
        (Ok(None), Verdict::Held)
    };
    let bytes =
        if rank == 0 { serde_json::to_vec(&verdict).context("encoding the run lock's outcome")? } else { Vec::new() };
    let verdict: Verdict = serde_json::from_slice(&control.broadcast_bytes(&bytes, 0))
        .with_context(|| format!("rank {rank}: decoding rank 0's run lock outcome"))?;
    if rank == 0 {
        return mine;
    }
    match verdict {
        Verdict::Held => Ok(None),
        Verdict::Refused { file, message } => Err(anyhow::Error::new(ConfigError { file, message })),
        Verdict::Failed(why) => Err(anyhow!("rank {rank}: rank 0 could not lock the run folder: {why}")),
    }
}

/// Opens (creating) the lock file for reading and writing, without truncating another's contents.
fn open_lock_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

fn same_inode(path: &Path, file: &File) -> Result<bool> {
    let mine = file.metadata().context("stat of the open lock file")?;
    match std::fs::metadata(path) {
        Ok(m) => Ok(m.ino() == mine.ino() && m.dev() == mine.dev()),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e).with_context(|| format!("stat of {}", path.display())),
    }
}

/// Overwrites the (locked) file itself: in flock mode the inode is the lock, so no rename.
fn write_in_place(file: &File, holder: &Holder) -> Result<()> {
    let bytes = serde_json::to_vec(holder).context("encoding the lock file")?;
    file.write_all_at(&bytes, 0).context("writing the lock file")?;
    file.set_len(bytes.len() as u64).context("writing the lock file")?;
    Ok(())
}

/// Writes `holder` to a file of this process's own beside `path`, to be renamed or linked into place.
fn write_temp(path: &Path, holder: &Holder) -> Result<PathBuf> {
    let tmp = path.with_file_name(format!("{FILE_NAME}.{}.{}.tmp", holder.host, holder.pid));
    let bytes = serde_json::to_vec(holder).context("encoding the lock file")?;
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    Ok(tmp)
}

/// The holder the file names. In flock mode a refresh may be half written: a few tries.
fn read_holder(path: &Path) -> Result<Holder> {
    let mut last = None;
    for _ in 0..10 {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        match serde_json::from_slice(&bytes) {
            Ok(h) => return Ok(h),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(anyhow!("{} is not a lock file: {}", path.display(), last.expect("at least one try")))
}

fn is_not_found(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>().is_some_and(|e| e.kind() == ErrorKind::NotFound)
}

/// How long ago `utc` was (zero if in the future: another host's clock); `None` if unreadable.
fn age(utc: &str) -> Option<Duration> {
    let t = parse_utc(utc)?;
    Some(SystemTime::now().duration_since(t).unwrap_or(Duration::ZERO))
}

fn utc_now() -> String {
    format_utc(SystemTime::now())
}

/// `t` as the lock file writes times: `2026-01-31T12:00:00.250Z` (RFC 3339, UTC, milliseconds, so
/// that a lease of a few seconds is not off by a whole one).
pub fn format_utc(t: SystemTime) -> String {
    let since_epoch = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
    let secs = since_epoch.as_secs();
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    let (y, m, d) = civil_from_days(days);
    let ms = since_epoch.subsec_millis();
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{ms:03}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// The inverse of [`format_utc`].
fn parse_utc(s: &str) -> Option<SystemTime> {
    let (date, time) = s.strip_suffix('Z')?.split_once('T')?;
    let num = |p: Option<&str>| p?.parse::<i64>().ok();
    let mut d = date.split('-');
    let (y, mo, day) = (num(d.next())?, num(d.next())?, num(d.next())?);
    let mut t = time.split(':');
    let (h, mi) = (num(t.next())?, num(t.next())?);
    let seconds = t.next()?;
    let (sec, ms) = match seconds.split_once('.') {
        // Milliseconds: the first three digits of the fraction.
        Some((s, frac)) if !frac.is_empty() && frac.bytes().all(|b| b.is_ascii_digit()) => {
            (num(Some(s))?, format!("{frac:0<3}")[..3].parse::<u64>().ok()?)
        }
        Some(_) => return None,
        None => (num(Some(seconds))?, 0),
    };
    if d.next().is_some() || t.next().is_some() || !(1..=12).contains(&mo) || !(1..=31).contains(&day) {
        return None;
    }
    let secs = days_from_civil(y, mo, day) * 86_400 + h * 3600 + mi * 60 + sec;
    Some(UNIX_EPOCH + Duration::from_secs(u64::try_from(secs).ok()?) + Duration::from_millis(ms))
}

// Days since 1970-01-01 to and from the proleptic Gregorian calendar: Howard Hinnant's
// `civil_from_days` / `days_from_civil` (http://howardhinnant.github.io/date_algorithms.html).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(pid: u32, job: Option<&str>, lease: bool) -> Settings {
        Settings {
            host: "node-a".into(),
            pid,
            slurm_job_id: job.map(String::from),
            lease_timeout: Duration::from_secs(2),
            refresh_every: Duration::from_millis(50),
            force_lease: lease,
            folder_name: "runs/exp".into(),
        }
    }

    fn on_disk(dir: &Path) -> Holder {
        read_holder(&dir.join(FILE_NAME)).unwrap()
    }

    fn refusal_text(e: anyhow::Error) -> String {
        assert!(is_refusal(&e), "not a refusal: {e:#}");
        format!("{e:#}")
    }

    #[test]
    fn a_second_holder_is_refused_until_the_first_releases() {
        for lease in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let run = dir.path().join("exp");
            let first = RunLock::acquire(&run, &settings(100, Some("7"), lease)).unwrap();
            assert_eq!(first.mode(), if lease { Mode::Lease } else { Mode::Flock });
            assert_eq!(on_disk(&run).pid, 100);
            let text = refusal_text(RunLock::acquire(&run, &settings(200, Some("8"), lease)).err().unwrap());
            assert!(text.contains("pid 100") && text.contains("host node-a") && text.contains("Slurm job 7"), "{text}");
            assert!(text.contains("`runs/exp`") && text.contains("another `name`"), "{text}");
            assert!(text.starts_with(&run.join(FILE_NAME).display().to_string()), "{text}");
            drop(first);
            assert!(!run.join(FILE_NAME).exists(), "the lock file outlived its holder");
            let second = RunLock::acquire(&run, &settings(200, Some("8"), lease)).unwrap();
            assert_eq!(on_disk(&run).pid, 200);
            drop(second);
        }
    }

    #[test]
    fn the_refresher_writes_the_published_step_and_time() {
        let dir = tempfile::tempdir().unwrap();
        let lock = RunLock::acquire(dir.path(), &settings(100, None, false)).unwrap();
        lock.set_step(42);
        std::thread::sleep(Duration::from_millis(300));
        let h = on_disk(dir.path());
        assert_eq!((h.step, h.pid, h.slurm_job_id), (42, 100, None));
        assert!(age(&h.refreshed).unwrap() < Duration::from_secs(5), "{}", h.refreshed);
        assert!(lock.is_owner());
    }

    /// Another run's lock file: pid 9 on node-b, refreshed now.
    fn node_b_holder() -> Holder {
        Holder { host: "node-b".into(), pid: 9, slurm_job_id: None, step: 3, since: utc_now(), refreshed: utc_now() }
    }

    #[test]
    fn a_lock_file_left_behind_is_taken_in_flock_mode() {
        // What a SIGKILLed holder leaves: the file, but no flock on it.
        let dir = tempfile::tempdir().unwrap();
        let stale = node_b_holder();
        std::fs::write(dir.path().join(FILE_NAME), serde_json::to_vec(&stale).unwrap()).unwrap();
        let lock = RunLock::acquire(dir.path(), &settings(100, None, false)).unwrap();
        assert_eq!(lock.mode(), Mode::Flock);
        assert_eq!(on_disk(dir.path()).pid, 100);
    }

    #[test]
    fn a_lease_expires_when_its_holder_stops_refreshing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(FILE_NAME);
        let mut dead = node_b_holder();
        std::fs::write(&path, serde_json::to_vec(&dead).unwrap()).unwrap();
        // Fresh: held (a lease of 2 s).
        let text = refusal_text(RunLock::acquire(dir.path(), &settings(100, None, true)).err().unwrap());
        assert!(text.contains("pid 9") && text.contains("host node-b"), "{text}");
        // The holder is gone: once its last refresh is older than the lease, the folder is free.
        std::thread::sleep(Duration::from_millis(3100));
        let lock = RunLock::acquire(dir.path(), &settings(100, None, true)).unwrap();
        assert_eq!(on_disk(dir.path()).pid, 100);
        drop(lock);
        dead.refreshed = format_utc(SystemTime::now() - Duration::from_secs(3600));
        std::fs::write(&path, serde_json::to_vec(&dead).unwrap()).unwrap();
        assert!(RunLock::acquire(dir.path(), &settings(100, None, true)).is_ok());
    }

    #[test]
    fn a_live_lease_holder_keeps_its_folder_past_the_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let _first = RunLock::acquire(dir.path(), &settings(100, None, true)).unwrap();
        std::thread::sleep(Duration::from_millis(3100));
        assert!(is_refusal(&RunLock::acquire(dir.path(), &settings(200, None, true)).err().unwrap()));
    }

    #[test]
    fn a_requeued_job_takes_its_own_lock_over_and_the_old_one_stops_refreshing() {
        for lease in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let old = RunLock::acquire(dir.path(), &settings(100, Some("55"), lease)).unwrap();
            let new = RunLock::acquire(dir.path(), &settings(200, Some("55"), lease)).unwrap();
            assert_eq!(on_disk(dir.path()).pid, 200);
            std::thread::sleep(Duration::from_millis(300));
            assert!(!old.is_owner(), "lease {lease}: the old incarnation still thinks it holds the folder");
            assert!(new.is_owner());
            assert_eq!(on_disk(dir.path()).pid, 200, "lease {lease}: the old incarnation overwrote the new one");
            drop(old);
            assert_eq!(on_disk(dir.path()).pid, 200, "lease {lease}: the old incarnation removed the new lock");
            // In flock mode the new file is locked too: a third run is refused.
            assert!(is_refusal(&RunLock::acquire(dir.path(), &settings(300, Some("56"), lease)).err().unwrap()));
            drop(new);
            assert!(!dir.path().join(FILE_NAME).exists());
        }
    }

    #[test]
    fn the_holder_description_names_everything() {
        let h = Holder {
            host: "gpu07".into(),
            pid: 4242,
            slurm_job_id: Some("1234".into()),
            step: 40,
            since: "2026-01-31T12:00:00Z".into(),
            refreshed: "2026-01-31T12:05:00Z".into(),
        };
        assert_eq!(
            h.describe(),
            "host gpu07, pid 4242, Slurm job 1234, since 2026-01-31T12:00:00Z (step 40, refreshed 2026-01-31T12:05:00Z)"
        );
        let alone = Holder { slurm_job_id: None, ..h };
        assert!(alone.describe().contains("no Slurm job"), "{}", alone.describe());
    }

    #[test]
    fn utc_times_round_trip() {
        assert_eq!(format_utc(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc(UNIX_EPOCH + Duration::from_millis(951_782_400_250)), "2000-02-29T00:00:00.250Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_796_731_199_007);
        assert_eq!(parse_utc(&format_utc(t)), Some(t));
        assert_eq!(parse_utc("2026-12-31T23:59:59Z"), Some(UNIX_EPOCH + Duration::from_secs(1_798_761_599)));
        assert_eq!(parse_utc("2026-12-31T23:59:59.5Z"), Some(UNIX_EPOCH + Duration::from_millis(1_798_761_599_500)));
        assert_eq!(parse_utc("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_utc("2026-12-01T00:00:00.Z"), None);
        assert_eq!(parse_utc("yesterday"), None);
    }

    #[test]
    fn every_rank_gets_rank_0s_refusal() {
        let dir = tempfile::tempdir().unwrap();
        let run = dir.path().join("exp");
        let _held = RunLock::acquire(&run, &settings(100, None, false)).unwrap();
        let handles: Vec<_> = crate::dist::control::tests::threads(3)
            .into_iter()
            .map(|t| {
                let run = run.clone();
                std::thread::spawn(move || {
                    acquire_for_job(&run, &settings(200, None, false), &t)
                        .err()
                        .map(|e| (is_refusal(&e), format!("{e:#}")))
                })
            })
            .collect();
        let outcomes: Vec<_> = handles.into_iter().map(|h| h.join().unwrap().expect("refused")).collect();
        assert!(outcomes.iter().all(|(refused, text)| *refused && text.contains("pid 100")), "{outcomes:?}");
        assert!(outcomes.windows(2).all(|w| w[0] == w[1]), "{outcomes:?}");
    }
}
