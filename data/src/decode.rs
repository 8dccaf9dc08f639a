//! Decoding JPEG, PNG and WebP members to 8-bit RGB, as PIL's `Image.open(..).convert('RGB')`.
//!
//! Reference behaviour: Pillow's `JpegImagePlugin`, `PngImagePlugin`, `WebPImagePlugin` and
//! `Convert.c` (what OpenCLIP's `webdataset` pipeline does with `.convert('RGB')`):
//! - the format comes from the magic bytes, not from the member extension;
//! - alpha is dropped without compositing onto a background;
//! - palette images are expanded through their palette;
//! - 16-bit RGB(A)/LA keep the high byte, while 16-bit grayscale (PIL mode `I;16`) is *clipped*
//!   to 0..=255 by PIL's `I;16 → L` conversion — a PIL quirk kept here for parity;
//! - Adobe (inverted) CMYK JPEGs become `R = C·K/255` on the stored values, PIL's `cmyk2rgb`.
//!
//! The pixel limit is checked on the header before any pixel is decoded, so a decompression
//! bomb costs a few hundred bytes of parsing (PIL's `DecompressionBombError`).
//!
//! JPEGs can also be decoded at a reduced DCT scale (1/2, 1/4, 1/8, [`decode_rgb_reduced`]),
//! which the train transform uses when the crop it keeps stays at least the output size.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder};

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

/// Container formats recognised by their magic bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageFormat {
    Jpeg,
    Png,
    Webp,
}

/// The format of `bytes` from its signature; `None` when it is none we decode.
pub fn sniff_format(bytes: &[u8]) -> Option<ImageFormat> {
    if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Some(ImageFormat::Jpeg)
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some(ImageFormat::Png)
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(ImageFormat::Webp)
    } else {
        None
    }
}

fn format_of(bytes: &[u8], ext: &str) -> Result<ImageFormat, DecodeError> {
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    sniff_format(bytes).ok_or_else(|| DecodeError::Unsupported(if ext.is_empty() { "unknown".into() } else { ext.into() }))
}

fn corrupt(e: impl std::fmt::Display) -> DecodeError {
    DecodeError::Corrupt(e.to_string())
}

fn zune_options() -> zune_jpeg::zune_core::options::DecoderOptions {
    use zune_jpeg::zune_core::colorspace::ColorSpace;
    // Dimension limits well above any pixel limit we enforce ourselves. Strict mode: PIL
    // raises on truncated JPEGs by default, so such samples are dropped here too.
    zune_jpeg::zune_core::options::DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::RGB)
        .set_max_width(1 << 16)
        .set_max_height(1 << 16)
        .set_strict_mode(true)
}

fn check_limit(width: u32, height: u32, limit: u64) -> Result<(), DecodeError> {
    if width == 0 || height == 0 {
        return Err(DecodeError::Corrupt(format!("zero-sized image {width}x{height}")));
    }
    if width as u64 * height as u64 > limit {
        return Err(DecodeError::TooLarge { width, height, limit });
    }
    Ok(())
}

/// Width and height from the header alone (no pixel data is decoded).
pub fn probe_size(bytes: &[u8], ext: &str) -> Result<(u32, u32), DecodeError> {
    match format_of(bytes, ext)? {
        ImageFormat::Jpeg => {
            let mut dec = zune_jpeg::JpegDecoder::new_with_options(
                zune_jpeg::zune_core::bytestream::ZCursor::new(bytes),
                zune_options(),
            );
            dec.decode_headers().map_err(corrupt)?;
            let (w, h) = dec.dimensions().ok_or_else(|| corrupt("no JPEG frame header"))?;
            Ok((w as u32, h as u32))
        }
        ImageFormat::Png => {
            // IHDR is always the first chunk: signature(8) len(4) "IHDR"(4) width(4) height(4).
            if bytes.len() < 24 || &bytes[12..16] != b"IHDR" {
                return Err(corrupt("PNG without IHDR"));
            }
            let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
            let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
            Ok((w, h))
        }
        ImageFormat::Webp => {
            let dec = image::codecs::webp::WebPDecoder::new(Cursor::new(bytes)).map_err(corrupt)?;
            Ok(dec.dimensions())
        }
    }
}

