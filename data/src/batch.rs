//! A batch as the trainer receives it: contiguous buffers, ready to wrap as tensors.

use crate::cursor::StreamCursor;

/// `len` samples: images `[len, 3, image_size, image_size]` (normalized f32, row-major),
/// tokens `[len, context_length]`.
#[derive(Debug, Clone)]
pub struct Batch {
    pub len: usize,
    pub image_size: usize,
    pub context_length: usize,
    pub images: Vec<f32>,
    pub tokens: Vec<i64>,
    /// Integer class labels (from the `cls` member) when the loader was asked for them.
    pub labels: Vec<i64>,
    /// Sample keys, in batch order (for debugging and resume tests).
    pub keys: Vec<String>,
    /// The raw caption of each sample, in batch order (retrieval evaluation, debugging).
    pub captions: Vec<String>,
    /// Epoch this batch belongs to (0-based).
    pub epoch: u64,
    /// Stream position right after this batch: store it to resume exactly here.
    pub cursor: StreamCursor,
}
