//! The `[data]` section of a run config: typed, with defaults and validation in one place.

use serde::{Deserialize, Serialize};

use crate::augment::AugmentConfig;

/// `[data]`: where training samples come from and how they are batched.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Training shards. Brace patterns (`/data/{00000..41407}.tar`), several sources joined
    /// with `::`, local paths or `pipe:CMD` (CMD's stdout is the tar stream). Default `""`.
    pub train: String,
    /// Sampling weight per `::`-separated source (OpenCLIP's `--train-data-upsampling-factors`).
    /// Empty: every source weighted by its shard count. Default `[]`.
    pub train_weights: Vec<f64>,
    /// Samples per rank per optimizer micro-step. Default 32.
    pub batch_size: usize,
    /// Decode/augment threads per rank. Default 4.
    pub workers: usize,
    /// Shard reader threads per rank (read-ahead across shards); the rank's shards are split
    /// between them like webdataset's `split_by_worker`. Default 2.
    pub readers: usize,
    /// Image member extensions in priority order, `;`-separated. Default `"jpg;jpeg;png;webp"`.
    pub image_keys: String,
    /// Caption member: an extension (`"txt"`) or a field of a JSON member (`"json:caption"`).
    /// Default `"txt"`.
    pub caption_key: String,
    /// Sample shuffle buffer size, in samples held encoded in memory (0 disables; eval never
    /// shuffles). Default 2000.
    pub shuffle_buffer: usize,
    /// The shuffle buffer also stops filling at this many bytes of encoded samples. Default 1 GiB.
    pub shuffle_buffer_bytes: u64,
    /// Each reader thread reads ahead of the merge by at most this many bytes (and 64 samples);
    /// the candidates of a batch being transformed are bounded by it too. Default 128 MiB.
    pub read_ahead_bytes: u64,
    /// Tar members larger than this are passed over unread (the sample is skipped as
    /// `member_too_large`). Default 256 MiB.
    pub max_member_bytes: u64,
    /// Captions are cut to this many bytes (at a character boundary) before cleaning and
    /// tokenization. Default 16384.
    pub max_caption_bytes: usize,
    /// A reader that makes no progress for this many seconds (a hung `pipe:` command or
    /// network filesystem) is abandoned: its shard counts as failed and reading goes on with
    /// the next one. Default 300.
    pub read_timeout_s: f64,
    /// Shuffle the shard order every epoch. Default true.
    pub shuffle_shards: bool,
    /// Draw shards with replacement forever (OpenCLIP's `--dataset-resampled`). Default false.
    pub resampled: bool,
    /// Samples that make one epoch across all ranks (OpenCLIP's `--train-num-samples`): each
    /// rank yields `ceil(train_num_samples / (batch_size * world_size))` batches per epoch.
    /// 0 means one pass over the rank's shards. Required with `resampled`. Default 0.
    pub train_num_samples: u64,
    /// Batches prepared ahead of the trainer. Default 4.
    pub prefetch: usize,
    /// Images with more pixels than this are skipped (decompression bombs). Default PIL's 89,478,485.
    pub max_image_pixels: u64,
    /// Train-time augmentation (`[data.augment]`).
    pub augment: AugmentConfig,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            train: String::new(),
            train_weights: Vec::new(),
            batch_size: 32,
            workers: 4,
            readers: 2,
            image_keys: "jpg;jpeg;png;webp".into(),
            caption_key: "txt".into(),
            shuffle_buffer: 2000,
            shuffle_buffer_bytes: 1 << 30,
            read_ahead_bytes: 128 << 20,
            max_member_bytes: 256 << 20,
            max_caption_bytes: 16 << 10,
            read_timeout_s: 300.0,
            shuffle_shards: true,
            resampled: false,
            train_num_samples: 0,
            prefetch: 4,
            max_image_pixels: 89_478_485,
            augment: AugmentConfig::default(),
        }
    }
}

/// A `[data]` value that cannot work; names the key.
#[derive(Debug, thiserror::Error)]
#[error("data.{key}: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl DataConfig {
    /// The image extensions, in priority order.
    pub fn image_extensions(&self) -> Vec<String> {
        self.image_keys
            .split(';')
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
            .collect()
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| Err(ConfigError { key: key.into(), message });
        if self.batch_size == 0 {
            return err("batch_size", "must be at least 1".into());
        }
        if self.workers == 0 {
            return err("workers", "must be at least 1".into());
        }
        if self.readers == 0 {
            return err("readers", "must be at least 1".into());
        }
        if self.image_extensions().is_empty() {
            return err("image_keys", "names no extension".into());
        }
        if self.caption_key.trim().is_empty() {
            return err("caption_key", "must name a member extension or json:field".into());
        }
        if self.resampled && self.train_num_samples == 0 {
            return err("train_num_samples", "must be set (> 0) when resampled = true".into());
        }
        if self.prefetch == 0 {
            return err("prefetch", "must be at least 1".into());
        }
        for (key, v) in [
            ("shuffle_buffer_bytes", self.shuffle_buffer_bytes),
            ("read_ahead_bytes", self.read_ahead_bytes),
            ("max_member_bytes", self.max_member_bytes),
            ("max_caption_bytes", self.max_caption_bytes as u64),
        ] {
            if v == 0 {
                return err(key, "must be at least 1".into());
            }
        }
        if !(self.read_timeout_s > 0.0 && self.read_timeout_s.is_finite()) {
            return err("read_timeout_s", "must be a number of seconds > 0".into());
        }
        if self.train_weights.iter().any(|w| !(w.is_finite() && *w > 0.0)) {
            return err("train_weights", "weights must be finite and > 0".into());
        }
        if !self.train_weights.is_empty() {
            let sources = self.train.split("::").count();
            if sources != self.train_weights.len() {
                return err(
                    "train_weights",
                    format!("has {} weights for {} `::`-separated sources", self.train_weights.len(), sources),
                );
            }
        }
        self.augment.validate().map_err(|e| ConfigError { key: format!("augment.{}", e.key), message: e.message })
    }
}
