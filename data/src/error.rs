//! The errors a loader (or `data-check`) reports to its caller; each names the pattern, shard,
//! key or rank it is about. Problems with single samples or shards are not errors: they are
//! skipped and counted ([`crate::stats`]).

use std::io;

use crate::config::ConfigError;
use crate::host::AllocError;

/// Errors the loader reports at start-up (or, for `Stalled`, when no data can be produced; a
/// `BatchBuffer` error after start-up ends the stream as `Stalled`, with its text).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("shard pattern `{pattern}` matches no file")]
    NoShards { pattern: String },
    #[error("bad shard pattern `{pattern}`: {message}")]
    BadPattern { pattern: String, message: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid loader options: {0}")]
    Options(String),
    #[error(
        "only {shards} shards for {world_size} ranks: every rank needs at least one shard (use more shards, \
         fewer ranks, or `resampled = true`)"
    )]
    TooFewShards { shards: usize, world_size: usize },
    #[error("shard `{shard}`: {source}")]
    Io { shard: String, source: io::Error },
    /// The checkpoint's stream was made with another value of `key`.
    #[error(
        "`{key}` changed since the checkpoint was written ({was} then, {now} now), so its data stream cannot \
         continue exactly; restore the old value, or set checkpoint.allow_data_change = true to accept a changed stream"
    )]
    DataChanged { key: String, was: String, now: String },
    /// The checkpoint's data cursors do not describe one consistent stream.
    #[error("the checkpoint's data cursors cannot be resumed: {0}")]
    BadCursor(String),
    #[error("no usable batch: {0}")]
    Stalled(String),
    /// A batch buffer (its size set by `data.batch_size`) cannot be allocated.
    #[error("the {what} buffer of a batch of {batch_size} samples: {alloc}; lower data.batch_size")]
    BatchBuffer { batch_size: usize, what: &'static str, alloc: AllocError },
}

impl DataError {
    /// Whether the run's config (its shard patterns, its `[data]` values, a `data.batch_size` whose
    /// buffers this machine cannot allocate, or what it resumes with) is what is wrong, rather than the data or the machine: `trainer` exits with status 2 then.
    pub fn is_config_error(&self) -> bool {
        matches!(
            self,
            DataError::NoShards { .. }
                | DataError::BadPattern { .. }
                | DataError::Config(_)
                | DataError::TooFewShards { .. }
                | DataError::DataChanged { .. }
                | DataError::BatchBuffer { .. }
        )
    }
}
