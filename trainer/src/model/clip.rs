//! The two-tower CLIP model (`open_clip/model.py`: `CLIP`); its configurations come from OpenCLIP
//! model-config files (`super::arch`).
//!
//! State-dict layout: image tower under `visual.`, the CLIP text tower at the root (`CLIP`) or a
//! Hugging Face text tower under `text.` (`CustomTextCLIP`), `logit_scale` 0-dim.

use tch::nn::{self, Init};
use tch::Tensor;

use super::convnext::{ConvNext, ConvNextConfig};
use super::hf_text::{XlmRobertaText, XlmrConfig};
use super::text::{TextConfig, TextTransformer};
use super::vit::{VisionTransformer, VitConfig};
use super::ContrastiveModel;

/// Which image tower and its hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum VisionConfig {
    /// timm ConvNeXt trunk + OpenCLIP head (`timm_model_name: convnext_*`).
    ConvNext(ConvNextConfig),
    /// OpenCLIP `VisionTransformer`.
    Vit(VitConfig),
}

/// Which text tower and its hyper-parameters.
#[derive(Debug, Clone, PartialEq)]
pub enum TextTower {
    /// OpenCLIP's own `TextTransformer` (parameters at the state-dict root).
    Clip(TextConfig),
    /// Hugging Face XLM-RoBERTa wrapped by OpenCLIP's `HFTextEncoder` (parameters under `text.`).
    XlmRoberta(XlmrConfig),
}

impl TextTower {
    /// Token sequence length (77 for every preset).
    pub fn context_length(&self) -> i64 {
        match self {
            TextTower::Clip(c) => c.context_length,
            TextTower::XlmRoberta(c) => c.context_length,
        }
    }

    /// Residual blocks / encoder layers.
    pub fn layers(&self) -> i64 {
        match self {
            TextTower::Clip(c) => c.layers,
            TextTower::XlmRoberta(c) => c.layers,
        }
    }

    /// Vocabulary size.
    pub fn vocab_size(&self) -> i64 {
        match self {
            TextTower::Clip(c) => c.vocab_size,
            TextTower::XlmRoberta(c) => c.vocab_size,
        }
    }

    /// Sets the vocabulary size (small test vocabularies).
    pub fn set_vocab_size(&mut self, vocab_size: i64) {
        match self {
            TextTower::Clip(c) => c.vocab_size = vocab_size,
            TextTower::XlmRoberta(c) => c.vocab_size = vocab_size,
        }
    }

    /// Id of the padding token the model expects after the text (0 for CLIP BPE, 1 for XLM-R).
    pub fn pad_token_id(&self) -> i64 {
        match self {
            TextTower::Clip(_) => 0,
            TextTower::XlmRoberta(c) => c.pad_token_id,
        }
    }
}

/// A full CLIP model configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    /// Architecture name: the built-in name or the model-config file's stem (e.g. `convnext_base_w`).
    pub arch: String,
    /// Shared embedding size (640 for convnext_base_w).
    pub embed_dim: i64,
    /// Image tower.
    pub vision: VisionConfig,
    /// Text tower.
    pub text: TextTower,
    /// Recompute each ConvNeXt block / transformer block in backward instead of keeping its
    /// activations (OpenCLIP `--grad-checkpointing`); the XLM-RoBERTa text tower is not covered.
    pub grad_checkpointing: bool,
}

impl ClipConfig {
    /// Token sequence length of the text tower (77 for every preset).
    pub fn context_length(&self) -> i64 {
        self.text.context_length()
    }

    /// Number of text-tower blocks (residual blocks or encoder layers).
    pub fn text_layers(&self) -> i64 {
        self.text.layers()
    }

    /// Training/eval resolution of the image tower.
    pub fn image_size(&self) -> i64 {
        match &self.vision {
            VisionConfig::ConvNext(c) => c.image_size,
            VisionConfig::Vit(c) => c.image_size,
        }
    }

