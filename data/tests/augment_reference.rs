//! The train transform against references written by others, from fixtures made by
//! `scripts/gen-transform-fixtures.py`: RandomResizedCrop parameters against timm's sampler (KS
//! test on 20,000 draws against 200,000 of timm's), the bicubic resize against PIL for fractional
//! boxes and downscales of 2× and more, and a high-frequency JPEG through decode + crop + resize
//! against PIL + timm — at full scale, and through the reduced-DCT path, whose difference from
//! the full-scale path is measured here and bounded; and colour jitter against torchvision's
//! `ColorJitter` on PIL images with its draws fixed.

use std::path::PathBuf;

use serde_json::Value;

use ferroclip_data::augment::{
    apply_color_jitter, random_resized_crop_params, AugmentConfig, CropRect, TrainTransform,
};
use ferroclip_data::decode::{decode_rgb, RgbImage};
use ferroclip_data::resize::{resize_bicubic_into, ResizeBox};
use ferroclip_data::rng::SampleRng;

const LIMIT: u64 = 89_478_485;

fn fixture(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e} (run scripts/gen-transform-fixtures.py)", p.display()))
}

fn json(name: &str) -> Value {
    serde_json::from_slice(&fixture(name)).unwrap()
}

fn png(name: &str) -> RgbImage {
    decode_rgb(&fixture(name), "png", LIMIT).unwrap()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect()
}

/// Rows `y0..y0 + h`, columns `0..w` of a stacked fixture image, as RGB bytes.
fn rows(img: &RgbImage, y0: usize, w: usize, h: usize) -> Vec<u8> {
    let stride = img.width as usize * 3;
    (y0..y0 + h).flat_map(|y| img.pixels[y * stride..y * stride + w * 3].iter().copied()).collect()
}

/// Largest distance between our sample's CDF and the reference's, seen at the reference's
/// quantiles `(level, value)`: the reference CDF F satisfies F(v⁻) ≤ level ≤ F(v), so with ties
/// (pixel-rounded crops, the fallback's point mass) the distance counts only what no tie explains.
fn ks_distance(sample: &mut [f64], levels: &[f64], values: &[f64]) -> f64 {
    sample.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = sample.len() as f64;
    let mut d: f64 = 0.0;
    for (&q, &v) in levels.iter().zip(values) {
        let below = sample.partition_point(|&x| x < v) as f64 / n;
        let at_most = sample.partition_point(|&x| x <= v) as f64 / n;
        d = d.max(q - at_most).max(below - q);
    }
    d
}

#[test]
fn random_resized_crop_matches_timms_sampler() {
    let fx = json("rrc_quantiles.json");
    let levels = floats(&fx["levels"]);
    let n = 20_000;
    for (k, case) in fx["cases"].as_array().unwrap().iter().enumerate() {
        let (w, h) = (case["width"].as_u64().unwrap() as u32, case["height"].as_u64().unwrap() as u32);
        let scale = floats(&case["scale"]);
        let ratio = floats(&case["ratio"]);
        let m = case["draws"].as_f64().unwrap();
        let mut rng = SampleRng::from_seed(100 + k as u64);
        let mut stats: [Vec<f64>; 4] = Default::default();
        for _ in 0..n {
            let c = random_resized_crop_params(w, h, [scale[0], scale[1]], [ratio[0], ratio[1]], &mut rng);
            assert!(c.left + c.width <= w && c.top + c.height <= h);
            let (cw, ch) = (c.width as f64, c.height as f64);
            stats[0].push(cw * ch / (w as f64 * h as f64));
            stats[1].push((cw / ch).ln());
            stats[2].push((c.left as f64 + cw / 2.0) / w as f64);
            stats[3].push((c.top as f64 + ch / 2.0) / h as f64);
        }
        // Two-sample KS critical value at α = 0.001 (1.95·sqrt(1/n + 1/m)), plus the quantile
        // grid's resolution (0.001).
        let crit = 1.95 * (1.0 / n as f64 + 1.0 / m).sqrt() + 0.001;
        for (i, name) in ["area", "log_aspect", "center_x", "center_y"].iter().enumerate() {
            let d = ks_distance(&mut stats[i], &levels, &floats(&case[*name]));
            assert!(d < crit, "{w}x{h} scale {scale:?}: {name} KS distance {d:.4} >= {crit:.4}");
        }
        // The quantile fixture directly: the medians agree to the sampling error.
        let med = |v: &[f64]| v[v.len() / 2];
        let want = floats(&case["area"])[500];
        assert!((med(&stats[0]) - want).abs() < 0.02, "{w}x{h}: median area {} vs timm {want}", med(&stats[0]));
    }
}

#[test]
fn ks_distance_sees_a_shifted_sampler() {
    // The test above must be able to fail: timm's area quantiles against areas drawn from a scale
    // range 0.05 narrower at the bottom.
    let fx = json("rrc_quantiles.json");
    let case = &fx["cases"][1];
    let mut rng = SampleRng::from_seed(3);
    let mut area: Vec<f64> = (0..20_000)
        .map(|_| {
            let c = random_resized_crop_params(640, 480, [0.13, 1.0], [0.75, 4.0 / 3.0], &mut rng);
            c.width as f64 * c.height as f64 / (640.0 * 480.0)
        })
        .collect();
    let d = ks_distance(&mut area, &floats(&fx["levels"]), &floats(&case["area"]));
    assert!(d > 0.03, "KS distance {d}");
}

