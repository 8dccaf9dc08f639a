//! JPEG decoding through libjpeg-turbo (the library Pillow decodes with), decoding only what a
//! crop needs: the image scaled by `M/8` in the DCT domain (`M` = 1..=8), and of that only the
//! rectangle asked for — columns through `jpeg_crop_scanline`, rows above it skipped with
//! `jpeg_skip_scanlines` (entropy-decoded, but no IDCT, upsampling or colour conversion), rows
//! below it not decoded at all.
//!
//! Output matches Pillow's `Image.open(..).convert('RGB')`: islow IDCT, fancy upsampling, RGB
//! from YCbCr/RGB/grayscale, and CMYK/YCCK read as CMYK (inverted when an Adobe marker is
//! present, as Pillow's `CMYK;I` raw mode) then converted with Pillow's `cmyk2rgb`. A premature
//! end of data is an error, as Pillow's "image file is truncated"; other libjpeg warnings are
//! ignored, as Pillow ignores them. The C side (`csrc/jpeg.c`) catches libjpeg's errors with
//! setjmp/longjmp in C, so no Rust frame is unwound.

use std::ffi::{c_char, c_int, CStr};

use crate::decoded::{take_buffer, DecodeError, RgbImage};

#[repr(C)]
#[derive(Default)]
struct FcHeader {
    width: u32,
    height: u32,
    components: u32,
    adobe: u32,
}

#[repr(C)]
#[derive(Default, Debug, Clone, Copy)]
struct FcRegion {
    left: u32,
    top: u32,
    width: u32,
    height: u32,
    scaled_width: u32,
    scaled_height: u32,
}

extern "C" {
    fn fc_jpeg_header(data: *const u8, len: usize, out: *mut FcHeader, message: *mut c_char, cap: usize) -> c_int;
    fn fc_jpeg_decode(
        data: *const u8,
        len: usize,
        scale_num: u32,
        region: *mut FcRegion,
        out: *mut u8,
        cap: usize,
        message: *mut c_char,
        cap_message: usize,
    ) -> c_int;
}

const MESSAGE: usize = 200;

/// Columns decoded beyond each side of a wanted rectangle (see [`decode_region`]).
const EDGE: u32 = 2;

fn failed(message: &[c_char; MESSAGE]) -> DecodeError {
    // SAFETY: the C side writes a NUL-terminated string (snprintf) before returning -1.
    let text = unsafe { CStr::from_ptr(message.as_ptr()) }.to_string_lossy().into_owned();
    DecodeError::Corrupt(format!("JPEG: {text}"))
}

/// What the frame header says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JpegHeader {
    pub width: u32,
    pub height: u32,
    /// Stored as CMYK/YCCK (converted to RGB on decode).
    pub cmyk: bool,
    pub adobe: bool,
}

/// Parse the headers (no pixel data).
pub fn header(bytes: &[u8]) -> Result<JpegHeader, DecodeError> {
    let mut h = FcHeader::default();
    let mut message = [0 as c_char; MESSAGE];
    // SAFETY: valid pointers and lengths; the C side reads `bytes` only and writes `h`/`message`.
    let rc = unsafe { fc_jpeg_header(bytes.as_ptr(), bytes.len(), &mut h, message.as_mut_ptr(), MESSAGE) };
    if rc != 0 {
        return Err(failed(&message));
    }
    Ok(JpegHeader { width: h.width, height: h.height, cmyk: h.components == 4, adobe: h.adobe != 0 })
}

/// Side of the image scaled by `m/8`: libjpeg's `ceil(side · m / 8)`.
pub fn scaled_size(side: u32, m: u32) -> u32 {
    (side as u64 * m as u64).div_ceil(8) as u32
}

/// A rectangle decoded from a JPEG scaled by `scale_num / 8`.
#[derive(Debug)]
pub struct JpegRegion {
    /// The decoded pixels (RGB); `left, top` is where `img`'s first pixel lies in the scaled image.
    pub img: RgbImage,
    pub left: u32,
    pub top: u32,
    pub scale_num: u32,
    /// The scaled image's full size.
    pub scaled_width: u32,
    pub scaled_height: u32,
}

/// Decode the rectangle `left, top, width × height` (coordinates of the image scaled by
/// `scale_num / 8`, clamped to it) as RGB, its pixels exactly those of a full decode at that scale.
/// The result may start further left and be wider (a margin, then whole iMCUs): `left` says where.
pub fn decode_region(
    bytes: &[u8],
    head: &JpegHeader,
    scale_num: u32,
    (left, top, width, height): (u32, u32, u32, u32),
) -> Result<JpegRegion, DecodeError> {
    assert!((1..=8).contains(&scale_num), "JPEG scale {scale_num}/8");
    let (sw, sh) = (scaled_size(head.width, scale_num), scaled_size(head.height, scale_num));
    let (width, height) = (width.min(sw.saturating_sub(left)), height.min(sh.saturating_sub(top)));
    if width == 0 || height == 0 {
        return Err(DecodeError::Corrupt(format!(
            "decode region {width}x{height}+{left}+{top} outside the {sw}x{sh} image (scale {scale_num}/8)"
        )));
    }
    // With `jpeg_crop_scanline`, fancy upsampling treats the decoded columns' edges as the image's
    // edges and replicates chroma there, so the outermost columns can differ from a full decode.
    // Asking for EDGE more columns on each side keeps the wanted ones exact.
    let (wl, wr) = (left.saturating_sub(EDGE), (left + width).saturating_add(EDGE).min(sw));
    let mut region = FcRegion { left: wl, top, width: wr - wl, height, ..FcRegion::default() };
    let width = wr - wl;
    // Widened further by at most one iMCU (≤ 32 px at any scale) on the left and right.
    let components = if head.cmyk { 4 } else { 3 };
    let cap = (width as usize + 64) * height as usize * components;
    let mut out = take_buffer(cap);
    let mut message = [0 as c_char; MESSAGE];
    // SAFETY: `out` holds `cap` bytes; the C side writes at most `cap` (it checks) and fills
    // `region` and `message`.
    let rc = unsafe {
        fc_jpeg_decode(
            bytes.as_ptr(),
            bytes.len(),
            scale_num,
            &mut region,
            out.as_mut_ptr(),
            cap,
            message.as_mut_ptr(),
            MESSAGE,
        )
    };
    if rc != 0 {
        return Err(failed(&message));
    }
    let n = region.width as usize * region.height as usize;
    let pixels = if head.cmyk {
        let rgb = cmyk_to_rgb(&out[..n * 4], head.adobe);
        crate::decoded::recycle(RgbImage { width: 0, height: 0, pixels: out });
        rgb
    } else {
        out.truncate(n * 3);
        out
    };
    Ok(JpegRegion {
        img: RgbImage { width: region.width, height: region.height, pixels },
        left: region.left,
        top: region.top,
        scale_num,
        scaled_width: region.scaled_width,
        scaled_height: region.scaled_height,
    })
}

