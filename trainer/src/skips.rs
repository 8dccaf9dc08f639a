//! Counting the steps skipped for a non-finite loss or gradient without reading anything back per step.
//!
//! The optimizer skips such a step on the device ([`crate::optim::AdamW::step_unless`]); the counts
//! stay on the device too, and the host reads them only at log and checkpoint steps
//! ([`SkippedSteps::read`]): then it reports the skipped steps and stops the run once
//! `train.max_bad_steps` of them came in a row. A skipped step still consumes its batch and its
//! place in the schedule (as a step skipped by torch's `GradScaler` in OpenCLIP).

use tch::{Device, Kind, Tensor};

use crate::optim::AdamW;

/// What [`SkippedSteps::read`] returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SkipCounts {
    /// All skipped steps of the run (checkpointed with the counters).
    pub total: u64,
    /// Skipped since the previous read.
    pub since_last_read: u64,
    /// The longest run of consecutive skipped steps since the previous read (a run that continues
    /// over a read counts from its start).
    pub longest_run: u64,
}

/// Device-side counters of skipped steps.
pub struct SkippedSteps {
    /// [3] int64 on the device: total, current run, longest run since the last read.
    counts: Tensor,
    last_total: u64,
}

impl SkippedSteps {
    /// Counters starting at `total` skipped steps (from a checkpoint), on `device`.
    pub fn new(total: u64, device: Device) -> Self {
        let counts = Tensor::from_slice(&[total as i64, 0, 0]).to_device(device);
        SkippedSteps { counts, last_total: total }
    }

    /// Records one step; `found_inf` is the optimizer's 0-dim flag (1.0 = skipped). No host sync.
    pub fn record(&mut self, found_inf: &Tensor) {
        tch::no_grad(|| {
            let bad = found_inf.to_kind(Kind::Int64); // [] 0 or 1
            let total = self.counts.get(0) + &bad;
            let run = (self.counts.get(1) + 1) * &bad; // reset to 0 by a good step
            let longest = self.counts.get(2).maximum(&run);
            self.counts = Tensor::stack(&[total, run, longest], 0);
        });
    }

    /// Reads the counters back (a host sync: call it at log and checkpoint steps only) and starts a
    /// new interval for `since_last_read` and `longest_run`.
    pub fn read(&mut self) -> SkipCounts {
        let v: Vec<i64> = Vec::<i64>::try_from(&self.counts.to_device(Device::Cpu)).expect("three int64 counters");
        let total = v[0] as u64;
        let counts = SkipCounts { total, since_last_read: total - self.last_total, longest_run: v[2] as u64 };
        self.last_total = total;
        tch::no_grad(|| {
            // A new interval; the current run goes on counting from its start.
            let _ = self.counts.get(2).zero_();
        });
        counts
    }
}

/// The end of a training step once the gradients are summed: the non-finite check, clipping to
/// `clip_norm` (`None`: no clipping), the optimizer update or its skip, and the count — all on the device.
/// Returns the `found_inf` flag and, when clipping, the gradient norm before clipping.
pub fn update(
    opt: &mut AdamW,
    loss: &Tensor,
    clip_norm: Option<f64>,
    skips: &mut SkippedSteps,
) -> (Tensor, Option<Tensor>) {
    let found_inf = opt.non_finite(loss);
    let grad_norm = clip_norm.map(|max| opt.clip_grad_norm(max));
    opt.step_unless(&found_inf);
    skips.record(&found_inf);
    (found_inf, grad_norm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::optim::AdamWConfig;

    /// A step whose gradient holds an injected inf, through the training loop's [`update`]: weights,
    /// moments and the optimizer's step count unchanged, the step counted; the next good step moves
    /// the weights again.
    #[test]
    fn an_injected_inf_is_skipped_and_counted() {
        let w = Tensor::from_slice(&[0.5f32, -1.0, 2.0]).view([3, 1]).set_requires_grad(true);
        let b = Tensor::from_slice(&[0.25f32]).set_requires_grad(true);
        let named = vec![("w".to_string(), w.shallow_clone()), ("b.bias".to_string(), b.shallow_clone())];
        let mut opt = AdamW::new(&named, AdamWConfig::default()).unwrap();
        let mut skips = SkippedSteps::new(0, Device::Cpu);
        let loss_of = |w: &Tensor, b: &Tensor| (w.sum(Kind::Float) * b.sum(Kind::Float)).square();
        let step = |opt: &mut AdamW, skips: &mut SkippedSteps, inject: bool| {
            opt.zero_grad();
            let loss = tch::with_grad(|| loss_of(&w, &b));
            loss.backward();
            if inject {
                let g = w.grad();
                let _ = g.get(1).fill_(f64::INFINITY);
            }
            update(opt, &loss.detach(), Some(1.0), skips).0
        };
        assert_eq!(step(&mut opt, &mut skips, false).double_value(&[]), 0.0);
        let before: Vec<Tensor> = [&w, &b].iter().map(|p| p.detach().copy()).collect();
        let moments: Vec<Tensor> = opt.state().into_iter().map(|(_, v)| v.copy()).collect();
        assert_eq!(step(&mut opt, &mut skips, true).double_value(&[]), 1.0);
        assert!(w.equal(&before[0]) && b.equal(&before[1]), "a skipped step moved the weights");
        for ((k, v), m) in opt.state().iter().zip(&moments) {
            assert!(v.equal(m), "{k} moved in a skipped step");
        }
        assert_eq!(opt.step_count(), 1);
        assert_eq!(skips.read(), SkipCounts { total: 1, since_last_read: 1, longest_run: 1 });
        let _ = step(&mut opt, &mut skips, false);
        assert!(!w.equal(&before[0]), "the next good step applies");
        assert_eq!(opt.step_count(), 2);
        assert_eq!(skips.read(), SkipCounts { total: 1, since_last_read: 0, longest_run: 0 });
    }

    #[test]
    fn counts_total_runs_and_intervals() {
        let mut s = SkippedSteps::new(5, Device::Cpu);
        let flag = |bad: bool| Tensor::from(if bad { 1.0f32 } else { 0.0 });
        for bad in [true, true, false, true] {
            s.record(&flag(bad));
        }
        assert_eq!(s.read(), SkipCounts { total: 8, since_last_read: 3, longest_run: 2 });
        // The run of one at the end continues over the read.
        for bad in [true, true, false] {
            s.record(&flag(bad));
        }
        assert_eq!(s.read(), SkipCounts { total: 10, since_last_read: 2, longest_run: 3 });
        s.record(&flag(false));
        assert_eq!(s.read(), SkipCounts { total: 10, since_last_read: 0, longest_run: 0 });
    }
}
