//! timm ConvNeXt trunk wrapped as OpenCLIP's `TimmModel` with `timm_pool: ""` and
//! `timm_proj: "linear" | "mlp"` (`open_clip/timm_model.py`, `timm/models/convnext.py`).
//!
//! Key layout under `visual.`: `trunk.stem.{0,1}` (patchify conv 4×4/4 + LayerNorm2d),
//! `trunk.stages.N.downsample.{0,1}` (LayerNorm2d + conv 2×2/2; absent for stage 0),
//! `trunk.stages.N.blocks.M.{conv_dw,norm,mlp.fc1,mlp.fc2,gamma}`, then — because `timm_pool` is
//! `""`, OpenCLIP keeps timm's own head with its global average pool — `trunk.head.norm`
//! (LayerNorm2d applied AFTER pooling; `trunk.head.fc` is an Identity), and finally OpenCLIP's
//! adapter `head.proj.weight` (linear, no bias) or `head.mlp.fc1.{weight,bias}` +
//! `head.mlp.fc2.weight` (hidden 2×embed, no bias on fc2).

use tch::nn::{self, Init};
use tch::Tensor;

use super::grad_checkpointing::checkpoint;

/// ConvNeXt image tower hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct ConvNextConfig {
    /// Channels per stage (convnext_base: 128-256-512-1024).
    pub dims: [i64; 4],
    /// Blocks per stage (convnext_base: 3-3-27-3).
    pub depths: [i64; 4],
    /// Maximum stochastic-depth rate, spread linearly over all blocks (OpenCLIP `timm_drop_path`, 0.1).
    pub drop_path_rate: f64,
    /// Projection head: `"linear"` or `"mlp"` (OpenCLIP `timm_proj`).
    pub proj: ConvNextProj,
    /// Dropout in the projection head (OpenCLIP `timm_drop`): before `head.proj`, or after the
    /// GELU of `head.mlp` (timm `Mlp(drop=(drop, 0))`); active in training only.
    pub head_drop: f64,
    /// Input resolution (informational for the trunk: it is fully convolutional).
    pub image_size: i64,
}

/// OpenCLIP `timm_proj`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvNextProj {
    /// `head.proj`: `Linear(c, embed, bias=False)`.
    Linear,
    /// `head.mlp`: `fc1 Linear(c, 2·embed)` -> GELU -> `fc2 Linear(2·embed, embed, bias=False)`.
    Mlp,
}

/// The timm ConvNeXt variants we build, by timm model name: `(dims, depths)` as in
/// `timm/models/convnext.py` (those with `conv_mlp = False` and LayerNorm eps 1e-6). The last two
/// are small trunks of ours, for the demo and the tests; `scripts/gen-model-fixtures.py` registers
/// them with timm under the same names, so their model configs load in OpenCLIP too.
pub const TIMM_CONVNEXTS: &[(&str, [i64; 4], [i64; 4])] = &[
    ("convnext_tiny", [96, 192, 384, 768], [3, 3, 9, 3]),
    ("convnext_small", [96, 192, 384, 768], [3, 3, 27, 3]),
    ("convnext_base", [128, 256, 512, 1024], [3, 3, 27, 3]),
    ("convnext_large", [192, 384, 768, 1536], [3, 3, 27, 3]),
    ("convnext_xlarge", [256, 512, 1024, 2048], [3, 3, 27, 3]),
    ("ferroclip_convnext_demo", [24, 48, 96, 192], [1, 1, 2, 1]),
    ("ferroclip_convnext_test", [16, 32, 64, 128], [1, 1, 2, 1]),
];

/// `(dims, depths)` of the timm ConvNeXt `name` (`vision_cfg.timm_model_name`), if we build it.
pub fn timm_convnext(name: &str) -> Option<([i64; 4], [i64; 4])> {
    TIMM_CONVNEXTS.iter().find(|(n, _, _)| *n == name).map(|(_, dims, depths)| (*dims, *depths))
}

/// timm's ConvNeXt init: trunc_normal(std .02) weights, zero biases. With std .02 the ±2
/// absolute truncation of `trunc_normal_` is never hit, so a plain normal is identical.
const W_INIT: Init = Init::Randn { mean: 0.0, stdev: 0.02 };

fn conv(p: nn::Path, i: i64, o: i64, k: i64, stride: i64, padding: i64, groups: i64) -> nn::Conv2D {
    nn::conv2d(
        p,
        i,
        o,
        k,
        nn::ConvConfig { stride, padding, groups, ws_init: W_INIT, bs_init: Init::Const(0.0), ..Default::default() },
    )
}

