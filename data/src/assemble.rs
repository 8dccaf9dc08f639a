//! Assembly: the candidate sequence → batches of transformed images and token ids, each with
//! the cursor that resumes right after it, epoch after epoch.
//!
//! A batch's candidates are transformed and tokenized on the worker pool, each into a fixed
//! slot, so batches never depend on which worker finished first. Each candidate runs under the
//! panic guard: a sample whose header probe, decode, transform or tokenization panics is skipped
//! and counted (`panic`) like any other bad sample. A batch's candidates in flight are bounded
//! by `data.read_ahead_bytes`, so huge samples are transformed a few at a time.
//!
//! Epochs follow the split plan ([`crate::plan`]): a segment of a fixed number of batches (a rank
//! short of samples starts another pass over its shards), or one pass over the rank's shards
//! when the epoch has no fixed length.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::Sender;
use rayon::prelude::*;

use crate::augment::ImageTransform;
use crate::batch::Batch;
use crate::cursor::{PendingGroup, StreamCursor};
use crate::erase::EraseBox;
use crate::guard::guarded;
use crate::host::BufPool;
use crate::merge::{Candidates, Merge, MergeRules, ShuffleBuffer};
use crate::plan::Layout;
use crate::reader::{Item, Shared};
use crate::rng::SampleRng;
use crate::stats::Stats;
use crate::tokenize::Tokenizer;

/// Tags that keep the loader's keyed random streams apart.
const DRAW_STREAM: u64 = 1;
const SHUFFLE_STREAM: u64 = 2;

/// Everything the assembler thread needs.
pub(crate) struct Context {
    pub layout: Layout,
    pub shared: Arc<Shared>,
    /// One ordered pass, no shuffle, the last partial batch kept.
    pub eval: bool,
    pub transform: Arc<dyn ImageTransform>,
    pub tokenizer: Arc<dyn Tokenizer>,
    /// Where batch buffers come from: `[batch, 3, s, s]` u8 and `[batch, context]` i64.
    pub images: Arc<BufPool>,
    pub tokens: Arc<BufPool>,
    pub stats: Arc<Stats>,
    pub stop: Arc<AtomicBool>,
    pub shuffle_buffer: usize,
    pub shuffle_buffer_bytes: u64,
    pub read_ahead_bytes: u64,
    pub read_timeout: Duration,
}

impl Context {
    fn rules(&self, pass: u64) -> MergeRules {
        MergeRules { by_shard: self.eval, read_timeout: self.read_timeout, count_done: pass == 0 }
    }

    /// The numbers a segment's shard draws are keyed on (resampled mode).
    fn draw_key(&self, cur: &StreamCursor) -> Option<Vec<u64>> {
        self.layout.resampled.then(|| vec![DRAW_STREAM, cur.epoch, cur.segment.start, self.layout.rank as u64])
    }

    /// Readers and shuffle buffer as `cur` describes them, the buffer refilled.
    fn start(&self, cur: &StreamCursor) -> Candidates {
        let mut refill: Vec<Vec<PendingGroup>> = vec![Vec::new(); cur.readers.len().max(1)];
        let n = refill.len();
        for (i, group) in cur.buffer.iter().enumerate() {
            refill[i % n].push(group.clone());
        }
        let key = self.draw_key(cur);
        let mut merge = Merge::start(
            self.shared.clone(),
            &cur.readers,
            refill,
            cur.next_reader,
            key.as_deref(),
            self.rules(cur.pass),
        );
        merge.shards_done = cur.shards_done;
        merge.samples_done = cur.samples_done;
        let mut buffer = ShuffleBuffer::new(self.shuffle_buffer, self.shuffle_buffer_bytes);
        merge.refill_into(&mut buffer);
        let pick_key = vec![SHUFFLE_STREAM, cur.epoch, cur.segment.start, self.layout.rank as u64];
        Candidates::new(merge, buffer, cur.picks, self.layout.seed, pick_key)
    }

