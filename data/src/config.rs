//! The `[data]` section of a run config: typed, with defaults and validation in one place.

use crate::augment::AugmentConfig;
use crate::section::{Range, Section};

crate::config_section! {
    /// `[data]`: where training samples come from and how they are batched.
    pub struct DataConfig {
        /// Training shards: brace patterns (`/data/{00000..41407}.tar`), several sources joined with
        /// `::`, local paths or `pipe:CMD` (CMD's stdout is the tar stream); `.tar`, `.tar.gz`, `.tar.zst`.
        pub train: String = "",
        /// Sampling weight per `::`-separated source (OpenCLIP's `--train-data-upsampling-factors`);
        /// empty: every source weighted by its shard count.
        pub train_weights: Vec<f64> = Vec::new() => Range::positive(),
        /// Samples per rank per optimizer micro-step.
        pub batch_size: usize = 32 => Range::closed(1.0, 1048576.0),
        /// Decode/augment threads per rank.
        pub workers: usize = 4 => Range::closed(1.0, 1024.0),
        /// Shard reader threads per rank (read-ahead across shards); the rank's shards are split
        /// between them like webdataset's `split_by_worker`.
        pub readers: usize = 2 => Range::closed(1.0, 1024.0),
        /// Image member extensions in priority order, `;`-separated.
        pub image_keys: String = "jpg;jpeg;png;webp",
        /// Caption member: an extension (`"txt"`) or a field of a JSON member (`"json:caption"`).
        pub caption_key: String = "txt",
        /// Sample shuffle buffer size, in samples held encoded in memory (0 disables; eval never
        /// shuffles).
        pub shuffle_buffer: usize = 2000 => Range::closed(0.0, 16777216.0),
        /// The shuffle buffer also stops filling at this many bytes of encoded samples.
        pub shuffle_buffer_bytes: u64 = 1 << 30 => Range::closed(1.0, 1099511627776.0),
        /// Each reader thread reads ahead of the merge by at most this many bytes (and 8192
        /// samples): the slack that hides a `pipe:` shard switch (128 MiB of ~30 KB samples is
        /// about a second at 9k samples/s over 2 readers). The candidates being transformed are
        /// bounded by it too.
        pub read_ahead_bytes: u64 = 128 << 20 => Range::closed(1.0, 1099511627776.0),
        /// Tar members larger than this are passed over unread (the sample is skipped as
        /// `member_too_large`).
        pub max_member_bytes: u64 = 256 << 20 => Range::closed(1.0, 1099511627776.0),
        /// Captions are cut to this many bytes (at a character boundary) before cleaning and
        /// tokenization.
        pub max_caption_bytes: usize = 16 << 10 => Range::closed(1.0, 16777216.0),
        /// A reader that makes no progress for this many seconds (a hung `pipe:` command or
        /// network filesystem) is abandoned: its shard counts as failed, its command is ended, and
        /// reading goes on with the next one.
        pub read_timeout_s: f64 = 300.0 => Range::positive(),
        /// Shuffle the shard order every epoch.
        pub shuffle_shards: bool = true,
        /// Draw shards with replacement forever (OpenCLIP's `--dataset-resampled`).
        pub resampled: bool = false,
        /// Samples that make one epoch across all ranks (OpenCLIP's `--train-num-samples`): each
        /// rank yields `ceil(train_num_samples / (batch_size × ranks))` batches per epoch. Required
        /// with `resampled` and with more than one rank; 0 (one rank only) reads the shards once per
        /// epoch. `trainer data-check` counts the samples.
        pub train_num_samples: u64 = 0,
        /// Batches prepared ahead of the trainer.
        pub prefetch: usize = 4 => Range::closed(1.0, 1024.0),
        /// Images with more pixels than this are skipped (decompression bombs); PIL's limit.
        pub max_image_pixels: u64 = 89_478_485 => Range::at_least(1.0),
        /// Train-time augmentation (`[data.augment]`).
        pub augment: AugmentConfig = AugmentConfig::default(),
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
        self.image_keys.split(';').map(|s| s.trim().to_ascii_lowercase()).filter(|s| !s.is_empty()).collect()
    }

    /// Every key within its declared range (`[data.augment]`'s too), then the rules across keys.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let err = |key: &str, message: String| Err(ConfigError { key: key.into(), message });
        Section::check_ranges(self).map_err(|e| ConfigError { key: e.key.into(), message: e.message })?;
        if self.image_extensions().is_empty() {
            return err("image_keys", "names no extension".into());
        }
        if self.caption_key.trim().is_empty() {
            return err("caption_key", "must name a member extension or json:field".into());
        }
        if self.resampled && self.train_num_samples == 0 {
            return err("train_num_samples", "must be set (> 0) when resampled = true".into());
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
