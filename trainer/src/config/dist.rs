//! `[dist]`: how the ranks of a job talk, and what ends a job that can no longer make progress.

use ferroclip_data::section::Range;
ferroclip_data::config_section! {
    /// `[dist]`
    pub struct DistConfig {
        /// Collectives for the training tensors: `"auto"` (NCCL on CUDA, Gloo on the CPU), `"nccl"`,
        /// `"gloo"`, or `"mpi"` (builds with the `mpi` feature). Control messages always take a host path.
        pub backend: Backend = Backend::Auto,
        /// Seconds the rendezvous, any collective or any store read may take before the job ends,
        /// naming the operation.
        pub timeout_s: u64 = 600 => Range::at_least(1.0),
        /// A rank whose heartbeat (every few seconds, through the job's store) stops for this long
        /// (stopped process, stuck I/O) ends the job, naming it.
        pub heartbeat_timeout_s: u64 = 60 => Range::at_least(1.0),
        /// End the job when a rank has not finished a step for this long, saying what it was doing
        /// (waiting for data, in a collective, writing a checkpoint, evaluating); 0: never. Counts
        /// set-up, evaluation and checkpoint writing too.
        pub step_timeout_s: u64 = 1800,
        /// Gradient all-reduce bucket size in MB (DDP's `bucket_cap_mb`).
        pub bucket_mb: f64 = 25.0 => Range::positive(),
        /// All-reduce each gradient bucket during backward, as soon as it is complete (same sums as
        /// without).
        pub overlap: bool = true,
        /// After a preemption checkpoint under an sbatch job, rank 0 requeues the job (`scontrol
        /// requeue`): `"sigusr1"` (on SIGUSR1, what `--signal=USR1@N` sends before the time limit),
        /// `"any"` (on SIGTERM too; `scancel` also sends SIGTERM), `"never"`.
        pub requeue: Requeue = Requeue::Sigusr1,
        /// For tests: device collectives refuse what NCCL would refuse on a GPU (tensors off the
        /// training device) and, since on the CPU the host is the device, integer, bool and byte
        /// tensors, which only control messages (flags, counters, cursors) use.
        pub strict_device: bool = false,
        /// For tests: every rank reads the one-process data stream with `data.batch_size` × world
        /// size and keeps its own slice, so a W-rank run sees exactly the batches of a one-process run.
        pub test_slices: bool = false,
    }
}

/// `dist.backend`
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Auto,
    Nccl,
    Gloo,
    Mpi,
}

/// `dist.requeue`
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Requeue {
    Sigusr1,
    Any,
    Never,
}

impl DistConfig {
    pub(crate) fn validate(&self) -> Result<(), String> {
        super::check_ranges("dist", self)?;
        if self.backend == Backend::Mpi && !cfg!(feature = "mpi") {
            return Err("key `dist.backend`: \"mpi\" needs a trainer built with `--features mpi`".into());
        }
        Ok(())
    }
}
