//! Where a rank's sample stream stands, as plain data: every batch carries one, the trainer
//! stores one per rank in each checkpoint (JSON), and a resume starts from them
//! ([`crate::resume`]): the same stream exactly, or the epoch's remainder re-split over another
//! number of ranks ([`crate::plan::Layout::elastic_share`]).
//!
//! A cursor records, at a batch boundary, what each reader thread has handed to the merge (the
//! unit it is in, anchored at the next sample's tar offset, and the units still to read), which
//! samples sit in the shuffle buffer (per shard, a bitmap of sample ordinals), the position of
//! the buffer's random stream and the epoch counters. Nothing in flight is lost: samples read
//! ahead but not yet merged are read again from the recorded offsets.

use serde::{Deserialize, Serialize};

/// What determines the sample stream; a resume refuses a change of any of these unless
/// `checkpoint.allow_data_change` is set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Fingerprint {
    /// The expanded shard list: `"{count} shards, fnv1a {hash:016x}"` over the URLs in order.
    pub shards: String,
    pub train_weights: Vec<f64>,
    pub readers: usize,
    pub shuffle_buffer: usize,
    pub shuffle_shards: bool,
    pub seed: u64,
    pub resampled: bool,
}

impl Fingerprint {
    /// The shard list's entry: its length and an FNV-1a hash of the URLs in order.
    pub fn of_shards<'a>(urls: impl IntoIterator<Item = &'a str>) -> String {
        let (mut n, mut h) = (0usize, 0xcbf2_9ce4_8422_2325u64);
        for url in urls {
            n += 1;
            for b in url.bytes().chain([0u8]) {
                h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
            }
        }
        format!("{n} shards, fnv1a {h:016x}")
    }

    /// Every key whose value differs from `now`, as `(config key, then, now)`, in config order.
    pub fn differences(&self, now: &Fingerprint) -> Vec<(&'static str, String, String)> {
        let mut out = Vec::new();
        let mut check = |key: &'static str, a: String, b: String| {
            if a != b {
                out.push((key, a, b));
            }
        };
        check("data.train", self.shards.clone(), now.shards.clone());
        check("data.train_weights", format!("{:?}", self.train_weights), format!("{:?}", now.train_weights));
        check("data.readers", self.readers.to_string(), now.readers.to_string());
        check("data.shuffle_buffer", self.shuffle_buffer.to_string(), now.shuffle_buffer.to_string());
        check("data.shuffle_shards", self.shuffle_shards.to_string(), now.shuffle_shards.to_string());
        check("seed", self.seed.to_string(), now.seed.to_string());
        check("data.resampled", self.resampled.to_string(), now.resampled.to_string());
        out
    }
}

/// Where a rank's sample stream stands right after a batch; part of the training state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamCursor {
    pub fingerprint: Fingerprint,
    pub rank: usize,
    pub world_size: usize,
    pub epoch: u64,
    /// Samples all ranks together have taken from `epoch` so far: batches × batch size × ranks,
    /// summed over every world size the epoch ran with.
    pub epoch_samples: u64,
    /// The stretch of the epoch this stream is in.
    pub segment: Segment,
    /// Batches this rank has handed out in the segment.
    pub batches_in_segment: u64,
    /// 0 while this rank reads its share of the epoch for the first time; `n` after `n`
    /// wrap-arounds (a rank with fewer samples than its batches need repeats, as OpenCLIP's
    /// `with_epoch` does).
    pub pass: u64,
    /// Shards this rank has read to their end in first passes so far (this epoch and earlier
    /// ones), and how many samples they held: the size estimate an elastic resume splits by.
    pub shards_done: u64,
    pub samples_done: u64,
    /// One per reader thread, in reader order.
    pub readers: Vec<ReaderCursor>,
    /// The samples in the shuffle buffer, by shard.
    pub buffer: Vec<PendingGroup>,
    /// Samples taken out of the shuffle buffer in this segment (the position of its random stream).
    pub picks: u64,
    /// The reader the merge takes the next sample from.
    pub next_reader: usize,
}

/// A stretch of an epoch read with one world size: the whole epoch, or what was left of it when
/// a checkpoint resumed on another number of ranks.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Segment {
    /// `epoch_samples` when the segment began (0 for a fresh epoch).
    pub start: u64,
    /// Batches every rank yields in the segment; `None` reads the rank's shards once (one rank,
    /// no `train_num_samples`).
    pub length: Option<u64>,
}

/// What one reader thread has handed to the merge.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ReaderCursor {
    /// The unit being read, anchored at its next sample; `None` between units.
    pub at: Option<Unit>,
    /// Units not started yet, in reading order.
    pub todo: Vec<Unit>,
    /// Resampled mode: how many shards this reader has drawn.
    pub draws: u64,
}

/// A run of samples of one shard that one reader reads in one go: the whole shard, or the part
/// from a recorded sample boundary on.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "UnitRepr", into = "UnitRepr")]
pub struct Unit {
    /// Index into the expanded shard list.
    pub shard: u32,
    /// Which reading of the shard this is: the pass (sequential) or the draw (resampled); the
    /// augmentation of its samples is keyed on it.
    pub draw: u64,
    /// A sample boundary to start at: the sample's ordinal in the shard (key groups counted from
    /// 0) and the tar offset of its first header.
    pub ordinal: u64,
    pub offset: u64,
    /// The first ordinal to use (`>= ordinal`); the samples before it are seeked over unread.
    pub begin: u64,
    /// Stop before this ordinal; `None` reads to the end of the shard.
    pub end: Option<u64>,
}

