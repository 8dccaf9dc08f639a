//! The split plan: which shards each reader thread of each rank reads, epoch by epoch, and on an
//! elastic resume how the rest of an epoch is re-split over a new number of ranks.
//!
//! Pure functions of their arguments (no I/O, no threads, no clock), so that every rank computes
//! the same split on its own. They follow OpenCLIP's `get_wds_dataset`
//! (`open_clip_train/data.py`): a seeded shard shuffle per epoch (`detshuffle2`) that is the same
//! on every rank, `split_by_node` (rank `r` takes shards `r, r + W, …`), `split_by_worker` (its
//! readers deal those out in turn), and `with_epoch`: with `train_num_samples` every rank yields
//! `ceil(train_num_samples / (batch_size × W))` batches per epoch, so all ranks end an epoch at
//! the same step; a rank whose shards run short reads them again ("pass" 1, 2, …), one with
//! more leaves the rest unread.
//!
//! Elastic resume follows MosaicML Streaming's elastic deterministic resumption: what the epoch
//! has not yet delivered (the samples in every old rank's shuffle buffer, the unread rest of
//! every shard in flight, the shards not started) is laid out in one deterministic order and cut
//! into `W′` contiguous stretches of equal size, splitting a shard between two ranks at a sample
//! ordinal where needed. Streaming knows every shard's sample count from its index; tar shards
//! have none, so an unread shard counts as the mean size of the shards read to the end so far
//! (this epoch and earlier ones; early in the first epoch, the furthest ordinal seen). When that
//! estimate is exact (equal shards, the usual img2dataset layout) and the rest of the epoch
//! divides into whole batches, every sample of the epoch is seen exactly once across the change.

use rand::seq::SliceRandom;

use crate::cursor::{encode_bits, Fingerprint, PendingGroup, ReaderCursor, Segment, StreamCursor, Unit};
use crate::rng::SampleRng;

/// Who this loader is and what it reads: everything the plan depends on.
#[derive(Debug, Clone, PartialEq)]
pub struct Layout {
    /// Number of shards in the expanded pattern.
    pub shards: usize,
    pub rank: usize,
    pub world_size: usize,
    pub readers: usize,
    pub batch_size: usize,
    pub seed: u64,
    pub shuffle_shards: bool,
    pub resampled: bool,
    /// Samples per epoch across all ranks; 0 reads the rank's shards once per epoch.
    pub train_num_samples: u64,
    pub fingerprint: Fingerprint,
}

impl Layout {
    /// Samples all ranks take per batch.
    pub fn global_batch(&self) -> u64 {
        (self.batch_size * self.world_size) as u64
    }

    /// Batches each rank yields in a segment starting `start` samples into the epoch (OpenCLIP's
    /// `with_epoch`, rounded up); `None` when the epoch is one pass over the rank's shards.
    pub fn segment_length(&self, start: u64) -> Option<u64> {
        (self.train_num_samples > 0).then(|| self.train_num_samples.saturating_sub(start).div_ceil(self.global_batch()))
    }

    /// The shard order of `epoch`: a seeded shuffle, the same on every rank, or file order.
    pub fn shard_order(&self, epoch: u64) -> Vec<u32> {
        let mut order: Vec<u32> = (0..self.shards as u32).collect();
        if self.shuffle_shards {
            order.shuffle(&mut SampleRng::for_sample(self.seed, epoch, "shard-order"));
        }
        order
    }

    /// The readers of a pass over this rank's share of `epoch`: shards `rank, rank + W, …` of the
    /// epoch's order, dealt to the readers in turn, each unit marked as reading `pass`. Resampled
    /// readers have no list: they draw.
    pub fn pass_readers(&self, epoch: u64, pass: u64) -> Vec<ReaderCursor> {
        let mut readers = vec![ReaderCursor::default(); self.readers];
        if self.resampled {
            return readers;
        }
        let mine = self.shard_order(epoch).into_iter().skip(self.rank).step_by(self.world_size);
        for (i, shard) in mine.enumerate() {
            readers[i % self.readers].todo.push(Unit::whole(shard, pass));
        }
        readers
    }

