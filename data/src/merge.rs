//! Shuffle/merge: a rank's reader threads merged into one candidate sequence, through a seeded
//! shuffle buffer (webdataset's `shuffle(bufsize)`), bounded in samples and in bytes.
//!
//! Merge order: round-robin over the readers, one sample each, like webdataset workers behind a
//! `DataLoader`, so while every reader keeps ahead the sequence does not depend on thread timing.
//! A reader with nothing ready when its turn comes is waited for briefly ([`GRACE`]), then marked
//! lagging: the merge takes from the others meanwhile and returns to strict turns once it is
//! well ahead again. A reader that shows no progress for `data.read_timeout_s` is abandoned: its
//! shard counts as failed, its `pipe:` command is ended, and a fresh thread goes on with its
//! next shard. Evaluation merges shard by shard, in order, and only abandons.
//!
//! The shuffle buffer is kept sorted by sample identity (shard, reading, ordinal), and each pick
//! is a uniform index drawn from a stream keyed on the pick's number: the buffer's state is the
//! *set* of samples in it plus a counter, which is what a cursor stores.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{RecvTimeoutError, Select, TryRecvError};
use rand::Rng;

use crate::cursor::{encode_bits, PendingGroup, ReaderCursor, Unit};
use crate::reader::{self, Handle, Item, Msg, Plan, Shared, Source, UnitEnd};
use crate::rng::SampleRng;

/// How long the merge waits for the reader whose turn it is before serving the others.
pub(crate) const GRACE: Duration = Duration::from_secs(1);

/// A lagging reader is back in strict turns once it has this many samples (or half its byte
/// budget) ready.
const CAUGHT_UP_SAMPLES: usize = 32;

/// How the merge takes from its readers.
#[derive(Debug, Clone)]
pub(crate) struct MergeRules {
    /// Evaluation: all of one reader's shard, then the next reader's, waiting as long as it takes
    /// (up to the read timeout).
    pub by_shard: bool,
    pub read_timeout: Duration,
    /// Count shards read to the end (first pass only: the elastic size estimate).
    pub count_done: bool,
}

/// The merge's view of one reader.
struct Slot {
    handle: Handle,
    /// What the slot reads (kept to restart a thread after a stall, and for cursors).
    source: Source,
    /// Index of the unit `at` is in, or of the next unit when `at` is `None`.
    seq: u64,
    at: Option<Unit>,
    lagging: bool,
    finished: bool,
    refilled: bool,
}

impl Slot {
    /// The next unit index to start.
    fn next_unit(&self) -> u64 {
        self.seq + self.at.is_some() as u64
    }

    fn cursor(&self) -> ReaderCursor {
        let next = self.next_unit();
        match &self.source {
            Source::List { units, .. } => ReaderCursor {
                at: self.at.clone(),
                todo: units.get(next as usize..).unwrap_or_default().to_vec(),
                draws: 0,
            },
            Source::Draws { .. } => ReaderCursor { at: self.at.clone(), todo: Vec::new(), draws: next },
        }
    }
}

/// The merge of one pass of a rank's readers.
pub(crate) struct Merge {
    slots: Vec<Slot>,
    next: usize,
    rules: MergeRules,
    shared: Arc<Shared>,
    /// Shards read to the end and the samples they held (see [`MergeRules::count_done`]).
    pub shards_done: u64,
    pub samples_done: u64,
}

impl Merge {
    /// Start one reader per cursor: refill groups first, then the cursor's units (or draws of the
    /// stream keyed `draw_key` + reader index).
    pub fn start(
        shared: Arc<Shared>,
        readers: &[ReaderCursor],
        mut refill: Vec<Vec<PendingGroup>>,
        next: usize,
        draw_key: Option<&[u64]>,
        rules: MergeRules,
    ) -> Merge {
        refill.resize(readers.len(), Vec::new());
        let slots = readers
            .iter()
            .zip(refill)
            .enumerate()
            .map(|(i, (cursor, refill))| {
                let (source, seq) = match draw_key {
                    None => {
                        let units: Vec<Unit> = cursor.at.iter().chain(&cursor.todo).cloned().collect();
                        (Source::List { units: Arc::new(units), first: 0 }, 0)
                    }
                    Some(key) => {
                        let mut key = key.to_vec();
                        key.push(i as u64);
                        let resume = cursor.at.clone().filter(|_| cursor.draws > 0);
                        let seq = cursor.draws - resume.is_some() as u64;
                        (Source::Draws { key, next: cursor.draws.max(resume.is_some() as u64), resume }, seq)
                    }
                };
                let handle = reader::spawn(Plan { slot: i, refill, source: source.clone() }, shared.clone());
                Slot { handle, source, seq, at: cursor.at.clone(), lagging: false, finished: false, refilled: false }
            })
            .collect();
        Merge { slots, next: next % readers.len().max(1), rules, shared, shards_done: 0, samples_done: 0 }
    }

