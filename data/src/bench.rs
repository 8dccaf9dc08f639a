//! Throughput benchmarks of the input pipeline (what `trainer bench-data` reports):
//! [`bench_loader`] times the real loader end to end on a config's `data.train` shards, with the
//! share of each stage and the loader's efficiency; [`bench_transform`] times decode + transform
//! alone on in-memory JPEGs, such as the LAION-like ones [`laion_like_jpegs`] makes
//! (`bench-data --synthetic`), which [`write_laion_like_shards`] also writes as shards.
//!
//! The baseline they are compared with is OpenCLIP's own pipeline (`get_wds_dataset` on the same
//! shards, or PIL decode + `open_clip.image_transform(256, is_train=True, aug_cfg=..)` on the same
//! files), timed by `scripts/bench-openclip-data.py`.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde::Serialize;

use crate::augment::{ImageTransform, TrainTransform};
use crate::config::DataConfig;
use crate::error::DataError;
use crate::loader::{Loader, LoaderOptions, Mode};
use crate::rng::SampleRng;
use crate::sample::{Sample, SampleGrouper, SampleSpec};
use crate::source::{expand_shards, open_shard, Activity};
use crate::tokenize::Tokenizer;

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

/// CPU time of this thread so far, in nanoseconds (`CLOCK_THREAD_CPUTIME_ID`). CPU time, not wall
/// time, so stage costs stay meaningful on a machine other jobs load too.
pub fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec to write to.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) } != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// CPU time of the whole process so far (every thread), in nanoseconds
/// (`CLOCK_PROCESS_CPUTIME_ID`).
pub fn process_cpu_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid timespec to write to.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut t) } != 0 {
        return 0;
    }
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Single-thread CPU milliseconds per image of each stage a sample goes through.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StageCosts {
    /// Reading the shards: tar members grouped into samples (file reads included; for `pipe:`
    /// shards the command's own CPU time is not).
    pub read_ms: f64,
    /// JPEG (or other) decoding of what the crop needs, at the chosen DCT scale.
    pub decode_ms: f64,
    /// The rest of the transform: bicubic resize, jitter/grayscale, erase box, HWC → CHW.
    pub resize_ms: f64,
    pub tokenize_ms: f64,
}

impl StageCosts {
    pub fn total_ms(&self) -> f64 {
        self.read_ms + self.decode_ms + self.resize_ms + self.tokenize_ms
    }
}

/// What [`bench_loader`] measured.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LoaderBench {
    pub shards: String,
    /// `data.workers`: the transform/tokenize thread pool.
    pub workers: usize,
    pub readers: usize,
    pub batch_size: usize,
    pub image_size: usize,
    /// Distinct samples the stage costs and the worker-only rate were measured on.
    pub sample_set: usize,
    pub mean_image_kib: f64,
    /// End to end: images in full batches handed out by the loader, per second of wall time,
    /// after the first batch (warm-up: readers starting, shuffle buffer filling).
    pub images: u64,
    pub seconds: f64,
    pub images_per_s: f64,
    pub images_per_s_per_worker: f64,
    /// CPU time the process spent (all threads: readers, drawing, assembly, workers) while the
    /// end-to-end images were timed, and images per CPU second: the rate per busy core, which a
    /// machine other jobs load depresses less than the wall-clock rate.
    pub cpu_seconds: f64,
    pub images_per_cpu_s: f64,
    /// The workers' own work only (transform + tokenization of in-memory samples) on `workers`
    /// threads at once, images/s in total.
    pub worker_only_images_per_s: f64,
    /// `images_per_s / worker_only_images_per_s` (= end to end ÷ workers × per-worker rate).
    pub efficiency: f64,
    pub stages: StageCosts,
    /// Samples the loader skipped while timed, by reason.
    pub skipped: std::collections::BTreeMap<String, u64>,
}

