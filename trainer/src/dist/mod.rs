//! Collectives across ranks. The trainer talks to a [`Collective`]; backends are
//! [`single`] (one process), MPI and NCCL.

use tch::Tensor;

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
}
