//! The one-process backend: every collective and every control message is the identity.

use tch::Tensor;

use super::{Collective, Control};

#[derive(Debug, Default, Clone, Copy)]
pub struct Single;

impl Collective for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_reduce_sum(&self, _t: &mut Tensor) {}
    fn all_gather(&self, t: &Tensor) -> Tensor {
        t.shallow_clone()
    }
    fn broadcast(&self, _t: &mut Tensor, _root: usize) {}
    fn barrier(&self) {}
    fn reduce_scatter_sum(&self, t: &Tensor) -> Tensor {
        t.shallow_clone()
    }
}

impl Control for Single {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        1
    }
    fn all_gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        vec![bytes.to_vec()]
    }
    fn broadcast_bytes(&self, bytes: &[u8], _root: usize) -> Vec<u8> {
        bytes.to_vec()
    }
}
