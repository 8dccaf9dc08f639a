//! The pixel path of the transforms: bicubic resize and eval transform against PIL/torchvision
//! fixtures (`scripts/gen-augment-fixtures.py`), and TrainTransform end to end.

use std::path::PathBuf;

use ferroclip_data::augment::{
    hwc_to_chw, random_resized_crop_params, AugmentConfig, EvalTransform, ImageTransform, TrainTransform,
};
use ferroclip_data::decode::{decode_rgb, RgbImage};
use ferroclip_data::normalize::normalize_and_erase;
use ferroclip_data::resize::{resize_bicubic_into, ResizeBox};
use ferroclip_data::rng::SampleRng;

const LIMIT: u64 = 89_478_485;

fn png(name: &str) -> RgbImage {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    decode_rgb(&std::fs::read(&p).unwrap(), "png", LIMIT).unwrap()
}

fn max_diff(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap()
}

#[test]
fn bicubic_downscale_of_a_crop_matches_pil() {
    let src = png("resize_src.png");
    let want = png("want_resize_crop_down.png");
    let mut out = Vec::new();
    resize_bicubic_into(&src, ResizeBox::crop(3, 5, 30, 20), 16, 16, &mut out);
    assert!(max_diff(&out, &want.pixels) <= 1, "max diff {}", max_diff(&out, &want.pixels));
}

#[test]
fn bicubic_upscale_of_a_crop_matches_pil() {
    let src = png("resize_src.png");
    let want = png("want_resize_crop_up.png");
    let mut out = Vec::new();
    resize_bicubic_into(&src, ResizeBox::crop(10, 4, 12, 9), 31, 23, &mut out);
    assert!(max_diff(&out, &want.pixels) <= 1, "max diff {}", max_diff(&out, &want.pixels));
}

#[test]
fn eval_transform_matches_torchvision_resize_and_center_crop() {
    let src = png("resize_src.png");
    let want = png("want_eval_24.png");
    let mut got = vec![0u8; 3 * 24 * 24];
    EvalTransform::new(24, LIMIT).apply_rgb(&src, &mut got);
    let mut expect = vec![0u8; 3 * 24 * 24];
    hwc_to_chw(&want.pixels, &mut expect);
    assert!(max_diff(&got, &expect) <= 1, "max diff {}", max_diff(&got, &expect));
}

fn smooth_jpeg(w: u32, h: u32) -> Vec<u8> {
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let fx = x as f32 / w as f32;
        let fy = y as f32 / h as f32;
        image::Rgb([
            (255.0 * fx) as u8,
            (255.0 * fy) as u8,
            (128.0 + 100.0 * (fx * 6.0).sin() * (fy * 4.0).cos()) as u8,
        ])
    });
    let mut buf = std::io::Cursor::new(Vec::new());
    image::DynamicImage::ImageRgb8(img).write_to(&mut buf, image::ImageFormat::Jpeg).unwrap();
    buf.into_inner()
}

#[test]
fn train_transform_is_crop_then_resize_then_normalize() {
    // Without erasing, the output equals: the crop drawn first from the stream, PIL-bicubic
    // resized, normalized.
    let jpg = smooth_jpeg(300, 200);
    let cfg = AugmentConfig { re_prob: 0.0, ..Default::default() };
    let mut t = TrainTransform::new(32, &cfg, LIMIT);
    t.reduced_decode = false;
    let mut out = vec![0u8; 3 * 32 * 32];
    assert_eq!(t.apply(&jpg, "jpg", &mut SampleRng::from_seed(9), &mut out).unwrap(), None);
    let img = decode_rgb(&jpg, "jpg", LIMIT).unwrap();
    let c = random_resized_crop_params(300, 200, cfg.scale, cfg.ratio, &mut SampleRng::from_seed(9));
    let mut rgb = Vec::new();
    resize_bicubic_into(&img, ResizeBox::crop(c.left, c.top, c.width, c.height), 32, 32, &mut rgb);
    let mut want = vec![0u8; 3 * 32 * 32];
    hwc_to_chw(&rgb, &mut want);
    assert_eq!(out, want);
    // Same stream → same output; another stream → another crop.
    let mut again = vec![0u8; 3 * 32 * 32];
    t.apply(&jpg, "jpg", &mut SampleRng::from_seed(9), &mut again).unwrap();
    assert_eq!(out, again);
    t.apply(&jpg, "jpg", &mut SampleRng::from_seed(10), &mut again).unwrap();
    assert_ne!(out, again);
}

