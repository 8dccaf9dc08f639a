//! OpenCLIP's text tower (`open_clip/transformer.py`: `Transformer`, `ResidualAttentionBlock`,
//! `TextTransformer`; `open_clip/model.py`: `CLIP.encode_text`).
//!
//! For the standard `CLIP` class the text parameters sit at the ROOT of the state dict
//! (`token_embedding.weight`, `positional_embedding`, `transformer.resblocks.N.*`, `ln_final.*`,
//! `text_projection`), so [`TextTransformer::new`] takes the root path.
//! The residual [`Transformer`] is shared with the ViT image tower.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

use super::grad_checkpointing::checkpoint;

/// Text tower hyper-parameters, as OpenCLIP's `CLIPTextCfg`.
#[derive(Debug, Clone, PartialEq)]
pub struct TextConfig {
    /// Token sequence length (77).
    pub context_length: i64,
    /// Vocabulary size (49408 for the OpenAI BPE tokenizer).
    pub vocab_size: i64,
    /// Residual width (512 for ViT-B-32).
    pub width: i64,
    /// Attention heads (8).
    pub heads: i64,
    /// Residual blocks (12).
    pub layers: i64,
}

/// OpenCLIP `LayerNorm` / `nn.LayerNorm` (eps 1e-5) over the last dim.
fn layer_norm(p: &nn::Path, dim: i64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![dim], nn::LayerNormConfig { eps: 1e-5, ..Default::default() })
}

/// `nn.MultiheadAttention` with the fused `in_proj_weight` `[3w, w]`, run through
/// `scaled_dot_product_attention` (batch first, as OpenCLIP >= 2.24).
#[derive(Debug)]
struct MultiheadAttention {
    in_proj_weight: Tensor,
    in_proj_bias: Tensor,
    out_proj: nn::Linear,
    heads: i64,
}

impl MultiheadAttention {
    fn new(p: &nn::Path, width: i64, heads: i64, attn_std: f64, proj_std: f64) -> Self {
        let in_proj_weight = p.var("in_proj_weight", &[3 * width, width], Init::Randn { mean: 0.0, stdev: attn_std });
        let in_proj_bias = p.var("in_proj_bias", &[3 * width], Init::Const(0.0));
        let out_proj = nn::linear(
            p / "out_proj",
            width,
            width,
            nn::LinearConfig {
                ws_init: Init::Randn { mean: 0.0, stdev: proj_std },
                bs_init: Some(Init::Const(0.0)),
                bias: true,
            },
        );
        Self { in_proj_weight, in_proj_bias, out_proj, heads }
    }

    fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let (b, n, w) = x.size3().expect("attention input must be [b, n, w]");
        let d = w / self.heads;
        let qkv = x
            .linear(&self.in_proj_weight, Some(&self.in_proj_bias)) // [b, n, 3w]
            .view([b, n, 3, self.heads, d])
            .permute([2, 0, 3, 1, 4]); // [3, b, h, n, d]
        let (q, k, v) = (qkv.get(0), qkv.get(1), qkv.get(2));
        let y = Tensor::scaled_dot_product_attention(&q, &k, &v, None::<Tensor>, 0.0, causal, None, false); // [b, h, n, d]
        y.transpose(1, 2).reshape([b, n, w]).apply(&self.out_proj) // [b, n, w]
    }
}

/// `Mlp`: `c_fc` -> exact (erf) GELU -> `c_proj`, hidden 4×width.
#[derive(Debug)]
struct Mlp {
    c_fc: nn::Linear,
    c_proj: nn::Linear,
}

impl Mlp {
    fn new(p: &nn::Path, width: i64, fc_std: f64, proj_std: f64) -> Self {
        let lin = |name: &str, i: i64, o: i64, std: f64| {
            // Bias keeps PyTorch's nn.Linear default (uniform ±1/sqrt(fan_in)); OpenCLIP only re-inits weights.
            let bound = 1.0 / (i as f64).sqrt();
            nn::linear(
                p / name,
                i,
                o,
                nn::LinearConfig {
                    ws_init: Init::Randn { mean: 0.0, stdev: std },
                    bs_init: Some(Init::Uniform { lo: -bound, up: bound }),
                    bias: true,
                },
            )
        };
        Self { c_fc: lin("c_fc", width, 4 * width, fc_std), c_proj: lin("c_proj", 4 * width, width, proj_std) }
    }

    fn forward(&self, x: &Tensor) -> Tensor {
        x.apply(&self.c_fc).gelu("none").apply(&self.c_proj)
    }
}

