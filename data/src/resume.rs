//! Picking a stream up from a checkpoint's cursors (one per rank of the run that wrote it).
//!
//! - Same world size, same [`Fingerprint`]: this rank continues exactly where it stood, with the
//!   same shuffle buffer and readers, so the stream goes on as if never interrupted.
//! - Another world size (or a data change the user accepted): sequential mode re-splits what the
//!   epoch has not delivered over the new ranks ([`Layout::elastic_share`]); resampled mode starts
//!   fresh draws keyed on (seed, epoch, resume position, rank). Either way the epoch keeps its
//!   count of samples taken, so it ends where it would have.
//! - A changed fingerprint without `checkpoint.allow_data_change` is an error naming the key.

use crate::cursor::{Fingerprint, StreamCursor};
use crate::error::DataError;
use crate::plan::Layout;

/// The data cursors a run resumes from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ResumeFrom {
    /// Every rank's cursor in rank order, as the checkpoint stores them; or only this rank's own
    /// (which allows an exact resume only).
    pub cursors: Vec<StreamCursor>,
    /// Accept a stream whose fingerprint changed (`checkpoint.allow_data_change`).
    pub allow_data_change: bool,
}

impl ResumeFrom {
    /// Resume exactly after the batch that carried `cursor`.
    pub fn own(cursor: StreamCursor) -> Self {
        ResumeFrom { cursors: vec![cursor], allow_data_change: false }
    }
}

/// How a resume starts; [`start_cursor`] returns it with a line for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeKind {
    Exact,
    Elastic,
    FreshDraws,
    NextEpoch,
}

fn bad(msg: String) -> DataError {
    DataError::BadCursor(msg)
}

/// The cursor this rank starts from, how, and a sentence saying so.
pub fn start_cursor(layout: &Layout, from: &ResumeFrom) -> Result<(StreamCursor, ResumeKind, String), DataError> {
    let cursors = &from.cursors;
    let first = cursors.first().ok_or_else(|| bad("there are none".into()))?;
    // One cursor of a multi-rank stream: a rank resuming from its own position only.
    let own_only = cursors.len() == 1 && first.world_size > 1;
    if own_only && (first.rank, first.world_size) != (layout.rank, layout.world_size) {
        return Err(bad(format!(
            "only the cursor of rank {} of {} was given, to resume rank {} of {}",
            first.rank, first.world_size, layout.rank, layout.world_size
        )));
    }
    if !own_only {
        for (i, c) in cursors.iter().enumerate() {
            if c.rank != i || c.world_size != cursors.len() {
                return Err(bad(format!(
                    "entry {i} is rank {} of {}, expected rank {i} of {}",
                    c.rank,
                    c.world_size,
                    cursors.len()
                )));
            }
            if (c.epoch, c.epoch_samples) != (first.epoch, first.epoch_samples) {
                return Err(bad(format!(
                    "rank {i} stood at epoch {} after {} samples, rank 0 at epoch {} after {}",
                    c.epoch, c.epoch_samples, first.epoch, first.epoch_samples
                )));
            }
        }
    }
    if first.fingerprint == Fingerprint::default() && !from.allow_data_change {
        return Err(bad(
            "they carry no fingerprint (written before cursors had one); set checkpoint.allow_data_change = true \
             to resume the model and optimizer and start the next epoch"
                .into(),
        ));
    }
    let changes = first.fingerprint.differences(&layout.fingerprint);
    if let Some((key, was, now)) = changes.first().filter(|_| !from.allow_data_change) {
        return Err(DataError::DataChanged { key: key.to_string(), was: was.clone(), now: now.clone() });
    }
    let changed: Vec<&str> = changes.iter().map(|c| c.0).collect();
    let (epoch, taken) = (first.epoch, first.epoch_samples);
    if changes.is_empty() && first.world_size == layout.world_size {
        let own = if own_only { first } else { &cursors[layout.rank] };
        let mut c = own.clone();
        // `train_num_samples` or `batch_size` may have changed: the epoch still ends after the
        // samples it has left.
        c.segment.length = layout.segment_length(c.epoch_samples).map(|rest| c.batches_in_segment + rest);
        return Ok((
            c,
            ResumeKind::Exact,
            format!("resuming the data stream exactly (epoch {epoch}, {taken} samples in)"),
        ));
    }
    if own_only {
        return Err(bad(format!(
            "rank {}'s own cursor alone cannot resume a changed stream; every rank's cursor is needed",
            layout.rank
        )));
    }
    let why = if changed.is_empty() {
        format!("written by {} ranks, resumed on {}", cursors.len(), layout.world_size)
    } else {
        format!("changed {} (allowed by checkpoint.allow_data_change)", changed.join(", "))
    };
    if layout.resampled {
        let c = layout.segment_cursor(epoch, taken, layout.pass_readers(epoch, 0), Vec::new());
        let line = format!("data stream {why}: epoch {epoch} goes on after {taken} samples with fresh draws per rank");
        return Ok((c, ResumeKind::FreshDraws, line));
    }
    if first.fingerprint.resampled || changed.contains(&"data.train") {
        let line = format!("data stream {why}: the checkpoint's position does not apply; starting epoch {}", epoch + 1);
        return Ok((layout.epoch_start(epoch + 1), ResumeKind::NextEpoch, line));
    }
    let (readers, buffer) = layout.elastic_share(cursors);
    let mut c = layout.segment_cursor(epoch, taken, readers, buffer);
    c.shards_done = cursors.iter().map(|c| c.shards_done).sum();
    c.samples_done = cursors.iter().map(|c| c.samples_done).sum();
    let line = format!(
        "data stream {why}: the rest of epoch {epoch} (after {taken} samples) is re-split over {} ranks",
        layout.world_size
    );
    Ok((c, ResumeKind::Elastic, line))
}

