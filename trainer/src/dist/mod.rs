//! Collectives across ranks. The trainer talks to a [`Collective`]; backends are
//! [`single`] (one process), [`mpi`] (CPU tensors, CUDA staged through the host) and [`nccl`]
//! (CUDA tensors). [`env`] says which rank this process is; [`fail_fast`] and [`preempt`] keep a
//! job from hanging when one rank fails or is asked to stop.

use tch::Tensor;

pub mod env;
pub mod fail_fast;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod preempt;
pub mod selftest;
pub mod single;

/// The collective operations the trainer needs. Tensors are contiguous; results are in rank order.
pub trait Collective {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// Sum `t` over all ranks, in place.
    fn all_reduce_sum(&self, t: &mut Tensor);
    /// Concatenate every rank's `t` along dim 0, in rank order (shapes equal on all ranks).
    fn all_gather(&self, t: &Tensor) -> Tensor;
    /// Overwrite `t` with rank `root`'s value.
    fn broadcast(&self, t: &mut Tensor, root: usize);
    fn barrier(&self);
    /// Stop the whole job now with exit status `code` (MPI_Abort for MPI-based backends), so that
    /// the other ranks do not wait forever in their next collective. One process just exits.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
