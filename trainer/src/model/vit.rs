//! OpenCLIP `VisionTransformer` (`open_clip/transformer.py`) with class-token pooling, as used by
//! ViT-B-32, and `resize_pos_embed` (`open_clip/model.py`) for checkpoints trained at another size.
//!
//! Keys under `visual.`: `conv1.weight` (no bias), `class_embedding` `[w]`,
//! `positional_embedding` `[grid²+1, w]`, `ln_pre`, `transformer.resblocks.N.*`, `ln_post`,
//! `proj` `[w, embed]` (used as `x @ proj`).
//!
//! Under bf16 autocast the residual stream stays fp32 here, a deliberate difference from OpenCLIP:
//! there the class and positional embeddings are cast to the patch embedding's dtype (bf16) and its
//! `LayerNorm` returns the input's dtype, so the residual stream is bf16. Ours adds the blocks'
//! outputs in fp32 (the matmuls still run in bf16), which costs activation memory and bandwidth on
//! the residual adds; the ViT-B-32 rows of `scripts/gpu-check`'s bench stage measure that cost
//! against OpenCLIP (not yet run on a GPU). In fp32 both are identical (`tests/model_parity.rs`).

use tch::nn::{self, Init};
use tch::Tensor;

use super::text::Transformer;

/// ViT image tower hyper-parameters, as OpenCLIP's `CLIPVisionCfg`.
#[derive(Debug, Clone, PartialEq)]
pub struct VitConfig {
    /// Input resolution (224).
    pub image_size: i64,
    /// Patch size (32).
    pub patch_size: i64,
    /// Residual width (768).
    pub width: i64,
    /// Residual blocks (12).
    pub layers: i64,
    /// Attention heads; OpenCLIP uses `width / 64`.
    pub heads: i64,
}

impl VitConfig {
    /// Patches per side.
    pub fn grid_size(&self) -> i64 {
        self.image_size / self.patch_size
    }
}

/// OpenCLIP `VisionTransformer` (pool `tok`, `ln_post` before pooling).
#[derive(Debug)]
pub struct VisionTransformer {
    conv1: nn::Conv2D,
    class_embedding: Tensor,
    positional_embedding: Tensor,
    ln_pre: nn::LayerNorm,
    transformer: Transformer,
    ln_post: nn::LayerNorm,
    proj: Tensor,
}

fn ln(p: nn::Path, w: i64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![w], nn::LayerNormConfig { eps: 1e-5, ..Default::default() })
}

impl VisionTransformer {
    /// `p` is the `visual` path.
    /// Activation checkpointing per residual block (see [`crate::model::grad_checkpointing`]).
    pub fn set_grad_checkpointing(&mut self, on: bool) {
        self.transformer.grad_checkpointing = on;
    }

    pub fn new(p: &nn::Path, cfg: &VitConfig, embed_dim: i64) -> Self {
        let w = cfg.width;
        let scale = (w as f64).powf(-0.5);
        let conv1 = nn::conv2d(
            p / "conv1",
            3,
            w,
            cfg.patch_size,
            nn::ConvConfig { stride: cfg.patch_size, bias: false, ..Default::default() },
        );
        let g = cfg.grid_size();
        let randn = Init::Randn { mean: 0.0, stdev: scale };
        Self {
            conv1,
            class_embedding: p.var("class_embedding", &[w], randn),
            positional_embedding: p.var("positional_embedding", &[g * g + 1, w], randn),
            ln_pre: ln(p / "ln_pre", w),
            transformer: Transformer::new(&(p / "transformer"), w, cfg.heads, cfg.layers),
            ln_post: ln(p / "ln_post", w),
            proj: p.var("proj", &[w, embed_dim], randn),
        }
    }

    /// `images`: `[b, 3, h, w]` -> `[b, embed_dim]`.
    pub fn forward(&self, images: &Tensor, _train: bool) -> Tensor {
        let x = images.apply(&self.conv1); // [b, w, g, g]
        let (b, w) = (x.size()[0], x.size()[1]);
        let x = x.reshape([b, w, -1]).transpose(1, 2); // [b, g², w]
        let cls = self.class_embedding.view([1, 1, w]).expand([b, 1, w], false); // [b, 1, w]
        let x = Tensor::cat(&[cls, x], 1) + &self.positional_embedding; // [b, g²+1, w]
        let x = x.apply(&self.ln_pre);
        let x = self.transformer.forward(&x, false).apply(&self.ln_post); // [b, g²+1, w]
        x.select(1, 0).matmul(&self.proj) // [b, embed]
    }
}

/// OpenCLIP `resize_pos_embed`: keep the class token, resample the `[g, g]` grid to `new_grid`
/// with bicubic interpolation, antialias on, `align_corners = False`. `pos`: `[1 + g², w]`, from a
/// file: a tensor of any other shape is an error saying why, not a panic.
pub fn resize_pos_embed(pos: &Tensor, new_grid: i64) -> Result<Tensor, String> {
    let size = pos.size();
    let &[n, w] = size.as_slice() else {
        return Err(format!("has shape {size:?}, not [1 + grid², width]"));
    };
    if n == new_grid * new_grid + 1 {
        return Ok(pos.shallow_clone());
    }
    let old_grid = ((n - 1).max(0) as f64).sqrt().round() as i64;
    if n < 2 || old_grid * old_grid != n - 1 {
        return Err(format!("has {n} rows: one class token plus a square grid (1 + g²) expected"));
    }
    let tok = pos.narrow(0, 0, 1);
    let img = pos.narrow(0, 1, n - 1).reshape([1, old_grid, old_grid, w]).permute([0, 3, 1, 2]);
    let img = img
        .f_internal_upsample_bicubic2d_aa([new_grid, new_grid], false, None, None) // [1, w, g', g']
        .map_err(|e| format!("resizing its {old_grid}x{old_grid} grid to {new_grid}x{new_grid}: {e}"))?
        .permute([0, 2, 3, 1])
        .reshape([new_grid * new_grid, w]);
    Ok(Tensor::cat(&[tok, img], 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_positional_embedding_that_is_not_a_square_grid_is_an_error() {
        let ok = Tensor::zeros([1 + 16, 8], (tch::Kind::Float, tch::Device::Cpu));
        assert_eq!(resize_pos_embed(&ok, 2).unwrap().size(), vec![1 + 4, 8]);
        for rows in [1 + 15, 1, 0] {
            let bad = Tensor::zeros([rows, 8], (tch::Kind::Float, tch::Device::Cpu));
            let e = resize_pos_embed(&bad, 2).unwrap_err();
            assert!(e.contains(&format!("{rows} rows")), "{e}");
        }
        let e = resize_pos_embed(&Tensor::zeros([17], (tch::Kind::Float, tch::Device::Cpu)), 2).unwrap_err();
        assert!(e.contains("[17]"), "{e}");
    }
}