impl fmt::Display for LoaderBench {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let st = &self.stages;
        let share = |ms: f64| 100.0 * ms / st.total_ms().max(1e-12);
        let (n, kib) = (self.sample_set, self.mean_image_kib);
        writeln!(f, "shards: {} (first {n} samples: mean {kib:.1} KiB), {} px", self.shards, self.image_size)?;
        writeln!(f, "loader: {} workers, {} readers, batch {}", self.workers, self.readers, self.batch_size)?;
        write!(f, "stage cpu ms/image (1 thread):")?;
        let stages = [("read", st.read_ms), ("decode", st.decode_ms), ("resize+augment", st.resize_ms)];
        for (name, ms) in stages.into_iter().chain([("tokenize", st.tokenize_ms)]) {
            write!(f, " {name} {ms:.3} ({:.0}%)", share(ms))?;
        }
        writeln!(f, "; total {:.3} = {:.0} images/s per busy core", st.total_ms(), 1e3 / st.total_ms().max(1e-12))?;
        let (w, only) = (self.workers, self.worker_only_images_per_s);
        writeln!(f, "worker-only (transform + tokenize, {w} threads): {only:.1} images/s")?;
        let (per, eff) = (self.images_per_s_per_worker, self.efficiency);
        let (images, s) = (self.images, self.seconds);
        writeln!(f, "end to end: {images} images in {s:.2} s; {per:.1} images/s per worker; efficiency {eff:.3}")?;
        let (cpu, per_cpu) = (self.cpu_seconds, self.images_per_cpu_s);
        writeln!(f, "end to end by CPU time: {cpu:.2} CPU s (all threads) = {per_cpu:.1} images per CPU second")?;
        if !self.skipped.is_empty() {
            writeln!(f, "skipped while timed: {:?}", self.skipped)?;
        }
        write!(f, "images_per_s={:.1} threads={}", self.images_per_s, self.workers)
    }
}

/// The first `n` usable samples of `shards`, in order, and the CPU time spent reading them per
/// raw sample (usable or not).
fn read_samples(cfg: &DataConfig, shards: &str, n: usize) -> Result<(Vec<Sample>, f64), DataError> {
    let weights: &[f64] = if shards == cfg.train { &cfg.train_weights } else { &[] };
    let list = expand_shards(shards, weights)?;
    let spec = SampleSpec::new(cfg, None);
    let (bytes, activity) = (Arc::new(AtomicU64::new(0)), Arc::new(Activity::default()));
    let (mut samples, mut raw) = (Vec::with_capacity(n), 0u64);
    let t = thread_cpu_ns();
    'shards: for shard in &list {
        let stream = open_shard(shard, bytes.clone(), activity.clone())
            .map_err(|source| DataError::Io { shard: shard.url.clone(), source })?;
        let mut grouper = SampleGrouper::new(stream, cfg.max_member_bytes);
        let io_error = |source| DataError::Io { shard: shard.url.clone(), source };
        while let Some(s) = grouper.next_sample().map_err(io_error)? {
            raw += 1;
            if let Ok(sample) = spec.select(s) {
                samples.push(sample);
                if samples.len() == n {
                    break 'shards;
                }
            }
        }
    }
    let ms = (thread_cpu_ns() - t) as f64 / 1e6 / raw.max(1) as f64;
    Ok((samples, ms))
}

