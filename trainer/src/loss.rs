//! Symmetric InfoNCE, as OpenCLIP's `ClipLoss` (open_clip/loss.py).
//!
//! `(CE(s·I·Tᵀ, labels) + CE(s·T·Iᵀ, labels)) / 2` over L2-normalized features, `s = exp(logit_scale)`,
//! always in fp32. The features handed in are the *gathered* ones (every rank's rows in rank order);
//! gathering and the gradient flow across ranks are the business of [`crate::step`].

use tch::{Kind, Tensor};

/// OpenCLIP's contrastive loss.
#[derive(Debug, Clone, Copy, Default)]
pub struct ClipLoss {
    /// Each rank computes only its own rows of the logits (`[n, N]` instead of `[N, N]`), labels
    /// offset by `rank * n`; the loss returned is that rank's, and the mean over ranks is the global
    /// loss. Default `false` (every rank computes the full global loss).
    pub local_loss: bool,
}

/// `F.normalize(x, dim=-1)` in fp32 (eps 1e-12): the one normalization of features everywhere.
pub fn l2_normalize(x: &Tensor) -> Tensor {
    let x = x.to_kind(Kind::Float);
    let norm = x.norm_scalaropt_dim(2, [-1i64].as_slice(), true).clamp_min(1e-12);
    x / norm
}

impl ClipLoss {
    /// The loss of `rank` out of `world_size` ranks.
    ///
    /// `image_features`, `text_features`: `[N, d]` with `N = world_size * n`, rows of rank `r` at
    /// `r*n .. (r+1)*n`, not yet normalized. `logit_scale` is the log temperature (0-dim).
    /// Without `local_loss` the result is the global loss (independent of `rank`); with it, the loss
    /// over this rank's rows only.
    pub fn forward(
        &self,
        image_features: &Tensor,
        text_features: &Tensor,
        logit_scale: &Tensor,
        rank: usize,
        world_size: usize,
    ) -> Tensor {
        let img = l2_normalize(image_features); // [N, d]
        let txt = l2_normalize(text_features); // [N, d]
        let scale = logit_scale.to_kind(Kind::Float).exp();
        let total = img.size()[0];
        let device = img.device();
        if self.local_loss && world_size > 1 {
            let n = total / world_size as i64;
            let start = rank as i64 * n;
            let img_local = img.narrow(0, start, n); // [n, d]
            let txt_local = txt.narrow(0, start, n); // [n, d]
            let labels = Tensor::arange_start(start, start + n, (Kind::Int64, device));
            let per_image = img_local.matmul(&txt.tr()) * &scale; // [n, N]
            let per_text = txt_local.matmul(&img.tr()) * &scale; // [n, N]
            (per_image.cross_entropy_for_logits(&labels) + per_text.cross_entropy_for_logits(&labels)) / 2.0
        } else {
            let labels = Tensor::arange(total, (Kind::Int64, device));
            let per_image = img.matmul(&txt.tr()) * &scale; // [N, N]
            let per_text = per_image.tr();
            (per_image.cross_entropy_for_logits(&labels) + per_text.cross_entropy_for_logits(&labels)) / 2.0
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn rows(t: &Tensor) -> Vec<Vec<f64>> {
        let t = t.to_kind(Kind::Double);
        let (n, d) = (t.size()[0], t.size()[1]);
        (0..n).map(|i| (0..d).map(|j| t.double_value(&[i, j])).collect()).collect()
    }

    fn normalize(v: &[f64]) -> Vec<f64> {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    /// Cross-entropy of row `i` against label `i`, by an explicit log-softmax.
    fn ce_row(a: &[f64], bs: &[Vec<f64>], label: usize, s: f64) -> f64 {
        let logits: Vec<f64> = bs.iter().map(|b| s * a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>()).collect();
        let m = logits.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let lse = m + logits.iter().map(|l| (l - m).exp()).sum::<f64>().ln();
        lse - logits[label]
    }

    /// The direct formula over rows `lo..hi` (all rows for the global loss).
    fn direct(img: &Tensor, txt: &Tensor, log_s: f64, lo: usize, hi: usize) -> f64 {
        let i: Vec<_> = rows(img).iter().map(|r| normalize(r)).collect();
        let t: Vec<_> = rows(txt).iter().map(|r| normalize(r)).collect();
        let s = log_s.exp();
        let mut a = 0.0;
        let mut b = 0.0;
        for r in lo..hi {
            a += ce_row(&i[r], &t, r, s);
            b += ce_row(&t[r], &i, r, s);
        }
        (a + b) / 2.0 / (hi - lo) as f64
    }

    #[test]
    fn global_loss_matches_direct_formula() {
        tch::manual_seed(0);
        let img = Tensor::randn([6, 5], (Kind::Float, Device::Cpu));
        let txt = Tensor::randn([6, 5], (Kind::Float, Device::Cpu)) + &img * 0.5;
        let log_s = Tensor::from(2.3f32);
        let want = direct(&img, &txt, 2.3f32 as f64, 0, 6);
        let got = ClipLoss { local_loss: false }.forward(&img, &txt, &log_s, 1, 2).double_value(&[]);
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        // Unnormalized inputs: scaling features must not change the loss.
        let got2 = ClipLoss::default().forward(&(&img * 3.0), &(&txt * 0.1), &log_s, 0, 1).double_value(&[]);
        assert!((got2 - want).abs() < 1e-5);
    }

    #[test]
    fn local_loss_is_each_ranks_rows_and_averages_to_global() {
        tch::manual_seed(1);
        let img = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
        let txt = Tensor::randn([8, 4], (Kind::Float, Device::Cpu));
        let log_s = Tensor::from(1.0f32);
        let local = ClipLoss { local_loss: true };
        let mut mean = 0.0;
        for rank in 0..2 {
            let got = local.forward(&img, &txt, &log_s, rank, 2).double_value(&[]);
            let want = direct(&img, &txt, 1.0, rank * 4, rank * 4 + 4);
            assert!((got - want).abs() < 1e-5, "rank {rank}: {got} vs {want}");
            mean += got / 2.0;
        }
        let global = direct(&img, &txt, 1.0, 0, 8);
        assert!((mean - global).abs() < 1e-5);
    }
}
