//! Shared helpers of the `stream_*` tests: shards written by the tests, a fake transform and
//! a byte tokenizer (the real decoder and tokenizer are tested in their own modules).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferroclip_data::augment::ImageTransform;
use ferroclip_data::decode::DecodeError;
use ferroclip_data::rng::SampleRng;
use ferroclip_data::tar::write_tar;
use ferroclip_data::tokenize::Tokenizer;
use ferroclip_data::{Batch, DataConfig, Loader, LoaderOptions, Mode, ResumeFrom, StreamCursor};
use rand::RngCore;

pub const SIZE: usize = 2;

/// "Decodes" `IMG...` payloads: pixels = payload bytes mixed with the sample's rng (so the
/// per-sample random stream is visible in the output). Fails like the real decoder on
/// empty, `CORRUPT` and `HUGE` payloads. Records every payload it transformed.
#[derive(Default)]
pub struct FakeTransform {
    pub seen: Mutex<Vec<(Vec<u8>, u64)>>,
}

impl ImageTransform for FakeTransform {
    fn output_size(&self) -> usize {
        SIZE
    }
    fn apply(
        &self,
        encoded: &[u8],
        _ext: &str,
        rng: &mut SampleRng,
        out: &mut [u8],
    ) -> Result<Option<ferroclip_data::EraseBox>, DecodeError> {
        let draw = rng.next_u64();
        self.seen.lock().unwrap().push((encoded.to_vec(), draw));
        if encoded.is_empty() {
            return Err(DecodeError::Empty);
        }
        if encoded.starts_with(b"HUGE") {
            return Err(DecodeError::TooLarge { width: 100_000, height: 100_000, limit: 89_478_485 });
        }
        if !encoded.starts_with(b"IMG") || encoded.windows(7).any(|w| w == b"CORRUPT") {
            return Err(DecodeError::Corrupt("bad magic".into()));
        }
        for (i, o) in out.iter_mut().enumerate() {
            // The payload byte, then the draw's bytes: the per-sample stream shows in the pixels.
            *o = if i == 0 { encoded[i % encoded.len()] } else { (draw >> (8 * (i % 8))) as u8 };
        }
        Ok(None)
    }
}

/// What [`FakeTransform::apply`] returns.
pub type Applied = Result<Option<ferroclip_data::EraseBox>, DecodeError>;

/// The fake transform run through `around(payload, apply)`, which may slow, hold or break a
/// sample before (or count it after) calling `apply`.
pub struct Around<F>(pub F);

impl<F: Fn(&[u8], &mut dyn FnMut() -> Applied) -> Applied + Send + Sync> ImageTransform for Around<F> {
    fn output_size(&self) -> usize {
        SIZE
    }
    fn apply(&self, encoded: &[u8], ext: &str, rng: &mut SampleRng, out: &mut [u8]) -> Applied {
        let fake = FakeTransform::default();
        (self.0)(encoded, &mut || fake.apply(encoded, ext, rng, out))
    }
}

/// Token ids = caption bytes, zero padded.
pub struct ByteTokenizer;

impl Tokenizer for ByteTokenizer {
    fn context_length(&self) -> usize {
        8
    }
    fn encode_into(&self, text: &str, out: &mut [i64]) {
        out.fill(0);
        for (o, b) in out.iter_mut().zip(text.bytes()) {
            *o = b as i64;
        }
    }
}

pub fn tempdir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferroclip-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A sample with a good image and caption.
pub fn good(key: &str) -> Vec<(String, Vec<u8>)> {
    vec![
        (format!("{key}.jpg"), format!("IMG:{key}").into_bytes()),
        (format!("{key}.txt"), format!("a photo of {key}").into_bytes()),
    ]
}

pub fn tar_of(samples: &[Vec<(String, Vec<u8>)>]) -> Vec<u8> {
    let members: Vec<(&str, &[u8])> = samples.iter().flatten().map(|(n, d)| (n.as_str(), d.as_slice())).collect();
    write_tar(&members)
}

/// `shards` shards of `per_shard` good samples, keys `s{shard}_{i}`, files `{shard:03}.tar`;
/// returns the brace pattern.
pub fn dataset(dir: &Path, shards: usize, per_shard: usize) -> String {
    for s in 0..shards {
        let samples: Vec<_> = (0..per_shard).map(|i| good(&format!("s{s}_{i:02}"))).collect();
        std::fs::write(dir.join(format!("{s:03}.tar")), tar_of(&samples)).unwrap();
    }
    format!("{}/{{000..{:03}}}.tar", dir.display(), shards - 1)
}

pub fn cfg() -> DataConfig {
    DataConfig { workers: 2, readers: 2, shuffle_buffer: 5, prefetch: 2, ..DataConfig::default() }
}

/// Options for rank `rank` of `world_size`; `resume` continues right after the batch that
/// carried that cursor.
pub fn opts(
    rank: usize,
    world_size: usize,
    batch_size: usize,
    mode: Mode,
    transform: Arc<FakeTransform>,
    resume: Option<StreamCursor>,
) -> LoaderOptions {
    LoaderOptions {
        rank,
        world_size,
        seed: 17,
        batch_size,
        mode,
        transform,
        tokenizer: Arc::new(ByteTokenizer),
        label_key: None,
        resume: resume.map(ResumeFrom::own),
        host_alloc: None,
    }
}

pub fn take(loader: &mut Loader, n: usize) -> Vec<Batch> {
    (0..n)
        .map(|i| loader.next_batch().unwrap_or_else(|| panic!("stream ended at batch {i}: {:?}", loader.error())))
        .collect()
}

pub fn keys(batches: &[Batch]) -> Vec<(u64, String)> {
    batches.iter().flat_map(|b| b.keys.iter().map(move |k| (b.epoch, k.clone()))).collect()
}

/// All keys of an eval pass plus the final stats.
pub fn eval_all(cfg: &DataConfig, pattern: &str, batch_size: usize) -> (Vec<String>, ferroclip_data::StatsSnapshot) {
    let mut l = Loader::new(cfg, pattern, opts(0, 1, batch_size, Mode::Eval, Arc::new(FakeTransform::default()), None))
        .unwrap();
    let mut ks = Vec::new();
    while let Some(b) = l.next_batch() {
        ks.extend(b.keys);
    }
    (ks, l.stats())
}

/// Run `f` on a thread; `None` if it does not finish within `limit` (a hang: the thread is left
/// behind, and the test is expected to fail).
pub fn finishes_within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(limit) {
        Ok(value) => Some(value),
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => panic!("the work panicked (its message is above)"),
    }
}

/// Run `f` on a thread and fail the test if it does not finish in time (a hang).
pub fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    finishes_within(Duration::from_secs(secs), f).expect("loader hung")
}