/// Time the loader on `cfg.train` end to end with `cfg.workers` workers, for at least
/// `min_seconds` after its first batch, with the options a training run uses (rank 0 of 1,
/// [`Mode::Train`], batches dropped right away so their buffers go back to the pool as the
/// trainer's do); and, in alternating slices with it, for as long, the rate of the workers' own
/// work (transform + tokenize of the first 256 usable samples, in memory) on `cfg.workers`
/// threads, the bound the loader's efficiency is measured against. Before that, on those
/// samples: each stage's single-thread CPU cost.
pub fn bench_loader(
    cfg: &DataConfig,
    transform: Arc<TrainTransform>,
    tokenizer: Arc<dyn Tokenizer>,
    seed: u64,
    min_seconds: f64,
) -> Result<LoaderBench, DataError> {
    cfg.validate()?;
    let (samples, read_ms) = read_samples(cfg, &cfg.train, 256)?;
    if samples.is_empty() {
        return Err(DataError::Options(format!("`{}`: no usable sample in the shards", cfg.train)));
    }
    let size = transform.output_size();
    let ctx = tokenizer.context_length();
    // Stage costs, one thread: decode alone, then the whole transform, then tokenization.
    let (mut out, mut row) = (vec![0u8; 3 * size * size], vec![0i64; ctx]);
    let rng = |i: usize| SampleRng::for_sample(seed, 0, &samples[i].key);
    let t0 = thread_cpu_ns();
    for (i, s) in samples.iter().enumerate() {
        if let Ok((img, _)) = transform.decode_crop(&s.image, &s.image_ext, &mut rng(i)) {
            crate::decode::recycle(img);
        }
    }
    let t1 = thread_cpu_ns();
    for (i, s) in samples.iter().enumerate() {
        let _ = transform.apply(&s.image, &s.image_ext, &mut rng(i), &mut out);
    }
    let t2 = thread_cpu_ns();
    for s in &samples {
        tokenizer.encode_into(&s.caption, &mut row);
    }
    let t3 = thread_cpu_ns();
    let per = |ns: u64| ns as f64 / 1e6 / samples.len() as f64;
    let stages = StageCosts {
        read_ms,
        decode_ms: per(t1 - t0),
        resize_ms: (per(t2 - t1) - per(t1 - t0)).max(0.0),
        tokenize_ms: per(t3 - t2),
    };
    let worker = (transform.clone(), tokenizer.clone());
    let opts = LoaderOptions {
        rank: 0,
        world_size: 1,
        seed,
        batch_size: cfg.batch_size,
        mode: Mode::Train,
        transform,
        tokenizer,
        label_key: None,
        resume: None,
        host_alloc: None,
    };
    // One rank reads every shard: no sample count is needed to keep ranks in step.
    let mut loader = Loader::new(cfg, &cfg.train, opts)?;
    let first = loader.next_batch().ok_or_else(|| stalled(&loader))?;
    drop(first);
    let before = loader.stats();
    // The two rates are compared, so they are measured in alternating slices: on a machine other
    // jobs load, both then see the same load. After a worker-only slice, the batches the loader
    // finished meanwhile (prefetch, and the one under way) are taken untimed.
    const ROUNDS: usize = 3;
    let slice = min_seconds / ROUNDS as f64;
    let (mut images, mut seconds, mut only_images, mut only_seconds) = (0u64, 0.0, 0.0, 0.0);
    let mut cpu_ns = 0;
    for _ in 0..ROUNDS {
        let (n, s) = bench_workers(&samples, worker.0.as_ref(), worker.1.as_ref(), cfg.workers, slice);
        (only_images, only_seconds) = (only_images + n, only_seconds + s);
        for _ in 0..cfg.prefetch + 1 {
            loader.next_batch().ok_or_else(|| stalled(&loader))?;
        }
        let (start, cpu) = (Instant::now(), process_cpu_ns());
        while start.elapsed().as_secs_f64() < slice {
            let batch = loader.next_batch().ok_or_else(|| stalled(&loader))?;
            images += batch.len as u64;
        }
        seconds += start.elapsed().as_secs_f64();
        cpu_ns += process_cpu_ns() - cpu;
    }
    let worker_only = only_images / only_seconds;
    let after = loader.stats();
    let skipped = after
        .skipped
        .iter()
        .map(|(k, v)| (k.clone(), v - before.skipped.get(k).copied().unwrap_or(0)))
        .filter(|(_, v)| *v > 0)
        .collect();
    let images_per_s = images as f64 / seconds;
    Ok(LoaderBench {
        shards: cfg.train.clone(),
        workers: cfg.workers,
        readers: cfg.readers,
        batch_size: cfg.batch_size,
        image_size: size,
        sample_set: samples.len(),
        mean_image_kib: samples.iter().map(|s| s.image.len()).sum::<usize>() as f64 / samples.len() as f64 / 1024.0,
        images,
        seconds,
        images_per_s,
        images_per_s_per_worker: images_per_s / cfg.workers as f64,
        cpu_seconds: cpu_ns as f64 / 1e9,
        images_per_cpu_s: images as f64 / (cpu_ns as f64 / 1e9).max(1e-9),
        worker_only_images_per_s: worker_only,
        efficiency: images_per_s / worker_only,
        stages,
        skipped,
    })
}

fn stalled(loader: &Loader) -> DataError {
    loader.error().unwrap_or_else(|| DataError::Stalled("the training stream ended".into()))
}

