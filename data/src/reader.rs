//! A reader thread: reads the shards of its plan in order (resampled: draws shards forever) and
//! sends their usable samples to the merge, never more than `data.read_ahead_bytes` (and
//! [`READ_AHEAD_SAMPLES`]) ahead of it.
//!
//! A plan starts with the samples a resume puts back into the shuffle buffer (re-read directly
//! from their recorded offsets, sent as [`Msg::Refill`], closed by [`Msg::RefillDone`]), then
//! reads its units. Every sample carries its shard ordinal and offsets, so the merge always knows
//! where each reader stands. A panic inside the tar reader costs the shard, never the thread.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, SendTimeoutError, Sender};
use rand::distributions::{Distribution, WeightedIndex};

use crate::cursor::{PendingGroup, Unit};
use crate::guard::guarded;
use crate::rng::SampleRng;
use crate::sample::{Sample, SampleGrouper, SampleSpec};
use crate::source::{open_shard, Activity, Shard};
use crate::stats::Stats;
use crate::tar::{ShardStream, TarReader};

/// Samples a reader may have sent that the merge has not taken yet. The byte budget
/// (`data.read_ahead_bytes`) is the bound that matters; this one only keeps tiny samples from
/// piling up by the million. It must not bind first at LAION sizes: hiding a `pipe:` shard
/// switch of about a second at 9k samples/s over 2 readers takes some 4.5k samples per reader.
pub(crate) const READ_AHEAD_SAMPLES: usize = 8192;

/// A usable sample with where it came from.
#[derive(Debug)]
pub(crate) struct Item {
    pub shard: u32,
    pub url: Arc<str>,
    pub draw: u64,
    /// Position of its unit in the reader's sequence (the unit list, or the draw number).
    pub unit: u64,
    pub ordinal: u64,
    /// Tar offsets of the sample and of the one after it.
    pub offset: u64,
    pub end: u64,
    pub sample: Sample,
    /// Encoded bytes held (image and caption).
    pub bytes: u64,
}

/// How a unit ended.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UnitEnd {
    /// Key groups the shard holds, when the unit read it to its end.
    pub groups: Option<u64>,
}

/// What a reader sends, in reading order.
#[derive(Debug)]
pub(crate) enum Msg {
    /// A sample the resumed shuffle buffer held.
    Refill(Item),
    /// No more refill samples from this reader.
    RefillDone,
    /// A sample; `last` when its unit ended right after it.
    Sample { item: Item, last: Option<UnitEnd> },
    /// Unit `unit` ended after its last sample was sent (or without any).
    UnitEnd { unit: u64, end: UnitEnd },
}

/// Bytes one reader has sent that the merge has not taken: the reader waits while it is over
/// the cap (a single sample larger than the cap still passes, alone).
#[derive(Debug)]
pub(crate) struct ByteBudget {
    used: AtomicU64,
    cap: u64,
    lock: Mutex<()>,
    freed: Condvar,
}

impl ByteBudget {
    pub fn new(cap: u64) -> Self {
        ByteBudget { used: AtomicU64::new(0), cap, lock: Mutex::new(()), freed: Condvar::new() }
    }

    /// Take `n` bytes, waiting for room; `false` if `keep_waiting` (asked now and then) says no.
    pub fn acquire(&self, n: u64, keep_waiting: impl Fn() -> bool) -> bool {
        let mut guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let used = self.used.load(Ordering::Relaxed);
            if used == 0 || used + n <= self.cap {
                self.used.fetch_add(n, Ordering::Relaxed);
                return true;
            }
            if !keep_waiting() {
                return false;
            }
            guard = self.freed.wait_timeout(guard, Duration::from_millis(50)).unwrap_or_else(|p| p.into_inner()).0;
        }
    }

    pub fn release(&self, n: u64) {
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.used.fetch_sub(n.min(self.used.load(Ordering::Relaxed)), Ordering::Relaxed);
        self.freed.notify_all();
    }

    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    pub fn cap(&self) -> u64 {
        self.cap
    }
}

/// What all readers of one loader share.
pub(crate) struct Shared {
    pub shards: Arc<Vec<Shard>>,
    pub urls: Vec<Arc<str>>,
    pub spec: SampleSpec,
    pub stats: Arc<Stats>,
    pub stop: Arc<AtomicBool>,
    pub max_member_bytes: u64,
    pub read_ahead_bytes: u64,
    pub seed: u64,
    pub rank: usize,
    /// Resampled mode: the draw distribution (each shard weighted by its source's weight).
    pub weights: Option<WeightedIndex<f64>>,
}

/// Where a reader's units come from.
#[derive(Debug, Clone)]
pub(crate) enum Source {
    /// These units, from index `first` on.
    List { units: Arc<Vec<Unit>>, first: usize },
    /// Shard draws `next, next + 1, …` of the stream keyed `key`; `resume` first continues draw
    /// `next - 1`.
    Draws { key: Vec<u64>, next: u64, resume: Option<Unit> },
}