/// Pre-norm residual block: `x + attn(ln_1(x))`, `x + mlp(ln_2(x))`.
#[derive(Debug)]
struct ResidualAttentionBlock {
    ln_1: nn::LayerNorm,
    attn: MultiheadAttention,
    ln_2: nn::LayerNorm,
    mlp: Mlp,
}

impl ResidualAttentionBlock {
    fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let x = x + self.attn.forward(&x.apply(&self.ln_1), causal);
        &x + self.mlp.forward(&x.apply(&self.ln_2))
    }
}

/// OpenCLIP `Transformer`: `resblocks.N.*`.
#[derive(Debug)]
pub(crate) struct Transformer {
    resblocks: Vec<ResidualAttentionBlock>,
    /// Each block recomputed in backward (OpenCLIP `Transformer.grad_checkpointing`).
    pub(crate) grad_checkpointing: bool,
}

impl Transformer {
    /// Builds `layers` blocks under `p / "resblocks"` with OpenCLIP's `init_parameters` stds.
    pub(crate) fn new(p: &nn::Path, width: i64, heads: i64, layers: i64) -> Self {
        let proj_std = (width as f64).powf(-0.5) * ((2 * layers) as f64).powf(-0.5);
        let attn_std = (width as f64).powf(-0.5);
        let fc_std = ((2 * width) as f64).powf(-0.5);
        let rp = p / "resblocks";
        let resblocks = (0..layers)
            .map(|i| {
                let b = &rp / i;
                ResidualAttentionBlock {
                    ln_1: layer_norm(&(&b / "ln_1"), width),
                    attn: MultiheadAttention::new(&(&b / "attn"), width, heads, attn_std, proj_std),
                    ln_2: layer_norm(&(&b / "ln_2"), width),
                    mlp: Mlp::new(&(&b / "mlp"), width, fc_std, proj_std),
                }
            })
            .collect();
        Self { resblocks, grad_checkpointing: false }
    }

    /// `x`: `[b, n, w]`; `causal` applies OpenCLIP's upper-triangular `-inf` mask.
    pub(crate) fn forward(&self, x: &Tensor, causal: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for blk in &self.resblocks {
            x = match self.grad_checkpointing {
                true => checkpoint(&x, move |x| blk.forward(x, causal)),
                false => blk.forward(&x, causal),
            };
        }
        x
    }
}

/// OpenCLIP's CLIP text tower with `text_pool_type = "argmax"` and a matrix `text_projection`.
#[derive(Debug)]
pub struct TextTransformer {
    token_embedding: nn::Embedding,
    positional_embedding: Tensor,
    transformer: Transformer,
    ln_final: nn::LayerNorm,
    text_projection: Tensor,
}

impl TextTransformer {
    /// `p` is the state-dict root (keys are not prefixed for the standard CLIP model).
    pub fn new(p: &nn::Path, cfg: &TextConfig, embed_dim: i64) -> Self {
        let token_embedding = nn::embedding(
            p / "token_embedding",
            cfg.vocab_size,
            cfg.width,
            nn::EmbeddingConfig { ws_init: Init::Randn { mean: 0.0, stdev: 0.02 }, ..Default::default() },
        );
        let positional_embedding =
            p.var("positional_embedding", &[cfg.context_length, cfg.width], Init::Randn { mean: 0.0, stdev: 0.01 });
        let transformer = Transformer::new(&(p / "transformer"), cfg.width, cfg.heads, cfg.layers);
        let ln_final = layer_norm(&(p / "ln_final"), cfg.width);
        let text_projection = p.var(
            "text_projection",
            &[cfg.width, embed_dim],
            Init::Randn { mean: 0.0, stdev: (cfg.width as f64).powf(-0.5) },
        );
        Self { token_embedding, positional_embedding, transformer, ln_final, text_projection }
    }

    /// Activation checkpointing per residual block (see [`crate::model::grad_checkpointing`]).
    pub fn set_grad_checkpointing(&mut self, on: bool) {
        self.transformer.grad_checkpointing = on;
    }

    /// `tokens`: `[b, context_length]` int64 -> `[b, embed_dim]` (not normalized).
    pub fn forward(&self, tokens: &Tensor) -> Tensor {
        let b = tokens.size()[0];
        let x = tokens.apply(&self.token_embedding) + &self.positional_embedding; // [b, n, w]
        let x = self.transformer.forward(&x, true).apply(&self.ln_final); // [b, n, w]
                                                                          // Pool at the EOT token, the largest id in each sequence (stays on device: no host sync).
        let eot = tokens.argmax(-1, false); // [b]
        let batch = Tensor::arange(b, (Kind::Int64, tokens.device()));
        let pooled = x.index(&[Some(batch), Some(eot)]); // [b, w]
        pooled.matmul(&self.text_projection) // [b, embed]
    }
}
