//! Ends a job that can no longer make progress, naming the rank, instead of letting it hang until
//! Slurm's time limit (a stopped process, a stuck filesystem read, a wedged GPU all look alike: a rank
//! that stops answering while the others wait in their next collective).
//!
//! Three checks run on threads of their own, beside the training loop:
//! - **heartbeats**: every rank writes `hb/{rank}` to the job's store every few seconds; rank 0 reads
//!   them and, when one has not changed for `dist.heartbeat_timeout_s`, ends the job naming that rank.
//!   A rank that cannot reach the store (rank 0 itself stopped) for as long ends itself.
//! - **the abort notice**: a rank that fails sets `abort` in the store ([`super::fail_fast`]); every
//!   rank polls it each second and exits with that message, so a set-up failure on one rank ends the
//!   job in seconds even where the launcher does not kill the others.
//! - **progress**: a rank that has not finished a step for `dist.step_timeout_s` ends the job and says
//!   what it was doing ([`Phase`]: waiting for data, in a collective, writing a checkpoint, ...).
//!
//! The training loop only updates a few atomics ([`set_phase`], [`enter`], [`step_done`]).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::c10d::Store;
use super::fail_fast;

/// What this rank is doing, for the progress watchdog's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    SettingUp = 0,
    WaitingForData,
    Computing,
    InCollective,
    WritingCheckpoint,
    Evaluating,
    Finishing,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            1 => Phase::WaitingForData,
            2 => Phase::Computing,
            3 => Phase::InCollective,
            4 => Phase::WritingCheckpoint,
            5 => Phase::Evaluating,
            6 => Phase::Finishing,
            _ => Phase::SettingUp,
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            Phase::SettingUp => "setting up",
            Phase::WaitingForData => "waiting for data",
            Phase::Computing => "computing (forward/backward/optimizer)",
            Phase::InCollective => "in a collective",
            Phase::WritingCheckpoint => "writing a checkpoint",
            Phase::Evaluating => "evaluating",
            Phase::Finishing => "finishing",
        }
    }
}

/// Which collective, while [`Phase::InCollective`].
static COLLECTIVE: OnceLock<std::sync::Mutex<&'static str>> = OnceLock::new();
static PHASE: AtomicU8 = AtomicU8::new(Phase::SettingUp as u8);
static STEP: AtomicU64 = AtomicU64::new(0);
/// Milliseconds since [`clock`]'s start at the last finished step (or the start of the loop).
static PROGRESS_AT: AtomicU64 = AtomicU64::new(0);

fn clock() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

pub fn set_phase(p: Phase) {
    PHASE.store(p as u8, Ordering::Relaxed);
}

pub fn phase() -> Phase {
    Phase::from_u8(PHASE.load(Ordering::Relaxed))
}

/// Marks the end of optimizer step `step` (or, with the step reached so far, the start of the loop).
pub fn step_done(step: u64) {
    STEP.store(step, Ordering::Relaxed);
    PROGRESS_AT.store(clock(), Ordering::Relaxed);
}

/// Restores the previous phase when dropped.
pub struct PhaseGuard(u8);

impl Drop for PhaseGuard {
    fn drop(&mut self) {
        PHASE.store(self.0, Ordering::Relaxed);
    }
}

/// Enters `p` until the guard drops; `collective` names the operation for [`Phase::InCollective`].
pub fn enter(p: Phase, collective: &'static str) -> PhaseGuard {
    if p == Phase::InCollective {
        *COLLECTIVE.get_or_init(Default::default).lock().unwrap_or_else(|e| e.into_inner()) = collective;
    }
    PhaseGuard(PHASE.swap(p as u8, Ordering::Relaxed))
}