/// One reader's work.
pub(crate) struct Plan {
    pub slot: usize,
    pub refill: Vec<PendingGroup>,
    pub source: Source,
}

/// The merge's end of a reader.
pub(crate) struct Handle {
    pub rx: Receiver<Msg>,
    pub activity: Arc<Activity>,
    pub budget: Arc<ByteBudget>,
    /// Position of the unit the thread is reading (`u64::MAX` while it refills).
    pub current: Arc<AtomicU64>,
}

/// The draw id of draw `d` of reader `slot`: distinct for every draw of a rank's segment.
pub(crate) fn draw_id(slot: usize, d: u64) -> u64 {
    ((slot as u64) << 40) | d
}

/// Start a reader thread.
pub(crate) fn spawn(plan: Plan, shared: Arc<Shared>) -> Handle {
    let (tx, rx) = bounded(READ_AHEAD_SAMPLES);
    let handle = Handle {
        rx,
        activity: Arc::new(Activity::default()),
        budget: Arc::new(ByteBudget::new(shared.read_ahead_bytes)),
        current: Arc::new(AtomicU64::new(u64::MAX)),
    };
    handle.activity.touch();
    let reader = Reader {
        shared,
        tx,
        activity: handle.activity.clone(),
        budget: handle.budget.clone(),
        current: handle.current.clone(),
    };
    std::thread::Builder::new()
        .name(format!("data-reader-{}", plan.slot))
        .spawn(move || reader.run(plan))
        .expect("spawn reader thread");
    handle
}

struct Reader {
    shared: Arc<Shared>,
    tx: Sender<Msg>,
    activity: Arc<Activity>,
    budget: Arc<ByteBudget>,
    current: Arc<AtomicU64>,
}

