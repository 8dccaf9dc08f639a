//! The loader: one rank's shards → samples → transformed batches, on background threads,
//! resumable from any batch's cursor, on the same or another number of ranks.
//!
//! Follows OpenCLIP's `get_wds_dataset` (`open_clip_train/data.py`); the parts, top-down:
//! [`crate::plan`] says which shards each reader thread of each rank reads (per-epoch seeded
//! shard shuffle, `split_by_node`, `split_by_worker`, `with_epoch`, `ResampledShards`),
//! `reader` threads read them, `merge` merges the readers through a seeded shuffle
//! buffer, `assemble` transforms and batches, [`crate::resume`] picks a stream up from a
//! checkpoint. Each batch carries the [`crate::cursor::StreamCursor`] that resumes right after it.
//!
//! Bad data: a bad sample or shard is skipped with a (rate-limited) warning naming the shard
//! and counted in [`StatsSnapshot`]; a panic while reading a shard, or probing, decoding,
//! transforming or tokenizing a sample, is one more bad shard or sample. A reader that makes no
//! progress for `data.read_timeout_s` is abandoned (its shard counts as failed) while the merge
//! goes on with the other readers. A Train stream that cannot yield one full batch (every shard
//! unreadable) ends: `next_batch` returns `None` and [`Loader::error`] says why.
//!
//! Batch buffers come from the caller's [`HostAlloc`]; the first ones are allocated when the
//! loader opens, so a `data.batch_size` no memory holds fails [`Loader::new`]
//! ([`DataError::BatchBuffer`], or a config error on `data.batch_size` where the size does not
//! even fit the address space); a later failed allocation ends the stream like a stall, with
//! the same words.
//!
//! Memory: per reader at most `read_ahead_bytes` (and 8192 samples) read ahead plus the sample
//! being read; the shuffle buffer at most `shuffle_buffer` samples and `shuffle_buffer_bytes`;
//! the candidates in flight at most `read_ahead_bytes` (and 4 per worker); `prefetch` finished
//! batches.
//! Shards are streamed member by member, never loaded whole; members over `max_member_bytes`
//! are passed over unread.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver};
use rand::distributions::WeightedIndex;

use crate::assemble::{self, Context};
use crate::augment::ImageTransform;
use crate::batch::Batch;
use crate::config::{ConfigError, DataConfig};
use crate::error::DataError;
use crate::guard::panic_message;
use crate::host::{BufPool, HostAlloc, VecAlloc};
use crate::plan::Layout;
use crate::reader::Shared;
use crate::resume::{self, ResumeFrom, ResumeKind};
use crate::sample::SampleSpec;
use crate::source::expand_shards;
use crate::stats::{Stats, StatsSnapshot};
use crate::tokenize::Tokenizer;

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
    /// Continue from a checkpoint's data cursors (or right after a batch: [`ResumeFrom::own`]).
    pub resume: Option<ResumeFrom>,
    /// Allocator of the batch buffers (e.g. pinned host memory); `None`: plain heap memory.
    pub host_alloc: Option<Arc<dyn HostAlloc>>,
}

/// Streams batches for one rank; see the module docs.
pub struct Loader {
    rx: Receiver<Result<Batch, String>>,
    assembler: Option<std::thread::JoinHandle<()>>,
    stats: Arc<Stats>,
    stop: Arc<AtomicBool>,
    error: Option<String>,
    done: bool,
    resumed: Option<ResumeKind>,
}

