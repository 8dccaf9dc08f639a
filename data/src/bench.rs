//! Throughput benchmark of decode + transform (what `bench-data` reports), and the LAION-like
//! JPEGs it runs on.
//!
//! The baseline it is compared with is OpenCLIP's own pipeline (PIL decode +
//! `open_clip.image_transform(256, is_train=True, aug_cfg=..)`), timed by
//! `scripts/bench-openclip-data.py` on the same kind of images.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

use crate::augment::ImageTransform;
use crate::rng::SampleRng;

/// Result of [`bench_transform`].
#[derive(Debug, Clone, PartialEq)]
pub struct BenchReport {
    /// Images transformed successfully.
    pub images: u64,
    /// Images whose decode failed (counted apart, not in `images`).
    pub failed: u64,
    /// Wall-clock seconds of the timed run.
    pub seconds: f64,
    pub threads: usize,
    pub images_per_s: f64,
    pub images_per_s_per_core: f64,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "images={} failed={} seconds={:.2}", self.images, self.failed, self.seconds)?;
        writeln!(f, "images_per_s_per_core={:.1}", self.images_per_s_per_core)?;
        write!(f, "images_per_s={:.1} threads={}", self.images_per_s, self.threads)
    }
}

/// Decode + transform `samples` (encoded bytes, extension) on `threads` threads, round-robin
/// over the samples, until at least `min_seconds` have passed (and every thread did at least
/// one image). Per-core rate is total / threads.
pub fn bench_transform(
    samples: &[(Vec<u8>, String)],
    transform: &dyn ImageTransform,
    threads: usize,
    min_seconds: f64,
) -> BenchReport {
    assert!(!samples.is_empty(), "bench_transform needs samples");
    let threads = threads.max(1);
    let size = transform.output_size();
    let next = AtomicU64::new(0);
    let (ok, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut out = vec![0u8; 3 * size * size];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let (bytes, ext) = &samples[(i % samples.len() as u64) as usize];
                    let mut rng = SampleRng::from_seed(i);
                    match transform.apply(bytes, ext, &mut rng, &mut out) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                    if start.elapsed().as_secs_f64() >= min_seconds {
                        break;
                    }
                }
            });
        }
    });
    let seconds = start.elapsed().as_secs_f64();
    let images = ok.load(Ordering::Relaxed);
    let images_per_s = images as f64 / seconds;
    BenchReport {
        images,
        failed: failed.load(Ordering::Relaxed),
        seconds,
        threads,
        images_per_s,
        images_per_s_per_core: images_per_s / threads as f64,
    }
}

/// `n` photo-like JPEGs (quality 90, shorter side 256–512, aspect 1–1.8 either way), like a
/// LAION shard after img2dataset: smooth illumination, textured regions, hard edges and sensor
/// noise, so the entropy-coded size and decode cost resemble real photos.
pub fn laion_like_jpegs(n: usize, seed: u64) -> Vec<(Vec<u8>, String)> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    (0..n)
        .map(|_| {
            let short = rng.gen_range(256..=512u32);
            let long = (short as f32 * rng.gen_range(1.0..1.8f32)) as u32;
            let (w, h) = if rng.gen_bool(0.6) { (long, short) } else { (short, long) };
            (encode_jpeg(&photo_like(w, h, &mut rng), w, h), "jpg".to_string())
        })
        .collect()
}

fn photo_like(w: u32, h: u32, rng: &mut Xoshiro256PlusPlus) -> Vec<u8> {
    let base: [f32; 3] = [rng.gen_range(40.0..200.0), rng.gen_range(40.0..200.0), rng.gen_range(40.0..200.0)];
    let grad: [f32; 3] = [rng.gen_range(-90.0..90.0), rng.gen_range(-90.0..90.0), rng.gen_range(-90.0..90.0)];
    let (fx, fy) = (rng.gen_range(0.005..0.05f32), rng.gen_range(0.005..0.05f32));
    let (tx, ty) = (rng.gen_range(0.2..0.9f32), rng.gen_range(0.2..0.9f32));
    // A few hard-edged objects with their own colors and textures.
    let rects: Vec<([u32; 4], [f32; 3], f32)> = (0..rng.gen_range(3..8))
        .map(|_| {
            let (x0, y0) = (rng.gen_range(0..w), rng.gen_range(0..h));
            let (x1, y1) = ((x0 + rng.gen_range(20..w / 2 + 21)).min(w), (y0 + rng.gen_range(20..h / 2 + 21)).min(h));
            let c = [rng.gen_range(0.0..255.0), rng.gen_range(0.0..255.0), rng.gen_range(0.0..255.0)];
            ([x0, y0, x1, y1], c, rng.gen_range(0.0..40.0f32))
        })
        .collect();
    let mut px = vec![0u8; (w * h * 3) as usize];
    let mut noise = rng.gen::<u32>() | 1;
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f32 / w as f32, y as f32 / h as f32);
            let shade = (x as f32 * fx).sin() * (y as f32 * fy).cos() * 30.0;
            let mut v = [0f32; 3];
            for c in 0..3 {
                v[c] = base[c] + grad[c] * (xf * tx + yf * ty - 0.5) + shade;
            }
            for (r, col, tex) in &rects {
                if x >= r[0] && x < r[2] && y >= r[1] && y < r[3] {
                    let t = ((x * 7 + y * 13) as f32 * 0.3).sin() * tex;
                    for c in 0..3 {
                        v[c] = col[c] + t + shade * 0.5;
                    }
                }
            }
            // xorshift sensor noise, ±6 levels.
            noise ^= noise << 13;
            noise ^= noise >> 17;
            noise ^= noise << 5;
            let nz = (noise % 13) as f32 - 6.0;
            let i = ((y * w + x) * 3) as usize;
            for c in 0..3 {
                px[i + c] = (v[c] + nz).clamp(0.0, 255.0) as u8;
            }
        }
    }
    px
}

fn encode_jpeg(px: &[u8], w: u32, h: u32) -> Vec<u8> {
    let mut out = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90)
        .encode(px, w, h, image::ExtendedColorType::Rgb8)
        .expect("encoding an in-memory RGB buffer cannot fail");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::augment::{AugmentConfig, TrainTransform};

    #[test]
    fn laion_like_jpegs_have_the_promised_sizes_and_are_deterministic() {
        let a = laion_like_jpegs(4, 5);
        assert_eq!(a, laion_like_jpegs(4, 5));
        for (bytes, ext) in &a {
            assert_eq!(ext, "jpg");
            let (w, h) = crate::decode::probe_size(bytes, ext).unwrap();
            assert!((256..=512).contains(&w.min(h)), "{w}x{h}");
            assert!(w.max(h) as f32 <= w.min(h) as f32 * 1.8 + 1.0);
        }
    }

    #[test]
    fn bench_counts_images_and_prints_the_contract_line() {
        let samples = laion_like_jpegs(2, 1);
        let t = TrainTransform::new(64, &AugmentConfig::default(), 1 << 30);
        let r = bench_transform(&samples, &t, 2, 0.05);
        assert!(r.images >= 2 && r.failed == 0 && r.seconds >= 0.05);
        assert!((r.images_per_s - r.images as f64 / r.seconds).abs() < 1e-6);
        assert!((r.images_per_s_per_core * 2.0 - r.images_per_s).abs() < 1e-6);
        let text = r.to_string();
        let last = text.lines().last().unwrap();
        assert_eq!(last, format!("images_per_s={:.1} threads=2", r.images_per_s));
    }
}
