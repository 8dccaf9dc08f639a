//! Statistical tests of the augreg samplers against the reference formulas (torchvision
//! `RandomResizedCrop.get_params`, timm `RandomErasing`), plus exact eval geometry and
//! normalization.

use ferroclip_data::augment::{
    center_crop_rect, hwc_to_chw, random_erasing_params, random_resized_crop_params, shorter_side_resize_size,
    CropRect, OPENAI_MEAN, OPENAI_STD,
};
use ferroclip_data::normalize::normalize_and_erase;
use ferroclip_data::rng::SampleRng;

const N: usize = 20_000;

fn quantile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q).round() as usize]
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

#[test]
fn crop_area_and_log_aspect_are_uniform_when_every_attempt_fits() {
    // 4000×4000, scale (0.1, 0.5): sqrt(0.5·4/3) < 1, so the first attempt is always kept and
    // area fraction ~ U(0.1, 0.5), log-aspect ~ U(log 3/4, log 4/3) up to pixel rounding.
    let mut rng = SampleRng::from_seed(1);
    let (mut area, mut logr) = (Vec::new(), Vec::new());
    for _ in 0..N {
        let c = random_resized_crop_params(4000, 4000, [0.1, 0.5], [0.75, 4.0 / 3.0], &mut rng);
        assert!(c.left + c.width <= 4000 && c.top + c.height <= 4000);
        area.push(c.width as f64 * c.height as f64 / 16e6);
        logr.push((c.width as f64 / c.height as f64).ln());
    }
    let (l0, l1) = (0.75f64.ln(), (4.0f64 / 3.0).ln());
    let se = 0.4 / (12f64.sqrt() * (N as f64).sqrt());
    assert!((mean(&area) - 0.3).abs() < 4.0 * se, "area mean {}", mean(&area));
    assert!(
        mean(&logr).abs() < 4.0 * (l1 - l0) / (12f64.sqrt() * (N as f64).sqrt()),
        "log-aspect mean {}",
        mean(&logr)
    );
    for q in [0.1, 0.25, 0.5, 0.75, 0.9] {
        let a = quantile(&mut area, q);
        assert!((a - (0.1 + 0.4 * q)).abs() < 0.01, "area q{q}: {a}");
        let r = quantile(&mut logr, q);
        assert!((r - (l0 + (l1 - l0) * q)).abs() < 0.01, "log-aspect q{q}: {r}");
    }
}

/// P(one attempt fits) on a `W × H` image by numerical integration over (scale, log-ratio):
/// w = sqrt(s·A·r) ≤ W + 0.5 and h = sqrt(s·A/r) ≤ H + 0.5 (Python rounding to the pixel).
fn attempt_fit_probability(w: f64, h: f64, scale: [f64; 2], ratio: [f64; 2]) -> f64 {
    let (l0, l1) = (ratio[0].ln(), ratio[1].ln());
    let steps = 2000;
    let mut p = 0.0;
    for i in 0..steps {
        let r = (l0 + (l1 - l0) * (i as f64 + 0.5) / steps as f64).exp();
        // s must satisfy s ≤ (W+.5)²/(A r) and s ≤ (H+.5)² r / A.
        let smax = ((w + 0.5).powi(2) / (w * h * r)).min((h + 0.5).powi(2) * r / (w * h));
        p += ((smax.min(scale[1]) - scale[0]) / (scale[1] - scale[0])).clamp(0.0, 1.0);
    }
    p / steps as f64
}

