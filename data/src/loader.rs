//! The loader: shards → samples → transformed batches, on background threads, resumable.
//!
//! Follows OpenCLIP's `get_wds_dataset` (`open_clip_train/data.py`): per-epoch seeded shard
//! shuffle (`detshuffle2`), `split_by_node` across ranks, `split_by_worker` across reader
//! threads, a seeded sample shuffle buffer, `ResampledShards` (draws with replacement, weighted
//! by source) for `resampled`, and `with_epoch` so `train_num_samples` fixes an epoch at
//! `ceil(train_num_samples / (batch_size * world_size))` batches per rank.
//!
//! Determinism: every reader thread produces its own fixed sample sequence; the assembler
//! merges them round-robin in reader order, shuffles with a seeded buffer and transforms on a
//! thread pool writing into fixed batch slots, so batches never depend on thread timing.
//!
//! Exact resume: an epoch's candidate sequence (after shuffling, before the image transform)
//! is a pure function of (config, shards, seed, rank, epoch). The cursor stores how many
//! candidates the epoch has consumed; resuming regenerates the epoch's sequence (reading tar
//! bytes again, transforming nothing) and drops that many before producing batches.
//!
//! Bad data: a bad sample or shard is skipped with a (rate-limited) warning naming the shard
//! and counted in [`StatsSnapshot`]. A Train epoch that yields not one full batch (every shard
//! unreadable, or fewer samples than a batch) ends the stream: `next_batch` returns `None` and
//! [`Loader::error`] says why, rather than spinning through empty epochs. In resampled mode a
//! reader gives up after `2 × shards + 16` consecutive draws without a usable sample.
//!
//! Memory: at most 64 encoded samples per reader thread, `shuffle_buffer` encoded samples,
//! one batch being assembled and `prefetch` finished batches; shards are streamed member by
//! member, never loaded whole.
//!
//! Resume cost: the fast-forward re-reads the tar headers and captions of the epoch up to the
//! cursor and transforms nothing; image payloads of local uncompressed shards are seeked over
//! (read later only if kept), while `pipe:` and compressed shards are read through. The cost
//! is bounded by one epoch of this rank's data; with `resampled`, `train_num_samples` (the
//! checkpoint interval) bounds it.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, Sender};
use rand::distributions::{Distribution, WeightedIndex};
use rand::seq::SliceRandom;
use rand::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::augment::ImageTransform;
use crate::batch::Batch;
use crate::config::{ConfigError, DataConfig};
use crate::rng::SampleRng;
use crate::sample::{Sample, SampleGrouper, SampleSpec};
use crate::source::{expand_shards, open_shard, read_payload, Shard};
use crate::tar::Payload;
use crate::stats::{Stats, StatsSnapshot};
use crate::tokenize::Tokenizer;

/// Where a rank's sample stream stands; part of the training state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamCursor {
    pub epoch: u64,
    /// Candidate samples (after shuffling, before the image transform, including those the
    /// transform then rejected) this rank has consumed in `epoch`.
    pub samples_in_epoch: u64,
    /// Batches this rank has handed out in `epoch`.
    pub batches_in_epoch: u64,
}

/// Training streams shuffle and never end; evaluation reads the shards once, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Shard and sample shuffling, endless over epochs (or resampled); partial batches dropped.
    Train,
    /// One ordered pass over the shards, no shuffle, last partial batch kept, then `None`.
    Eval,
}

/// What a rank's loader reads and how.
pub struct LoaderOptions {
    pub rank: usize,
    pub world_size: usize,
    pub seed: u64,
    pub batch_size: usize,
    pub mode: Mode,
    pub transform: Arc<dyn ImageTransform>,
    pub tokenizer: Arc<dyn Tokenizer>,
    /// Member holding an integer class label (e.g. `Some("cls")`) → `Batch.labels`;
    /// samples without it are skipped.
    pub label_key: Option<String>,
    /// Continue right after the batch that carried this cursor.
    pub resume: Option<StreamCursor>,
}

/// Errors the loader reports at start-up (or, for `Stalled`, when no data can be produced).
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("shard pattern `{pattern}` matches no file")]
    NoShards { pattern: String },
    #[error("bad shard pattern `{pattern}`: {message}")]
    BadPattern { pattern: String, message: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("invalid loader options: {0}")]
    Options(String),
    #[error("only {shards} shards for {world_size} ranks: every rank needs at least one shard (use more shards, fewer ranks, or `resampled = true`)")]
    TooFewShards { shards: usize, world_size: usize },
    #[error("shard `{shard}`: {source}")]
    Io { shard: String, source: io::Error },
    #[error("no usable batch: {0}")]
    Stalled(String),
}

