//! The c10d backends behind the trainer's two paths: [`DeviceGroup`], the [`Collective`] for model
//! tensors (ProcessGroupNCCL on CUDA, ProcessGroupGloo on the CPU), and [`GlooControl`], the
//! [`Control`] path on host bytes (always a Gloo group of its own).
//!
//! A failed collective (a timeout after `dist.timeout_s`, a peer that died) ends the job through
//! [`fail_fast::abort_job`], naming the operation; the trait's calls therefore do not return errors.

use tch::{Device, Kind, Tensor};

use super::c10d::{C10dError, ProcessGroup, Work};
use super::control::Control;
use super::watchdog::{self, Phase};
use super::{fail_fast, Collective};

/// Collectives over one c10d process group, on tensors of the training `device`.
pub struct DeviceGroup {
    group: ProcessGroup,
    rank: usize,
    world: usize,
    device: Device,
    /// Refuse what NCCL refuses (`dist.strict_device`); see [`DeviceGroup::check`].
    strict: bool,
}

impl DeviceGroup {
    pub fn new(group: ProcessGroup, rank: usize, world: usize, device: Device, strict: bool) -> Self {
        DeviceGroup { group, rank, world, device, strict }
    }

    /// ProcessGroupGloo collectives on CUDA tensors are copied through host memory (NCCL is the
    /// GPU backend; Gloo on a GPU run is for debugging).
    fn staged(&self, t: &Tensor) -> bool {
        t.device() != Device::Cpu && self.group.name() == "gloo"
    }

    /// What NCCL would refuse on a GPU run: a tensor that is not on the training device. In strict
    /// mode on the CPU, where the host is the device, also every integer, bool or byte tensor: model
    /// data (parameters, gradients, features) is floating point, and whatever else reaches a device
    /// collective is a control message (a flag, a counter, a cursor) on the wrong path.
    fn check(&self, op: &'static str, t: &Tensor) {
        if let Some(why) = self.refusal(op, t) {
            fail_fast::abort_job(&why);
        }
    }

    fn refusal(&self, op: &str, t: &Tensor) -> Option<String> {
        let floating = matches!(t.kind(), Kind::Float | Kind::Double | Kind::Half | Kind::BFloat16);
        (self.strict && (t.device() != self.device || !floating)).then(|| {
            format!(
                "strict device mode (dist.strict_device): {op} was given a {:?} tensor on {:?}, but device \
                 collectives take model tensors on {:?}; flags, counters and bytes are control messages and go \
                 through dist::Control",
                t.kind(),
                t.device(),
                self.device
            )
        })
    }

    fn finish(&self, op: &'static str, started: Result<Work, C10dError>) {
        let _phase = watchdog::enter(Phase::InCollective, op);
        if let Err(e) = started.and_then(Work::wait) {
            fail_fast::abort_job(&format!("{op} on the {} group failed: {e}", self.group.name()));
        }
    }
}

impl Collective for DeviceGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, t: &mut Tensor) {
        self.check("all_reduce_sum", t);
        let staged = self.staged(t);
        let work = if staged { t.to_device(Device::Cpu) } else { t.contiguous() };
        self.finish("all_reduce_sum", self.group.all_reduce_sum(&work));
        if staged || work.data_ptr() != t.data_ptr() {
            tch::no_grad(|| t.copy_(&work));
        }
    }

    fn all_gather(&self, t: &Tensor) -> Tensor {
        self.check("all_gather", t);
        let staged = self.staged(t);
        let input = if staged { t.to_device(Device::Cpu) } else { t.contiguous() };
        let input = if input.dim() == 0 { input.view([1]) } else { input };
        let mut shape = input.size();
        shape[0] *= self.world as i64;
        let out = Tensor::empty(shape.as_slice(), (input.kind(), input.device()));
        self.finish("all_gather", self.group.all_gather(&input, &out));
        if staged {
            out.to_device(t.device())
        } else {
            out
        }
    }

    fn broadcast(&self, t: &mut Tensor, root: usize) {
        self.check("broadcast", t);
        let staged = self.staged(t);
        let work = if staged { t.to_device(Device::Cpu) } else { t.contiguous() };
        self.finish("broadcast", self.group.broadcast(&work, root));
        if staged || work.data_ptr() != t.data_ptr() {
            tch::no_grad(|| t.copy_(&work));
        }
    }

    fn barrier(&self) {
        self.finish("barrier", self.group.barrier());
    }

    fn reduce_scatter_sum(&self, t: &Tensor) -> Tensor {
        self.check("reduce_scatter_sum", t);
        let staged = self.staged(t);
        let input = if staged { t.to_device(Device::Cpu) } else { t.contiguous() };
        let mut shape = input.size();
        assert!(shape[0] % self.world as i64 == 0, "reduce_scatter_sum: {} rows for {} ranks", shape[0], self.world);
        shape[0] /= self.world as i64;
        let out = Tensor::empty(shape.as_slice(), (input.kind(), input.device()));
        self.finish("reduce_scatter_sum", self.group.reduce_scatter_sum(&input, &out));
        if staged {
            out.to_device(t.device())
        } else {
            out
        }
    }

    fn process_group(&self) -> Option<&ProcessGroup> {
        Some(&self.group)
    }

    fn abort(&self, code: i32) -> ! {
        let _ = code;
        fail_fast::abort_job("aborted")
    }
}

