//! Train (augreg) and eval image transforms, writing normalized CHW floats.
//!
//! Follows timm's `create_transform(is_training=True, scale=(0.33, 1.0), re_prob=0.35,
//! re_mode='pixel', hflip=0, interpolation='bicubic')` + OpenAI CLIP normalization for training,
//! and OpenCLIP's eval transform (shortest-side bicubic resize, center crop).

use serde::{Deserialize, Serialize};

use crate::decode::DecodeError;
use crate::rng::SampleRng;

/// `[data.augment]`: the train-time augmentation recipe (defaults: augreg).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// RandomResizedCrop area fraction range. Default `[0.33, 1.0]` (augreg).
    pub scale: [f64; 2],
    /// RandomResizedCrop aspect ratio range. Default `[0.75, 1.3333333333333333]`.
    pub ratio: [f64; 2],
    /// Random erasing probability ('pixel' mode). Default 0.35 (augreg).
    pub re_prob: f64,
    /// Color jitter strength (brightness, contrast, saturation); 0 disables. Default 0.
    pub color_jitter: f64,
    /// Probability of converting to grayscale; 0 disables. Default 0.
    pub grayscale_prob: f64,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self { scale: [0.33, 1.0], ratio: [3.0 / 4.0, 4.0 / 3.0], re_prob: 0.35, color_jitter: 0.0, grayscale_prob: 0.0 }
    }
}

/// An invalid `[data.augment]` value.
#[derive(Debug)]
pub struct AugmentConfigError {
    pub key: String,
    pub message: String,
}

impl AugmentConfig {
    pub fn validate(&self) -> Result<(), AugmentConfigError> {
        let err = |key: &str, message: &str| Err(AugmentConfigError { key: key.into(), message: message.into() });
        if !(0.0 < self.scale[0] && self.scale[0] <= self.scale[1] && self.scale[1] <= 1.0) {
            return err("scale", "must satisfy 0 < min <= max <= 1");
        }
        if !(0.0 < self.ratio[0] && self.ratio[0] <= self.ratio[1]) {
            return err("ratio", "must satisfy 0 < min <= max");
        }
        if !(0.0..=1.0).contains(&self.re_prob) {
            return err("re_prob", "must be in [0, 1]");
        }
        if !(0.0..=1.0).contains(&self.grayscale_prob) {
            return err("grayscale_prob", "must be in [0, 1]");
        }
        if !(self.color_jitter >= 0.0 && self.color_jitter.is_finite()) {
            return err("color_jitter", "must be >= 0");
        }
        Ok(())
    }
}

/// Turns one encoded image into `3 × size × size` normalized floats.
pub trait ImageTransform: Send + Sync {
    /// Side length of the square output.
    fn output_size(&self) -> usize;
    /// Decode `encoded` (member extension `ext`, lower-case) and write the CHW result into
    /// `out` (length `3 * size * size`). All randomness comes from `rng`.
    fn apply(&self, encoded: &[u8], ext: &str, rng: &mut SampleRng, out: &mut [f32]) -> Result<(), DecodeError>;
}