/// "in a collective (all_gather) at step 12": this rank's phase, for messages.
pub fn what_now() -> String {
    let p = phase();
    let what = if p == Phase::InCollective {
        let op = COLLECTIVE.get().map(|m| *m.lock().unwrap_or_else(|e| e.into_inner())).unwrap_or("?");
        format!("{} ({op})", p.describe())
    } else {
        p.describe().to_string()
    };
    format!("{what} after step {}", STEP.load(Ordering::Relaxed))
}

/// Time limits of the watchdog.
#[derive(Debug, Clone)]
pub struct Limits {
    pub heartbeat_timeout: Duration,
    /// `None`: no progress watchdog.
    pub step_timeout: Option<Duration>,
    /// Where the store is, for the "lost the store" message.
    pub store_addr: String,
}

/// The running watchdog threads; [`Watchdog::stop`] them before the job's last barrier returns.
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

/// Starts the heartbeat and monitor threads of `rank`, each on its own client of `store`.
pub fn start(store: &Store, rank: usize, world: usize, limits: Limits) -> anyhow::Result<Watchdog> {
    let stop = Arc::new(AtomicBool::new(false));
    let last_store_ok = Arc::new(AtomicU64::new(clock()));
    step_done(0);
    let hb_store = store.clone_client()?;
    hb_store.set_timeout(limits.heartbeat_timeout)?;
    let mon_store = store.clone_client()?;
    mon_store.set_timeout(Duration::from_secs(5))?;
    hb_store.set(&format!("hb/{rank}"), &heartbeat_value(0))?;
    let tick = Duration::from_millis(200);
    let beat_every = (limits.heartbeat_timeout / 10).clamp(Duration::from_millis(200), Duration::from_secs(5));

    let heartbeat = {
        let (stop, last_ok, limits) = (stop.clone(), last_store_ok.clone(), limits.clone());
        std::thread::Builder::new().name("ferroclip-heartbeat".into()).spawn(move || {
            let mut seen: Vec<(Vec<u8>, Instant)> = vec![(Vec::new(), Instant::now()); world];
            let (mut n, mut next_beat, mut next_abort_check) = (0u64, Instant::now(), Instant::now());
            while !stop.load(Ordering::Relaxed) {
                let now = Instant::now();
                if now >= next_abort_check {
                    next_abort_check = now + Duration::from_secs(1);
                    if let Ok(true) = hb_store.contains(fail_fast::ABORT_KEY) {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let why = hb_store.get(fail_fast::ABORT_KEY).map(|v| String::from_utf8_lossy(&v).into_owned());
                        fail_fast::die(&format!("ending the job: {}", why.unwrap_or_else(|e| e.0)));
                    }
                }
                if now >= next_beat {
                    next_beat = now + beat_every;
                    n += 1;
                    if hb_store.set(&format!("hb/{rank}"), &heartbeat_value(n)).is_ok() {
                        last_ok.store(clock(), Ordering::Relaxed);
                    }
                    if rank == 0 {
                        check_peers(&hb_store, &mut seen, &limits, &stop);
                    }
                }
                std::thread::sleep(tick);
            }
        })?
    };

    let monitor = {
        let (stop, last_ok, limits) = (stop.clone(), last_store_ok, limits);
        std::thread::Builder::new().name("ferroclip-watchdog".into()).spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                std::thread::sleep(tick);
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let now = clock();
                let silent = Duration::from_millis(now.saturating_sub(last_ok.load(Ordering::Relaxed)));
                if silent > limits.heartbeat_timeout {
                    fail_fast::die(&format!(
                        "no answer from the job's store on rank 0 ({}) for {} s (dist.heartbeat_timeout_s): \
                         rank 0 stopped responding or the network is down",
                        limits.store_addr,
                        silent.as_secs()
                    ));
                }
                if let Some(limit) = limits.step_timeout {
                    let idle = Duration::from_millis(now.saturating_sub(PROGRESS_AT.load(Ordering::Relaxed)));
                    if idle > limit {
                        fail_fast::abort_job(&format!(
                            "no step finished for {} s (dist.step_timeout_s): this rank is {}{}",
                            idle.as_secs(),
                            what_now(),
                            others_not_in_collectives(&mon_store, rank, world)
                        ));
                    }
                }
            }
        })?
    };
    Ok(Watchdog { stop, threads: vec![heartbeat, monitor] })
}