/// The control path over a Gloo group of its own (host memory, whatever the device backend).
pub struct GlooControl {
    group: ProcessGroup,
    rank: usize,
    world: usize,
}

impl GlooControl {
    pub fn new(group: ProcessGroup, rank: usize, world: usize) -> Self {
        GlooControl { group, rank, world }
    }

    fn run(&self, op: &'static str, started: Result<Work, C10dError>) {
        let _phase = watchdog::enter(Phase::InCollective, op);
        if let Err(e) = started.and_then(Work::wait) {
            fail_fast::abort_job(&format!("control message ({op}) failed: {e}"));
        }
    }
}

impl Control for GlooControl {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_gather_bytes(&self, bytes: &[u8]) -> Vec<Vec<u8>> {
        // Two all-gathers: the lengths, then the payloads padded to the longest.
        let len = Tensor::from_slice(&[bytes.len() as i64]);
        let lens = Tensor::zeros([self.world as i64], (Kind::Int64, Device::Cpu));
        self.run("all_gather_bytes", self.group.all_gather(&len, &lens));
        let lens: Vec<i64> = Vec::try_from(&lens).expect("int64 lengths");
        let max = lens.iter().copied().max().unwrap_or(0).max(1) as usize;
        let mut padded = bytes.to_vec();
        padded.resize(max, 0);
        let mine = Tensor::from_slice(&padded);
        let all = Tensor::zeros([(max * self.world) as i64], (Kind::Uint8, Device::Cpu));
        self.run("all_gather_bytes", self.group.all_gather(&mine, &all));
        let all: Vec<u8> = Vec::try_from(&all).expect("uint8 payloads");
        lens.iter().enumerate().map(|(r, &n)| all[r * max..r * max + n as usize].to_vec()).collect()
    }

    fn broadcast_bytes(&self, bytes: &[u8], root: usize) -> Vec<u8> {
        let len = Tensor::from_slice(&[bytes.len() as i64]);
        self.run("broadcast_bytes", self.group.broadcast(&len, root));
        let n = len.int64_value(&[0]) as usize;
        let mut buf = if self.rank == root { bytes.to_vec() } else { vec![0u8; n] };
        buf.resize(n.max(1), 0);
        let t = Tensor::from_slice(&buf);
        self.run("broadcast_bytes", self.group.broadcast(&t, root));
        let mut out: Vec<u8> = Vec::try_from(&t).expect("uint8 payload");
        out.truncate(n);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::c10d::Store;
    use std::time::Duration;

    fn one_rank(strict: bool) -> DeviceGroup {
        let store = Store::hash().unwrap();
        let g = ProcessGroup::gloo(&store, 0, 1, Duration::from_secs(10), None).unwrap();
        DeviceGroup::new(g, 0, 1, Device::Cpu, strict)
    }

    #[test]
    fn strict_mode_refuses_control_data_on_the_device_path() {
        let strict = one_rank(true);
        // What `any_rank` used to all-reduce through NCCL: an int64 flag.
        let flag = Tensor::from_slice(&[1i64]);
        let why = strict.refusal("all_reduce_sum", &flag).expect("an int64 flag is refused");
        assert!(why.contains("all_reduce_sum") && why.contains("Int64") && why.contains("Control"), "{why}");
        assert!(strict.refusal("all_gather", &Tensor::from_slice(&[1u8, 2])).is_some(), "cursor bytes are refused");
        assert!(strict.refusal("all_gather", &Tensor::ones([2, 3], (Kind::Float, Device::Cpu))).is_none());
        assert!(strict.refusal("all_gather", &Tensor::ones([2], (Kind::BFloat16, Device::Cpu))).is_none());
        assert!(one_rank(false).refusal("all_reduce_sum", &flag).is_none(), "off unless asked for");
    }

    #[test]
    fn a_non_contiguous_tensor_is_reduced_in_place() {
        let g = one_rank(false);
        let base = Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]);
        let mut col = base.transpose(0, 1); // not contiguous
        g.all_reduce_sum(&mut col);
        assert!(col.equal(&Tensor::arange(6, (Kind::Float, Device::Cpu)).view([2, 3]).transpose(0, 1)));
        let gathered = g.all_gather(&Tensor::from(3.0f32));
        assert_eq!(gathered.size(), vec![1], "a 0-dim tensor gathers as [world]");
    }
}
