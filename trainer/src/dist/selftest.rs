//! A self-check of a [`Collective`] backend and the [`Control`] path across real ranks: every
//! operation runs on rank-dependent data and the result is compared with what it must be. Run it
//! under `mpirun -np N` / `srun -n N` (`trainer dist-selftest`) to prove a launcher, backend and
//! network work before spending hours of allocation on training.

use anyhow::{ensure, Result};
use tch::{Device, Kind, Tensor};

use super::{preempt, Collective, Control};

/// Runs every collective on CPU tensors (staged or not, depending on the backend).
pub fn run(collective: &dyn Collective, control: &dyn Control) -> Result<()> {
    run_on(collective, control, Device::Cpu, true)
}

/// Runs every collective on tensors placed on `device` (a CUDA device for NCCL), and every control
/// message. `integers`: also reduce and gather int64 tensors through the device collective (which
/// the strict device mode refuses).
pub fn run_on(collective: &dyn Collective, control: &dyn Control, device: Device, integers: bool) -> Result<()> {
    let (r, w) = (collective.rank() as i64, collective.world_size() as i64);
    ensure!(r < w, "rank {r} outside world of {w}");

    // all_reduce_sum, f32: rank r holds (r + 1) * [1, 2, ..., n]; the sum is w(w+1)/2 * [1..n].
    // Large enough to cross MPI's eager/rendezvous switch and NCCL's chunking.
    let n = 1 << 18;
    let base = Tensor::arange(n, (Kind::Float, device)) + 1.0;
    let mut t = &base * (r + 1) as f64;
    collective.all_reduce_sum(&mut t);
    let want = &base * (w * (w + 1) / 2) as f64;
    ensure!(t.device() == device, "all_reduce_sum moved the tensor to {:?}", t.device());
    ensure!(t.equal(&want), "all_reduce_sum f32: got {} want {}", head(&t), head(&want));

    // all_reduce_sum, i64 (counters, flags): values beyond f32's exact range.
    if integers {
        let big = 1i64 << 40;
        let mut t = Tensor::from_slice(&[big + r, -r, 1]).to_device(device);
        collective.all_reduce_sum(&mut t);
        let want = Tensor::from_slice(&[big * w + w * (w - 1) / 2, -w * (w - 1) / 2, w]).to_device(device);
        ensure!(t.equal(&want), "all_reduce_sum i64: got {} want {}", head(&t), head(&want));
    }

    // all_reduce_sum on a non-contiguous view's contiguous copy must leave other data alone:
    // reduce a slice of a larger tensor in place.
    let whole = Tensor::zeros([4, 3], (Kind::Float, device));
    let mut row = whole.get(1);
    let _ = row.fill_(r as f64 + 1.0);
    collective.all_reduce_sum(&mut row);
    let want = Tensor::zeros([4, 3], (Kind::Float, device));
    let _ = want.get(1).fill_((w * (w + 1) / 2) as f64);
    ensure!(whole.equal(&want), "all_reduce_sum on a row view: got {}", head(&whole));

    // all_gather: rank r holds [[100r + 0, 100r + 1, 100r + 2], [100r + 3, ...]] (2 x 3 f32).
    let local = (Tensor::arange(6, (Kind::Float, device)) + (100 * r) as f64).view([2, 3]);
    let gathered = collective.all_gather(&local);
    let want = Tensor::cat(
        &(0..w).map(|q| (Tensor::arange(6, (Kind::Float, device)) + (100 * q) as f64).view([2, 3])).collect::<Vec<_>>(),
        0,
    );
    ensure!(gathered.size() == vec![2 * w, 3], "all_gather shape {:?}", gathered.size());
    ensure!(gathered.equal(&want), "all_gather: got {} want {}", head(&gathered), head(&want));

    // reduce_scatter_sum: rank r holds rows q·3 .. q·3+3 = (r + 1) * (100q + [0, 1, 2]) for each q;
    // rank q receives the sum over r: w(w+1)/2 * (100q + [0, 1, 2]).
    let rows = (Tensor::arange(3, (Kind::Float, device)).view([1, 3])
        + Tensor::arange(w, (Kind::Float, device)).view([w, 1]) * 100.0)
        .view([-1]);
    let mine = collective.reduce_scatter_sum(&(&rows * (r + 1) as f64));
    let want = (Tensor::arange(3, (Kind::Float, device)) + (100 * r) as f64) * (w * (w + 1) / 2) as f64;
    ensure!(mine.equal(&want), "reduce_scatter_sum: got {} want {}", head(&mine), head(&want));

    // broadcast from the last rank (not 0, so a backend that ignores `root` fails).
    let root = (w - 1) as usize;
    let mut t = Tensor::full([3, 5], (r * 10 + 3) as f64, (Kind::Float, device));
    collective.broadcast(&mut t, root);
    let want = Tensor::full([3, 5], ((w - 1) * 10 + 3) as f64, (Kind::Float, device));
    ensure!(t.equal(&want), "broadcast from {root}: got {}", head(&t));

    collective.barrier();

    // Control path: the stop vote (only the last rank saw the signal; every rank must learn of it),
    // bytes of different lengths, rank 0's choice, step agreement.
    ensure!(preempt::any_rank(r == w - 1, control), "any_rank missed the last rank's flag");
    ensure!(!preempt::any_rank(false, control), "any_rank true with no flag set");
    let mine = vec![r as u8; r as usize * 5];
    let all = control.all_gather_bytes(&mine);
    ensure!(
        all.iter().enumerate().all(|(q, b)| *b == vec![q as u8; q * 5]),
        "all_gather_bytes: got lengths {:?}",
        all.iter().map(Vec::len).collect::<Vec<_>>()
    );
    let chosen = control.broadcast_bytes(if r == 0 { b"step_00000042" } else { b"" }, 0);
    ensure!(chosen == b"step_00000042", "broadcast_bytes: got {:?}", String::from_utf8_lossy(&chosen));
    control.check_same_u64(42, "the step")?;
    ensure!(control.check_same_u64(r as u64 / 2 + 1, "the step").is_err() == (w > 2), "check_same_u64 missed a rank");

    collective.barrier();
    Ok(())
}

/// The first few values of `t`, for error messages.
fn head(t: &Tensor) -> String {
    let flat = t.flatten(0, -1).to_device(Device::Cpu).to_kind(Kind::Double);
    let k = flat.numel().min(6) as i64;
    format!("{:?}", Vec::<f64>::try_from(flat.narrow(0, 0, k)).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dist::single::Single;

    #[test]
    fn single_process_passes() {
        run(&Single, &Single).unwrap();
    }

    /// A backend whose all-reduce does not sum over ranks must be caught.
    struct WrongSum;
    impl Collective for WrongSum {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            2
        }
        fn all_reduce_sum(&self, t: &mut Tensor) {
            let _ = t.g_mul_scalar_(2.0);
        }
        fn all_gather(&self, t: &Tensor) -> Tensor {
            Tensor::cat(&[t, t], 0)
        }
        fn broadcast(&self, _t: &mut Tensor, _root: usize) {}
        fn barrier(&self) {}
    }

    #[test]
    fn a_wrong_backend_fails() {
        // all_reduce on 2 "ranks" where rank 0 doubles: 2 * 1 * base vs 3 * base -> mismatch.
        let err = run(&WrongSum, &Single).unwrap_err();
        assert!(format!("{err:#}").contains("all_reduce_sum"), "{err:#}");
    }
}
