//! Assembly: the candidate sequence → batches of transformed images and token ids, each with
//! the cursor that resumes right after it, epoch after epoch.
//!
//! Candidates are transformed and tokenized on the worker pool one task each, handed out as they
//! are drawn, across batch boundaries (see [`Window`]); results are placed in draw order, so
//! batches never depend on which worker finished first. Each candidate runs under the panic
//! guard: a sample whose header probe, decode, transform or tokenization panics is skipped and
//! counted (`panic`) like any other bad sample. The candidates in flight are bounded by
//! `data.read_ahead_bytes`, so huge samples are transformed a few at a time.
//!
//! A batch's cursor is the stream position right after its last candidate was drawn. Draws run
//! ahead of the batch being filled, and a rejected candidate moves the batch's end, so the
//! position is recorded after every draw that may still end a batch (one in a batch size's
//! worth of draws, plus the window).
//!
//! Epochs follow the split plan ([`crate::plan`]): a segment of a fixed number of batches (a rank
//! short of samples starts another pass over its shards), or one pass over the rank's shards
//! when the epoch has no fixed length.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crossbeam_channel::{Receiver, Select, Sender};

use crate::augment::ImageTransform;
use crate::batch::Batch;
use crate::cursor::{PendingGroup, StreamCursor};
use crate::erase::EraseBox;
use crate::error::DataError;
use crate::guard::guarded;
use crate::host::BufPool;
use crate::merge::{Candidates, Merge, MergeRules, ShuffleBuffer};
use crate::plan::Layout;
use crate::reader::{Item, Shared};
use crate::rng::SampleRng;
use crate::stats::Stats;
use crate::tokenize::Tokenizer;

