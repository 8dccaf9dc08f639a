//! A batch as the trainer receives it: uint8 images, their erase boxes and token ids, in
//! buffers from the loader's pool (see [`crate::host`]), ready to wrap as tensors.

use crate::cursor::StreamCursor;
use crate::erase::EraseBox;
use crate::host::PooledBuf;

/// `len` samples: `images` `[len, 3, image_size, image_size]` uint8 CHW, row-major (the pixels
/// after RandomResizedCrop and resize, before `ToTensor`); `erase[i]` sample `i`'s
/// RandomErasing box, if any; `tokens` `[len, context_length]` i64. Dropping the batch returns
/// its buffers to the loader.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    pub len: usize,
    pub image_size: usize,
    pub context_length: usize,
    pub images: PooledBuf,
    pub erase: Vec<Option<EraseBox>>,
    pub tokens: PooledBuf,
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

impl Batch {
    /// `[len, 3, s, s]` uint8 CHW pixels.
    pub fn images(&self) -> &[u8] {
        self.images.as_bytes()
    }

    /// `[len, context_length]` token ids.
    pub fn tokens(&self) -> &[i64] {
        self.tokens.as_i64()
    }

    /// The images as the old f32 transform gave them: normalized (OpenAI mean/std) and erased,
    /// `[len, 3, s, s]` — the CPU reference of the device path.
    pub fn normalized_images(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.images.len()];
        crate::normalize::normalize_and_erase(self.images(), &self.erase, &mut out);
        out
    }
}