#[test]
fn reduced_jpeg_decode_keeps_the_output_close() {
    // 1024×768, output 64: most crops allow 1/2..1/8 decoding. The result must stay close to
    // the full-resolution path (same crop, antialiased resize of a smooth image).
    let jpg = smooth_jpeg(1024, 768);
    let cfg = AugmentConfig { re_prob: 0.0, ..Default::default() };
    let full = {
        let mut t = TrainTransform::new(64, &cfg, LIMIT);
        t.reduced_decode = false;
        t
    };
    let fast = TrainTransform::new(64, &cfg, LIMIT);
    let (mut a, mut b) = (vec![0u8; 3 * 64 * 64], vec![0u8; 3 * 64 * 64]);
    let mut total = 0.0;
    let mut differ = 0;
    for seed in 0..20 {
        full.apply(&jpg, "jpg", &mut SampleRng::from_seed(seed), &mut a).unwrap();
        fast.apply(&jpg, "jpg", &mut SampleRng::from_seed(seed), &mut b).unwrap();
        // In normalized units (÷ 255 ÷ std ≈ ÷ 68), as before the pixels became uint8.
        let mad = a.iter().zip(&b).map(|(x, y)| x.abs_diff(*y) as f64).sum::<f64>() / a.len() as f64 / 68.0;
        total += mad;
        differ += (a != b) as usize;
        assert!(mad < 0.05, "seed {seed}: mean abs diff {mad} (normalized units)");
    }
    assert!(total / 20.0 < 0.03);
    // The fast path really decoded at a reduced scale (otherwise outputs would be identical).
    assert!(differ >= 15, "only {differ}/20 outputs came from a reduced decode");
}

#[test]
fn erasing_fills_a_rectangle_with_standard_normal_noise() {
    let jpg = smooth_jpeg(200, 200);
    let cfg = AugmentConfig { re_prob: 1.0, ..Default::default() };
    let clean_cfg = AugmentConfig { re_prob: 0.0, ..Default::default() };
    let (mut erased_u8, mut clean_u8) = (vec![0u8; 3 * 48 * 48], vec![0u8; 3 * 48 * 48]);
    let (mut erased, mut clean) = (vec![0f32; 3 * 48 * 48], vec![0f32; 3 * 48 * 48]);
    let mut noise = Vec::new();
    for seed in 0..50 {
        let boxed = TrainTransform::new(48, &cfg, LIMIT)
            .apply(&jpg, "jpg", &mut SampleRng::from_seed(seed), &mut erased_u8)
            .unwrap();
        TrainTransform::new(48, &clean_cfg, LIMIT)
            .apply(&jpg, "jpg", &mut SampleRng::from_seed(seed), &mut clean_u8)
            .unwrap();
        // The pixels are the same: erasing happens after normalization.
        assert_eq!(erased_u8, clean_u8);
        let b = boxed.expect("re_prob 1 on a 48 px image always finds a box");
        normalize_and_erase(&erased_u8, &[boxed], &mut erased);
        normalize_and_erase(&clean_u8, &[None], &mut clean);
        let changed: Vec<f32> = erased.iter().zip(&clean).filter(|(e, c)| e != c).map(|(e, _)| *e).collect();
        assert_eq!(changed.len(), 3 * (b.height * b.width) as usize);
        // Between 2% and 1/3 of the area (±rounding), in every channel.
        let frac = changed.len() as f64 / erased.len() as f64;
        assert!(frac > 0.015 && frac < 0.36, "seed {seed}: erased fraction {frac}");
        noise.extend(changed);
    }
    let n = noise.len() as f64;
    let m = noise.iter().map(|&v| v as f64).sum::<f64>() / n;
    let var = noise.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>() / n;
    assert!(m.abs() < 0.02 && (var - 1.0).abs() < 0.03, "noise mean {m} var {var}");
}

#[test]
fn grayscale_and_jitter_options_change_the_image() {
    let jpg = smooth_jpeg(120, 90);
    let gray = AugmentConfig { re_prob: 0.0, grayscale_prob: 1.0, ..Default::default() };
    let mut out = vec![0u8; 3 * 16 * 16];
    TrainTransform::new(16, &gray, LIMIT).apply(&jpg, "jpg", &mut SampleRng::from_seed(1), &mut out).unwrap();
    // All channels carry the same value.
    for p in 0..256 {
        assert!(out[p] == out[256 + p] && out[p] == out[512 + p], "pixel {p}");
    }
    let jit = AugmentConfig { re_prob: 0.0, color_jitter: 0.4, ..Default::default() };
    let base = AugmentConfig { re_prob: 0.0, ..Default::default() };
    let mut a = vec![0u8; 3 * 16 * 16];
    TrainTransform::new(16, &jit, LIMIT).apply(&jpg, "jpg", &mut SampleRng::from_seed(1), &mut a).unwrap();
    let mut b = vec![0u8; 3 * 16 * 16];
    TrainTransform::new(16, &base, LIMIT).apply(&jpg, "jpg", &mut SampleRng::from_seed(1), &mut b).unwrap();
    assert_ne!(a, b);
}
