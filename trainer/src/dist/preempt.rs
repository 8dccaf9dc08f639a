//! Preemption: Slurm sends SIGUSR1 (with `--signal=USR1@120`) before the time limit, SIGTERM when it
//! cancels or preempts a job. The signal only sets a flag; the training loop finishes its step, agrees
//! with the other ranks through [`any_rank`] (a rank that saw the signal must not checkpoint alone),
//! writes a checkpoint and exits. Under an sbatch job rank 0 then requeues the job itself
//! ([`requeue_job`]: `--requeue` alone only covers node failures and admin requeues), and the requeued
//! job resumes with `resume = "latest"`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};

use super::Control;
use crate::config::Requeue;

/// The signals that ask the job to stop.
pub const STOP_SIGNALS: [i32; 2] = [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1];

/// Set by SIGUSR1 alone, to tell "stop before the time limit" from "stop, cancelled".
static USR1: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// Returns a flag that becomes `true` when this process receives SIGTERM or SIGUSR1. The signals
/// no longer terminate the process: the loop must check the flag.
pub fn install_signal_flag() -> io::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in STOP_SIGNALS {
        signal_hook::flag::register(sig, Arc::clone(&flag))?;
    }
    let usr1 = USR1.get_or_init(|| Arc::new(AtomicBool::new(false)));
    signal_hook::flag::register(signal_hook::consts::SIGUSR1, Arc::clone(usr1))?;
    Ok(flag)
}

/// True on every rank when `flag` is true on at least one rank. A control message: every rank must
/// call it at the same point of the loop.
pub fn any_rank(flag: bool, control: &dyn Control) -> bool {
    if control.world_size() == 1 {
        return flag;
    }
    control.any(flag)
}

/// Whether the signal that stopped this rank asks for a requeue under `policy` (`dist.requeue`).
pub fn requeue_wanted(policy: Requeue) -> bool {
    let usr1 = USR1.get().is_some_and(|f| f.load(Ordering::Relaxed));
    match policy {
        Requeue::Never => false,
        Requeue::Sigusr1 => usr1,
        Requeue::Any => true,
    }
}

/// `scontrol requeue $SLURM_JOB_ID`: the job goes back to the queue and, once it starts again,
/// resumes from the checkpoint just written. Returns the job id.
pub fn requeue_job() -> Result<String> {
    let Ok(job) = std::env::var("SLURM_JOB_ID") else {
        bail!("not a Slurm job (no SLURM_JOB_ID): nothing to requeue");
    };
    let out = std::process::Command::new("scontrol")
        .args(["requeue", &job])
        .output()
        .context("running `scontrol requeue` (is Slurm's scontrol on PATH?)")?;
    if !out.status.success() {
        bail!(
            "`scontrol requeue {job}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            if String::from_utf8_lossy(&out.stderr).contains("batch") { "" } else { " (only sbatch jobs can be requeued)" }
        );
    }
    Ok(job)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::single::Single;

    #[test]
    fn sigusr1_and_sigterm_set_the_flag_instead_of_killing() {
        let flag = install_signal_flag().unwrap();
        assert!(!flag.load(Ordering::SeqCst));
        signal_hook::low_level::raise(signal_hook::consts::SIGTERM).unwrap();
        assert!(flag.load(Ordering::SeqCst));
        assert!(!requeue_wanted(Requeue::Sigusr1), "SIGTERM alone does not requeue by default");
        assert!(requeue_wanted(Requeue::Any));
        flag.store(false, Ordering::SeqCst);
        signal_hook::low_level::raise(signal_hook::consts::SIGUSR1).unwrap();
        assert!(flag.load(Ordering::SeqCst));
        assert!(requeue_wanted(Requeue::Sigusr1));
        assert!(!requeue_wanted(Requeue::Never));
    }

    #[test]
    fn one_process_agrees_with_itself() {
        assert!(any_rank(true, &Single));
        assert!(!any_rank(false, &Single));
    }
}