/// Decode to 8-bit RGB as PIL's `convert('RGB')`; images over `max_pixels` are refused from
/// their header ([`DecodeError::TooLarge`]).
pub fn decode_rgb(bytes: &[u8], ext: &str, max_pixels: u64) -> Result<RgbImage, DecodeError> {
    decode_rgb_reduced(bytes, ext, max_pixels, 1)
}

/// Like [`decode_rgb`], but a JPEG is decoded at `1/denom` of its size (`denom` ∈ {1, 2, 4, 8})
/// in the DCT domain: `ceil(w/denom) × ceil(h/denom)`. Other formats, and CMYK JPEGs, are
/// decoded at full size; callers look at the returned size to know the scale they got.
pub fn decode_rgb_reduced(bytes: &[u8], ext: &str, max_pixels: u64, denom: u32) -> Result<RgbImage, DecodeError> {
    let format = format_of(bytes, ext)?;
    let (w, h) = probe_size(bytes, ext)?;
    check_limit(w, h, max_pixels)?;
    // Decoders may still panic on adversarial input in paths we cannot audit; a bad member
    // must cost one sample, never the worker thread.
    let result = std::panic::catch_unwind(|| match format {
        ImageFormat::Jpeg if denom > 1 => decode_jpeg_scaled(bytes, w, h, denom),
        ImageFormat::Jpeg => decode_jpeg(bytes),
        ImageFormat::Png => decode_png(bytes),
        ImageFormat::Webp => decode_webp(bytes),
    });
    let img = result.unwrap_or_else(|_| Err(corrupt("decoder panicked")))?;
    if img.pixels.len() != img.width as usize * img.height as usize * 3 {
        return Err(corrupt("decoder returned a short buffer"));
    }
    Ok(img)
}

fn decode_jpeg(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    let mut dec =
        zune_jpeg::JpegDecoder::new_with_options(zune_jpeg::zune_core::bytestream::ZCursor::new(bytes), zune_options());
    dec.decode_headers().map_err(corrupt)?;
    let (w, h) = dec.dimensions().ok_or_else(|| corrupt("no JPEG frame header"))?;
    let len = dec.output_buffer_size().ok_or_else(|| corrupt("no JPEG frame header"))?;
    let mut pixels = take_buffer(len);
    dec.decode_into(&mut pixels).map_err(corrupt)?;
    Ok(RgbImage { width: w as u32, height: h as u32, pixels })
}

