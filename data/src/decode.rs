//! Decoding JPEG, PNG and WebP members to 8-bit RGB, as PIL's `Image.open(..).convert('RGB')`.

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