    /// Whether the image tower takes `image_size`-pixel inputs: a ViT's patches must tile the
    /// image (its positional grid has one entry per patch), a ConvNeXt needs at least one pixel
    /// left after its stride-4 stem and three stride-2 downsamplings (32) and a size the stem
    /// tiles. The reason when it does not.
    pub fn check_image_size(&self, image_size: i64) -> Result<(), String> {
        match &self.vision {
            VisionConfig::Vit(c) if image_size < c.patch_size || image_size % c.patch_size != 0 => {
                Err(format!("{image_size} is not a positive multiple of the ViT's patch size {}", c.patch_size))
            }
            VisionConfig::ConvNext(_) if image_size < 32 || image_size % 4 != 0 => Err(format!(
                "{image_size} does not suit a ConvNeXt: it needs a multiple of its stem stride 4, at least 32"
            )),
            _ => Ok(()),
        }
    }

    /// Same model at another input resolution (ViT: the positional grid changes; checkpoints
    /// from another size are resized on load).
    pub fn with_image_size(mut self, image_size: i64) -> Self {
        match &mut self.vision {
            VisionConfig::ConvNext(c) => c.image_size = image_size,
            VisionConfig::Vit(c) => c.image_size = image_size,
        }
        self
    }

    /// Same model with activation checkpointing on or off (no effect on the parameters).
    pub fn with_grad_checkpointing(mut self, on: bool) -> Self {
        self.grad_checkpointing = on;
        self
    }

    /// Override the projection head's dropout (ConvNeXt `timm_drop`; OpenCLIP's ViT head has none).
    pub fn with_head_dropout(mut self, rate: f64) -> Self {
        if let VisionConfig::ConvNext(c) = &mut self.vision {
            c.head_drop = rate;
        }
        self
    }

    /// Override the maximum stochastic-depth rate (ConvNeXt; the ViT tower has none, as in OpenCLIP's default).
    pub fn with_drop_path(mut self, rate: f64) -> Self {
        if let VisionConfig::ConvNext(c) = &mut self.vision {
            c.drop_path_rate = rate;
        }
        self
    }
}

#[derive(Debug)]
enum Text {
    Clip(TextTransformer),
    XlmRoberta(XlmRobertaText),
}

#[derive(Debug)]
enum Visual {
    ConvNext(ConvNext),
    Vit(VisionTransformer),
}

/// OpenCLIP `CLIP`: image tower, text tower, learnable `logit_scale` (init ln(1/0.07)).
#[derive(Debug)]
pub struct Clip {
    visual: Visual,
    text: Text,
    logit_scale: Tensor,
}

impl Clip {
    /// `root` is the state-dict root.
    pub fn new(root: &nn::Path, cfg: &ClipConfig) -> Self {
        let vp = root / "visual";
        let visual = match &cfg.vision {
            VisionConfig::ConvNext(c) => {
                let mut m = ConvNext::new(&vp, c, cfg.embed_dim);
                m.set_grad_checkpointing(cfg.grad_checkpointing);
                Visual::ConvNext(m)
            }
            VisionConfig::Vit(c) => {
                let mut m = VisionTransformer::new(&vp, c, cfg.embed_dim);
                m.set_grad_checkpointing(cfg.grad_checkpointing);
                Visual::Vit(m)
            }
        };
        let text = match &cfg.text {
            TextTower::Clip(c) => {
                let mut m = TextTransformer::new(root, c, cfg.embed_dim);
                m.set_grad_checkpointing(cfg.grad_checkpointing);
                Text::Clip(m)
            }
            TextTower::XlmRoberta(c) => Text::XlmRoberta(XlmRobertaText::new(&(root / "text"), c, cfg.embed_dim)),
        };
        let logit_scale = root.var("logit_scale", &[], Init::Const((1.0f64 / 0.07).ln()));
        Self { visual, text, logit_scale }
    }
}

impl ContrastiveModel for Clip {
    fn encode_image(&self, images: &Tensor, train: bool) -> Tensor {
        match &self.visual {
            Visual::ConvNext(m) => m.forward(images, train),
            Visual::Vit(m) => m.forward(images, train),
        }
    }