    /// The cursor of a fresh epoch, before its first batch.
    pub fn epoch_start(&self, epoch: u64) -> StreamCursor {
        self.segment_cursor(epoch, 0, self.pass_readers(epoch, 0), Vec::new())
    }

    /// The cursor that starts a segment of `epoch` at `start` samples, with these readers and
    /// samples to put back into the shuffle buffer.
    pub fn segment_cursor(
        &self,
        epoch: u64,
        start: u64,
        readers: Vec<ReaderCursor>,
        buffer: Vec<PendingGroup>,
    ) -> StreamCursor {
        StreamCursor {
            fingerprint: self.fingerprint.clone(),
            rank: self.rank,
            world_size: self.world_size,
            epoch,
            epoch_samples: start,
            segment: Segment { start, length: self.segment_length(start) },
            readers,
            buffer,
            ..StreamCursor::default()
        }
    }

    /// This rank's share of what the epoch of `old` (the cursors of every rank of the run that
    /// wrote the checkpoint, in rank order) has not delivered yet; see the module docs.
    pub fn elastic_share(&self, old: &[StreamCursor]) -> (Vec<ReaderCursor>, Vec<PendingGroup>) {
        let pieces = remaining_pieces(old);
        let total: u64 = pieces.iter().map(Piece::size).sum();
        let world = self.world_size as u64;
        // Rank r gets the samples at positions [bound(r), bound(r + 1)).
        let bound = |r: u64| ((total as u128 * r as u128) / world as u128) as u64;
        let (lo, hi) = (bound(self.rank as u64), bound(self.rank as u64 + 1));
        let last_rank = self.rank + 1 == self.world_size;
        let mut readers = vec![ReaderCursor::default(); self.readers];
        let mut buffer = Vec::new();
        let (mut pos, mut dealt) = (0u64, 0usize);
        for piece in pieces {
            let size = piece.size();
            let (a, b) = (pos.max(lo), (pos + size).min(hi));
            // A piece estimated empty belongs to the rank at its position (the last one at the end).
            let empty_here = size == 0 && ((lo..hi).contains(&pos) || (last_rank && pos >= hi));
            if a < b || empty_here {
                match piece {
                    Piece::Pending { group, ordinals } => {
                        let part = &ordinals[(a - pos) as usize..(b - pos) as usize];
                        let bits = encode_bits(part.iter().map(|o| o - group.ordinal));
                        buffer.push(PendingGroup { pending: bits, ..group });
                    }
                    Piece::Range { unit, .. } => {
                        let reads_to_end = b == pos + size && unit.end.is_none();
                        let part = Unit {
                            begin: unit.begin + (a - pos),
                            end: if reads_to_end { None } else { Some(unit.begin + (b - pos)) },
                            ..unit
                        };
                        readers[dealt % self.readers].todo.push(part);
                        dealt += 1;
                    }
                }
            }
            pos += size;
        }
        (readers, buffer)
    }
}

/// Part of what an epoch still has to deliver.
enum Piece {
    /// Buffered samples: exactly these ordinals.
    Pending { group: PendingGroup, ordinals: Vec<u64> },
    /// A shard, or its unread rest, from `unit.begin` on; `size` is exact with an `end`, else
    /// estimated.
    Range { unit: Unit, size: u64 },
}

impl Piece {
    fn size(&self) -> u64 {
        match self {
            Piece::Pending { ordinals, .. } => ordinals.len() as u64,
            Piece::Range { size, .. } => *size,
        }
    }
}