#[test]
fn bicubic_resize_of_fractional_boxes_and_large_downscales_matches_pil() {
    let src = png("in_resize_box.png");
    let want = png("want_resize_box.png");
    let mut y0 = 0;
    for case in json("resize_box.json")["cases"].as_array().unwrap() {
        let b = floats(&case["box"]);
        let (w, h) = (case["width"].as_u64().unwrap() as usize, case["height"].as_u64().unwrap() as usize);
        // PIL's resize(box=) reads pixels anywhere in the image, as far as the filter reaches.
        let region = ResizeBox { x0: b[0], y0: b[1], x1: b[2], y1: b[3], clip: (0, 0, src.width, src.height) };
        let mut out = Vec::new();
        resize_bicubic_into(&src, region, w, h, &mut out);
        let expect = rows(&want, y0, w, h);
        let max = out.iter().zip(&expect).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        assert!(max <= 1, "box {b:?} -> {w}x{h}: max diff {max}");
        y0 += h;
    }
}

#[test]
fn color_jitter_matches_torchvision_on_pil() {
    let src = png("in_color_jitter.png");
    let want = png("want_color_jitter.png");
    let (w, h) = (src.width as usize, src.height as usize);
    for (k, case) in json("color_jitter.json")["cases"].as_array().unwrap().iter().enumerate() {
        let order = floats(&case["order"]);
        let order = [0, 1, 2].map(|i| order[i] as usize);
        let factors = floats(&case["factors"]);
        let factors = [0, 1, 2].map(|i| factors[i] as f32);
        let mut out = src.pixels.clone();
        apply_color_jitter(&mut out, order, factors);
        let expect = rows(&want, k * h, w, h);
        // PIL blends in C floats as we do: identical with Pillow 13.0; a one-level rounding difference
        // in a few values is allowed for a PIL built with contracted multiply-adds.
        let max = out.iter().zip(&expect).map(|(a, b)| a.abs_diff(*b)).max().unwrap();
        let off = out.iter().zip(&expect).filter(|(a, b)| a != b).count();
        let case = format!("order {order:?}, factors {factors:?}");
        assert!(max <= 1 && off * 100 <= out.len(), "{case}: max diff {max}, {off} values differ");
    }
}

/// Our decode + crop + resize of the high-frequency fixture for each of its crops, and PIL + timm's.
fn highfreq_outputs(reduced: bool) -> Vec<(CropRect, Vec<u8>, Vec<u8>)> {
    let fx = json("highfreq.json");
    let size = fx["size"].as_u64().unwrap() as usize;
    let jpg = fixture("in_highfreq.jpg");
    let want = png("want_highfreq.png");
    let mut t = TrainTransform::new(size, &AugmentConfig::default(), LIMIT);
    t.reduced_decode = reduced;
    let get = |c: &Value, k: &str| c[k].as_u64().unwrap() as u32;
    let crops = fx["crops"].as_array().unwrap();
    crops
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let (top, left) = (get(c, "top"), get(c, "left"));
            let crop = CropRect { top, left, height: get(c, "height"), width: get(c, "width") };
            let (img, region) = t.decode_crop_rect(&jpg, "jpg", &crop).unwrap();
            let mut out = Vec::new();
            resize_bicubic_into(&img, region, size, size, &mut out);
            (crop, out, rows(&want, k * size, size, size))
        })
        .collect()
}

fn diff_stats(a: &[u8], b: &[u8]) -> (u8, f64) {
    let max = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    let mean = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as f64).sum::<f64>() / a.len() as f64;
    (max, mean)
}

#[test]
fn high_frequency_jpeg_through_the_full_scale_path_matches_pil_and_timm() {
    // libjpeg-turbo with Pillow's settings decodes exactly; only the resize's ≤ 1 remains.
    for (crop, got, want) in highfreq_outputs(false) {
        let (max, mean) = diff_stats(&got, &want);
        assert!(max <= 1 && mean < 0.05, "{crop:?}: max diff {max}, mean {mean:.3}");
    }
}

#[test]
fn high_frequency_jpeg_through_the_reduced_dct_path_stays_close_to_pil_and_timm() {
    // Decoding at 1/2 or 1/4 scale replaces part of the antialiasing filter by the IDCT's own
    // low-pass: on this worst case (gratings near Nyquist, a 3 px checkerboard, noise σ 10) the
    // output differs from PIL + timm by the amounts below; crops that keep the full scale
    // (smaller than twice the output) stay exact. Measured (14 crops, 96 px): at 2/8 and 4/8 a mean
    // absolute difference of 1.9-7.4 levels, at most 37; worst where the scaled crop is barely the
    // output size, so the resize hardly filters (see docs/data-benchmark.md).
    let mut reduced = 0;
    for (crop, got, want) in highfreq_outputs(true) {
        let (max, mean) = diff_stats(&got, &want);
        let m = ferroclip_data::augment::dct_scale(&crop, 96);
        eprintln!("{crop:?}: scale {m}/8, max diff {max}, mean abs diff {mean:.3} levels");
        if m == 8 {
            assert!(max <= 1, "{crop:?}: full scale, max diff {max}");
        } else {
            reduced += 1;
            assert!(mean < MEAN_TOLERANCE && max <= MAX_TOLERANCE, "{crop:?} at {m}/8: max {max}, mean {mean:.3}");
        }
    }
    assert!(reduced >= 8, "only {reduced} crops took the reduced path");
}

/// Bounds of the reduced-DCT path's difference from PIL + timm on the high-frequency fixture, in
/// 8-bit levels (mean absolute difference over pixels and channels, and the largest).
const MEAN_TOLERANCE: f64 = 8.0;
const MAX_TOLERANCE: u8 = 40;
