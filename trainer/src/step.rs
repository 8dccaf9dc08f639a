//! One optimizer step's forward/backward with EXACT gradients over the global batch.
//!
//! Follows OpenCLIP's gradient accumulation (open_clip_train/train.py `accum_freq`: features of all
//! micro-batches first without graph, then each micro-batch recomputed with graph), and fixes what it
//! gets wrong: there the tower gradients are averaged over W ranks (DDP) and the temperature gradient
//! is counted k times. Here:
//!
//! 1. every micro-batch's features are computed (without graph when k > 1; with k = 1 the single
//!    forward keeps its graph and is reused);
//! 2. the local features (k micro-batches concatenated) are all-gathered, turned into leaves, and the
//!    loss of the whole global batch is computed and backpropagated to the leaves and `logit_scale`;
//! 3. each micro-batch is recomputed with graph, replaying its RNG (`tch::manual_seed(rng_seed + i)`
//!    before both passes, so dropout/stochastic-depth masks match), and backpropagated with its slice
//!    of the feature gradients.
//!
//! After the caller sums the parameter gradients over ranks ([`crate::dist::grad_buckets::GradSync`],
//! whose buckets start during the last backward of step 3 when it is passed in), they equal those of
//! one process on the concatenated W·k·B batch.
//!
//! The `logit_scale` rule (so the SUM over ranks does not over-count it):
//! - without `local_loss`, every rank computes the full global loss, so its `logit_scale` gradient is
//!   already complete: only rank 0 puts it into `.grad()`, the others contribute zero;
//! - with `local_loss`, each rank backpropagates its share `loss_r / W`, whose `logit_scale`
//!   gradients sum to the exact one; each rank's rows of the logits touch every rank's features, so
//!   the feature gradients are summed over ranks, and each rank needs only its own rows of that sum:
//!   a reduce-scatter (half the bytes of an all-reduce), which also sums the loss shares.
//!
//! Features are all-gathered in the compute dtype (bf16 under `amp_bf16`: half the bytes), then the
//! loss runs in fp32. No host sync: the loss comes back as a tensor; read it only when logging.

use tch::{Kind, Tensor};

use crate::dist::grad_buckets::GradSync;
use crate::dist::Collective;
use crate::loss::ClipLoss;
use crate::model::ContrastiveModel;

/// What one [`contrastive_step`] returns.
pub struct StepOutput {
    /// The global loss (0-dim fp32, equal on every rank). A device tensor: `double_value` syncs.
    pub loss: Tensor,
    /// Samples in the global batch (W · sum of micro-batch sizes).
    pub global_batch: usize,
}