/// The rest of the epoch of `old`, in a fixed order: every rank's buffered samples, then every
/// reader's unit in flight and the units it has not started, rank by rank. Only first-pass
/// units count: a rank already re-reading its shards (pass ≥ 1) has delivered its share.
fn remaining_pieces(old: &[StreamCursor]) -> Vec<Piece> {
    let (shards, samples) = old.iter().fold((0u64, 0u64), |(n, s), c| (n + c.shards_done, s + c.samples_done));
    let first_pass = |u: &&Unit| u.draw == 0;
    let mean = if shards > 0 {
        (samples as f64 / shards as f64).round() as u64
    } else {
        // Nothing read to the end yet: the furthest ordinal seen is the best lower bound.
        let frontier = old.iter().flat_map(|c| &c.readers).flat_map(|r| r.at.iter()).map(|u| u.begin);
        let buffered = old.iter().flat_map(|c| &c.buffer).flat_map(|g| g.ordinals().last().map(|o| o + 1));
        frontier.chain(buffered).max().unwrap_or(1).max(1)
    };
    let mut pieces = Vec::new();
    for group in old.iter().flat_map(|c| &c.buffer).filter(|g| g.draw == 0) {
        let ordinals = group.ordinals();
        if !ordinals.is_empty() {
            pieces.push(Piece::Pending { group: PendingGroup { pending: String::new(), ..group.clone() }, ordinals });
        }
    }
    for reader in old.iter().flat_map(|c| &c.readers) {
        for unit in reader.at.iter().chain(&reader.todo).filter(first_pass) {
            let size = match unit.end {
                Some(end) => end.saturating_sub(unit.begin),
                None => mean.saturating_sub(unit.begin),
            };
            pieces.push(Piece::Range { unit: unit.clone(), size });
        }
    }
    pieces
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(rank: usize, world_size: usize, readers: usize) -> Layout {
        Layout {
            shards: 10,
            rank,
            world_size,
            readers,
            batch_size: 4,
            seed: 5,
            shuffle_shards: true,
            resampled: false,
            train_num_samples: 100,
            fingerprint: Fingerprint::default(),
        }
    }

    fn shards_of(readers: &[ReaderCursor]) -> Vec<u32> {
        readers.iter().flat_map(|r| r.todo.iter().map(|u| u.shard)).collect()
    }

    #[test]
    fn an_epoch_splits_every_shard_to_exactly_one_rank_and_reader() {
        let mut all: Vec<u32> = (0..3).flat_map(|r| shards_of(&layout(r, 3, 2).pass_readers(4, 0))).collect();
        all.sort();
        assert_eq!(all, (0..10).collect::<Vec<_>>());
        // Rank 1 of 3 takes the epoch order's positions 1, 4, 7, dealt to readers 0, 1, 0.
        let order = layout(1, 3, 2).shard_order(4);
        let r = layout(1, 3, 2).pass_readers(4, 2);
        assert_eq!(r[0].todo, [Unit::whole(order[1], 2), Unit::whole(order[7], 2)]);
        assert_eq!(r[1].todo, [Unit::whole(order[4], 2)]);
        assert_ne!(layout(0, 1, 1).shard_order(4), layout(0, 1, 1).shard_order(5), "the order changes per epoch");
        let unshuffled = Layout { shuffle_shards: false, ..layout(0, 1, 1) };
        assert_eq!(unshuffled.shard_order(9), (0..10).collect::<Vec<_>>());
    }

    #[test]
    fn segments_have_openclip_with_epoch_lengths() {
        // ceil(100 / (4 x 3)) = 9 batches per rank; after 24 samples ceil(76 / 12) = 7.
        assert_eq!(layout(0, 3, 1).segment_length(0), Some(9));
        assert_eq!(layout(0, 3, 1).segment_length(24), Some(7));
        assert_eq!(layout(0, 3, 1).segment_length(200), Some(0));
        assert_eq!(Layout { train_num_samples: 0, ..layout(0, 1, 1) }.segment_length(0), None);
    }

    /// Cursors of a 2-rank run part-way through epoch 0 of 10 shards of 10 samples.
    fn old_cursors() -> Vec<StreamCursor> {
        let unit = |shard, ordinal| Unit { shard, ordinal, offset: 1024 * ordinal, begin: ordinal, ..Unit::default() };
        let c0 = StreamCursor {
            rank: 0,
            world_size: 2,
            shards_done: 2,
            samples_done: 20,
            readers: vec![ReaderCursor { at: Some(unit(4, 6)), todo: vec![Unit::whole(8, 0)], draws: 0 }],
            // Shard 4: ordinals 2 and 5 still buffered; shard 0 (done): ordinal 9.
            buffer: vec![
                PendingGroup { shard: 4, ordinal: 2, offset: 2048, pending: encode_bits([0, 3]), draw: 0 },
                PendingGroup { shard: 0, ordinal: 9, offset: 9216, pending: encode_bits([0]), draw: 0 },
            ],
            ..StreamCursor::default()
        };
        let c1 = StreamCursor {
            rank: 1,
            world_size: 2,
            readers: vec![ReaderCursor {
                at: Some(unit(5, 3)),
                todo: vec![Unit::whole(9, 0), Unit::whole(1, 1)],
                draws: 0,
            }],
            ..StreamCursor::default()
        };
        vec![c0, c1]
    }

    /// Every (shard, ordinal) a share covers, with the mean size 10 for open-ended units.
    fn samples_of(readers: &[ReaderCursor], buffer: &[PendingGroup]) -> Vec<(u32, u64)> {
        let mut out: Vec<(u32, u64)> =
            buffer.iter().flat_map(|g| g.ordinals().into_iter().map(move |o| (g.shard, o))).collect();
        for u in readers.iter().flat_map(|r| &r.todo) {
            out.extend((u.begin..u.end.unwrap_or(10)).map(|o| (u.shard, o)));
        }
        out
    }

    #[test]
    fn elastic_share_covers_the_rest_of_the_epoch_once_in_equal_parts() {
        let old = old_cursors();
        // Left: 3 buffered + shard 4 from 6 (4) + shard 8 (10) + shard 5 from 3 (7) + shard 9 (10);
        // shard 1 is a second pass (filler) and does not count.
        let mut want: Vec<(u32, u64)> = vec![(4, 2), (4, 5), (0, 9)];
        want.extend(
            (6..10)
                .map(|o| (4, o))
                .chain((0..10).map(|o| (8, o)))
                .chain((3..10).map(|o| (5, o)))
                .chain((0..10).map(|o| (9, o))),
        );
        want.sort();
        for world in [1, 2, 3, 5] {
            let mut all = Vec::new();
            for rank in 0..world {
                let (readers, buffer) = layout(rank, world, 2).elastic_share(&old);
                let mine = samples_of(&readers, &buffer);
                // 34 samples: parts of floor or ceil of 34 / world.
                assert!(
                    mine.len() as u64 >= 34 / world as u64 && mine.len() as u64 <= 34u64.div_ceil(world as u64),
                    "{world}: {mine:?}"
                );
                all.extend(mine);
            }
            all.sort();
            assert_eq!(all, want, "world {world}");
        }
        // A split shard: the first part stops at an ordinal, the last reads to the end; both keep
        // the recorded anchor, so the second seeks from there instead of reading from 0.
        let (r0, _) = layout(0, 3, 1).elastic_share(&old);
        let (r1, _) = layout(1, 3, 1).elastic_share(&old);
        let last0 = r0[0].todo.last().unwrap();
        let first1 = &r1[0].todo[0];
        assert_eq!((last0.shard, first1.shard), (8, 8));
        assert_eq!((last0.end, first1.begin, first1.end), (Some(4), 4, None));
        // Recorded offsets survive the split.
        let tail = r0[0].todo.iter().find(|u| u.shard == 4).unwrap();
        assert_eq!((tail.ordinal, tail.offset, tail.begin), (6, 6144, 6));
    }

    #[test]
    fn without_a_finished_shard_the_frontier_estimates_the_size() {
        let mut old = old_cursors();
        for c in &mut old {
            c.shards_done = 0;
            c.samples_done = 0;
        }
        // Furthest ordinal seen: 9 (buffered, of shard 0), so an unread shard counts 10 samples;
        // over 2 ranks the split lands after 3 + 4 + 10 = 17 samples, at ordinal 0 of shard 5.
        let (r1, _) = layout(1, 2, 1).elastic_share(&old);
        assert_eq!(r1[0].todo[0], Unit { shard: 5, ordinal: 3, offset: 3072, begin: 3, ..Unit::default() });
        let (readers, buffer) = layout(0, 1, 1).elastic_share(&old);
        let sizes: Vec<(u32, Option<u64>)> = readers[0].todo.iter().map(|u| (u.shard, u.end)).collect();
        assert_eq!(sizes, [(4, None), (8, None), (5, None), (9, None)]);
        assert_eq!(buffer.iter().map(|g| g.ordinals().len()).sum::<usize>(), 3);
    }
}
