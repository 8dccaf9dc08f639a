//! Decoding each supported format against PIL's `convert('RGB')` (fixtures written by
//! `scripts/gen-augment-fixtures.py`), images the `image` crate encodes here, the pixel limit,
//! header probing, and garbage input.

use std::path::PathBuf;

use ferroclip_data::decode::{decode_rgb, decode_rgb_region, probe_size, DecodeError, RgbImage};

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

const LIMIT: u64 = 89_478_485;

/// Max and mean absolute difference between two same-sized images.
fn diff(a: &RgbImage, b: &RgbImage) -> (u8, f64) {
    assert_eq!((a.width, a.height), (b.width, b.height));
    let max = a.pixels.iter().zip(&b.pixels).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    let mean = a.pixels.iter().zip(&b.pixels).map(|(x, y)| x.abs_diff(*y) as f64).sum::<f64>() / a.pixels.len() as f64;
    (max, mean)
}

fn check(name: &str, ext: &str, max_tol: u8, mean_tol: f64) {
    let got = decode_rgb(&fixture(&format!("in_{name}.{ext}")), ext, LIMIT).unwrap();
    let want = decode_rgb(&fixture(&format!("want_{name}.png")), "png", LIMIT).unwrap();
    let (max, mean) = diff(&got, &want);
    assert!(max <= max_tol && mean <= mean_tol, "{name}: max diff {max}, mean diff {mean:.3}");
}

// JPEGs go through libjpeg-turbo with Pillow's settings (islow IDCT, fancy upsampling): exact.
#[test]
fn jpeg_baseline_matches_pil() {
    check("baseline", "jpg", 0, 0.0);
}
#[test]
fn jpeg_progressive_matches_pil() {
    check("progressive", "jpg", 0, 0.0);
}
#[test]
fn jpeg_grayscale_matches_pil() {
    check("gray", "jpg", 0, 0.0);
}
#[test]
fn jpeg_adobe_cmyk_matches_pil() {
    check("cmyk", "jpg", 0, 0.0);
}
// Lossless formats must match exactly.
#[test]
fn png_rgba_drops_alpha_like_pil() {
    check("rgba", "png", 0, 0.0);
}
#[test]
fn png_palette_matches_pil() {
    check("palette", "png", 0, 0.0);
    check("palette_trns", "png", 0, 0.0);
}
#[test]
fn png_la_matches_pil() {
    check("la", "png", 0, 0.0);
}
#[test]
fn png_16bit_matches_pil() {
    check("rgb16", "png", 0, 0.0);
    check("gray16", "png", 0, 0.0);
}
#[test]
fn webp_matches_pil() {
    check("webp_lossless_alpha", "webp", 0, 0.0);
    // Lossy WebP: libwebp vs image-webp YUV→RGB rounding.
    check("webp_lossy", "webp", 3, 0.6);
}

fn gradient(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, ((x + y) % 256) as u8]))
}

fn encode(img: &image::DynamicImage, fmt: image::ImageFormat) -> Vec<u8> {
    let mut buf = std::io::Cursor::new(Vec::new());
    img.write_to(&mut buf, fmt).unwrap();
    buf.into_inner()
}

#[test]
fn format_comes_from_magic_bytes_not_extension() {
    let img = image::DynamicImage::ImageRgb8(gradient(20, 10));
    let png = encode(&img, image::ImageFormat::Png);
    let got = decode_rgb(&png, "jpg", LIMIT).unwrap();
    assert_eq!((got.width, got.height), (20, 10));
    assert_eq!(got.pixels, img.to_rgb8().into_raw());
    let jpg = encode(&img, image::ImageFormat::Jpeg);
    assert_eq!(probe_size(&jpg, "png").unwrap(), (20, 10));
    assert_eq!(probe_size(&png, "webp").unwrap(), (20, 10));
    let webp = encode(&img, image::ImageFormat::WebP);
    assert_eq!(probe_size(&webp, "jpg").unwrap(), (20, 10));
    assert_eq!(decode_rgb(&webp, "jpg", LIMIT).unwrap().pixels, img.to_rgb8().into_raw());
}