    pub fn next_reader(&self) -> usize {
        self.next
    }

    pub fn cursors(&self) -> Vec<ReaderCursor> {
        self.slots.iter().map(Slot::cursor).collect()
    }

    /// Bytes read ahead by the readers and not taken yet.
    pub fn read_ahead(&self) -> u64 {
        self.slots.iter().map(|s| s.handle.budget.used()).sum()
    }

    /// How often to look at stalls while waiting.
    fn tick(&self) -> Duration {
        GRACE.min(self.rules.read_timeout / 4).max(Duration::from_millis(10))
    }

    /// Take every refill sample into `buffer`, until each reader says it has sent them all.
    pub fn refill_into(&mut self, buffer: &mut ShuffleBuffer) {
        while let Some(i) = (0..self.slots.len()).find(|&i| !self.slots[i].refilled && !self.slots[i].finished) {
            if self.stopped() {
                return;
            }
            match self.slots[i].handle.rx.recv_timeout(self.tick()) {
                Ok(Msg::Refill(item)) => {
                    self.slots[i].handle.budget.release(item.bytes);
                    buffer.insert(item);
                }
                Ok(Msg::RefillDone) => self.slots[i].refilled = true,
                Ok(other) => unreachable!("a reader sent {other:?} before RefillDone"),
                Err(RecvTimeoutError::Timeout) => self.check_stall(i),
                Err(RecvTimeoutError::Disconnected) => self.slots[i].finished = true,
            }
        }
    }

    fn stopped(&self) -> bool {
        self.shared.stop.load(Ordering::Relaxed)
    }

    /// The next sample in merge order; `None` once every reader has finished (or the loader stops).
    pub fn pull(&mut self) -> Option<Item> {
        loop {
            if self.stopped() {
                return None;
            }
            let n = self.slots.len();
            let i = (0..n).map(|k| (self.next + k) % n).find(|&i| !self.slots[i].finished)?;
            if self.rules.by_shard {
                match self.slots[i].handle.rx.recv_timeout(self.tick()) {
                    Ok(msg) => {
                        if let Some(item) = self.take(i, msg) {
                            return Some(item);
                        }
                    }
                    Err(RecvTimeoutError::Timeout) => self.check_stall(i),
                    Err(RecvTimeoutError::Disconnected) => self.finish(i),
                }
                continue;
            }
            let slot = &mut self.slots[i];
            if slot.lagging
                && (slot.handle.rx.len() >= CAUGHT_UP_SAMPLES
                    || slot.handle.budget.used() * 2 >= slot.handle.budget.cap())
            {
                slot.lagging = false;
            }
            if !slot.lagging {
                match slot.handle.rx.recv_timeout(GRACE) {
                    Ok(msg) => {
                        if let Some(item) = self.take(i, msg) {
                            self.next = i + 1;
                            return Some(item);
                        }
                        continue;
                    }
                    Err(RecvTimeoutError::Timeout) => {
                        self.slots[i].lagging = true;
                        self.check_stall(i);
                    }
                    Err(RecvTimeoutError::Disconnected) => {
                        self.finish(i);
                        continue;
                    }
                }
            }
            // Reader `i` lags: serve whoever has something, in turn order from `i`.
            let mut took_marker = false;
            for k in 0..n {
                let j = (i + k) % n;
                if self.slots[j].finished {
                    continue;
                }
                match self.slots[j].handle.rx.try_recv() {
                    Ok(msg) => {
                        if let Some(item) = self.take(j, msg) {
                            self.next = j + 1;
                            return Some(item);
                        }
                        took_marker = true;
                        break;
                    }
                    Err(TryRecvError::Empty) => self.check_stall(j),
                    Err(TryRecvError::Disconnected) => self.finish(j),
                }
            }
            if took_marker || self.slots.iter().all(|s| s.finished) {
                continue;
            }
            // Nothing ready anywhere: wait for the first reader with something, a while.
            let live: Vec<usize> = (0..n).filter(|&j| !self.slots[j].finished).collect();
            let mut select = Select::new();
            for &j in &live {
                select.recv(&self.slots[j].handle.rx);
            }
            let _ = select.ready_timeout(self.tick());
        }
    }