thread_local! {
    /// A per-thread pixel buffer handed back by [`recycle`]: a decode then reuses warm memory
    /// instead of a fresh zeroed allocation (measurable at hundreds of images per second).
    static POOL: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A buffer of exactly `len` bytes with unspecified contents (the decoder overwrites them).
fn take_buffer(len: usize) -> Vec<u8> {
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

/// Reduced-size IDCT decode via `jpeg-decoder` (zune-jpeg has no DCT scaling).
fn decode_jpeg_scaled(bytes: &[u8], w: u32, h: u32, denom: u32) -> Result<RgbImage, DecodeError> {
    let mut dec = jpeg_decoder::Decoder::new(bytes);
    dec.read_info().map_err(corrupt)?;
    let info = dec.info().ok_or_else(|| corrupt("no JPEG frame header"))?;
    if info.pixel_format == jpeg_decoder::PixelFormat::CMYK32 {
        return decode_jpeg(bytes);
    }
    let want_w = w.div_ceil(denom).min(u16::MAX as u32) as u16;
    let want_h = h.div_ceil(denom).min(u16::MAX as u32) as u16;
    let (sw, sh) = dec.scale(want_w, want_h).map_err(corrupt)?;
    let data = dec.decode().map_err(corrupt)?;
    let (sw, sh) = (sw as u32, sh as u32);
    let pixels = match info.pixel_format {
        jpeg_decoder::PixelFormat::RGB24 => data,
        jpeg_decoder::PixelFormat::L8 => data.iter().flat_map(|&v| [v, v, v]).collect(),
        jpeg_decoder::PixelFormat::L16 => data.chunks_exact(2).flat_map(|c| [c[0], c[0], c[0]]).collect(),
        jpeg_decoder::PixelFormat::CMYK32 => unreachable!("handled above"),
    };
    Ok(RgbImage { width: sw, height: sh, pixels })
}

fn decode_png(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    let dec = image::codecs::png::PngDecoder::new(Cursor::new(bytes)).map_err(corrupt)?;
    let img = DynamicImage::from_decoder(dec).map_err(corrupt)?;
    Ok(dynamic_to_rgb_like_pil(img))
}

fn decode_webp(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    let dec = image::codecs::webp::WebPDecoder::new(Cursor::new(bytes)).map_err(corrupt)?;
    let img = DynamicImage::from_decoder(dec).map_err(corrupt)?;
    Ok(dynamic_to_rgb_like_pil(img))
}

/// PIL's `convert('RGB')` from each mode the PNG/WebP decoders produce.
fn dynamic_to_rgb_like_pil(img: DynamicImage) -> RgbImage {
    let (width, height) = (img.width(), img.height());
    let n = width as usize * height as usize;
    let mut pixels = Vec::with_capacity(n * 3);
    match img {
        DynamicImage::ImageRgb8(b) => pixels = b.into_raw(),
        DynamicImage::ImageRgba8(b) => b.into_raw().chunks_exact(4).for_each(|p| pixels.extend_from_slice(&p[..3])),
        DynamicImage::ImageLuma8(b) => b.into_raw().iter().for_each(|&v| pixels.extend_from_slice(&[v, v, v])),
        DynamicImage::ImageLumaA8(b) => b.into_raw().chunks_exact(2).for_each(|p| pixels.extend_from_slice(&[p[0]; 3])),
        // PIL opens 16-bit grayscale as `I;16`, whose conversion to L/RGB clips at 255.
        DynamicImage::ImageLuma16(b) => b.into_raw().iter().for_each(|&v| pixels.extend_from_slice(&[v.min(255) as u8; 3])),
        // 16-bit LA/RGB/RGBA: PIL's `;16B` raw modes keep the most significant byte.
        DynamicImage::ImageLumaA16(b) => {
            b.into_raw().chunks_exact(2).for_each(|p| pixels.extend_from_slice(&[(p[0] >> 8) as u8; 3]))
        }
        DynamicImage::ImageRgb16(b) => pixels.extend(b.into_raw().iter().map(|&v| (v >> 8) as u8)),
        DynamicImage::ImageRgba16(b) => {
            b.into_raw().chunks_exact(4).for_each(|p| pixels.extend(p[..3].iter().map(|&v| (v >> 8) as u8)))
        }
        other => pixels = other.to_rgb8().into_raw(),
    }
    RgbImage { width, height, pixels }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_magic_not_extension() {
        assert_eq!(sniff_format(&[0xFF, 0xD8, 0xFF, 0xE0]), Some(ImageFormat::Jpeg));
        assert_eq!(sniff_format(b"\x89PNG\r\n\x1a\n...."), Some(ImageFormat::Png));
        assert_eq!(sniff_format(b"RIFF\0\0\0\0WEBPVP8 "), Some(ImageFormat::Webp));
        assert_eq!(sniff_format(b"GIF89a"), None);
        assert!(matches!(decode_rgb(b"GIF89a....", "jpg", 1000), Err(DecodeError::Unsupported(_))));
        assert!(matches!(decode_rgb(b"", "jpg", 1000), Err(DecodeError::Empty)));
    }
}
