//! What a decoder hands back: an 8-bit RGB image, or why there is none, and the per-thread pixel
//! buffers decodes reuse. Shared by the format dispatch ([`crate::decode`]) and the libjpeg-turbo
//! path ([`crate::jpeg`]), which both fill these buffers.

/// An 8-bit RGB image, rows packed (`width * 3` bytes per row).
#[derive(Debug, Clone, PartialEq)]
pub struct RgbImage {
    pub width: u32,
    pub height: u32,
    pub pixels: Vec<u8>,
}

/// Why an image member could not be used; the loader counts each kind.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty image member")]
    Empty,
    #[error("unsupported image format `{0}`")]
    Unsupported(String),
    #[error("corrupt image: {0}")]
    Corrupt(String),
    #[error("image of {width}x{height} exceeds the pixel limit {limit}")]
    TooLarge { width: u32, height: u32, limit: u64 },
}

impl DecodeError {
    /// A short stable name for counters and logs.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::Empty => "empty_image",
            DecodeError::Unsupported(_) => "unsupported_image",
            DecodeError::Corrupt(_) => "corrupt_image",
            DecodeError::TooLarge { .. } => "image_too_large",
        }
    }
}

thread_local! {
    /// A per-thread pixel buffer handed back by [`recycle`]: a decode then reuses warm memory
    /// instead of a fresh zeroed allocation (measurable at hundreds of images per second).
    static POOL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of exactly `len` bytes with unspecified contents (the decoder overwrites them).
pub(crate) fn take_buffer(len: usize) -> Vec<u8> {
    let mut v = POOL.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if v.len() < len {
        v.resize(len, 0);
    }
    v.truncate(len);
    v
}

/// Give a decoded image's memory back for the next decode on this thread (optional).
pub fn recycle(img: RgbImage) {
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        if img.pixels.capacity() > p.capacity() {
            *p = img.pixels;
        }
    });
}
