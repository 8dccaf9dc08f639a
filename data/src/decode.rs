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
//! JPEGs go through libjpeg-turbo ([`crate::jpeg`]), also at a reduced DCT scale (M/8) and only
//! for the rectangle a crop needs ([`decode_rgb_region`]), which the train transform uses.

use std::io::Cursor;

use image::{DynamicImage, ImageDecoder};

pub use crate::decoded::{recycle, DecodeError, RgbImage};

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
    sniff_format(bytes)
        .ok_or_else(|| DecodeError::Unsupported(if ext.is_empty() { "unknown".into() } else { ext.into() }))
}

fn corrupt(e: impl std::fmt::Display) -> DecodeError {
    DecodeError::Corrupt(e.to_string())
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
            let head = crate::jpeg::header(bytes)?;
            Ok((head.width, head.height))
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
    Ok(decode_rgb_region(bytes, ext, max_pixels, 8, (0, 0, u32::MAX, u32::MAX))?.img)
}

/// A decoded image, or the part of it a crop needs, possibly at a reduced scale.
#[derive(Debug)]
pub struct Decoded {
    pub img: RgbImage,
    /// The image was scaled by `scale_num / 8` (8: full size; always 8 for PNG and WebP).
    pub scale_num: u32,
    /// Where `img`'s first pixel lies in the scaled image.
    pub left: u32,
    pub top: u32,
}

/// Decode the rectangle `(left, top, width, height)` of the image scaled by `scale_num / 8`
/// (coordinates of the scaled image, clamped to it; `scale_num` in 1..=8). JPEGs are decoded
/// at that scale and only as far as the rectangle needs ([`crate::jpeg`]); PNG and WebP are
/// decoded whole at full size. The result says what it holds.
pub fn decode_rgb_region(
    bytes: &[u8],
    ext: &str,
    max_pixels: u64,
    scale_num: u32,
    region: (u32, u32, u32, u32),
) -> Result<Decoded, DecodeError> {
    let format = format_of(bytes, ext)?;
    if format == ImageFormat::Jpeg {
        let head = crate::jpeg::header(bytes)?;
        check_limit(head.width, head.height, max_pixels)?;
        let (left, top, width, height) = region;
        let r = crate::jpeg::decode_region(bytes, &head, scale_num, (left, top, width, height))?;
        return Ok(Decoded { img: r.img, scale_num, left: r.left, top: r.top });
    }
    let (w, h) = probe_size(bytes, ext)?;
    check_limit(w, h, max_pixels)?;
    // Decoders may still panic on adversarial input in paths we cannot audit; a bad member
    // must cost one sample, never the worker thread.
    let result = crate::guard::guarded(|| match format {
        ImageFormat::Png => decode_png(bytes),
        ImageFormat::Webp => decode_webp(bytes),
        ImageFormat::Jpeg => unreachable!("decoded above"),
    });
    let img = result.unwrap_or_else(|m| Err(corrupt(format!("decoder panicked: {m}"))))?;
    if img.pixels.len() != img.width as usize * img.height as usize * 3 {
        return Err(corrupt("decoder returned a short buffer"));
    }
    Ok(Decoded { img, scale_num: 8, left: 0, top: 0 })
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
        DynamicImage::ImageLuma16(b) => {
            b.into_raw().iter().for_each(|&v| pixels.extend_from_slice(&[v.min(255) as u8; 3]))
        }
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
