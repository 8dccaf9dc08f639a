//! `[model]`: the architecture, its overrides, the weights to start from and the tokenizer; builds
//! the model and the tokenizer every command uses.

use ferroclip_data::section::Range;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use tch::nn::VarStore;

use ferroclip_data::tokenize::{Tokenizer, TokenizerConfig};

use crate::model::{Clip, ClipConfig};

ferroclip_data::config_section! {
    /// `[model]`
    pub struct ModelConfig {
        /// OpenCLIP architecture: a built-in name (`convnext_base_w`, `convnext_large_d_320`, `ViT-B-32`,
        /// …; see Models) or the path of an OpenCLIP model-config `.json`.
        pub arch: String = "convnext_base_w",
        /// Input resolution; unset keeps the architecture's own. A ViT's must be a multiple of its
        /// patch size, a ConvNeXt's a multiple of its stem stride (4) and at least 32 (its stride
        /// after the last downsampling).
        pub image_size: Option<usize> = None => Range::closed(1.0, 8192.0),
        /// Weights to start from, with a fresh optimizer, schedule and data stream; ignored on
        /// resume. Ours or OpenCLIP's: a `.safetensors` model file, a `torch.save` state dict (the
        /// hub's `open_clip_pytorch_model.bin`) or an open_clip_train checkpoint (`epoch_N.pt`).
        pub init: Option<PathBuf> = None,
        /// Hugging Face text-encoder weights (e.g. `xlm-roberta-base`'s `model.safetensors` or
        /// `pytorch_model.bin`, `roberta.*` or bare `embeddings.*`/`encoder.*` keys) to start the text
        /// tower of an HF-text architecture from; applied after `init`, ignored on resume.
        pub text_init: Option<PathBuf> = None,
        /// Stochastic depth rate of the image tower; unset keeps the architecture's (0.1 for the
        /// ConvNeXts).
        pub drop_path: Option<f64> = None => Range::below(0.0, 1.0),
        /// Dropout in the image tower's projection head (OpenCLIP's `timm_drop`; the 256 px
        /// convnext_large_d augreg run used 0.1); unset keeps the architecture's (0 for the built-in
        /// ConvNeXts). ConvNeXt only: OpenCLIP's ViT head has none.
        pub head_dropout: Option<f64> = None => Range::below(0.0, 1.0),
        /// Text tokenizer: `"clip"` (OpenAI CLIP BPE) or the path of a Hugging Face `tokenizer.json`.
        pub tokenizer: TokenizerConfig = TokenizerConfig::Clip,
    }
}

impl ModelConfig {
    /// The architecture `arch` names, with `image_size`, `drop_path` and `head_dropout` applied.
    pub fn arch_config(&self) -> Result<ClipConfig> {
        let mut m = ClipConfig::resolve(&self.arch).map_err(|e| anyhow::anyhow!("key `model.arch`: {e}"))?;
        if let Some(size) = self.image_size {
            m.check_image_size(size as i64).map_err(|e| anyhow::anyhow!("key `model.image_size`: {e}"))?;
            m = m.with_image_size(size as i64);
        }
        if let Some(rate) = self.drop_path {
            m = m.with_drop_path(rate);
        }
        if let Some(rate) = self.head_dropout {
            if !matches!(m.vision, crate::model::VisionConfig::ConvNext(_)) && rate != 0.0 {
                anyhow::bail!(
                    "key `model.head_dropout`: {} has no dropout in its image head (ConvNeXt only)",
                    self.arch
                );
            }
            m = m.with_head_dropout(rate);
        }
        Ok(m)
    }

    /// The model with freshly initialized parameters in `vs` (torch's RNG: seed it first), and
    /// its resolved architecture. `grad_checkpointing` is `train.grad_checkpointing`.
    pub fn init(&self, vs: &VarStore, grad_checkpointing: bool) -> Result<(Clip, ClipConfig)> {
        let m = self.arch_config()?.with_grad_checkpointing(grad_checkpointing);
        Ok((Clip::new(&vs.root(), &m), m))
    }

    /// The tokenizer `tokenizer` names, with the text tower's context length.
    pub fn tokenizer(&self) -> Result<Arc<dyn Tokenizer>> {
        let context = self.arch_config()?.context_length() as usize;
        self.tokenizer.init(context).with_context(|| format!("model.tokenizer = {}", self.tokenizer))
    }
}