    /// The random stream of one candidate: keyed on the sample and on which reading of its shard
    /// it came from, so that every occurrence of a sample is augmented anew.
    fn sample_rng(&self, cur: &StreamCursor, item: &Item) -> SampleRng {
        let (url, key) = (&item.url, &item.sample.key);
        let id = if self.layout.resampled {
            format!("{url}/{key}#draw{}.{}.{}", cur.segment.start, self.layout.rank, item.draw)
        } else if item.draw == 0 {
            format!("{url}/{key}")
        } else {
            format!("{url}/{key}#pass{}", item.draw)
        };
        SampleRng::for_sample(self.layout.seed, cur.epoch, &id)
    }
}

/// The assembler thread: batches into `tx` until it closes, the loader stops or the stream
/// cannot go on (then one `Err` says why).
pub(crate) fn run(ctx: Context, pool: rayon::ThreadPool, start: StreamCursor, tx: Sender<Result<Batch, String>>) {
    let mut cur = start;
    loop {
        if cur.segment.length.is_some_and(|n| cur.batches_in_segment >= n) {
            cur = next_epoch(&ctx, &cur);
        }
        let mut cands = ctx.start(&cur);
        let mut sent_any = cur.batches_in_segment > 0;
        let mut empty_passes = 0;
        loop {
            if ctx.stop.load(Ordering::Relaxed) {
                return;
            }
            if cur.segment.length.is_some_and(|n| cur.batches_in_segment >= n) {
                break;
            }
            match fill_batch(&ctx, &pool, &mut cands, &mut cur, &mut empty_passes) {
                Ok((batch, exhausted)) => {
                    let keep = batch.len == ctx.layout.batch_size || (ctx.eval && batch.len > 0);
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
                Err(why) => {
                    let _ = tx.send(Err(stream_error(&ctx, &cur, sent_any, &why)));
                    return;
                }
            }
        }
        if ctx.eval {
            return;
        }
        if !sent_any {
            let _ = tx.send(Err(stream_error(&ctx, &cur, false, "its shards ran out first")));
            return;
        }
        cur = next_epoch(&ctx, &cur);
    }
}

/// The start of the epoch after `cur`'s; the shard-size tally carries over (it describes the data).
fn next_epoch(ctx: &Context, cur: &StreamCursor) -> StreamCursor {
    StreamCursor {
        shards_done: cur.shards_done,
        samples_done: cur.samples_done,
        ..ctx.layout.epoch_start(cur.epoch + 1)
    }
}

fn stream_error(ctx: &Context, cur: &StreamCursor, sent_any: bool, why: &str) -> String {
    let (rank, shards) = (ctx.layout.rank, ctx.layout.shards);
    if sent_any {
        format!("rank {rank}, epoch {}: {why}", cur.epoch)
    } else {
        format!(
            "epoch {} of rank {rank} produced not a single full batch of {} from {shards} shards: {why}; \
             see the warnings above",
            cur.epoch, ctx.layout.batch_size
        )
    }
}

/// The next candidate, starting another pass over the rank's shards when a fixed-length segment
/// needs more; `Ok(None)` when a one-pass epoch has run out.
fn next_candidate(
    ctx: &Context,
    cands: &mut Candidates,
    cur: &mut StreamCursor,
    empty_passes: &mut u32,
) -> Result<Option<Item>, String> {
    loop {
        if let Some(item) = cands.next() {
            return Ok(Some(item));
        }
        if ctx.eval || cur.segment.length.is_none() || ctx.stop.load(Ordering::Relaxed) {
            return Ok(None);
        }
        if ctx.layout.resampled {
            return Err("every reader gave up: the shards it drew held no usable sample".into());
        }
        *empty_passes = if cands.pulled_in_pass == 0 { *empty_passes + 1 } else { 0 };
        if *empty_passes >= 2 {
            return Err("two passes over its shards found no usable sample".into());
        }
        cur.pass += 1;
        let readers = ctx.layout.pass_readers(cur.epoch, cur.pass);
        let mut merge = Merge::start(ctx.shared.clone(), &readers, Vec::new(), 0, None, ctx.rules(cur.pass));
        (merge.shards_done, merge.samples_done) = (cands.merge.shards_done, cands.merge.samples_done);
        cands.next_pass(merge);
    }
}

/// Why one candidate is not in the batch: a skip reason (the stats counter) and the details.
type Rejection = (&'static str, String);

/// Fill one batch from `cands`; returns it and whether a one-pass epoch ran out. Advances `cur`
/// to the position right after the batch.
fn fill_batch(
    ctx: &Context,
    pool: &rayon::ThreadPool,
    cands: &mut Candidates,
    cur: &mut StreamCursor,
    empty_passes: &mut u32,
) -> Result<(Batch, bool), String> {
    let bs = ctx.layout.batch_size;
    let size = ctx.transform.output_size();
    let px = 3 * size * size;
    let ctx_len = ctx.tokenizer.context_length();
    let mut images = ctx.images.take(bs * px);
    let mut tokens = ctx.tokens.take(bs * ctx_len * 8);
    let mut erase: Vec<Option<EraseBox>> = vec![None; bs];
    let mut kept: Vec<Item> = Vec::with_capacity(bs);
    let mut exhausted = false;
    while kept.len() < bs && !exhausted {
        let have = kept.len();
        let (mut chunk, mut bytes) = (Vec::with_capacity(bs - have), 0u64);
        while chunk.len() < bs - have && (chunk.is_empty() || bytes < ctx.read_ahead_bytes) {
            match next_candidate(ctx, cands, cur, empty_passes)? {
                Some(item) => {
                    bytes += item.bytes;
                    chunk.push(item);
                }
                None => {
                    exhausted = true;
                    break;
                }
            }
        }
        if chunk.is_empty() {
            break;
        }
        let n = chunk.len();
        let (transform, tokenizer) = (&ctx.transform, &ctx.tokenizer);
        let rngs: Vec<SampleRng> = chunk.iter().map(|item| ctx.sample_rng(cur, item)).collect();
        let results: Vec<Result<Option<EraseBox>, Rejection>> = pool.install(|| {
            images.as_bytes_mut()[have * px..(have + n) * px]
                .par_chunks_mut(px)
                .zip(tokens.as_i64_mut()[have * ctx_len..(have + n) * ctx_len].par_chunks_mut(ctx_len))
                .zip(chunk.par_iter().zip(rngs))
                .map(|((out, row), (item, mut rng))| {
                    let s = &item.sample;
                    let work = || -> Result<Option<EraseBox>, crate::decode::DecodeError> {
                        let erase = transform.apply(&s.image, &s.image_ext, &mut rng, out)?;
                        tokenizer.encode_into(&s.caption, row);
                        Ok(erase)
                    };
                    match guarded(work) {
                        Ok(Ok(erase)) => Ok(erase),
                        Ok(Err(e)) => Err((e.reason(), e.to_string())),
                        Err(panic) => Err(("panic", format!("panicked: {panic}"))),
                    }
                })
                .collect()
        });
        for (i, (item, result)) in chunk.into_iter().zip(results).enumerate() {
            match result {
                Ok(boxed) => {
                    let (from, to) = (have + i, kept.len());
                    if from != to {
                        images.as_bytes_mut().copy_within(from * px..(from + 1) * px, to * px);
                        tokens.as_i64_mut().copy_within(from * ctx_len..(from + 1) * ctx_len, to * ctx_len);
                    }
                    erase[to] = boxed;
                    kept.push(item);
                }
                Err((reason, e)) => {
                    ctx.stats.warn_skip(reason, || format!("`{}` key `{}`: {e}", item.url, item.sample.key))
                }
            }
        }
    }
    let n = kept.len();
    images.truncate(n * px);
    tokens.truncate(n * ctx_len * 8);
    erase.truncate(n);
    if n > 0 {
        cur.batches_in_segment += 1;
        cur.epoch_samples = cur.segment.start + cur.batches_in_segment * ctx.layout.global_batch();
    }
    cur.readers = cands.merge.cursors();
    cur.buffer = cands.buffer.groups();
    cur.picks = cands.picks;
    cur.next_reader = cands.merge.next_reader();
    cur.shards_done = cands.merge.shards_done;
    cur.samples_done = cands.merge.samples_done;
    let batch = Batch {
        len: n,
        image_size: size,
        context_length: ctx_len,
        images,
        erase,
        tokens,
        labels: kept.iter().filter_map(|item| item.sample.label).collect(),
        keys: kept.iter().map(|item| item.sample.key.clone()).collect(),
        captions: kept.into_iter().map(|item| item.sample.caption).collect(),
        epoch: cur.epoch,
        cursor: cur.clone(),
    };
    Ok((batch, exhausted))
}
