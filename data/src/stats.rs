//! Counters of the input pipeline, shared by its threads and read cheaply by the trainer.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;

/// Live counters (atomics; the reason map behind a mutex touched only on skips).
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    pub samples: AtomicU64,
    pub batches: AtomicU64,
    pub shards_opened: AtomicU64,
    pub shards_failed: AtomicU64,
    pub bytes_read: Arc<AtomicU64>,
    /// Nanoseconds the consumer spent blocked in `next_batch`.
    pub wait_nanos: AtomicU64,
    /// Encoded bytes held in the shuffle buffer and read ahead by the readers, now and at most.
    pub buffered_bytes: AtomicU64,
    pub peak_buffered_bytes: AtomicU64,
    skipped: Mutex<BTreeMap<String, u64>>,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            samples: AtomicU64::new(0),
            batches: AtomicU64::new(0),
            shards_opened: AtomicU64::new(0),
            shards_failed: AtomicU64::new(0),
            bytes_read: Arc::new(AtomicU64::new(0)),
            wait_nanos: AtomicU64::new(0),
            buffered_bytes: AtomicU64::new(0),
            peak_buffered_bytes: AtomicU64::new(0),
            skipped: Mutex::new(BTreeMap::new()),
        }
    }
}

impl Stats {
    /// Count one skipped sample; returns how many were skipped for `reason` so far.
    pub fn skip(&self, reason: &str) -> u64 {
        let mut map = self.skipped.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(reason.to_string()).or_insert(0);
        *n += 1;
        *n
    }

    /// Count a skipped sample and warn, rate-limited: the first few of each reason, then every
    /// thousandth.
    pub fn warn_skip(&self, reason: &str, what: impl FnOnce() -> String) {
        let n = self.skip(reason);
        if n <= 10 || n.is_multiple_of(1000) {
            eprintln!("warning: skipped sample ({reason}, {n} so far): {}", what());
        }
    }

    /// Record how many encoded bytes the loader holds now.
    pub fn set_buffered(&self, bytes: u64) {
        self.buffered_bytes.store(bytes, Ordering::Relaxed);
        self.peak_buffered_bytes.fetch_max(bytes, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let elapsed = self.started.elapsed().as_secs_f64();
        let samples = self.samples.load(Ordering::Relaxed);
        StatsSnapshot {
            samples_yielded: samples,
            batches_yielded: self.batches.load(Ordering::Relaxed),
            samples_per_second: if elapsed > 0.0 { samples as f64 / elapsed } else { 0.0 },
            skipped: self.skipped.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            shards_opened: self.shards_opened.load(Ordering::Relaxed),
            shards_failed: self.shards_failed.load(Ordering::Relaxed),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            wait_seconds: self.wait_nanos.load(Ordering::Relaxed) as f64 * 1e-9,
            buffered_bytes: self.buffered_bytes.load(Ordering::Relaxed),
            peak_buffered_bytes: self.peak_buffered_bytes.load(Ordering::Relaxed),
        }
    }
}

/// A point-in-time copy of the counters, for logs and TensorBoard.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct StatsSnapshot {
    pub samples_yielded: u64,
    pub batches_yielded: u64,
    /// Samples yielded per second since the loader started.
    pub samples_per_second: f64,
    /// Samples skipped, by reason (`missing_caption`, `corrupt_image`, `panic`, ...).
    pub skipped: BTreeMap<String, u64>,
    pub shards_opened: u64,
    /// Shards that could not be opened or ended in a read error (truncated, failed `pipe:`).
    pub shards_failed: u64,
    /// Raw (compressed) bytes read from shards.
    pub bytes_read: u64,
    /// Seconds the trainer waited in `next_batch` for data.
    pub wait_seconds: f64,
    /// Encoded bytes in the shuffle buffer and read ahead (bounded by `data.shuffle_buffer_bytes`
    /// and `data.read_ahead_bytes` per reader, plus one sample each), now and at most so far.
    pub buffered_bytes: u64,
    pub peak_buffered_bytes: u64,
}

impl StatsSnapshot {
    pub fn skipped_total(&self) -> u64 {
        self.skipped.values().sum()
    }
}