    fn encode_text(&self, tokens: &Tensor, train: bool) -> Tensor {
        match &self.text {
            Text::Clip(m) => m.forward(tokens),
            Text::XlmRoberta(m) => m.forward(tokens, train),
        }
    }

    fn logit_scale(&self) -> Tensor {
        self.logit_scale.shallow_clone()
    }
}

/// Number of scalar parameters in a var store (trainable or not).
pub fn num_params(vs: &nn::VarStore) -> i64 {
    vs.variables().values().map(|t| t.numel() as i64).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::{Device, Kind};

    /// A test architecture from `tests/models/` (not built into the binary).
    fn test_arch(name: &str) -> ClipConfig {
        let path = format!("{}/../tests/models/{name}.json", env!("CARGO_MANIFEST_DIR"));
        ClipConfig::resolve(&path).unwrap()
    }

    #[test]
    fn image_sizes_are_checked_against_the_tower() {
        let convnext = test_arch("convnext_test");
        assert!(convnext.check_image_size(32).is_ok() && convnext.check_image_size(100).is_ok());
        for bad in [1, 7, 28, 34] {
            assert!(convnext.check_image_size(bad).is_err(), "{bad}");
        }
        let vit = test_arch("vit_test");
        assert!(vit.check_image_size(8).is_ok() && vit.check_image_size(48).is_ok());
        for bad in [1, 4, 36] {
            assert!(vit.check_image_size(bad).unwrap_err().contains("patch size 8"), "{bad}");
        }
    }

    #[test]
    fn overrides_change_only_their_field() {
        let base = ClipConfig::resolve("convnext_base_w").unwrap();
        let cfg = base.clone().with_image_size(320).with_drop_path(0.2);
        assert_eq!(cfg.image_size(), 320);
        assert!(matches!(cfg.vision, VisionConfig::ConvNext(ref c) if c.drop_path_rate == 0.2));
        assert_eq!(cfg.with_image_size(256).with_drop_path(0.1), base);
    }

    #[test]
    fn init_matches_open_clip_and_timm() {
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &test_arch("convnext_test"));
        let vars = vs.variables();
        assert!((model.logit_scale().double_value(&[]) - (1.0f64 / 0.07).ln()).abs() < 1e-6);
        assert_eq!(model.logit_scale().dim(), 0, "OpenCLIP's logit_scale is 0-dim");
        let gamma = &vars["visual.trunk.stages.0.blocks.0.gamma"];
        assert!(gamma.allclose(&gamma.full_like(1e-6), 0.0, 1e-12, false));
        assert_eq!(vars["visual.trunk.stem.0.bias"].abs().max().double_value(&[]), 0.0);
        let pos_std = vars["positional_embedding"].std(true).double_value(&[]);
        assert!((pos_std - 0.01).abs() < 0.001, "positional_embedding std {pos_std}");
    }

    #[test]
    fn stochastic_depth_only_in_train_mode() {
        tch::manual_seed(1);
        let cfg = test_arch("convnext_test").with_drop_path(0.5);
        let vs = nn::VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &cfg);
        // Make the residual branches matter (gamma starts at 1e-6).
        tch::no_grad(|| {
            for (k, mut v) in vs.variables() {
                if k.ends_with("gamma") {
                    let _ = v.fill_(1.0);
                }
            }
        });
        let x = Tensor::randn([4, 3, 64, 64], (Kind::Float, Device::Cpu));
        let eval_a = model.encode_image(&x, false);
        assert!(eval_a.equal(&model.encode_image(&x, false)));
        assert_eq!(eval_a.size(), [4, 32]);
        let train = model.encode_image(&x, true);
        assert!((train - &eval_a).abs().max().double_value(&[]) > 1e-4);
        let tokens = Tensor::randint(49407, [3, 77], (Kind::Int64, Device::Cpu));
        assert_eq!(model.encode_text(&tokens, true).size(), [3, 32]);
    }
}