fn linear(p: nn::Path, i: i64, o: i64, bias: bool) -> nn::Linear {
    nn::linear(p, i, o, nn::LinearConfig { ws_init: W_INIT, bs_init: Some(Init::Const(0.0)), bias })
}

/// timm `LayerNorm` (channels last, eps 1e-6).
fn layer_norm(p: nn::Path, c: i64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![c], nn::LayerNormConfig { eps: 1e-6, ..Default::default() })
}

/// timm `LayerNorm2d`: LayerNorm over the channels of an NCHW tensor (permute, normalize, permute back).
#[derive(Debug)]
struct LayerNorm2d(nn::LayerNorm);

impl LayerNorm2d {
    fn new(p: nn::Path, c: i64) -> Self {
        Self(layer_norm(p, c))
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        x.permute([0, 2, 3, 1]).apply(&self.0).permute([0, 3, 1, 2])
    }
}

/// Per-sample stochastic depth (timm `drop_path`), scaled by 1/keep; identity outside training.
pub(crate) fn drop_path(x: &Tensor, rate: f64, train: bool) -> Tensor {
    if !train || rate <= 0.0 {
        return x.shallow_clone();
    }
    let keep = 1.0 - rate;
    let mut shape = vec![1i64; x.dim()];
    shape[0] = x.size()[0];
    let mask = Tensor::empty(&shape, (x.kind(), x.device())).bernoulli_float_(keep) / keep;
    x * mask
}

/// `ConvNeXtBlock` (conv_mlp = False): dw 7×7 -> NHWC LayerNorm -> Mlp -> gamma -> drop path + x.
#[derive(Debug)]
struct Block {
    conv_dw: nn::Conv2D,
    norm: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    gamma: Tensor,
    drop_path: f64,
}

