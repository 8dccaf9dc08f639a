//! Fail fast: when one rank fails, the whole job stops within seconds instead of the other ranks
//! waiting forever in their next collective. The failing rank prints its error, posts it as the
//! job's abort notice in the store (every rank's watchdog polls it and exits with the message, see
//! [`super::watchdog`]) and exits non-zero, which also makes `srun --kill-on-bad-exit=1` and `mpirun`
//! end the other ranks.

use std::fmt::Display;
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use super::c10d::Store;
use super::Collective;

/// The store key of the abort notice: why the job ends (`"rank 1 of 3 failed: ..."`).
pub const ABORT_KEY: &str = "abort";

struct Job {
    rank: usize,
    world: usize,
    /// A client of the job's store used only to post the notice.
    store: Mutex<Option<Store>>,
}

static JOB: OnceLock<Job> = OnceLock::new();

/// Registers this process as `rank` of a `world`-rank job whose store `store` is (a client of its own).
pub fn register(rank: usize, world: usize, store: Store) {
    let _ = JOB.set(Job { rank, world, store: Mutex::new(Some(store)) });
}

fn who() -> String {
    match JOB.get() {
        Some(j) => format!("rank {} of {}", j.rank, j.world),
        None => "rank 0 of 1".into(),
    }
}

/// Prints `error on rank R of W: {message}` and ends this process at once (status 1), without
/// running destructors that could wait for peers.
pub fn die(message: &str) -> ! {
    let _ = writeln!(std::io::stderr(), "error on {}: {message}", who());
    let _ = std::io::stdout().flush();
    linger_if_store_host();
    // SAFETY: _exit ends the process; nothing after it runs.
    unsafe { libc::_exit(1) }
}

/// How long rank 0, which serves the job's store, keeps serving after the job's end is decided: the
/// other ranks' watchdogs poll the abort notice every second, and one that finds the store gone
/// instead would wait out `dist.heartbeat_timeout_s` (or hang in a collective) before it ends.
const STORE_LINGER: Duration = Duration::from_millis(2500);

fn linger_if_store_host() {
    if let Some(j) = JOB.get() {
        if j.rank == 0 && j.world > 1 {
            std::thread::sleep(STORE_LINGER);
        }
    }
}

/// This rank failed: posts `rank R of W failed: {message}` as the job's abort notice (when this process
/// is part of a job; waiting at most three seconds for the store), then [`die`]s. When another rank
/// has posted a notice already, this failure is most likely its consequence (a collective that lost
/// that rank): the notice is what this rank reports.
pub fn abort_job(message: &str) -> ! {
    if let Some(notice) = posted_notice() {
        die(&format!("ending the job: {notice} (here: {message})"));
    }
    post_abort(&format!("{} failed: {message}", who()));
    die(message)
}

/// The abort notice another rank posted, if any (asking the store for at most two seconds).
fn posted_notice() -> Option<String> {
    let job = JOB.get()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("ferroclip-abort".into())
        .spawn(move || {
            let notice = job.store.lock().ok().and_then(|guard| {
                let store = guard.as_ref()?;
                match store.contains(ABORT_KEY) {
                    Ok(true) => store.get(ABORT_KEY).ok().map(|v| String::from_utf8_lossy(&v).into_owned()),
                    _ => None,
                }
            });
            let _ = tx.send(notice);
        })
        .ok()?;
    rx.recv_timeout(Duration::from_secs(2)).ok().flatten()
}

/// This rank saw that the job cannot go on (`reason` names the rank at fault): posts `reason` as the
/// abort notice, then [`die`]s.
pub fn end_job(reason: &str) -> ! {
    post_abort(reason);
    die(reason)
}

fn post_abort(notice: &str) {
    let Some(job) = JOB.get() else { return };
    let notice = notice.to_string();
    let (tx, rx) = std::sync::mpsc::channel();
    let spawned = std::thread::Builder::new().name("ferroclip-abort".into()).spawn(move || {
        if let Ok(guard) = job.store.lock() {
            if let Some(store) = guard.as_ref() {
                if !store.contains(ABORT_KEY).unwrap_or(false) {
                    let _ = store.set(ABORT_KEY, notice.as_bytes());
                }
            }
        }
        let _ = tx.send(());
    });
    if spawned.is_ok() {
        let _ = rx.recv_timeout(Duration::from_secs(3));
    }
}

/// Unwraps `result`, or prints `error on rank R: ...` (with the whole context chain), posts the
/// abort notice and ends the job with exit status 1.
pub fn exit_on_error<T, E: Display>(collective: &dyn Collective, result: Result<T, E>) -> T {
    match result {
        Ok(v) => v,
        Err(e) => {
            let message = format!("{e:#}");
            if JOB.get().is_some() {
                abort_job(&message);
            }
            eprintln!("error on rank {} of {}: {message}", collective.rank(), collective.world_size());
            collective.abort(1)
        }
    }
}

/// For `main`'s error path: prints `error on rank R of W: {message}` (`error: ...` outside a job) and,
/// in a multi-rank job, posts the abort notice so that the other ranks stop now (the caller then exits
/// with its own status).
pub fn report_failure(message: &str) {
    if JOB.get().is_some() {
        eprintln!("error on {}: {message}", who());
        post_abort(&format!("{} failed: {message}", who()));
        linger_if_store_host();
    } else {
        eprintln!("error: {message}");
    }
}

/// Makes a panic on any thread an error like any other. A panic is a bug (no input should reach
/// one), but when one happens the rank still ends through the failure path rather than with a
/// hung peer or a signal: after the default hook's message (and backtrace, with `RUST_BACKTRACE`),
/// `error on rank R of W: internal error: panic at FILE:LINE: MESSAGE` ([`report_failure`], which
/// also posts the abort notice that stops the other ranks; MPI_Abort under the `mpi` backend),
/// then exit status 1. Panics caught on purpose (a bad sample's decoder inside
/// `ferroclip_data::guard`) never reach this hook. Call once, first thing in `main`.
pub fn install_panic_hook() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        let what = ferroclip_data::guard::panic_message(info.payload());
        let at = info.location().map(|l| format!(" at {}:{}", l.file(), l.line())).unwrap_or_default();
        report_failure(&format!("internal error: panic{at}: {what}"));
        #[cfg(feature = "mpi")]
        super::mpi::abort_world_if_initialized(1);
        // SAFETY: ends the process; other threads may be inside collectives that would never return.
        unsafe { libc::_exit(1) }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::single::Single;

    #[test]
    fn ok_values_pass_through() {
        assert_eq!(exit_on_error(&Single, Ok::<_, String>(7)), 7);
    }
}