/// A candidate sample with the shard it came from.
type Item = (Arc<str>, Sample);

/// What one reader thread reads in an epoch.
enum ReaderPlan {
    /// These shards, in order (sequential mode).
    List(Vec<Shard>),
    /// Draws from all shards with replacement, forever (resampled mode).
    Resampled { shards: Arc<Vec<Shard>>, rng: SampleRng },
}

/// Everything the background threads share.
struct Context {
    shards: Arc<Vec<Shard>>,
    spec: SampleSpec,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    mode: Mode,
    rank: usize,
    world_size: usize,
    seed: u64,
    batch_size: usize,
    readers: usize,
    shuffle_shards: bool,
    shuffle_buffer: usize,
    resampled: bool,
    batches_per_epoch: Option<u64>,
    transform: Arc<dyn ImageTransform>,
    tokenizer: Arc<dyn Tokenizer>,
}

/// Streams batches for one rank; see the module docs.
pub struct Loader {
    rx: Receiver<Result<Batch, String>>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    error: Option<String>,
    done: bool,
}

impl Loader {
    /// Expand `shards` (the trainer passes `cfg.train`, or an eval pattern), check the options
    /// and start the reader and assembler threads.
    pub fn new(cfg: &DataConfig, shards: &str, opts: LoaderOptions) -> Result<Loader, DataError> {
        cfg.validate()?;
        if opts.world_size == 0 || opts.rank >= opts.world_size {
            return Err(DataError::Options(format!("rank {} of world size {}", opts.rank, opts.world_size)));
        }
        if opts.batch_size == 0 {
            return Err(DataError::Options("batch_size must be at least 1".into()));
        }
        // `train_weights` belong to the `train` pattern's sources only.
        let weights: &[f64] = if shards == cfg.train { &cfg.train_weights } else { &[] };
        let shard_list = expand_shards(shards, weights)?;
        let train = opts.mode == Mode::Train;
        let resampled = train && cfg.resampled;
        if !resampled {
            let n = shard_list.len();
            if n < opts.world_size {
                if train {
                    return Err(DataError::TooFewShards { shards: n, world_size: opts.world_size });
                }
                eprintln!("warning: `{shards}`: {n} shards for {} ranks; rank {} reads nothing", opts.world_size, opts.rank);
            } else if n < opts.world_size * cfg.readers {
                eprintln!(
                    "warning: `{shards}`: {n} shards for {} ranks x {} readers; some reader threads stay idle (less read-ahead)",
                    opts.world_size, cfg.readers
                );
            }
        }
        let batches_per_epoch = (train && cfg.train_num_samples > 0)
            .then(|| cfg.train_num_samples.div_ceil((opts.batch_size * opts.world_size) as u64).max(1));
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = Context {
            shards: Arc::new(shard_list),
            spec: SampleSpec::new(cfg, opts.label_key.as_deref()),
            stats: stats.clone(),
            stop: stop.clone(),
            mode: opts.mode,
            rank: opts.rank,
            world_size: opts.world_size,
            seed: opts.seed,
            batch_size: opts.batch_size,
            readers: cfg.readers,
            shuffle_shards: train && cfg.shuffle_shards,
            shuffle_buffer: if train { cfg.shuffle_buffer } else { 0 },
            resampled,
            batches_per_epoch,
            transform: opts.transform,
            tokenizer: opts.tokenizer,
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.workers)
            .thread_name(|i| format!("data-worker-{i}"))
            .build()
            .map_err(|e| DataError::Options(format!("cannot start {} workers: {e}", cfg.workers)))?;
        let (tx, rx) = bounded(cfg.prefetch);
        let resume = opts.resume.unwrap_or_default();
        std::thread::Builder::new()
            .name("data-assembler".into())
            .spawn(move || {
                // A panic (e.g. in a transform) must surface as an error, not a silent end.
                let tx_panic = tx.clone();
                let run = std::panic::AssertUnwindSafe(|| assemble(ctx, pool, resume, tx));
                if let Err(panic) = std::panic::catch_unwind(run) {
                    let what = panic
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    let _ = tx_panic.send(Err(format!("the loader thread panicked: {what}")));
                }
            })
            .map_err(|e| DataError::Options(format!("cannot start the loader thread: {e}")))?;
        Ok(Loader { rx, stats, stop, error: None, done: false })
    }