impl Loader {
    /// Expand `shards` (the trainer passes `cfg.train`, or an eval pattern), check the options
    /// and start the reader and assembler threads.
    pub fn new(cfg: &DataConfig, shards: &str, opts: LoaderOptions) -> Result<Loader, DataError> {
        cfg.validate()?;
        let (rank, world_size) = (opts.rank, opts.world_size);
        if world_size == 0 || rank >= world_size {
            return Err(DataError::Options(format!("rank {rank} of world size {world_size}")));
        }
        if opts.batch_size == 0 {
            return Err(DataError::Options("batch_size must be at least 1".into()));
        }
        if opts.tokenizer.context_length() == 0 {
            return Err(DataError::Options("the tokenizer's context length must be at least 1".into()));
        }
        // `train_weights` belong to the `train` pattern's sources only.
        let weights: &[f64] = if shards == cfg.train { &cfg.train_weights } else { &[] };
        let shard_list = expand_shards(shards, weights)?;
        let train = opts.mode == Mode::Train;
        let resampled = train && cfg.resampled;
        let n = shard_list.len();
        if !resampled {
            if n < world_size {
                if train {
                    return Err(DataError::TooFewShards { shards: n, world_size });
                }
                eprintln!("warning: `{shards}`: {n} shards for {world_size} ranks; rank {rank} reads nothing");
            } else if n < world_size * cfg.readers && rank == 0 {
                eprintln!(
                    "warning: `{shards}`: {n} shards for {world_size} ranks x {} readers; some reader threads \
                     stay idle (less read-ahead)",
                    cfg.readers
                );
            }
        }
        if train && !resampled && world_size > 1 && cfg.train_num_samples == 0 {
            return Err(ConfigError {
                key: "train_num_samples".into(),
                message: format!(
                    "must be set (> 0) to train on {world_size} ranks without `resampled`: it fixes the batches \
                     of an epoch for every rank, so all ranks end it at the same step (OpenCLIP's \
                     --train-num-samples; `trainer data-check` counts the samples)"
                ),
            }
            .into());
        }
        let urls: Vec<String> = shard_list.iter().map(|s| s.url.clone()).collect();
        let layout = Layout {
            shards: n,
            rank,
            world_size,
            readers: cfg.readers,
            batch_size: opts.batch_size,
            seed: opts.seed,
            shuffle_shards: train && cfg.shuffle_shards,
            resampled,
            train_num_samples: if train { cfg.train_num_samples } else { 0 },
            fingerprint: resume::fingerprint(&urls, cfg, opts.seed, weights),
        };
        let (start, resumed) = match &opts.resume {
            None => (layout.epoch_start(0), None),
            Some(from) => {
                let (cursor, kind, line) = resume::start_cursor(&layout, from)?;
                if rank == 0 {
                    eprintln!("ferroclip: {line}");
                }
                (cursor, Some(kind))
            }
        };
        let stats = Arc::new(Stats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let draw_weights = if resampled {
            let w = WeightedIndex::new(shard_list.iter().map(|s| s.weight))
                .map_err(|e| DataError::Options(format!("shard weights: {e}")))?;
            Some(w)
        } else {
            None
        };
        let shared = Arc::new(Shared {
            urls: urls.iter().map(|u| Arc::from(u.as_str())).collect(),
            shards: Arc::new(shard_list),
            spec: SampleSpec::new(cfg, opts.label_key.as_deref()),
            stats: stats.clone(),
            stop: stop.clone(),
            max_member_bytes: cfg.max_member_bytes,
            read_ahead_bytes: cfg.read_ahead_bytes,
            seed: opts.seed,
            rank,
            weights: draw_weights,
        });
        let alloc: Arc<dyn HostAlloc> = opts.host_alloc.unwrap_or_else(|| Arc::new(VecAlloc));
        let size = opts.transform.output_size();
        let context_length = opts.tokenizer.context_length();
        // Idle buffers worth keeping: the prefetched batches, the one being filled, those the
        // trainer holds.
        let keep = cfg.prefetch + 3;
        let batch_size = opts.batch_size;
        let buffer_error = |what, alloc| DataError::BatchBuffer { batch_size, what, alloc };
        let pool = |what, per_sample: Option<usize>| -> Result<Arc<BufPool>, DataError> {
            let bytes = per_sample.and_then(|n| n.checked_mul(batch_size)).ok_or_else(|| ConfigError {
                key: "batch_size".into(),
                message: format!("{batch_size} samples: the {what} buffer of a batch is larger than the address space"),
            })?;
            let pool = BufPool::new(alloc.clone(), bytes, keep);
            // The first batch's buffer now, so that a size no memory holds is an error of the
            // loader's start (naming `data.batch_size`), not of its thread later. It goes back
            // to the pool, where the first batch finds it.
            drop(pool.take(0).map_err(|e| buffer_error(what, e))?);
            Ok(pool)
        };
        let images = pool("image", size.checked_mul(size).and_then(|n| n.checked_mul(3)))?;
        let tokens = pool("token", context_length.checked_mul(8))?;
        let ctx = Context {
            images,
            tokens,
            layout,
            shared,
            eval: !train,
            transform: opts.transform,
            tokenizer: opts.tokenizer,
            stats: stats.clone(),
            stop: stop.clone(),
            shuffle_buffer: if train { cfg.shuffle_buffer } else { 0 },
            shuffle_buffer_bytes: cfg.shuffle_buffer_bytes,
            read_ahead_bytes: cfg.read_ahead_bytes,
            read_timeout: Duration::from_secs_f64(cfg.read_timeout_s),
        };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.workers)
            .thread_name(|i| format!("data-worker-{i}"))
            .build()
            .map_err(|e| DataError::Options(format!("cannot start {} workers: {e}", cfg.workers)))?;
        let (tx, rx) = bounded(cfg.prefetch);
        let assembler = std::thread::Builder::new()
            .name("data-assembler".into())
            .spawn(move || {
                // Samples and shards are guarded where they are handled; a panic here is a bug in
                // the loader itself, and must surface as an error, not a silent end.
                let tx_panic = tx.clone();
                let run = std::panic::AssertUnwindSafe(|| assemble::run(ctx, pool, start, tx));
                if let Err(panic) = std::panic::catch_unwind(run) {
                    let _ =
                        tx_panic.send(Err(format!("the loader thread panicked: {}", panic_message(panic.as_ref()))));
                }
            })
            .map_err(|e| DataError::Options(format!("cannot start the loader thread: {e}")))?;
        Ok(Loader { rx, assembler: Some(assembler), stats, stop, error: None, done: false, resumed })
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

    /// How this loader picked up a checkpoint's stream, if it resumed one.
    pub fn resumed(&self) -> Option<ResumeKind> {
        self.resumed
    }
}

impl Iterator for Loader {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        self.next_batch()
    }
}

impl Drop for Loader {
    /// Stop, and wait for the assembler: when this returns, every reader has been told to end and
    /// every `pipe:` command it ran has been ended.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Closing the batch channel frees an assembler waiting to hand over a batch.
        drop(std::mem::replace(&mut self.rx, crossbeam_channel::never()));
        if let Some(assembler) = self.assembler.take() {
            let _ = assembler.join();
        }
    }
}
