//! Preemption: Slurm sends SIGUSR1 (with `--signal=USR1@120`) before the time limit, SIGTERM when it
//! cancels or preempts a job. The signal only sets a flag; the training loop finishes its step, agrees
//! with the other ranks on when to stop ([`StopVote`]: a rank that saw the signal must not checkpoint
//! alone), writes a checkpoint and exits. Under an sbatch job rank 0 then requeues the job itself
//! ([`requeue_job`]: `--requeue` alone only covers node failures and admin requeues), and the requeued
//! job resumes with `resume = "latest"`.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context, Result};

use super::c10d::Store;
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

/// When to stop, agreed through the job's store at the cost of one key lookup per rank and step (a
/// collective vote would cost a ring of all ranks every step). The first rank that sees a signal after
/// step `s` proposes to stop after step `s + 2`; every rank checks for a proposal after each step. Each
/// step's collectives order every rank's step `s + 1` after the proposal, so all ranks have seen it by
/// the end of step `s + 1` and stop after the same step.
pub struct StopVote {
    store: Option<Store>,
    proposed: bool,
    stop_after: Option<u64>,
}

const STOP_AT_KEY: &str = "stop/after_step";
const STOP_VOTES_KEY: &str = "stop/votes";

impl StopVote {
    /// `store`: the job's store (`None` for one process: a signal then stops after the current step).
    pub fn new(store: Option<Store>) -> Self {
        StopVote { store, proposed: false, stop_after: None }
    }

    /// Call on every rank after each step `step`, with this rank's signal flag: true when the job
    /// stops after this step.
    pub fn stop_now(&mut self, step: u64, signalled: bool) -> Result<bool> {
        let Some(store) = &self.store else { return Ok(signalled) };
        if signalled && !self.proposed {
            self.proposed = true;
            if store.add(STOP_VOTES_KEY, 1)? == 1 {
                store.set(STOP_AT_KEY, (step + 2).to_string().as_bytes())?;
            }
        }
        if self.stop_after.is_none() && store.contains(STOP_AT_KEY)? {
            let v = store.get(STOP_AT_KEY)?;
            let at: u64 =
                String::from_utf8_lossy(&v).parse().context("a malformed stop proposal in the job's store")?;
            if at < step {
                bail!("the ranks' stop proposal for step {at} arrived at step {step}: ranks are out of step");
            }
            self.stop_after = Some(at);
        }
        Ok(self.stop_after == Some(step))
    }
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
            if String::from_utf8_lossy(&out.stderr).contains("batch") {
                ""
            } else {
                " (only sbatch jobs can be requeued)"
            }
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
    fn all_ranks_stop_after_the_same_step_two_steps_after_the_first_signal() {
        let store = Store::hash().unwrap();
        let mut a = StopVote::new(Some(store.clone_client().unwrap()));
        let mut b = StopVote::new(Some(store.clone_client().unwrap()));
        let mut c = StopVote::new(Some(store));
        // Step 5: rank a is signalled; rank b (later in step 5) sees the proposal at once, rank c only
        // at the end of step 6; rank b is signalled too at step 6 (no second proposal).
        assert!(!a.stop_now(5, true).unwrap());
        assert!(!b.stop_now(5, false).unwrap());
        assert!(!b.stop_now(6, true).unwrap());
        assert!(!c.stop_now(6, false).unwrap());
        assert!(!a.stop_now(6, true).unwrap());
        assert_eq!(
            [a.stop_now(7, true).unwrap(), b.stop_now(7, false).unwrap(), c.stop_now(7, false).unwrap()],
            [true; 3]
        );
        // One process: the signal stops it after the current step.
        assert!(StopVote::new(None).stop_now(3, true).unwrap());
        assert!(!StopVote::new(None).stop_now(3, false).unwrap());
    }

    #[test]
    fn one_process_agrees_with_itself() {
        assert!(any_rank(true, &Single));
        assert!(!any_rank(false, &Single));
    }
}