#[test]
fn pixel_limit_is_checked_before_decoding() {
    // A 3000×3000 PNG header followed by nothing decodable: refused as TooLarge, not Corrupt,
    // which proves the check happens before pixel data is touched.
    let img = image::DynamicImage::ImageRgb8(gradient(3000, 3000));
    let png = encode(&img, image::ImageFormat::Png);
    let truncated = &png[..64];
    match decode_rgb(truncated, "png", 1_000_000) {
        Err(DecodeError::TooLarge { width: 3000, height: 3000, limit: 1_000_000 }) => {}
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let jpg = encode(&img, image::ImageFormat::Jpeg);
    // Cut a little after the start-of-scan marker: headers complete, entropy data missing.
    let sos = jpg.windows(2).position(|w| w == [0xFF, 0xDA]).unwrap();
    let cut = &jpg[..sos + 40];
    assert!(matches!(decode_rgb(cut, "jpg", 8_999_999), Err(DecodeError::TooLarge { .. })));
    assert!(matches!(decode_rgb(cut, "jpg", 9_000_000), Err(DecodeError::Corrupt(_))));
    assert!(decode_rgb(&jpg, "jpg", 9_000_000).is_ok());
}

#[test]
fn reduced_jpeg_decode_is_a_downscaled_image() {
    let img = image::DynamicImage::ImageRgb8(gradient(203, 117));
    let jpg = encode(&img, image::ImageFormat::Jpeg);
    let full = decode_rgb(&jpg, "jpg", LIMIT).unwrap();
    for d in [2u32, 4, 8] {
        let r = decode_rgb_region(&jpg, "jpg", LIMIT, 8 / d, (0, 0, u32::MAX, u32::MAX)).unwrap().img;
        assert_eq!((r.width, r.height), (203u32.div_ceil(d), 117u32.div_ceil(d)), "1/{d}");
        // Each reduced pixel ≈ the mean of its d×d block of the full decode (smooth image).
        let mut err = 0.0;
        let mut n = 0.0;
        for y in 0..r.height / 2 {
            for x in 0..r.width / 2 {
                for c in 0..3 {
                    let mut s = 0.0;
                    for dy in 0..d {
                        for dx in 0..d {
                            s += full.pixels[(((y * d + dy) * 203 + x * d + dx) * 3 + c) as usize] as f64;
                        }
                    }
                    err += (s / (d * d) as f64 - r.pixels[((y * r.width + x) * 3 + c) as usize] as f64).abs();
                    n += 1.0;
                }
            }
        }
        assert!(err / n < 4.0, "1/{d}: mean abs error {}", err / n);
    }
}

#[test]
fn garbage_never_panics() {
    let img = image::DynamicImage::ImageRgb8(gradient(64, 48));
    let mut inputs = vec![];
    for fmt in [image::ImageFormat::Jpeg, image::ImageFormat::Png, image::ImageFormat::WebP] {
        inputs.push(encode(&img, fmt));
    }
    inputs.push(fixture("in_progressive.jpg"));
    inputs.push(fixture("in_cmyk.jpg"));
    let mut state = 0x1234_5678_9abc_def0u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for data in &inputs {
        for cut in (0..data.len()).step_by(7) {
            let _ = decode_rgb(&data[..cut], "jpg", LIMIT);
            let _ = decode_rgb_region(&data[..cut], "jpg", LIMIT, 4, (3, 2, 20, 10));
        }
        for _ in 0..300 {
            let mut d = data.clone();
            for _ in 0..1 + next() % 8 {
                let i = (next() as usize) % d.len();
                d[i] = next() as u8;
            }
            if let Ok(img) = decode_rgb(&d, "jpg", LIMIT) {
                assert_eq!(img.pixels.len(), (img.width * img.height * 3) as usize);
            }
            let _ = decode_rgb_region(&d, "jpg", LIMIT, 2, (0, 0, u32::MAX, u32::MAX));
        }
    }
}