    /// The next batch; `None` at the end of an eval pass, or after a fatal stall
    /// (see [`Loader::error`]).
    pub fn next_batch(&mut self) -> Option<Batch> {
        if self.done {
            return None;
        }
        let t = Instant::now();
        let msg = self.rx.recv();
        self.stats.wait_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        match msg {
            Ok(Ok(batch)) => {
                self.stats.samples.fetch_add(batch.len as u64, Ordering::Relaxed);
                self.stats.batches.fetch_add(1, Ordering::Relaxed);
                Some(batch)
            }
            Ok(Err(e)) => {
                eprintln!("error: data loader stopped: {e}");
                self.error = Some(e);
                self.done = true;
                None
            }
            Err(_) => {
                self.done = true;
                None
            }
        }
    }

    /// Why the stream ended early, if it did (e.g. every shard unreadable).
    pub fn error(&self) -> Option<DataError> {
        self.error.clone().map(DataError::Stalled)
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }
}

impl Iterator for Loader {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        self.next_batch()
    }
}

impl Drop for Loader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Context {
    /// The per-reader plans of `epoch` for this rank.
    fn plans(&self, epoch: u64) -> Vec<ReaderPlan> {
        if self.resampled {
            // OpenCLIP's ResampledShards: each (rank, worker, epoch) draws its own sequence.
            return (0..self.readers)
                .map(|r| ReaderPlan::Resampled {
                    shards: self.shards.clone(),
                    rng: SampleRng::for_sample(self.seed, epoch, &format!("resample/rank{}/reader{r}", self.rank)),
                })
                .collect();
        }
        let mut order: Vec<usize> = (0..self.shards.len()).collect();
        if self.shuffle_shards {
            // Same seed on every rank, so the split below stays disjoint.
            order.shuffle(&mut SampleRng::for_sample(self.seed, epoch, "shard-order"));
        }
        let mine: Vec<usize> = order.into_iter().skip(self.rank).step_by(self.world_size).collect();
        let readers = self.readers.min(mine.len()).max(1);
        (0..readers)
            .map(|r| ReaderPlan::List(mine.iter().skip(r).step_by(readers).map(|&i| self.shards[i].clone()).collect()))
            .collect()
    }
}

/// Rate-limited warning: the first few of each reason, then every thousandth.
fn warn_skip(stats: &Stats, reason: &str, what: impl FnOnce() -> String) {
    let n = stats.skip(reason);
    if n <= 10 || n.is_multiple_of(1000) {
        eprintln!("warning: skipped sample ({reason}, {n} so far): {}", what());
    }
}