impl Unit {
    /// The whole shard `shard`, as reading `draw` of it.
    pub fn whole(shard: u32, draw: u64) -> Unit {
        Unit { shard, draw, ..Unit::default() }
    }
}

/// A whole first-pass shard is written as its bare index, so a fresh epoch's cursor stays small.
#[derive(Serialize, Deserialize)]
#[serde(untagged)]
enum UnitRepr {
    Whole(u32),
    Part {
        shard: u32,
        #[serde(default)]
        draw: u64,
        #[serde(default)]
        ordinal: u64,
        #[serde(default)]
        offset: u64,
        #[serde(default)]
        begin: u64,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        end: Option<u64>,
    },
}

impl From<UnitRepr> for Unit {
    fn from(r: UnitRepr) -> Unit {
        match r {
            UnitRepr::Whole(shard) => Unit::whole(shard, 0),
            UnitRepr::Part { shard, draw, ordinal, offset, begin, end } => {
                Unit { shard, draw, ordinal, offset, begin, end }
            }
        }
    }
}

impl From<Unit> for UnitRepr {
    fn from(u: Unit) -> UnitRepr {
        if u == Unit::whole(u.shard, 0) {
            UnitRepr::Whole(u.shard)
        } else {
            UnitRepr::Part {
                shard: u.shard,
                draw: u.draw,
                ordinal: u.ordinal,
                offset: u.offset,
                begin: u.begin,
                end: u.end,
            }
        }
    }
}

/// Samples of one shard (one reading of it) that were read but not yet emitted: on resume they
/// are read again, directly from `offset` on, and go back into the shuffle buffer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct PendingGroup {
    pub shard: u32,
    pub draw: u64,
    /// A sample boundary at or before the first pending sample (ordinal and tar offset).
    pub ordinal: u64,
    pub offset: u64,
    /// Which samples from `ordinal` on are pending: bit `i` is ordinal `ordinal + i`; hex digits,
    /// four bits each, lowest bits first.
    pub pending: String,
}

impl PendingGroup {
    /// The pending ordinals, ascending.
    pub fn ordinals(&self) -> Vec<u64> {
        decode_bits(&self.pending).into_iter().map(|i| self.ordinal + i).collect()
    }
}

/// Bitmap of `positions` (ascending or not) as hex digits, lowest bits first.
pub fn encode_bits(positions: impl IntoIterator<Item = u64>) -> String {
    let mut nibbles: Vec<u8> = Vec::new();
    for p in positions {
        let i = (p / 4) as usize;
        if nibbles.len() <= i {
            nibbles.resize(i + 1, 0);
        }
        nibbles[i] |= 1 << (p % 4);
    }
    nibbles.iter().map(|&n| char::from_digit(n as u32, 16).expect("nibble")).collect()
}

/// The positions set in a bitmap written by [`encode_bits`]; characters that are not hex digits
/// count as zero.
pub fn decode_bits(bits: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for (i, c) in bits.chars().enumerate() {
        let n = c.to_digit(16).unwrap_or(0);
        for b in 0..4 {
            if n & (1 << b) != 0 {
                out.push(i as u64 * 4 + b);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_round_trip_and_units_serialize_compactly() {
        let set = [0u64, 3, 4, 17, 18, 63];
        let hex = encode_bits(set);
        assert_eq!(hex, "9100600000000008");
        assert_eq!(decode_bits(&hex), set);
        assert_eq!(decode_bits(""), Vec::<u64>::new());

        let units =
            vec![Unit::whole(7, 0), Unit { shard: 2, draw: 1, ordinal: 5, offset: 5120, begin: 6, end: Some(9) }];
        let json = serde_json::to_string(&units).unwrap();
        assert_eq!(json, r#"[7,{"shard":2,"draw":1,"ordinal":5,"offset":5120,"begin":6,"end":9}]"#);
        assert_eq!(serde_json::from_str::<Vec<Unit>>(&json).unwrap(), units);
    }

    #[test]
    fn fingerprint_names_every_changed_key() {
        let a = Fingerprint {
            shards: Fingerprint::of_shards(["a.tar", "b.tar"]),
            readers: 2,
            seed: 1,
            ..Default::default()
        };
        assert_eq!(a.shards, Fingerprint { shards: Fingerprint::of_shards(["a.tar", "b.tar"]), ..a.clone() }.shards);
        let b = Fingerprint { shards: Fingerprint::of_shards(["a.tar", "c.tar"]), readers: 4, ..a.clone() };
        let keys: Vec<&str> = a.differences(&b).into_iter().map(|d| d.0).collect();
        assert_eq!(keys, ["data.train", "data.readers"]);
        // The URL boundary counts: ["ab", "c"] is not ["a", "bc"].
        assert_ne!(Fingerprint::of_shards(["ab", "c"]), Fingerprint::of_shards(["a", "bc"]));
        assert!(a.differences(&a).is_empty());
    }
}