    /// Account for one message of reader `i`; the sample, if it is one.
    fn take(&mut self, i: usize, msg: Msg) -> Option<Item> {
        match msg {
            Msg::Sample { item, last } => {
                let anchor = last.is_none().then(|| self.anchor_after(i, &item));
                let slot = &mut self.slots[i];
                slot.handle.budget.release(item.bytes);
                slot.seq = item.unit;
                slot.at = anchor;
                if let Some(end) = last {
                    self.unit_done(i, item.unit, end);
                }
                Some(item)
            }
            Msg::UnitEnd { unit, end } => {
                self.unit_done(i, unit, end);
                None
            }
            Msg::RefillDone => {
                self.slots[i].refilled = true;
                None
            }
            Msg::Refill(_) => unreachable!("refill samples are taken before merging starts"),
        }
    }

    /// The unit of reader `i` anchored right after `item`.
    fn anchor_after(&self, i: usize, item: &Item) -> Unit {
        let (begin, end) = match &self.slots[i].source {
            Source::List { units, .. } => units.get(item.unit as usize).map_or((0, None), |u| (u.begin, u.end)),
            Source::Draws { .. } => (0, None),
        };
        let next = item.ordinal + 1;
        Unit { shard: item.shard, draw: item.draw, ordinal: next, offset: item.end, begin: begin.max(next), end }
    }

    fn unit_done(&mut self, i: usize, unit: u64, end: UnitEnd) {
        let slot = &mut self.slots[i];
        slot.seq = unit + 1;
        slot.at = None;
        if let (true, Some(groups)) = (self.rules.count_done, end.groups) {
            self.shards_done += 1;
            self.samples_done += groups;
        }
        if self.rules.by_shard {
            self.next = i + 1;
        }
    }

    fn finish(&mut self, i: usize) {
        self.slots[i].finished = true;
        self.slots[i].refilled = true;
        if self.rules.by_shard && self.next % self.slots.len() == i {
            self.next = i + 1;
        }
    }

    /// Abandon reader `i` if it has nothing ready and has not moved for the read timeout, and go
    /// on with a fresh thread from its next unit.
    fn check_stall(&mut self, i: usize) {
        let timeout = self.rules.read_timeout;
        let slot = &self.slots[i];
        if slot.finished || !slot.handle.rx.is_empty() || slot.handle.activity.idle() < timeout {
            return;
        }
        let current = slot.handle.current.load(Ordering::Relaxed);
        let stalled = if current == u64::MAX { slot.next_unit() } else { current };
        let what = match &slot.source {
            Source::List { units, .. } => {
                units.get(stalled as usize).map(|u| self.shared.urls[u.shard as usize].to_string())
            }
            Source::Draws { .. } => slot.at.as_ref().map(|u| self.shared.urls[u.shard as usize].to_string()),
        }
        .unwrap_or_else(|| "(opening a shard)".into());
        slot.handle.activity.abandon();
        self.shared.stats.shards_failed.fetch_add(1, Ordering::Relaxed);
        eprintln!(
            "warning: rank {}: reader {i} made no progress for {:.0} s on `{what}` (data.read_timeout_s); \
             the shard counts as failed and reading goes on",
            self.shared.rank,
            timeout.as_secs_f64()
        );
        let after = if current == u64::MAX { slot.next_unit() } else { current + 1 };
        let source = match &slot.source {
            Source::List { units, .. } => Source::List { units: units.clone(), first: after as usize },
            Source::Draws { key, .. } => Source::Draws { key: key.clone(), next: after, resume: None },
        };
        let handle = reader::spawn(Plan { slot: i, refill: Vec::new(), source: source.clone() }, self.shared.clone());
        self.slots[i] = Slot { handle, source, seq: after, at: None, lagging: true, finished: false, refilled: true };
    }
}