impl Block {
    fn new(p: &nn::Path, c: i64, drop_path: f64) -> Self {
        Self {
            conv_dw: conv(p / "conv_dw", c, c, 7, 1, 3, c),
            norm: layer_norm(p / "norm", c),
            fc1: linear(p / "mlp" / "fc1", c, 4 * c, true),
            fc2: linear(p / "mlp" / "fc2", 4 * c, c, true),
            gamma: p.var("gamma", &[c], Init::Const(1e-6)),
            drop_path,
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Tensor {
        let y = x.apply(&self.conv_dw).permute([0, 2, 3, 1]); // [b, h, w, c]
        let y = y.apply(&self.norm).apply(&self.fc1).gelu("none").apply(&self.fc2); // [b, h, w, c]
        let y = (y * &self.gamma).permute([0, 3, 1, 2]); // [b, c, h, w]
        drop_path(&y, self.drop_path, train) + x
    }
}

#[derive(Debug)]
struct Stage {
    downsample: Option<(LayerNorm2d, nn::Conv2D)>,
    blocks: Vec<Block>,
}

/// timm `ConvNeXt` with OpenCLIP's projection head, rooted at `visual`.
#[derive(Debug)]
pub struct ConvNext {
    stem_conv: nn::Conv2D,
    stem_norm: LayerNorm2d,
    stages: Vec<Stage>,
    head_norm: LayerNorm2d,
    proj: Head,
    head_drop: f64,
    /// Each block recomputed in backward instead of keeping its activations (OpenCLIP
    /// `set_grad_checkpointing`, timm `checkpoint_seq` over each stage's blocks).
    grad_checkpointing: bool,
}

#[derive(Debug)]
enum Head {
    Linear(nn::Linear),
    Mlp(nn::Linear, nn::Linear),
}

impl ConvNext {
    /// `p` is the `visual` path.
    pub fn new(p: &nn::Path, cfg: &ConvNextConfig, embed_dim: i64) -> Self {
        let trunk = p / "trunk";
        let stem = &trunk / "stem";
        let stem_conv = conv(&stem / 0, 3, cfg.dims[0], 4, 4, 0, 1);
        let stem_norm = LayerNorm2d::new(&stem / 1, cfg.dims[0]);
        // timm calculate_drop_path_rates(stagewise=True): linspace(0, rate, sum(depths)) split per stage.
        let total: i64 = cfg.depths.iter().sum();
        let rate = |i: i64| {
            if total > 1 {
                cfg.drop_path_rate * i as f64 / (total - 1) as f64
            } else {
                0.0
            }
        };
        let mut idx = 0;
        let mut prev = cfg.dims[0];
        let mut stages = Vec::new();
        for (s, (&c, &depth)) in cfg.dims.iter().zip(cfg.depths.iter()).enumerate() {
            let sp = &trunk / "stages" / s as i64;
            let downsample = (s > 0).then(|| {
                let dp = &sp / "downsample";
                (LayerNorm2d::new(&dp / 0, prev), conv(&dp / 1, prev, c, 2, 2, 0, 1))
            });
            let blocks = (0..depth)
                .map(|m| {
                    let b = Block::new(&(&sp / "blocks" / m), c, rate(idx));
                    idx += 1;
                    b
                })
                .collect();
            stages.push(Stage { downsample, blocks });
            prev = c;
        }
        let head_norm = LayerNorm2d::new(&trunk / "head" / "norm", prev);
        let hp = p / "head";
        let proj = match cfg.proj {
            ConvNextProj::Linear => Head::Linear(linear(&hp / "proj", prev, embed_dim, false)),
            ConvNextProj::Mlp => Head::Mlp(
                linear(&hp / "mlp" / "fc1", prev, 2 * embed_dim, true),
                linear(&hp / "mlp" / "fc2", 2 * embed_dim, embed_dim, false),
            ),
        };
        Self { stem_conv, stem_norm, stages, head_norm, proj, head_drop: cfg.head_drop, grad_checkpointing: false }
    }

    /// Activation checkpointing per block (see [`crate::model::grad_checkpointing`]).
    pub fn set_grad_checkpointing(&mut self, on: bool) {
        self.grad_checkpointing = on;
    }

    /// `images`: `[b, 3, h, w]` normalized -> `[b, embed_dim]`.
    pub fn forward(&self, images: &Tensor, train: bool) -> Tensor {
        let mut x = self.stem_norm.forward(&images.apply(&self.stem_conv)); // [b, c0, h/4, w/4]
        for stage in &self.stages {
            if let Some((norm, conv)) = &stage.downsample {
                x = norm.forward(&x).apply(conv); // [b, c, h/2, w/2]
            }
            for blk in &stage.blocks {
                x = match self.grad_checkpointing && train {
                    true => checkpoint(&x, move |x| blk.forward(x, train)),
                    false => blk.forward(&x, train),
                };
            }
        }
        let kind = x.kind();
        let x = x.mean_dim(&[-2i64, -1][..], true, kind); // [b, c, 1, 1]
        let x = self.head_norm.forward(&x).flatten(1, -1); // [b, c]

        // `Tensor::dropout` is torch's `F.dropout`: the same mask for the same RNG state as OpenCLIP.
        match &self.proj {
            Head::Linear(l) => x.dropout(self.head_drop, train).apply(l),
            Head::Mlp(fc1, fc2) => x.apply(fc1).gelu("none").dropout(self.head_drop, train).apply(fc2),
        } // [b, embed]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    #[test]
    fn drop_path_drops_whole_samples_and_rescales() {
        tch::manual_seed(0);
        let x = Tensor::ones([4000, 3, 2, 2], (Kind::Float, Device::Cpu));
        let y = drop_path(&x, 0.25, true);
        // Each sample is either all 0 or all 1/keep.
        let per_sample = y.flatten(1, -1);
        let (mn, mx) = (per_sample.amin(&[1i64][..], false), per_sample.amax(&[1i64][..], false));
        assert!(mn.equal(&mx), "a sample was partially dropped");
        let kept = mx.gt(0.0).to_kind(Kind::Float).mean(Kind::Float).double_value(&[]);
        assert!((kept - 0.75).abs() < 0.03, "kept fraction {kept}");
        assert!((mx.max().double_value(&[]) - 1.0 / 0.75).abs() < 1e-6);
        assert!(drop_path(&x, 0.25, false).equal(&x), "eval must be identity");
    }

    #[test]
    fn drop_path_rates_increase_linearly_over_all_blocks() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = ConvNextConfig {
            dims: [8, 8, 8, 8],
            depths: [1, 1, 2, 1],
            drop_path_rate: 0.4,
            proj: ConvNextProj::Linear,
            head_drop: 0.0,
            image_size: 32,
        };
        let m = ConvNext::new(&(vs.root() / "visual"), &cfg, 4);
        let rates: Vec<f64> = m.stages.iter().flat_map(|s| s.blocks.iter().map(|b| b.drop_path)).collect();
        // timm: torch.linspace(0, 0.4, 5).split(depths)
        let want = [0.0, 0.1, 0.2, 0.3, 0.4];
        assert!(rates.iter().zip(want).all(|(a, b)| (a - b).abs() < 1e-12), "{rates:?}");
    }
}
