//! The gradient all-reduce, in buckets, overlapped with backward as DDP does it
//! (`torch.nn.parallel.DistributedDataParallel`, `bucket_cap_mb` 25).
//!
//! The gradients are views into AdamW's flat buffers ([`crate::optim::AdamW::grad_layout`]); a bucket is
//! a contiguous slice of one buffer, at most `dist.bucket_mb`, cut at parameter boundaries. The
//! buffers are laid out in the order backward completes the gradients ([`gradient_ready_order`]), so
//! the first buckets fill first. With a c10d process group and `dist.overlap`, a hook on every
//! parameter all-reduces its bucket as soon as the bucket's last gradient is accumulated during the
//! step's last backward pass (`csrc/grad_buckets.cpp`); [`GradSync::finish`] starts the rest and waits.
//! Without overlap the same buckets are all-reduced after backward, so the sums are bit for bit the same.

use anyhow::Result;
use tch::{nn::VarStore, Tensor};

use super::c10d;
use super::watchdog::{self, Phase};
use super::{fail_fast, Collective};
use crate::optim::AdamW;

/// Sums the gradients of an [`AdamW`]'s parameters over ranks, bucket by bucket.
pub struct GradSync {
    buckets: Vec<Tensor>,
    hooks: Option<c10d::GradBuckets>,
    overlap: bool,
    early: usize,
}

impl GradSync {
    /// Buckets of at most `bucket_mb` MB over `opt`'s gradient buffers, in buffer order. Hooks are
    /// installed when `collective` has a c10d process group and more than one rank.
    pub fn new(opt: &AdamW, collective: &dyn Collective, bucket_mb: f64, overlap: bool) -> Result<Self> {
        let cap = (bucket_mb * 1024.0 * 1024.0) as i64;
        let mut buckets = Vec::new();
        let mut params = Vec::new();
        let mut bucket_of = Vec::new();
        for (flat, members) in opt.grad_layout() {
            let elt = flat.kind().elt_size_in_bytes() as i64;
            let (mut start, mut len) = (0i64, 0i64);
            for (param, offset, numel) in members {
                debug_assert_eq!(offset, start + len, "flat buffers are dense");
                if len > 0 && (len + numel) * elt > cap {
                    buckets.push(flat.narrow(0, start, len));
                    start += len;
                    len = 0;
                }
                len += numel;
                params.push(param);
                bucket_of.push(buckets.len() as i64);
            }
            if len > 0 {
                buckets.push(flat.narrow(0, start, len));
            }
        }
        let hooks = match collective.process_group() {
            Some(group) if collective.world_size() > 1 => {
                Some(c10d::GradBuckets::new(group, &buckets, &params, &bucket_of)?)
            }
            _ => None,
        };
        Ok(GradSync { buckets, hooks, overlap, early: 0 })
    }

    /// Number of buckets.
    pub fn len(&self) -> usize {
        self.buckets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buckets.is_empty()
    }

    /// Call right before the last backward pass of a step: its completed buckets start at once.
    pub fn before_last_backward(&self) {
        if let (true, Some(h)) = (self.overlap, &self.hooks) {
            h.arm();
        }
    }

    /// After backward: the gradients summed over ranks (buckets started during backward are waited
    /// for, the others all-reduced now, in bucket order).
    pub fn finish(&mut self, collective: &dyn Collective) {
        if collective.world_size() <= 1 {
            return;
        }
        let _phase = watchdog::enter(Phase::InCollective, "gradient all-reduce");
        match &self.hooks {
            Some(h) => match h.finish() {
                Ok(early) => self.early = early,
                Err(e) => fail_fast::abort_job(&format!("the gradient all-reduce failed: {e}")),
            },
            None => {
                for b in &mut self.buckets {
                    collective.all_reduce_sum(b);
                }
                self.early = 0;
            }
        }
    }

    /// Buckets whose all-reduce started during the last step's backward (overlapped).
    pub fn started_during_backward(&self) -> usize {
        self.early
    }
}

/// `named` reordered into the order backward produces their gradients: the reverse of the order the
/// model created its parameters in (the towers are built input to output, and backward runs output
/// to input), as DDP orders its buckets by `reversed(model.parameters())`.
pub fn gradient_ready_order(vs: &VarStore, mut named: Vec<(String, Tensor)>) -> Vec<(String, Tensor)> {
    let created: Vec<usize> = vs.trainable_variables().iter().map(|t| t.data_ptr() as usize).collect();
    let position = |t: &Tensor| created.iter().position(|&p| p == t.data_ptr() as usize).unwrap_or(usize::MAX);
    named.sort_by_key(|(_, t)| std::cmp::Reverse(position(t)));
    named
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::single::Single;
    use crate::optim::AdamWConfig;
    use tch::{Device, Kind};

    #[test]
    fn buckets_cut_at_parameter_boundaries_within_the_cap() {
        let o = (Kind::Float, Device::Cpu);
        // 4-byte floats: a 0.0001 MB cap is 104 bytes = 26 values.
        let named: Vec<(String, Tensor)> = [10, 10, 10, 30, 5]
            .iter()
            .enumerate()
            .map(|(i, &n)| (format!("w{i}"), Tensor::ones([n, 1], o).set_requires_grad(true)))
            .collect();
        let opt = AdamW::new(&named, AdamWConfig::default()).unwrap();
        let sync = GradSync::new(&opt, &Single, 0.0001, true).unwrap();
        let sizes: Vec<i64> = sync.buckets.iter().map(|b| b.numel() as i64).collect();
        assert_eq!(sizes, vec![20, 10, 30, 5], "a parameter larger than the cap gets a bucket of its own");
        assert!(sync.hooks.is_none(), "one process: nothing to hook");
    }

    #[test]
    fn ready_order_is_reverse_creation_order() {
        let vs = VarStore::new(Device::Cpu);
        let root = vs.root();
        let a = root.zeros("b_first", &[2]);
        let b = root.zeros("a_second", &[2]);
        let c = root.zeros("c_third", &[2]);
        let named = vec![("a_second".to_string(), b), ("b_first".to_string(), a), ("c_third".to_string(), c)];
        let names: Vec<String> = gradient_ready_order(&vs, named).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["c_third", "a_second", "b_first"]);
    }
}