impl Drop for Merge {
    fn drop(&mut self) {
        // Readers of a finished pass (or a dropped loader) must not keep reading.
        for slot in &self.slots {
            slot.handle.activity.abandon();
        }
    }
}

/// The seeded shuffle buffer; see the module docs.
pub(crate) struct ShuffleBuffer {
    /// Sorted by (shard, draw, ordinal). Boxed: inserting into and removing from the middle
    /// then moves pointers, not ~200-byte samples (a 2000-sample buffer, at every pick).
    #[allow(clippy::vec_box)]
    items: Vec<Box<Item>>,
    bytes: u64,
    capacity: usize,
    byte_cap: u64,
}

fn identity(item: &Item) -> (u32, u64, u64) {
    (item.shard, item.draw, item.ordinal)
}

impl ShuffleBuffer {
    pub fn new(capacity: usize, byte_cap: u64) -> Self {
        ShuffleBuffer { items: Vec::new(), bytes: 0, capacity, byte_cap }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether it takes another sample before handing one out.
    pub fn wants_more(&self) -> bool {
        self.items.len() < self.capacity && self.bytes < self.byte_cap
    }

    pub fn insert(&mut self, item: Item) {
        let at = self.items.binary_search_by_key(&identity(&item), |b| identity(b)).unwrap_or_else(|i| i);
        self.bytes += item.bytes;
        self.items.insert(at, Box::new(item));
    }

    pub fn take(&mut self, index: usize) -> Item {
        let item = *self.items.remove(index);
        self.bytes -= item.bytes;
        item
    }

    /// The buffered samples by shard reading, anchored at the first of each.
    pub fn groups(&self) -> Vec<PendingGroup> {
        let mut out: Vec<PendingGroup> = Vec::new();
        let mut members: Vec<u64> = Vec::new();
        let flush = |out: &mut Vec<PendingGroup>, members: &mut Vec<u64>| {
            if let Some(g) = out.last_mut() {
                g.pending = encode_bits(members.drain(..).map(|o| o - g.ordinal));
            }
        };
        for item in &self.items {
            let same = out.last().is_some_and(|g| (g.shard, g.draw) == (item.shard, item.draw));
            if !same {
                flush(&mut out, &mut members);
                out.push(PendingGroup {
                    shard: item.shard,
                    draw: item.draw,
                    ordinal: item.ordinal,
                    offset: item.offset,
                    pending: String::new(),
                });
            }
            members.push(item.ordinal);
        }
        flush(&mut out, &mut members);
        out
    }
}

/// One segment's candidate sequence: merged readers through the shuffle buffer.
pub(crate) struct Candidates {
    pub merge: Merge,
    pub buffer: ShuffleBuffer,
    /// Picks made so far, and the numbers the pick stream is keyed on.
    pub picks: u64,
    pick_key: Vec<u64>,
    seed: u64,
    /// Samples the current pass's readers have delivered.
    pub pulled_in_pass: u64,
}

impl Candidates {
    pub fn new(merge: Merge, buffer: ShuffleBuffer, picks: u64, seed: u64, pick_key: Vec<u64>) -> Self {
        Candidates { merge, buffer, picks, pick_key, seed, pulled_in_pass: 0 }
    }

    /// Go on with a new merge (the next pass), keeping the buffer and the pick stream.
    pub fn next_pass(&mut self, merge: Merge) {
        self.merge = merge;
        self.pulled_in_pass = 0;
    }

    fn pull(&mut self) -> Option<Item> {
        let item = self.merge.pull();
        self.pulled_in_pass += item.is_some() as u64;
        item
    }

    /// The next candidate; `None` when the readers are done and the buffer is empty.
    pub fn next(&mut self) -> Option<Item> {
        let item = if self.buffer.capacity == 0 {
            self.pull()
        } else {
            while self.buffer.wants_more() {
                match self.pull() {
                    Some(item) => self.buffer.insert(item),
                    None => break,
                }
            }
            if self.buffer.len() == 0 {
                None
            } else {
                let mut key = self.pick_key.clone();
                key.push(self.picks);
                self.picks += 1;
                let i = SampleRng::keyed(self.seed, &key).gen_range(0..self.buffer.len());
                Some(self.buffer.take(i))
            }
        };
        self.merge.shared.stats.set_buffered(self.buffer.bytes() + self.merge.read_ahead());
        item
    }
}
