//! CLIP models whose parameter paths equal OpenCLIP's state-dict keys.

pub mod arch;
pub mod clip;
pub mod convnext;
pub(crate) mod grad_checkpointing;
pub mod hf_text;
pub mod text;
pub mod torch_file;
pub mod vit;
pub mod weights;

pub use clip::{num_params, Clip, ClipConfig, TextTower, VisionConfig};
pub use convnext::{ConvNextConfig, ConvNextProj};
pub use hf_text::{XlmRobertaText, XlmrConfig};
pub use text::TextConfig;
pub use vit::VitConfig;
pub use weights::{
    load_hf_text_encoder, load_state_dict, read_state_dict, save_safetensors, without_ddp_prefix, LoadReport,
    WeightsError,
};

use tch::Tensor;

/// What the training step and evaluation need from a two-tower contrastive model.
pub trait ContrastiveModel {
    /// Image features `[b, embed_dim]`, not normalized. `train` enables stochastic depth/dropout.
    fn encode_image(&self, images: &Tensor, train: bool) -> Tensor;
    /// Text features `[b, embed_dim]`, not normalized.
    fn encode_text(&self, tokens: &Tensor, train: bool) -> Tensor;
    /// The learnable log temperature (a 0-dim parameter; `exp()` gives the logit scale).
    fn logit_scale(&self) -> Tensor;
}