/// Transform + tokenize `samples` round-robin on `threads` threads for `min_seconds`: images done
/// and the seconds taken.
fn bench_workers(
    samples: &[Sample],
    transform: &dyn ImageTransform,
    tokenizer: &dyn Tokenizer,
    threads: usize,
    min_seconds: f64,
) -> (f64, f64) {
    let (size, ctx) = (transform.output_size(), tokenizer.context_length());
    let (next, done) = (AtomicU64::new(0), AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|sc| {
        for _ in 0..threads.max(1) {
            sc.spawn(|| {
                let (mut out, mut row) = (vec![0u8; 3 * size * size], vec![0i64; ctx]);
                while start.elapsed().as_secs_f64() < min_seconds {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let s = &samples[(i % samples.len() as u64) as usize];
                    if transform.apply(&s.image, &s.image_ext, &mut SampleRng::from_seed(i), &mut out).is_ok() {
                        tokenizer.encode_into(&s.caption, &mut row);
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    (done.load(Ordering::Relaxed) as f64, start.elapsed().as_secs_f64())
}

/// Write `shards` WebDataset shards of `per_shard` LAION-like samples (`{key}.jpg` from
/// [`laion_like_jpegs`], `{key}.txt` an alt-text-like caption) into `dir` as `{shard:05}.tar`.
pub fn write_laion_like_shards(
    dir: &Path,
    shards: usize,
    per_shard: usize,
    seed: u64,
) -> std::io::Result<Vec<PathBuf>> {
    const WORDS: [&str; 24] = [
        "photo", "of", "a", "the", "red", "vintage", "car", "on", "street", "in", "summer", "with", "blue", "sky",
        "wooden", "table", "kitchen", "modern", "house", "garden", "dog", "portrait", "black", "and",
    ];
    std::fs::create_dir_all(dir)?;
    let mut paths = Vec::with_capacity(shards);
    for shard in 0..shards {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed ^ (shard as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let images = laion_like_jpegs(per_shard, rng.gen());
        let mut members: Vec<(String, Vec<u8>)> = Vec::with_capacity(2 * per_shard);
        for (i, (jpg, _)) in images.into_iter().enumerate() {
            let key = format!("{shard:05}{i:04}");
            let words: Vec<&str> = (0..rng.gen_range(4..20)).map(|_| WORDS[rng.gen_range(0..WORDS.len())]).collect();
            members.push((format!("{key}.jpg"), jpg));
            members.push((format!("{key}.txt"), words.join(" ").into_bytes()));
        }
        let refs: Vec<(&str, &[u8])> = members.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
        let path = dir.join(format!("{shard:05}.tar"));
        std::fs::write(&path, crate::tar::write_tar(&refs))?;
        paths.push(path);
    }
    Ok(paths)
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
    fn loader_bench_reads_the_shards_and_its_figures_agree() {
        let dir = std::env::temp_dir().join(format!("ferroclip-bench-{}", std::process::id()));
        let paths = write_laion_like_shards(&dir, 2, 6, 3).unwrap();
        assert_eq!(paths.len(), 2);
        let cfg = DataConfig {
            train: format!("{}/{{00000..00001}}.tar", dir.display()),
            batch_size: 4,
            workers: 2,
            ..DataConfig::default()
        };
        let t = Arc::new(TrainTransform::new(32, &AugmentConfig::default(), 1 << 30));
        let tok: Arc<dyn Tokenizer> = Arc::new(crate::tokenize::ClipTokenizer::new());
        let r = bench_loader(&cfg, t, tok, 0, 0.2).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        // Every sample of both shards is usable; the loader yields whole batches of them.
        assert_eq!(r.sample_set, 12);
        assert!(r.images >= 4 && r.images.is_multiple_of(4) && r.seconds >= 0.2, "{r:?}");
        assert!((r.images_per_s - r.images as f64 / r.seconds).abs() < 1e-6);
        assert!((r.images_per_s_per_worker * 2.0 - r.images_per_s).abs() < 1e-6);
        assert!((r.efficiency - r.images_per_s / r.worker_only_images_per_s).abs() < 1e-9);
        assert!(r.cpu_seconds > 0.0 && (r.images_per_cpu_s - r.images as f64 / r.cpu_seconds).abs() < 1e-6);
        assert!(r.stages.decode_ms > 0.0 && r.stages.tokenize_ms > 0.0 && r.skipped.is_empty(), "{r:?}");
        let text = r.to_string();
        assert_eq!(text.lines().last().unwrap(), format!("images_per_s={:.1} threads=2", r.images_per_s));
        assert!(text.contains("efficiency") && text.contains("decode"), "{text}");
    }

    #[test]
    fn loader_bench_names_shards_without_usable_samples() {
        let dir = std::env::temp_dir().join(format!("ferroclip-bench-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("0.tar"), crate::tar::write_tar(&[("a.txt", b"caption only")])).unwrap();
        let cfg = DataConfig { train: format!("{}/0.tar", dir.display()), ..DataConfig::default() };
        let t = Arc::new(TrainTransform::new(32, &AugmentConfig::default(), 1 << 30));
        let err = bench_loader(&cfg, t, Arc::new(crate::tokenize::ClipTokenizer::new()), 0, 0.1).unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(err.to_string().contains("0.tar") && err.to_string().contains("no usable sample"), "{err}");
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