/// The whole image at full size.
pub fn decode(bytes: &[u8]) -> Result<RgbImage, DecodeError> {
    let head = header(bytes)?;
    Ok(decode_region(bytes, &head, 8, (0, 0, head.width, head.height))?.img)
}

/// Pillow's `CMYK` (or `CMYK;I` after an Adobe marker) → RGB: `cmyk2rgb` in `Convert.c`,
/// `out = nk - MULDIV255(c, nk)` with `nk = 255 - k`.
fn cmyk_to_rgb(cmyk: &[u8], inverted: bool) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    let mut rgb = Vec::with_capacity(cmyk.len() / 4 * 3);
    for p in cmyk.chunks_exact(4) {
        let v = |x: u8| if inverted { 255 - x as u32 } else { x as u32 };
        let nk = 255 - v(p[3]);
        for &c in &p[..3] {
            rgb.push((nk - muldiv255(v(c), nk)) as u8);
        }
    }
    rgb
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo(w: u32, h: u32) -> Vec<u8> {
        let img = image::RgbImage::from_fn(w, h, |x, y| {
            let v = ((x * 7 + y * 13) % 256) as u8;
            image::Rgb([v, (x * 255 / w) as u8, ((x ^ y) % 256) as u8])
        });
        let mut buf = std::io::Cursor::new(Vec::new());
        image::DynamicImage::ImageRgb8(img).write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
        buf.into_inner()
    }

    /// Every scale, a rectangle at odd offsets: exactly the same pixels as the full decode.
    fn region_matches_full_decode(jpg: &[u8], (x, y, w, h): (u32, u32, u32, u32), what: &str) {
        let head = header(jpg).unwrap();
        for m in 1..=8 {
            let full = decode_region(jpg, &head, m, (0, 0, 1 << 20, 1 << 20)).unwrap();
            let size = (scaled_size(head.width, m), scaled_size(head.height, m));
            assert_eq!((full.img.width, full.img.height), size, "{what}: scale {m}/8");
            let (l, t) = (x * m / 8, y * m / 8);
            let (w, h) = (scaled_size(w, m).max(1), scaled_size(h, m).max(1));
            let part = decode_region(jpg, &head, m, (l, t, w, h)).unwrap();
            let w = w.min(size.0 - l);
            assert!(part.left <= l && part.left + part.img.width >= l + w && part.top == t && part.img.height == h);
            let (pw, fw) = (part.img.width as usize, full.img.width as usize);
            let (dx, l, w) = ((l - part.left) as usize, l as usize, w as usize);
            for y in 0..part.img.height as usize {
                let a = &part.img.pixels[(y * pw + dx) * 3..][..w * 3];
                let b = &full.img.pixels[((t as usize + y) * fw + l) * 3..][..w * 3];
                assert_eq!(a, b, "{what}: scale {m}/8, row {y}");
            }
        }
    }

    #[test]
    fn a_region_is_exactly_that_part_of_the_full_decode_at_every_scale() {
        let jpg = photo(203, 150);
        let head = header(&jpg).unwrap();
        assert_eq!((head.width, head.height, head.cmyk), (203, 150, false));
        // Left and right edges on, before and after iMCU boundaries; up to the image's edges.
        for (x, y, w, h) in [(37, 21, 90, 70), (16, 16, 16, 16), (15, 1, 34, 9), (32, 17, 31, 40), (150, 100, 53, 50)] {
            region_matches_full_decode(&jpg, (x, y, w, h), "4:2:2 photo");
        }
        // PIL-written fixtures: 4:2:0 baseline and progressive, grayscale, Adobe CMYK.
        for name in ["baseline", "progressive", "gray", "cmyk"] {
            let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/fixtures/in_{name}.jpg"));
            let jpg = std::fs::read(&path).unwrap();
            for (x, y, w, h) in [(13, 9, 21, 17), (17, 0, 31, 40), (16, 15, 16, 2), (0, 23, 32, 17)] {
                region_matches_full_decode(&jpg, (x, y, w, h), name);
            }
        }
    }

    #[test]
    fn truncated_and_garbage_data_are_errors() {
        let jpg = photo(64, 64);
        assert!(matches!(decode(&jpg[..jpg.len() / 2]), Err(DecodeError::Corrupt(m)) if m.contains("Premature end")));
        assert!(matches!(header(b"\xff\xd8\xff\xe0garbage"), Err(DecodeError::Corrupt(_))));
    }
}
