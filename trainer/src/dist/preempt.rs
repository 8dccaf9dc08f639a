//! Preemption: Slurm sends SIGTERM (or SIGUSR1 with `--signal=USR1@120`) before it kills or
//! requeues a job. The signal only sets a flag; the training loop finishes its step, agrees with
//! the other ranks through [`any_rank`] (a rank that saw the signal must not checkpoint alone),
//! writes a checkpoint and exits, so a requeued job resumes with `resume = "latest"`.

use std::io;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use tch::{Device, Kind, Tensor};

use super::Collective;

/// The signals that ask the job to stop.
pub const STOP_SIGNALS: [i32; 2] = [signal_hook::consts::SIGTERM, signal_hook::consts::SIGUSR1];

/// Returns a flag that becomes `true` when this process receives SIGTERM or SIGUSR1. The signals
/// no longer terminate the process: the loop must check the flag.
pub fn install_signal_flag() -> io::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in STOP_SIGNALS {
        signal_hook::flag::register(sig, Arc::clone(&flag))?;
    }
    Ok(flag)
}

/// True on every rank when `flag` is true on at least one rank (an all-reduce of the flags).
/// A collective call: every rank must call it at the same point of the loop.
pub fn any_rank(flag: bool, collective: &dyn Collective) -> bool {
    if collective.world_size() == 1 {
        return flag;
    }
    let mut t = Tensor::from_slice(&[flag as i64]).to_kind(Kind::Int64).to_device(Device::Cpu);
    collective.all_reduce_sum(&mut t);
    t.int64_value(&[0]) > 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::single::Single;
    use std::sync::atomic::Ordering;

    #[test]
    fn sigusr1_and_sigterm_set_the_flag_instead_of_killing() {
        let flag = install_signal_flag().unwrap();
        assert!(!flag.load(Ordering::SeqCst));
        signal_hook::low_level::raise(signal_hook::consts::SIGUSR1).unwrap();
        assert!(flag.load(Ordering::SeqCst));
        flag.store(false, Ordering::SeqCst);
        signal_hook::low_level::raise(signal_hook::consts::SIGTERM).unwrap();
        assert!(flag.load(Ordering::SeqCst));
    }

    #[test]
    fn one_process_agrees_with_itself() {
        assert!(any_rank(true, &Single));
        assert!(!any_rank(false, &Single));
    }
}