/// Candidates in a row that a resampled stream may reject before it gives up. Its readers draw
/// shards forever and give up only on shards without a single complete sample; when every
/// sample is complete but no image decodes, this ends the stream instead. Far more than any
/// usable dataset rejects in a row (one with 99.9 % bad images still has a usable sample in
/// this many with probability 1 - 5e-5).
const RESAMPLED_REJECTED_RUN: u64 = 10_000;

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
    let window = Window::new(pool);
    let mut cur = start;
    loop {
        if cur.segment.length.is_some_and(|n| cur.batches_in_segment >= n) {
            cur = next_epoch(&ctx, &cur);
        }
        let sent_before = cur.batches_in_segment > 0;
        match window.segment(&ctx, &mut cur, &tx) {
            SegmentEnd::Closed => return,
            SegmentEnd::Failed { why, sent_any } => {
                let _ = tx.send(Err(stream_error(&ctx, &cur, sent_before || sent_any, &why)));
                return;
            }
            SegmentEnd::Done { sent_any } => {
                if ctx.eval {
                    return;
                }
                if !(sent_before || sent_any) {
                    let _ = tx.send(Err(stream_error(&ctx, &cur, false, "its shards ran out first")));
                    return;
                }
            }
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

/// Whether the passes over a rank's shards still find usable samples: a pass whose candidates
/// were all rejected (no sample selected, or every image undecodable) is barren, and two barren
/// passes in a row end the stream instead of passing over the same bad shards forever.
#[derive(Default)]
struct Barren {
    passes: u32,
    /// Usable candidates when the last pass ended.
    accepted: u64,
}

/// The next candidate, starting another pass over the rank's shards when a fixed-length segment
/// needs more; `Ok(None)` when a one-pass epoch has run out. `accepted` waits until every
/// candidate drawn so far is transformed and says how many were usable (`None`: the loader stops).
fn next_candidate(
    ctx: &Context,
    cands: &mut Candidates,
    cur: &mut StreamCursor,
    barren: &mut Barren,
    accepted: &mut dyn FnMut() -> Option<u64>,
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
        let Some(now) = accepted() else { return Ok(None) };
        let usable = cands.pulled_in_pass > 0 && now > barren.accepted;
        barren.accepted = now;
        barren.passes = if usable { 0 } else { barren.passes + 1 };
        if barren.passes >= 2 {
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

/// How a segment's batching ended.
enum SegmentEnd {
    /// Its batches are all out, or (one-pass epochs, evaluation) its candidates ran out.
    Done { sent_any: bool },
    /// The candidate sequence cannot go on; the batches finished before are out.
    Failed { why: String, sent_any: bool },
    /// The loader stopped or the trainer dropped it.
    Closed,
}

/// Where the candidate sequence stands right after one draw: the part of a cursor that moves
/// with every candidate. Recorded after each candidate that may turn out to end a batch.
struct Position {
    pass: u64,
    readers: Vec<crate::cursor::ReaderCursor>,
    buffer: Vec<PendingGroup>,
    picks: u64,
    next_reader: usize,
    shards_done: u64,
    samples_done: u64,
}

impl Position {
    fn of(cands: &Candidates, pass: u64) -> Position {
        Position {
            pass,
            readers: cands.merge.cursors(),
            buffer: cands.buffer.groups(),
            picks: cands.picks,
            next_reader: cands.merge.next_reader(),
            shards_done: cands.merge.shards_done,
            samples_done: cands.merge.samples_done,
        }
    }

    fn apply(self, cur: &mut StreamCursor) {
        cur.pass = self.pass;
        cur.readers = self.readers;
        cur.buffer = self.buffer;
        cur.picks = self.picks;
        cur.next_reader = self.next_reader;
        cur.shards_done = self.shards_done;
        cur.samples_done = self.samples_done;
    }
}

/// One candidate's work, back from the pool: its pixels and token ids, or why it is not usable.
struct Done {
    seq: u64,
    item: Item,
    pixels: Vec<u8>,
    tokens: Vec<i64>,
    result: Result<Option<EraseBox>, Rejection>,
}

/// The batch being filled, slot by slot in draw order.
struct Filling {
    images: crate::host::PooledBuf,
    tokens: crate::host::PooledBuf,
    erase: Vec<Option<EraseBox>>,
    kept: Vec<Item>,
}

/// The worker pool with the candidates handed to it: each candidate is transformed and tokenized
/// as its own task, as soon as it is drawn, up to `limit` candidates (and `data.read_ahead_bytes`)
/// ahead of the batch being filled. Workers so go on with the next batch's samples while a batch's
/// last ones finish, and a slow sample holds up nobody but the batch it is in. Results are placed
/// in draw order, so a batch is the first `batch_size` usable candidates after the one before it,
/// whichever worker finishes first.
///
/// Drawing runs on a thread of its own for the segment ([`Drawer`]): a draw can wait for a slow
/// reader, and the batches already complete must not wait with it.
struct Window {
    pool: rayon::ThreadPool,
    done_tx: Sender<Done>,
    done_rx: Receiver<Done>,
    /// Scratch buffers of placed candidates, back to the drawing side for the next ones.
    spare_tx: Sender<(Vec<u8>, Vec<i64>)>,
    spare_rx: Receiver<(Vec<u8>, Vec<i64>)>,
    /// Candidates drawn and not yet placed, at most.
    limit: u64,
}

/// How far placing has got; the drawing thread draws while there is room.
#[derive(Default)]
struct Progress {
    placed: u64,
    /// Bytes (encoded) of the placed candidates.
    placed_bytes: u64,
    /// Results back from the pool, and how many of them were rejections.
    resolved: u64,
    rejected: u64,
    /// Placed candidates since the last usable one.
    rejected_run: u64,
    /// The segment is over (or the loader stops): draw no more.
    finished: bool,
}

struct Gate {
    progress: Mutex<Progress>,
    moved: Condvar,
}

impl Gate {
    fn update(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().unwrap_or_else(|p| p.into_inner()));
        self.moved.notify_all();
    }
}

/// What the drawing thread tells the assembler, besides the candidates themselves.
enum Drawn {
    /// Where the sequence stands right after candidate `seq`, which may end a batch.
    End(u64, Position),
    /// No more candidates after the first `drawn`: `Ok` where they ran out, `Err` why the
    /// sequence failed.
    Last { drawn: u64, at: Result<Position, String> },
}

/// The drawing side of a segment: candidates in sequence order, each recorded and handed to the
/// pool while there is room ahead of placing.
struct Drawer<'a> {
    ctx: &'a Context,
    pool: &'a rayon::ThreadPool,
    gate: &'a Gate,
    done_tx: Sender<Done>,
    spare_rx: Receiver<(Vec<u8>, Vec<i64>)>,
    news: Sender<Drawn>,
    limit: u64,
    /// Usable candidates the segment still needs (fixed-length segments): none is drawn beyond.
    need: Option<u64>,
}

impl Drawer<'_> {
    fn run(self, mut cands: Candidates, mut drawing: StreamCursor) {
        let (ctx, bs) = (self.ctx, self.ctx.layout.batch_size as u64);
        let (mut drawn, mut drawn_bytes, mut barren) = (0u64, 0u64, Barren::default());
        loop {
            // Wait for room; the counts seen here may lag behind placing, which only makes the
            // recorded ends more, never fewer.
            let (resolved, rejected) = {
                let mut p = self.gate.progress.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if p.finished || ctx.stop.load(Ordering::Relaxed) {
                        return;
                    }
                    if ctx.layout.resampled && p.rejected_run >= RESAMPLED_REJECTED_RUN {
                        let why = format!("{} candidates in a row held no usable sample", p.rejected_run);
                        let _ = self.news.send(Drawn::Last { drawn, at: Err(why) });
                        return;
                    }
                    let room = drawn - p.placed < self.limit
                        && (drawn == p.placed || drawn_bytes - p.placed_bytes < ctx.read_ahead_bytes)
                        && self.need.is_none_or(|need| drawn - p.rejected < need);
                    if room {
                        break (p.resolved, p.rejected);
                    }
                    p = self
                        .gate
                        .moved
                        .wait_timeout(p, Duration::from_millis(100))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                }
            };
            match next_candidate(ctx, &mut cands, &mut drawing, &mut barren, &mut || self.accepted(drawn)) {
                Ok(Some(item)) => {
                    // Usable candidates up to this one: at most `hi`, at least `hi - unresolved`.
                    // A batch can end here only if a multiple of the batch size lies between.
                    let hi = drawn + 1 - rejected;
                    let unresolved = drawn - resolved;
                    if hi >= bs && (hi / bs) * bs >= hi - unresolved {
                        let _ = self.news.send(Drawn::End(drawn, Position::of(&cands, drawing.pass)));
                    }
                    drawn_bytes += item.bytes;
                    self.dispatch(&drawing, drawn, item);
                    drawn += 1;
                }
                Ok(None) => {
                    let _ = self.news.send(Drawn::Last { drawn, at: Ok(Position::of(&cands, drawing.pass)) });
                    return;
                }
                Err(why) => {
                    let _ = self.news.send(Drawn::Last { drawn, at: Err(why) });
                    return;
                }
            }
        }
    }

    /// Usable candidates among the first `drawn`, once all of them are back from the pool;
    /// `None` when the segment is over or the loader stops first.
    fn accepted(&self, drawn: u64) -> Option<u64> {
        let mut p = self.gate.progress.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if p.finished || self.ctx.stop.load(Ordering::Relaxed) {
                return None;
            }
            if p.resolved >= drawn {
                return Some(p.resolved - p.rejected);
            }
            p = self.gate.moved.wait_timeout(p, Duration::from_millis(100)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Hand candidate `seq` to the pool.
    fn dispatch(&self, drawing: &StreamCursor, seq: u64, item: Item) {
        let ctx = self.ctx;
        let mut rng = ctx.sample_rng(drawing, &item);
        let (mut pixels, mut tokens) = self.spare_rx.try_recv().unwrap_or_default();
        pixels.resize(3 * ctx.transform.output_size().pow(2), 0);
        tokens.resize(ctx.tokenizer.context_length(), 0);
        let (transform, tokenizer, done) = (ctx.transform.clone(), ctx.tokenizer.clone(), self.done_tx.clone());
        self.pool.spawn(move || {
            let s = &item.sample;
            let work = || -> Result<Option<EraseBox>, crate::decode::DecodeError> {
                let erase = transform.apply(&s.image, &s.image_ext, &mut rng, &mut pixels)?;
                tokenizer.encode_into(&s.caption, &mut tokens);
                Ok(erase)
            };
            let result = match guarded(work) {
                Ok(Ok(erase)) => Ok(erase),
                Ok(Err(e)) => Err((e.reason(), e.to_string())),
                Err(panic) => Err(("panic", format!("panicked: {panic}"))),
            };
            // The assembler is gone only when the loader stops; the result is not needed then.
            let _ = done.send(Done { seq, item, pixels, tokens, result });
        });
    }
}

impl Window {
    fn new(pool: rayon::ThreadPool) -> Window {
        let (done_tx, done_rx) = crossbeam_channel::unbounded();
        let (spare_tx, spare_rx) = crossbeam_channel::unbounded();
        // Four per worker: enough queued that no worker waits for the assembler, few enough that
        // the finished candidates waiting behind a slow one stay a few megabytes.
        let limit = 4 * pool.current_num_threads().max(1) as u64;
        Window { pool, done_tx, done_rx, spare_tx, spare_rx, limit }
    }

    /// Buffers for the next batch; an error (naming `data.batch_size`) when none can be allocated.
    fn filling(&self, ctx: &Context) -> Result<Filling, String> {
        let bs = ctx.layout.batch_size;
        let failed = |what, alloc| DataError::BatchBuffer { batch_size: bs, what, alloc }.to_string();
        Ok(Filling {
            images: ctx.images.take(ctx.images.bytes()).map_err(|e| failed("image", e))?,
            tokens: ctx.tokens.take(ctx.tokens.bytes()).map_err(|e| failed("token", e))?,
            erase: Vec::with_capacity(bs),
            kept: Vec::with_capacity(bs),
        })
    }

    /// Transform and batch the candidates of `cur`'s segment (the rest of it, after a resume) and
    /// send the batches; `cur` ends right after the last batch sent.
    fn segment(&self, ctx: &Context, cur: &mut StreamCursor, tx: &Sender<Result<Batch, String>>) -> SegmentEnd {
        let gate = Gate { progress: Mutex::new(Progress::default()), moved: Condvar::new() };
        let (news_tx, news_rx) = crossbeam_channel::unbounded();
        let drawer = Drawer {
            ctx,
            pool: &self.pool,
            gate: &gate,
            done_tx: self.done_tx.clone(),
            spare_rx: self.spare_rx.clone(),
            news: news_tx,
            limit: self.limit,
            need: cur.segment.length.map(|n| n.saturating_sub(cur.batches_in_segment) * ctx.layout.batch_size as u64),
        };
        let cands = ctx.start(cur);
        // The drawing thread's cursor moves with the draws (another pass over the shards); `cur`
        // moves batch by batch.
        let drawing = cur.clone();
        std::thread::scope(|scope| {
            std::thread::Builder::new()
                .name("data-draw".into())
                .spawn_scoped(scope, move || drawer.run(cands, drawing))
                .expect("cannot start the drawing thread");
            let end = self.place(ctx, cur, tx, &gate, &news_rx);
            gate.update(|p| p.finished = true);
            end
        })
    }

    /// The assembler's side of [`Window::segment`]: results placed in draw order, batches sent.
    fn place(
        &self,
        ctx: &Context,
        cur: &mut StreamCursor,
        tx: &Sender<Result<Batch, String>>,
        gate: &Gate,
        news: &Receiver<Drawn>,
    ) -> SegmentEnd {
        let bs = ctx.layout.batch_size;
        let mut placed = 0u64;
        let mut back: BTreeMap<u64, Done> = BTreeMap::new();
        let mut ends: VecDeque<(u64, Position)> = VecDeque::new();
        let mut last: Option<(u64, Result<Position, String>)> = None;
        let mut sent_any = false;
        let mut filling = match self.filling(ctx) {
            Ok(filling) => filling,
            Err(why) => return SegmentEnd::Failed { why, sent_any },
        };
        loop {
            if ctx.stop.load(Ordering::Relaxed) {
                return SegmentEnd::Closed;
            }
            // Wait for the next result or the drawer's news, unless the next candidate is back.
            if !back.contains_key(&placed) {
                let mut sel = Select::new();
                let results = sel.recv(&self.done_rx);
                let told = if last.is_none() { Some(sel.recv(news)) } else { None };
                if let Ok(op) = sel.select_timeout(Duration::from_millis(100)) {
                    if op.index() == results {
                        if let Ok(done) = op.recv(&self.done_rx) {
                            gate.update(|p| {
                                p.resolved += 1;
                                p.rejected += done.result.is_err() as u64;
                            });
                            back.insert(done.seq, done);
                        }
                    } else if Some(op.index()) == told {
                        match op.recv(news) {
                            Ok(Drawn::End(seq, at)) => ends.push_back((seq, at)),
                            Ok(Drawn::Last { drawn, at }) => last = Some((drawn, at)),
                            Err(_) => {
                                let why = "the drawing thread ended unexpectedly".to_string();
                                return SegmentEnd::Failed { why, sent_any };
                            }
                        }
                    }
                }
            }
            // Ends are told before their candidate is handed out, so they are all here by now.
            while let Ok(news) = news.try_recv() {
                match news {
                    Drawn::End(seq, at) => ends.push_back((seq, at)),
                    Drawn::Last { drawn, at } => last = Some((drawn, at)),
                }
            }
            while let Some(done) = back.remove(&placed) {
                placed += 1;
                gate.update(|p| {
                    p.placed += 1;
                    p.placed_bytes += done.item.bytes;
                    p.rejected_run = if done.result.is_ok() { 0 } else { p.rejected_run + 1 };
                });
                match done.result {
                    Ok(erase) => {
                        let (px, row) = (done.pixels.len(), done.tokens.len());
                        let slot = filling.kept.len();
                        filling.images.as_bytes_mut()[slot * px..(slot + 1) * px].copy_from_slice(&done.pixels);
                        filling.tokens.as_i64_mut()[slot * row..(slot + 1) * row].copy_from_slice(&done.tokens);
                        filling.erase.push(erase);
                        filling.kept.push(done.item);
                    }
                    Err((reason, e)) => ctx
                        .stats
                        .warn_skip(reason, || format!("`{}` key `{}`: {e}", done.item.url, done.item.sample.key)),
                }
                let _ = self.spare_tx.send((done.pixels, done.tokens));
                while ends.front().is_some_and(|(seq, _)| *seq < done.seq) {
                    ends.pop_front();
                }
                if filling.kept.len() == bs {
                    let (seq, position) = ends.pop_front().expect("a batch ends where an end was recorded");
                    debug_assert_eq!(seq, done.seq);
                    let next = match self.filling(ctx) {
                        Ok(next) => next,
                        // The finished batch still goes out; the stream cannot go on without buffers.
                        Err(why) => {
                            return match send(ctx, cur, position, filling, tx) {
                                true => SegmentEnd::Failed { why, sent_any: true },
                                false => SegmentEnd::Closed,
                            }
                        }
                    };
                    let full = std::mem::replace(&mut filling, next);
                    if !send(ctx, cur, position, full, tx) {
                        return SegmentEnd::Closed;
                    }
                    sent_any = true;
                    if cur.segment.length.is_some_and(|n| cur.batches_in_segment >= n) {
                        return SegmentEnd::Done { sent_any };
                    }
                }
            }
            match last.take() {
                Some((drawn, Ok(position))) if drawn == placed => {
                    // Evaluation keeps the last partial batch; training drops it, but the
                    // shard-size tally goes on into the next epoch.
                    if ctx.eval && !filling.kept.is_empty() {
                        if !send(ctx, cur, position, filling, tx) {
                            return SegmentEnd::Closed;
                        }
                        sent_any = true;
                    } else {
                        (cur.shards_done, cur.samples_done) = (position.shards_done, position.samples_done);
                    }
                    return SegmentEnd::Done { sent_any };
                }
                Some((drawn, Err(why))) if drawn == placed => return SegmentEnd::Failed { why, sent_any },
                other => last = other,
            }
        }
    }
}

/// Move `cur` past `filling`'s batch (its last candidate drawn at `position`) and send it; `false`
/// when the trainer dropped the loader.
fn send(
    ctx: &Context,
    cur: &mut StreamCursor,
    position: Position,
    filling: Filling,
    tx: &Sender<Result<Batch, String>>,
) -> bool {
    let Filling { mut images, mut tokens, erase, kept } = filling;
    let n = kept.len();
    let size = ctx.transform.output_size();
    let ctx_len = ctx.tokenizer.context_length();
    images.truncate(n * 3 * size * size);
    tokens.truncate(n * ctx_len * 8);
    position.apply(cur);
    cur.batches_in_segment += 1;
    cur.epoch_samples = cur.segment.start + cur.batches_in_segment * ctx.layout.global_batch();
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
    tx.send(Ok(batch)).is_ok()
}