/// Read one reader's shards into `tx` until its plan ends, `tx` is dropped or the loader stops.
///
/// While `fast_forward` is set (a resume is skipping candidates), image payloads of local
/// plain shards are seeked over and sent as [`Payload::At`], to be read only if kept.
fn read_shards(
    plan: ReaderPlan,
    spec: SampleSpec,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    fast_forward: Arc<AtomicBool>,
    tx: Sender<Option<Item>>,
) {
    let (list, mut resample) = match plan {
        ReaderPlan::List(l) => (l, None),
        ReaderPlan::Resampled { shards, rng } => {
            let weights = WeightedIndex::new(shards.iter().map(|s| s.weight)).expect("weights validated > 0");
            (Vec::new(), Some((shards, weights, rng)))
        }
    };
    let mut next_in_list = 0;
    // Resampled mode over only-bad shards would spin forever; give up after this many
    // consecutive shards without a single usable sample.
    let mut barren = 0usize;
    loop {
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let shard = match &mut resample {
            None => match list.get(next_in_list) {
                Some(s) => {
                    next_in_list += 1;
                    s.clone()
                }
                None => return,
            },
            Some((shards, weights, rng)) => {
                if barren > 2 * shards.len() + 16 {
                    eprintln!("error: {barren} consecutive resampled shards had no usable sample; this reader stops");
                    return;
                }
                shards[weights.sample(rng)].clone()
            }
        };
        let name: Arc<str> = shard.url.as_str().into();
        let reader = match open_shard(&shard, stats.bytes_read.clone()) {
            Ok(r) => r,
            Err(e) => {
                stats.shards_failed.fetch_add(1, Ordering::Relaxed);
                eprintln!("warning: skipping shard `{name}`: {e}");
                barren += 1;
                if tx.send(None).is_err() {
                    return;
                }
                continue;
            }
        };
        stats.shards_opened.fetch_add(1, Ordering::Relaxed);
        let mut grouper = SampleGrouper::new(reader);
        let mut usable = 0u64;
        loop {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let defer: &[String] = if fast_forward.load(Ordering::Relaxed) { &spec.image_exts } else { &[] };
            match grouper.next_sample_deferring(defer) {
                Ok(Some(raw)) => {
                    let key = raw.key.clone();
                    match spec.select(raw) {
                        Ok(sample) => {
                            usable += 1;
                            if tx.send(Some((name.clone(), sample))).is_err() {
                                return;
                            }
                        }
                        Err(reason) => warn_skip(&stats, reason.name(), || format!("`{name}` key `{key}`")),
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    stats.shards_failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("warning: shard `{name}` ends early after {usable} samples: {e}");
                    break;
                }
            }
        }
        barren = if usable == 0 { barren + 1 } else { 0 };
        // End-of-shard marker: lets Eval merge the readers shard by shard.
        if tx.send(None).is_err() {
            return;
        }
    }
}

/// One epoch's candidate sequence for this rank: readers merged round-robin (per sample in
/// Train, like webdataset workers; per shard in Eval, so it reads the shards in order), then
/// shuffled (Train).
struct EpochStream {
    /// `None` messages mark the end of a shard.
    readers: Vec<Receiver<Option<Item>>>,
    next_reader: usize,
    by_shard: bool,
    buffer: Vec<Item>,
    capacity: usize,
    rng: SampleRng,
}

impl EpochStream {
    fn start(ctx: &Context, epoch: u64, fast_forward: &Arc<AtomicBool>) -> EpochStream {
        let readers = ctx
            .plans(epoch)
            .into_iter()
            .enumerate()
            .map(|(r, plan)| {
                // Read-ahead: each reader runs ahead of the assembler by this many samples.
                let (tx, rx) = bounded(64);
                let (spec, stats, stop, ff) = (ctx.spec.clone(), ctx.stats.clone(), ctx.stop.clone(), fast_forward.clone());
                std::thread::Builder::new()
                    .name(format!("data-reader-{r}"))
                    .spawn(move || read_shards(plan, spec, stats, stop, ff, tx))
                    .expect("spawn reader thread");
                rx
            })
            .collect();
        EpochStream {
            readers,
            next_reader: 0,
            by_shard: ctx.mode == Mode::Eval,
            buffer: Vec::new(),
            capacity: ctx.shuffle_buffer,
            rng: SampleRng::for_sample(ctx.seed, epoch, &format!("sample-shuffle/rank{}", ctx.rank)),
        }
    }

    fn pull(&mut self) -> Option<Item> {
        while !self.readers.is_empty() {
            let i = self.next_reader % self.readers.len();
            match self.readers[i].recv() {
                Ok(Some(item)) => {
                    if !self.by_shard {
                        self.next_reader = i + 1;
                    }
                    return Some(item);
                }
                Ok(None) => {
                    if self.by_shard {
                        self.next_reader = i + 1;
                    }
                }
                Err(_) => {
                    self.readers.remove(i);
                    self.next_reader = i;
                }
            }
        }
        None
    }

    fn next(&mut self) -> Option<Item> {
        if self.capacity == 0 {
            return self.pull();
        }
        while self.buffer.len() < self.capacity {
            match self.pull() {
                Some(item) => self.buffer.push(item),
                None => break,
            }
        }
        if self.buffer.is_empty() {
            return None;
        }
        let i = self.rng.gen_range(0..self.buffer.len());
        Some(self.buffer.swap_remove(i))
    }
}

/// The assembler thread: epochs → batches → `tx`, until `tx` closes or the stream ends.
fn assemble(ctx: Context, pool: rayon::ThreadPool, resume: StreamCursor, tx: Sender<Result<Batch, String>>) {
    let mut cursor = resume;
    loop {
        if ctx.batches_per_epoch.is_some_and(|n| cursor.batches_in_epoch >= n) {
            cursor = StreamCursor { epoch: cursor.epoch + 1, samples_in_epoch: 0, batches_in_epoch: 0 };
        }
        let fast_forward = Arc::new(AtomicBool::new(cursor.samples_in_epoch > 0));
        let mut stream = EpochStream::start(&ctx, cursor.epoch, &fast_forward);
        // Fast-forward over what the interrupted run already consumed: no transform runs,
        // and images of local plain shards are not even read.
        for _ in 0..cursor.samples_in_epoch {
            if stream.next().is_none() {
                break;
            }
        }
        fast_forward.store(false, Ordering::Relaxed);
        let batches_before = cursor.batches_in_epoch;
        let mut sent_any = batches_before > 0;
        loop {
            if ctx.stop.load(Ordering::Relaxed) {
                return;
            }
            if ctx.batches_per_epoch.is_some_and(|n| cursor.batches_in_epoch >= n) {
                break;
            }
            let (batch, exhausted) = fill_batch(&ctx, &pool, &mut stream, &mut cursor);
            let keep = batch.len == ctx.batch_size || (ctx.mode == Mode::Eval && batch.len > 0);
            if keep {
                sent_any = true;
                if tx.send(Ok(batch)).is_err() {
                    return;
                }
            }
            if exhausted {
                break;
            }
        }
        if ctx.mode == Mode::Eval {
            return;
        }
        if !sent_any {
            let _ = tx.send(Err(format!(
                "epoch {} of rank {} produced not a single full batch of {} from {} shards; see the warnings above",
                cursor.epoch,
                ctx.rank,
                ctx.batch_size,
                ctx.shards.len()
            )));
            return;
        }
        cursor = StreamCursor { epoch: cursor.epoch + 1, samples_in_epoch: 0, batches_in_epoch: 0 };
    }
}

/// Fill one batch from `stream`, transforming in parallel into fixed slots; returns the batch
/// and whether the stream ran out. Advances `cursor`.
fn fill_batch(ctx: &Context, pool: &rayon::ThreadPool, stream: &mut EpochStream, cursor: &mut StreamCursor) -> (Batch, bool) {
    let bs = ctx.batch_size;
    let size = ctx.transform.output_size();
    let px = 3 * size * size;
    let mut images = vec![0f32; bs * px];
    let mut kept: Vec<Item> = Vec::with_capacity(bs);
    let mut exhausted = false;
    while kept.len() < bs {
        let have = kept.len();
        let mut cands = Vec::with_capacity(bs - have);
        while cands.len() < bs - have {
            match stream.next() {
                Some(item) => cands.push(item),
                None => {
                    exhausted = true;
                    break;
                }
            }
        }
        cursor.samples_in_epoch += cands.len() as u64;
        if cands.is_empty() {
            break;
        }
        let (seed, epoch, transform, stats) = (ctx.seed, cursor.epoch, &ctx.transform, &ctx.stats);
        let results: Vec<Result<(), (&'static str, String)>> = pool.install(|| {
            images[have * px..(have + cands.len()) * px]
                .par_chunks_mut(px)
                .zip(cands.par_iter())
                .map(|(out, (shard, s))| {
                    let loaded;
                    let encoded: &[u8] = match &s.image {
                        Payload::Bytes(b) => b,
                        Payload::At { offset, size } => {
                            loaded = read_payload(shard, *offset, *size, &stats.bytes_read)
                                .map_err(|e| ("shard_read_error", e.to_string()))?;
                            &loaded
                        }
                        Payload::TooLarge => return Err(("member_too_large", String::new())),
                    };
                    let mut rng = SampleRng::for_sample(seed, epoch, &format!("{shard}/{}", s.key));
                    transform.apply(encoded, &s.image_ext, &mut rng, out).map_err(|e| (e.reason(), e.to_string()))
                })
                .collect()
        });
        for (i, (item, result)) in cands.into_iter().zip(results).enumerate() {
            match result {
                Ok(()) => {
                    let (from, to) = ((have + i) * px, kept.len() * px);
                    if from != to {
                        images.copy_within(from..from + px, to);
                    }
                    kept.push(item);
                }
                Err((reason, e)) => warn_skip(&ctx.stats, reason, || format!("`{}` key `{}`: {e}", item.0, item.1.key)),
            }
        }
        if exhausted {
            break;
        }
    }
    let n = kept.len();
    images.truncate(n * px);
    let ctx_len = ctx.tokenizer.context_length();
    let mut tokens = vec![0i64; n * ctx_len];
    for ((_, s), row) in kept.iter().zip(tokens.chunks_mut(ctx_len.max(1))) {
        ctx.tokenizer.encode_into(&s.caption, row);
    }
    if n > 0 {
        cursor.batches_in_epoch += 1;
    }
    let batch = Batch {
        len: n,
        image_size: size,
        context_length: ctx_len,
        images,
        tokens,
        labels: kept.iter().filter_map(|(_, s)| s.label).collect(),
        keys: kept.iter().map(|(_, s)| s.key.clone()).collect(),
        captions: kept.into_iter().map(|(_, s)| s.caption).collect(),
        epoch: cursor.epoch,
        cursor: cursor.clone(),
    };
    (batch, exhausted)
}