impl Reader {
    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed) || self.activity.is_abandoned()
    }

    /// Send `msg` once its bytes fit the budget and the channel has room; `false` when the reader
    /// must end. Waiting for the merge to take samples is not a stall: it counts as activity.
    fn send(&self, msg: Msg, bytes: u64) -> bool {
        let waiting = || {
            self.activity.touch();
            !self.stopped()
        };
        if !self.budget.acquire(bytes, waiting) {
            return false;
        }
        let mut msg = msg;
        loop {
            if !waiting() {
                break;
            }
            match self.tx.send_timeout(msg, Duration::from_millis(100)) {
                Ok(()) => return true,
                Err(SendTimeoutError::Timeout(m)) => msg = m,
                Err(SendTimeoutError::Disconnected(_)) => break,
            }
        }
        self.budget.release(bytes);
        false
    }

    fn run(self, plan: Plan) {
        for group in &plan.refill {
            if !self.refill(group) {
                return;
            }
        }
        if !self.send(Msg::RefillDone, 0) {
            return;
        }
        match plan.source {
            Source::List { units, first } => {
                for (i, unit) in units.iter().enumerate().skip(first) {
                    if self.read_unit(i as u64, unit).is_none() {
                        return;
                    }
                }
            }
            Source::Draws { key, next, resume } => {
                if let Some(unit) = resume {
                    if self.read_unit(next - 1, &unit).is_none() {
                        return;
                    }
                }
                let weights = self.shared.weights.as_ref().expect("resampled readers have weights");
                // Over only-bad shards this would spin forever: give up after this many consecutive
                // shards without a single usable sample.
                let limit = 2 * self.shared.shards.len() as u64 + 16;
                let mut barren = 0;
                for d in next.. {
                    if barren > limit {
                        let rank = self.shared.rank;
                        eprintln!(
                            "error: rank {rank}: {barren} consecutive resampled shards had no usable sample; \
                             a reader stops"
                        );
                        return;
                    }
                    let mut parts = key.clone();
                    parts.push(d);
                    let shard = weights.sample(&mut SampleRng::keyed(self.shared.seed, &parts)) as u32;
                    let unit = Unit::whole(shard, draw_id(plan.slot, d));
                    match self.read_unit(d, &unit) {
                        None => return,
                        Some(usable) => barren = if usable == 0 { barren + 1 } else { 0 },
                    }
                }
            }
        }
    }

    /// Open a shard at a recorded sample boundary; `None` (counted, warned) when it cannot be read.
    fn open_at(&self, shard: u32, ordinal: u64, offset: u64) -> Option<SampleGrouper<Box<dyn ShardStream>>> {
        if self.stopped() {
            return None;
        }
        let s = &self.shared;
        let url = &s.urls[shard as usize];
        let opened = open_shard(&s.shards[shard as usize], s.stats.bytes_read.clone(), self.activity.clone())
            .and_then(|stream| TarReader::starting_at(stream, offset, s.max_member_bytes));
        match opened {
            Ok(tar) => {
                s.stats.shards_opened.fetch_add(1, Ordering::Relaxed);
                Some(SampleGrouper::over(tar, ordinal))
            }
            Err(e) => {
                if !self.stopped() {
                    s.stats.shards_failed.fetch_add(1, Ordering::Relaxed);
                    eprintln!("warning: skipping shard `{url}`: {e}");
                }
                None
            }
        }
    }

    fn item(&self, unit: &Unit, index: u64, raw: crate::sample::RawSample) -> Option<Item> {
        let (ordinal, offset, end, key) = (raw.ordinal, raw.offset, raw.end, raw.key.clone());
        let url = &self.shared.urls[unit.shard as usize];
        match self.shared.spec.select(raw) {
            Ok(sample) => {
                let bytes = (sample.image.len() + sample.caption.len()) as u64;
                Some(Item {
                    shard: unit.shard,
                    url: url.clone(),
                    draw: unit.draw,
                    unit: index,
                    ordinal,
                    offset,
                    end,
                    sample,
                    bytes,
                })
            }
            Err(reason) => {
                self.shared.stats.warn_skip(reason.name(), || format!("`{url}` key `{key}`"));
                None
            }
        }
    }

    /// Read the samples of `group` back (from its offset, passing over the others); `false` when
    /// the reader must end.
    fn refill(&self, group: &PendingGroup) -> bool {
        self.current.store(u64::MAX, Ordering::Relaxed);
        let wanted = group.ordinals();
        let Some(&last) = wanted.last() else { return true };
        let Some(mut samples) = self.open_at(group.shard, group.ordinal, group.offset) else {
            eprintln!(
                "warning: {} buffered samples of `{}` are lost: the shard cannot be read again",
                wanted.len(),
                self.shared.urls[group.shard as usize]
            );
            return !self.stopped();
        };
        let unit = Unit { shard: group.shard, draw: group.draw, ..Unit::default() };
        let skip = |ord: u64| wanted.binary_search(&ord).is_err();
        loop {
            if self.stopped() {
                return false;
            }
            match guarded(|| samples.next_sample_skipping(&skip)) {
                Ok(Ok(Some(raw))) => {
                    let ordinal = raw.ordinal;
                    if !skip(ordinal) {
                        if let Some(item) = self.item(&unit, u64::MAX, raw) {
                            let bytes = item.bytes;
                            if !self.send(Msg::Refill(item), bytes) {
                                return false;
                            }
                        }
                    }
                    if ordinal >= last {
                        return true;
                    }
                }
                Ok(Ok(None)) => return true,
                Ok(Err(e)) => {
                    self.shard_error(group.shard, &e.to_string());
                    return !self.stopped();
                }
                Err(panic) => {
                    self.shard_error(group.shard, &format!("the tar reader panicked: {panic}"));
                    return !self.stopped();
                }
            }
        }
    }

    fn shard_error(&self, shard: u32, e: &str) {
        if !self.stopped() {
            self.shared.stats.shards_failed.fetch_add(1, Ordering::Relaxed);
            eprintln!("warning: shard `{}` ends early: {e}", self.shared.urls[shard as usize]);
        }
    }

    /// Read one unit, sending its samples and how it ended; the number of usable samples, or
    /// `None` when the reader must end.
    fn read_unit(&self, index: u64, unit: &Unit) -> Option<u64> {
        self.current.store(index, Ordering::Relaxed);
        let mut usable = 0u64;
        let mut end = UnitEnd { groups: None };
        if let Some(mut samples) = self.open_at(unit.shard, unit.ordinal, unit.offset) {
            let skip = |ord: u64| ord < unit.begin || unit.end.is_some_and(|e| ord >= e);
            let mut held: Option<Item> = None;
            loop {
                if self.stopped() {
                    return None;
                }
                match guarded(|| samples.next_sample_skipping(&skip)) {
                    Ok(Ok(Some(raw))) => {
                        if unit.end.is_some_and(|e| raw.ordinal >= e) {
                            break;
                        }
                        if raw.ordinal < unit.begin {
                            continue;
                        }
                        if let Some(item) = self.item(unit, index, raw) {
                            usable += 1;
                            if let Some(prev) = held.replace(item) {
                                let bytes = prev.bytes;
                                if !self.send(Msg::Sample { item: prev, last: None }, bytes) {
                                    return None;
                                }
                            }
                        }
                    }
                    Ok(Ok(None)) => {
                        if unit.end.is_none() {
                            end.groups = Some(samples.next_ordinal());
                        }
                        break;
                    }
                    Ok(Err(e)) => {
                        self.shard_error(unit.shard, &format!("after {usable} samples: {e}"));
                        break;
                    }
                    Err(panic) => {
                        self.shard_error(unit.shard, &format!("the tar reader panicked: {panic}"));
                        break;
                    }
                }
            }
            if let Some(item) = held {
                let bytes = item.bytes;
                return self.send(Msg::Sample { item, last: Some(end) }, bytes).then_some(usable);
            }
        }
        self.send(Msg::UnitEnd { unit: index, end }, 0).then_some(usable)
    }
}