/// `"{beat} {step} {phase}"`: changes with every beat; says where the rank is.
fn heartbeat_value(beat: u64) -> Vec<u8> {
    format!("{beat} {} {}", STEP.load(Ordering::Relaxed), PHASE.load(Ordering::Relaxed)).into_bytes()
}

/// `"; rank 1 is waiting for data after step 12"`: the other ranks that are not waiting in a collective
/// (the likely culprits when this rank is), from their last heartbeats; at most eight.
fn others_not_in_collectives(store: &Store, rank: usize, world: usize) -> String {
    let mut out = String::new();
    let mut named = 0;
    for r in (0..world).filter(|&r| r != rank) {
        let key = format!("hb/{r}");
        let Ok(Some(v)) = store.contains(&key).and_then(|p| if p { store.get(&key).map(Some) } else { Ok(None) })
        else {
            continue;
        };
        let text = String::from_utf8_lossy(&v).into_owned();
        let mut f = text.split(' ').skip(1);
        let (step, phase) = (f.next().unwrap_or("?"), f.next().and_then(|p| p.parse::<u8>().ok()).map(Phase::from_u8));
        if let Some(p) = phase.filter(|p| *p != Phase::InCollective) {
            if named < 8 {
                out.push_str(&format!("; rank {r} is {} after step {step}", p.describe()));
            }
            named += 1;
        }
    }
    if named > 8 {
        out.push_str(&format!("; and {} more ranks not in a collective", named - 8));
    }
    out
}

/// Rank 0: end the job when a rank's heartbeat has not changed for the limit.
fn check_peers(store: &Store, seen: &mut [(Vec<u8>, Instant)], limits: &Limits, stop: &AtomicBool) {
    let now = Instant::now();
    for (r, (last, since)) in seen.iter_mut().enumerate().skip(1) {
        let key = format!("hb/{r}");
        match store.contains(&key).and_then(|present| if present { store.get(&key).map(Some) } else { Ok(None) }) {
            Ok(Some(v)) if v != *last => {
                *last = v;
                *since = now;
            }
            Ok(_) => {}
            // The store is this process: a failure here is not the peer's.
            Err(_) => continue,
        }
        let silent = now.duration_since(*since);
        if silent > limits.heartbeat_timeout && !stop.load(Ordering::Relaxed) {
            let text = String::from_utf8_lossy(last).into_owned();
            let mut f = text.split(' ').skip(1);
            let (step, phase) = (f.next().unwrap_or("?"), f.next().and_then(|p| p.parse::<u8>().ok()));
            let doing = phase.map(|p| Phase::from_u8(p).describe()).unwrap_or("not started");
            fail_fast::end_job(&format!(
                "rank {r} stopped responding: no heartbeat for {} s (dist.heartbeat_timeout_s); its last one said \
                 it was {doing} after step {step}",
                silent.as_secs()
            ));
        }
    }
}

impl Watchdog {
    /// Stops the threads (waiting up to two seconds for them: one may be inside a store call that
    /// fails slowly once rank 0's store has gone).
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(2);
        for t in self.threads {
            while !t.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_nest_and_describe_the_collective() {
        set_phase(Phase::Computing);
        step_done(4);
        {
            let _g = enter(Phase::InCollective, "all_gather");
            assert_eq!(phase(), Phase::InCollective);
            assert_eq!(what_now(), "in a collective (all_gather) after step 4");
        }
        assert_eq!(phase(), Phase::Computing);
        assert_eq!(String::from_utf8(heartbeat_value(9)).unwrap(), format!("9 4 {}", Phase::Computing as u8));
    }
}