#[test]
fn fallback_frequency_on_wide_images_matches_the_formula() {
    // 300×100 with augreg scale: an attempt fits only if s ≤ 0.3367·r — rare, so the centered
    // fallback (w = round(100·4/3) = 133, h = 100) happens with probability (1 - p)^10.
    let (scale, ratio): ([f64; 2], [f64; 2]) = ([0.33, 1.0], [0.75, 4.0 / 3.0]);
    let p = attempt_fit_probability(300.0, 100.0, scale, ratio);
    let want = (1.0 - p).powi(10);
    let fallback = CropRect { top: 0, left: 83, height: 100, width: 133 };
    let mut rng = SampleRng::from_seed(2);
    let hits = (0..N).filter(|_| random_resized_crop_params(300, 100, scale, ratio, &mut rng) == fallback).count();
    let got = hits as f64 / N as f64;
    let se = (want * (1.0 - want) / N as f64).sqrt();
    assert!(want > 0.3 && want < 0.95, "test case should be informative: {want}");
    assert!((got - want).abs() < 4.0 * se + 0.002, "fallback rate {got} vs {want}");
    // Far past the ratio range nothing ever fits: always the fallback, exactly.
    let mut rng = SampleRng::from_seed(3);
    for _ in 0..1000 {
        assert_eq!(
            random_resized_crop_params(1000, 100, scale, ratio, &mut rng),
            CropRect { top: 0, left: 433, height: 100, width: 133 }
        );
        assert_eq!(
            random_resized_crop_params(100, 1000, scale, ratio, &mut rng),
            CropRect { top: 433, left: 0, height: 133, width: 100 }
        );
    }
}

#[test]
fn augreg_crop_on_square_image_matches_conditional_distribution() {
    // Square 512²: attempts are kept when s·r ≤ 1 and s/r ≤ 1 (no fallback in practice). The kept
    // area fraction has the per-attempt distribution conditioned on fitting; its mean by
    // numerical integration.
    let (scale, ratio): ([f64; 2], [f64; 2]) = ([0.33, 1.0], [0.75, 4.0 / 3.0]);
    let (l0, l1) = (ratio[0].ln(), ratio[1].ln());
    let (mut num, mut den) = (0.0, 0.0);
    let steps = 1000;
    for i in 0..steps {
        let r = (l0 + (l1 - l0) * (i as f64 + 0.5) / steps as f64).exp();
        for j in 0..steps {
            let s = scale[0] + (scale[1] - scale[0]) * (j as f64 + 0.5) / steps as f64;
            if s * r <= (512.5f64 / 512.0).powi(2) && s / r <= (512.5f64 / 512.0).powi(2) {
                num += s;
                den += 1.0;
            }
        }
    }
    let want_area = num / den;
    let mut rng = SampleRng::from_seed(4);
    let (mut area, mut logr) = (Vec::new(), Vec::new());
    for _ in 0..N {
        let c = random_resized_crop_params(512, 512, scale, ratio, &mut rng);
        area.push(c.width as f64 * c.height as f64 / (512.0 * 512.0));
        logr.push((c.width as f64 / c.height as f64).ln());
    }
    assert!((mean(&area) - want_area).abs() < 0.004, "area mean {} vs {want_area}", mean(&area));
    // Symmetric in log-aspect.
    assert!(mean(&logr).abs() < 0.004, "log-aspect mean {}", mean(&logr));
    assert!(quantile(&mut logr, 0.5).abs() < 0.01);
    // Crop positions are uniform over the valid range: mean of the free-space fraction is 1/2.
    let mut rng = SampleRng::from_seed(5);
    let frac: Vec<f64> = (0..N)
        .filter_map(|_| {
            let c = random_resized_crop_params(512, 512, scale, ratio, &mut rng);
            (c.width < 400).then(|| c.left as f64 / (512 - c.width) as f64)
        })
        .collect();
    assert!((mean(&frac) - 0.5).abs() < 0.02, "left position mean {}", mean(&frac));
}