/// The fingerprint of what a loader reads.
pub(crate) fn fingerprint(
    urls: &[String],
    cfg: &crate::config::DataConfig,
    seed: u64,
    train_weights: &[f64],
) -> Fingerprint {
    Fingerprint {
        shards: Fingerprint::of_shards(urls.iter().map(String::as_str)),
        train_weights: train_weights.to_vec(),
        readers: cfg.readers,
        shuffle_buffer: cfg.shuffle_buffer,
        shuffle_shards: cfg.shuffle_shards,
        seed,
        resampled: cfg.resampled,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(rank: usize, world_size: usize, train_num_samples: u64) -> Layout {
        Layout {
            shards: 4,
            rank,
            world_size,
            readers: 1,
            batch_size: 4,
            seed: 0,
            shuffle_shards: true,
            resampled: false,
            train_num_samples,
            fingerprint: Fingerprint {
                shards: Fingerprint::of_shards(["a", "b", "c", "d"]),
                readers: 1,
                ..Fingerprint::default()
            },
        }
    }

    fn cursor(rank: usize, world_size: usize, epoch_samples: u64) -> StreamCursor {
        StreamCursor {
            fingerprint: layout(0, 1, 0).fingerprint,
            rank,
            world_size,
            epoch_samples,
            ..StreamCursor::default()
        }
    }

    #[test]
    fn same_world_resumes_exactly_and_the_epoch_keeps_its_sample_count() {
        let own = StreamCursor { batches_in_segment: 3, ..cursor(1, 2, 24) };
        let from = ResumeFrom {
            cursors: vec![StreamCursor { batches_in_segment: 3, ..cursor(0, 2, 24) }, own.clone()],
            ..Default::default()
        };
        let (c, kind, _) = start_cursor(&layout(1, 2, 100), &from).unwrap();
        assert_eq!(kind, ResumeKind::Exact);
        assert_eq!(c.readers, own.readers);
        // 76 samples left at 8 per batch: 10 more batches after the 3 done.
        assert_eq!(c.segment.length, Some(13));
        // A smaller train_num_samples (48) leaves 24: 3 more.
        assert_eq!(start_cursor(&layout(1, 2, 48), &from).unwrap().0.segment.length, Some(6));
        assert_eq!(start_cursor(&layout(1, 2, 48), &ResumeFrom::own(own)).unwrap().1, ResumeKind::Exact);
    }

    #[test]
    fn inconsistent_or_unmarked_cursors_are_refused_with_the_reason() {
        let err = |l: &Layout, cursors: Vec<StreamCursor>| {
            start_cursor(l, &ResumeFrom { cursors, ..Default::default() }).unwrap_err().to_string()
        };
        let e = err(&layout(0, 2, 48), vec![cursor(0, 2, 16), cursor(1, 2, 24)]);
        assert!(e.contains("rank 1 stood at epoch 0 after 24 samples"), "{e}");
        let e = err(&layout(0, 2, 48), vec![cursor(1, 2, 16), cursor(0, 2, 16)]);
        assert!(e.contains("entry 0 is rank 1 of 2"), "{e}");
        let e = err(&layout(0, 3, 48), vec![cursor(1, 2, 16)]);
        assert!(e.contains("only the cursor of rank 1 of 2 was given, to resume rank 0 of 3"), "{e}");
        // A rank's own cursor can continue its stream, but not re-split a changed one.
        let mut more_readers = layout(1, 2, 48);
        more_readers.fingerprint.readers = 2;
        let own = ResumeFrom { cursors: vec![cursor(1, 2, 16)], allow_data_change: true };
        let e = start_cursor(&more_readers, &own).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("own cursor alone"), "{e}");
        let unmarked = StreamCursor { rank: 0, world_size: 1, ..StreamCursor::default() };
        let e = err(&layout(0, 1, 48), vec![unmarked.clone()]);
        assert!(e.contains("no fingerprint") && e.contains("allow_data_change"), "{e}");
        let allowed = ResumeFrom { cursors: vec![unmarked], allow_data_change: true };
        let (c, kind, _) = start_cursor(&layout(0, 1, 48), &allowed).unwrap();
        assert_eq!((kind, c.epoch, c.epoch_samples), (ResumeKind::NextEpoch, 1, 0));
    }
}