/// Forward/backward of one optimizer step over `micro_batches` (images, tokens) of this rank,
/// accumulating exact gradients into the parameters' `.grad()` (not zeroed here: zero them before).
/// Every rank must pass micro-batches of the same sizes. `rng_seed` must differ between steps (and
/// ranks); micro-batch `i` uses `rng_seed + i`. With `grad_sync`, its buckets are armed right before
/// the last backward pass, so their all-reduce overlaps it; call `grad_sync.finish` afterwards.
pub fn contrastive_step(
    model: &dyn ContrastiveModel,
    micro_batches: &[(Tensor, Tensor)],
    collective: &dyn Collective,
    loss: &ClipLoss,
    rng_seed: i64,
    grad_sync: Option<&GradSync>,
) -> StepOutput {
    assert!(!micro_batches.is_empty(), "contrastive_step needs at least one micro-batch");
    let rank = collective.rank();
    let world = collective.world_size();
    let k = micro_batches.len();
    let sizes: Vec<i64> = micro_batches.iter().map(|(img, _)| img.size()[0]).collect();
    let local_rows: i64 = sizes.iter().sum();

    // (1) features of every micro-batch, in the compute dtype; with k = 1 keep the graph for step (3).
    let mut kept: Option<(Tensor, Tensor)> = None;
    let (img_local, txt_local) = if k == 1 {
        tch::manual_seed(rng_seed);
        let (images, tokens) = &micro_batches[0];
        let (fi, ft) = tch::with_grad(|| (model.encode_image(images, true), model.encode_text(tokens, true)));
        let out = (fi.detach(), ft.detach());
        kept = Some((fi, ft));
        out
    } else {
        tch::no_grad(|| {
            let (mut is, mut ts) = (Vec::with_capacity(k), Vec::with_capacity(k));
            for (i, (images, tokens)) in micro_batches.iter().enumerate() {
                tch::manual_seed(rng_seed + i as i64);
                is.push(model.encode_image(images, true));
                ts.push(model.encode_text(tokens, true));
            }
            (Tensor::cat(&is, 0), Tensor::cat(&ts, 0)) // [k·B, d]
        })
    };

    // (2) gather, loss on fp32 leaves, backward to the leaves (and logit_scale).
    let img_all = collective.all_gather(&img_local).to_kind(Kind::Float).detach().set_requires_grad(true); // [W·k·B, d]
    let txt_all = collective.all_gather(&txt_local).to_kind(Kind::Float).detach().set_requires_grad(true);
    let local = loss.local_loss && world > 1;
    // Ranks other than 0 contribute a zero (but defined) logit_scale gradient without local_loss.
    let logit_scale = if local || rank == 0 {
        model.logit_scale()
    } else {
        let s = model.logit_scale();
        tch::with_grad(|| &s * 0.0 + s.detach())
    };
    let d = img_all.size()[1];
    let (global_loss, img_grad, txt_grad) = tch::with_grad(|| {
        let l = loss.forward(&img_all, &txt_all, &logit_scale, rank, world);
        if local {
            let share = &l / world as f64;
            share.backward();
            // Destination block r of the reduce-scatter: rank r's image rows, its text rows and the
            // loss share, so that one collective returns this rank's summed rows and the summed loss.
            let (gi, gt) = (img_all.grad().view([world as i64, -1]), txt_all.grad().view([world as i64, -1]));
            let shares = share.detach().view([1, 1]).expand([world as i64, 1], false);
            let packed = Tensor::cat(&[gi, gt, shares], 1).contiguous().view([-1]); // [W·(2·k·B·d + 1)]
            let mine = collective.reduce_scatter_sum(&packed); // [2·k·B·d + 1]
            let n = local_rows * d;
            let gi = mine.narrow(0, 0, n).view([local_rows, d]);
            let gt = mine.narrow(0, n, n).view([local_rows, d]);
            let lsum = mine.narrow(0, 2 * n, 1).view([]);
            (lsum, gi, gt)
        } else {
            l.backward();
            let start = rank as i64 * local_rows;
            (l.detach(), img_all.grad().narrow(0, start, local_rows), txt_all.grad().narrow(0, start, local_rows))
        }
    });
    // img_grad, txt_grad: [k·B, d], this rank's rows.

    // (3) tower backward per micro-batch with its slice of the feature gradients.
    tch::with_grad(|| {
        let mut offset = 0i64;
        for (i, (images, tokens)) in micro_batches.iter().enumerate() {
            let (fi, ft) = match kept.take() {
                Some(f) => f,
                None => {
                    tch::manual_seed(rng_seed + i as i64);
                    (model.encode_image(images, true), model.encode_text(tokens, true))
                }
            };
            let gi = img_grad.narrow(0, offset, sizes[i]);
            let gt = txt_grad.narrow(0, offset, sizes[i]);
            // d/dF sum(F ⊙ G) = G: backpropagates exactly the given feature gradients.
            let surrogate =
                (fi.to_kind(Kind::Float) * gi).sum(Kind::Float) + (ft.to_kind(Kind::Float) * gt).sum(Kind::Float);
            if i + 1 == k {
                if let Some(sync) = grad_sync {
                    sync.before_last_backward();
                }
            }
            surrogate.backward();
            offset += sizes[i];
        }
    });

    StepOutput { loss: global_loss, global_batch: world * local_rows as usize }
}

/// OpenCLIP clamps the log temperature to `[0, ln(100)]` after every optimizer step.
pub fn clamp_logit_scale(model: &dyn ContrastiveModel, max: f64) {
    let mut s = model.logit_scale();
    tch::no_grad(|| {
        let _ = s.clamp_(0.0, max);
    });
}