#[test]
fn erasing_frequency_area_and_aspect_match_timm() {
    let (h, w) = (224u32, 224u32);
    let (a0, a1) = (0.02f64, 1.0 / 3.0);
    let (l0, l1) = (0.3f64.ln(), (1.0f64 / 0.3).ln());
    // Per-attempt fit: h = sqrt(s·A·a) < 224 - 0.5 and w = sqrt(s·A/a) < 223.5, by integration.
    let lim = (223.5f64 / 224.0).powi(2);
    let steps = 1000;
    let (mut fit, mut area_num, mut total) = (0.0, 0.0, 0.0);
    for i in 0..steps {
        let a = (l0 + (l1 - l0) * (i as f64 + 0.5) / steps as f64).exp();
        for j in 0..steps {
            let s = a0 + (a1 - a0) * (j as f64 + 0.5) / steps as f64;
            total += 1.0;
            if s * a < lim && s / a < lim {
                fit += 1.0;
                area_num += s;
            }
        }
    }
    let p_fit = fit / total;
    let want_area = area_num / fit;
    for prob in [0.35, 1.0] {
        let mut rng = SampleRng::from_seed(6);
        let draws: Vec<Option<CropRect>> = (0..N).map(|_| random_erasing_params(h, w, prob, &mut rng)).collect();
        let erased: Vec<CropRect> = draws.iter().flatten().copied().collect();
        let want_rate = prob * (1.0 - (1.0 - p_fit).powi(10));
        let got_rate = erased.len() as f64 / N as f64;
        let se = (want_rate * (1.0 - want_rate) / N as f64).sqrt();
        assert!((got_rate - want_rate).abs() < 4.0 * se + 1e-3, "erase rate {got_rate} vs {want_rate}");
        for r in &erased {
            assert!(r.top + r.height <= h && r.left + r.width <= w && r.height < h && r.width < w);
        }
        let area: Vec<f64> = erased.iter().map(|r| (r.height * r.width) as f64 / (h * w) as f64).collect();
        let mut loga: Vec<f64> = erased
            .iter()
            .filter(|r| r.width > 0 && r.height > 0)
            .map(|r| (r.height as f64 / r.width as f64).ln())
            .collect();
        assert!((mean(&area) - want_area).abs() < 0.004, "erase area mean {} vs {want_area}", mean(&area));
        assert!(mean(&loga).abs() < 0.03, "erase log-aspect mean {}", mean(&loga));
        assert!(quantile(&mut loga, 0.5).abs() < 0.04);
        // The log-aspect spans (log 0.3, log 1/0.3).
        assert!(quantile(&mut loga, 0.02) < 0.9 * l0 && quantile(&mut loga, 0.98) > 0.9 * l1);
    }
    let mut rng = SampleRng::from_seed(7);
    assert!((0..1000).all(|_| random_erasing_params(h, w, 0.0, &mut rng).is_none()));
}

#[test]
fn eval_geometry_follows_torchvision_rounding() {
    assert_eq!(shorter_side_resize_size(640, 480, 224), (298, 224));
    assert_eq!(shorter_side_resize_size(480, 640, 224), (224, 298));
    assert_eq!(shorter_side_resize_size(300, 300, 224), (224, 224));
    assert_eq!(shorter_side_resize_size(1000, 333, 256), (768, 256));
    // Python round half to even: (299-224)/2 = 37.5 → 38, (297-224)/2 = 36.5 → 36.
    assert_eq!(center_crop_rect(299, 224, 224), CropRect { top: 0, left: 38, height: 224, width: 224 });
    assert_eq!(center_crop_rect(297, 224, 224), CropRect { top: 0, left: 36, height: 224, width: 224 });
    assert_eq!(center_crop_rect(224, 298, 224), CropRect { top: 37, left: 0, height: 224, width: 224 });
}

#[test]
#[allow(clippy::excessive_precision)]
fn normalization_is_totensor_then_openai_normalize_in_chw() {
    let rgb: Vec<u8> = (0..12u32).map(|i| (i * 23 % 256) as u8).collect(); // 4 pixels
    let mut chw = vec![0u8; 12];
    hwc_to_chw(&rgb, &mut chw);
    let mut out = vec![0f32; 12];
    normalize_and_erase(&chw, &[None], &mut out);
    for p in 0..4 {
        for c in 0..3 {
            let want = (rgb[p * 3 + c] as f64 / 255.0 - OPENAI_MEAN[c] as f64) / OPENAI_STD[c] as f64;
            assert!((out[c * 4 + p] as f64 - want).abs() < 1e-6, "pixel {p} channel {c}");
        }
    }
    assert_eq!(OPENAI_MEAN, [0.48145466, 0.4578275, 0.40821073]);
    assert_eq!(OPENAI_STD, [0.26862954, 0.26130258, 0.27577711]);
}
