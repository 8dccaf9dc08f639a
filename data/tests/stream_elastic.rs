//! Elastic resume: a stream checkpointed on W ranks continues on W′ ≠ W. In sequential mode every
//! sample of the epoch is seen exactly once across the change (counted key by key), all ranks end
//! every epoch at the same batch, and a changed stream is refused naming its key unless allowed.
//! In resampled mode the epoch goes on with fresh draws, and every occurrence of a sample (any
//! rank, any draw, any pass) gets its own augmentation.

mod stream_support;

use std::collections::BTreeMap;
use std::sync::Arc;

use ferroclip_data::augment::ImageTransform;
use ferroclip_data::decode::DecodeError;
use ferroclip_data::rng::SampleRng;
use ferroclip_data::{Batch, DataConfig, DataError, Loader, Mode, ResumeFrom, StreamCursor};
use rand::RngCore;
use stream_support::*;

const BS: usize = 4;

fn loader(
    cfg: &DataConfig,
    pattern: &str,
    rank: usize,
    world: usize,
    resume: Option<ResumeFrom>,
) -> Result<Loader, DataError> {
    let mut o = opts(rank, world, BS, Mode::Train, Arc::new(FakeTransform::default()), None);
    o.resume = resume;
    Loader::new(cfg, pattern, o)
}

/// `batches` batches from each of `world` ranks (resuming from `resume`), and every rank's last cursor.
fn run_ranks(
    cfg: &DataConfig,
    pattern: &str,
    world: usize,
    batches: usize,
    resume: Option<ResumeFrom>,
) -> (Vec<Vec<Batch>>, Vec<StreamCursor>) {
    let mut out = Vec::new();
    for rank in 0..world {
        let mut l = loader(cfg, pattern, rank, world, resume.clone()).unwrap();
        out.push(take(&mut l, batches));
    }
    let cursors = out.iter().map(|b| b.last().unwrap().cursor.clone()).collect();
    (out, cursors)
}

fn full(cursors: Vec<StreamCursor>) -> ResumeFrom {
    ResumeFrom { cursors, allow_data_change: false }
}

/// How often each key of `epoch` occurs in these batches.
fn counts(batches: &[Vec<Batch>], epoch: u64, into: &mut BTreeMap<String, u32>) {
    for b in batches.iter().flatten().filter(|b| b.epoch == epoch) {
        for k in &b.keys {
            *into.entry(k.clone()).or_default() += 1;
        }
    }
}

#[test]
fn sequential_epochs_are_seen_exactly_once_across_a_change_of_world_size() {
    let dir = tempdir("elastic-seq");
    // 12 shards x 8 samples, one epoch = all 96.
    let pattern = dataset(&dir, 12, 8);
    let cfg = DataConfig { train_num_samples: 96, ..cfg() };
    // (W, batches per rank before the checkpoint, W′): the rest of the epoch divides into whole
    // batches on W′ ranks.
    for (world, cut, new_world) in [(2, 3, 1), (1, 6, 3), (2, 3, 3), (3, 4, 2), (2, 6, 4)] {
        let (before, cursors) = run_ranks(&cfg, &pattern, world, cut, None);
        assert!(
            cursors.iter().map(|c| c.shards_done).sum::<u64>() > 0,
            "no shard finished: the size estimate is a guess"
        );
        let taken = (world * cut * BS) as u64;
        assert!(cursors.iter().all(|c| c.epoch == 0 && c.epoch_samples == taken));
        let rest = (96 - taken as usize) / (BS * new_world);
        let (after, _) = run_ranks(&cfg, &pattern, new_world, rest + 1, Some(full(cursors)));
        let mut seen = BTreeMap::new();
        counts(&before, 0, &mut seen);
        counts(&after, 0, &mut seen);
        let want: BTreeMap<String, u32> =
            (0..12).flat_map(|s| (0..8).map(move |i| (format!("s{s}_{i:02}"), 1))).collect();
        assert_eq!(seen, want, "{world} -> {new_world} ranks after {cut} batches");
        // Every new rank ends the epoch at the same batch: `rest` batches of epoch 0, then epoch 1.
        for (rank, batches) in after.iter().enumerate() {
            let epochs: Vec<u64> = batches.iter().map(|b| b.epoch).collect();
            assert_eq!(epochs[..rest], vec![0; rest][..], "rank {rank} of {new_world}");
            assert_eq!(epochs[rest], 1, "rank {rank} of {new_world}");
        }
    }
}

#[test]
fn a_resumed_elastic_segment_resumes_exactly_and_its_next_epoch_splits_afresh() {
    let dir = tempdir("elastic-again");
    let pattern = dataset(&dir, 12, 8);
    let cfg = DataConfig { train_num_samples: 96, ..cfg() };
    let (_, cursors) = run_ranks(&cfg, &pattern, 2, 3, None);
    // 3 ranks: 6 batches each finish epoch 0; stop each after 2 and resume them again (same world).
    let (whole, _) = run_ranks(&cfg, &pattern, 3, 10, Some(full(cursors.clone())));
    let (first, mid) = run_ranks(&cfg, &pattern, 3, 2, Some(full(cursors)));
    let (second, _) = run_ranks(&cfg, &pattern, 3, 8, Some(full(mid)));
    for rank in 0..3 {
        let joined: Vec<Batch> = first[rank].iter().chain(&second[rank]).cloned().collect();
        assert_eq!(keys(&joined), keys(&whole[rank]), "rank {rank}");
        for (a, b) in joined.iter().zip(&whole[rank]) {
            assert_eq!(a.images, b.images, "rank {rank}: pixels differ after the second resume");
        }
    }
    // Epoch 1 on 3 ranks: 96 / 12 = 8 batches each, disjoint shards.
    let epoch1: Vec<Vec<Batch>> = whole.iter().map(|b| b.iter().filter(|b| b.epoch == 1).cloned().collect()).collect();
    let mut seen = BTreeMap::new();
    counts(&epoch1, 1, &mut seen);
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
}

#[test]
fn all_ranks_end_every_epoch_at_the_same_batch_with_unequal_shards() {
    let dir = tempdir("elastic-unequal");
    for (s, n) in [3, 9, 5, 12, 7, 2].into_iter().enumerate() {
        let samples: Vec<_> = (0..n).map(|i| good(&format!("s{s}_{i:02}"))).collect();
        std::fs::write(dir.join(format!("{s:03}.tar")), tar_of(&samples)).unwrap();
    }
    let pattern = format!("{}/{{000..005}}.tar", dir.display());
    // 38 samples, 2 ranks x 4: ceil(38 / 8) = 5 batches per rank per epoch, whatever each holds.
    let cfg = DataConfig { train_num_samples: 38, ..cfg() };
    let (batches, _) = run_ranks(&cfg, &pattern, 2, 16, None);
    let epochs = |rank: usize| batches[rank].iter().map(|b| b.epoch).collect::<Vec<_>>();
    let want: Vec<u64> = (0..16).map(|i| i / 5).collect();
    assert_eq!(epochs(0), want);
    assert_eq!(epochs(1), want);
    // The shard split really is unequal: some epoch gives one rank more samples than the other has.
    let sizes = |rank: usize, e: u64| {
        let mut keys: Vec<&String> = batches[rank].iter().filter(|b| b.epoch == e).flat_map(|b| &b.keys).collect();
        keys.sort();
        keys.dedup();
        keys.len()
    };
    assert!((0..3).any(|e| sizes(0, e) != sizes(1, e)), "the ranks' shares were equal: the test proves nothing");
}

#[test]
fn a_changed_stream_is_refused_naming_the_key_unless_allowed() {
    let dir = tempdir("elastic-fingerprint");
    let pattern = dataset(&dir, 6, 8);
    let cfg = DataConfig { train_num_samples: 48, ..cfg() };
    let (_, cursors) = run_ranks(&cfg, &pattern, 2, 3, None);
    assert!(cursors.iter().map(|c| c.shards_done).sum::<u64>() > 0, "no shard finished: the size estimate is a guess");
    let refused = |cfg: &DataConfig, pattern: &str, seed: u64| {
        let mut o = opts(0, 2, BS, Mode::Train, Arc::new(FakeTransform::default()), None);
        o.seed = seed;
        o.resume = Some(full(cursors.clone()));
        match Loader::new(cfg, pattern, o) {
            Err(DataError::DataChanged { key, .. }) => key,
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a changed stream was accepted"),
        }
    };
    assert_eq!(refused(&DataConfig { readers: 3, ..cfg.clone() }, &pattern, 17), "data.readers");
    assert_eq!(refused(&DataConfig { shuffle_buffer: 9, ..cfg.clone() }, &pattern, 17), "data.shuffle_buffer");
    assert_eq!(refused(&cfg, &pattern, 18), "seed");
    let fewer = format!("{}/{{000..004}}.tar", dir.display());
    assert_eq!(refused(&cfg, &fewer, 17), "data.train");
    let message = loader(&DataConfig { readers: 3, ..cfg.clone() }, &pattern, 0, 2, Some(full(cursors.clone())))
        .err()
        .unwrap()
        .to_string();
    assert!(message.contains("data.readers") && message.contains("checkpoint.allow_data_change"), "{message}");

    // Allowed: more readers per rank, and the epoch still sees each sample once.
    let allowed = ResumeFrom { cursors, allow_data_change: true };
    let more = DataConfig { readers: 3, ..cfg.clone() };
    let (after, _) = run_ranks(&more, &pattern, 2, 3, Some(allowed));
    let (before, _) = run_ranks(&cfg, &pattern, 2, 3, None);
    let mut seen = BTreeMap::new();
    counts(&before, 0, &mut seen);
    counts(&after, 0, &mut seen);
    assert_eq!(seen.len(), 48);
    assert!(seen.values().all(|&n| n == 1), "{seen:?}");
}

#[test]
fn resampled_streams_continue_the_epoch_on_another_world_size() {
    let dir = tempdir("elastic-resampled");
    let pattern = dataset(&dir, 4, 6);
    // 48 per epoch: 6 batches per rank on 2 ranks; after 2 batches each (16 samples), 32 are
    // left: ceil(32 / 12) = 3 batches per rank on 3 ranks.
    let cfg = DataConfig { resampled: true, train_num_samples: 48, ..cfg() };
    let (_, cursors) = run_ranks(&cfg, &pattern, 2, 2, None);
    let (after, next) = run_ranks(&cfg, &pattern, 3, 5, Some(full(cursors)));
    for batches in &after {
        assert_eq!(batches.iter().map(|b| b.epoch).collect::<Vec<_>>(), [0, 0, 0, 1, 1]);
    }
    assert_ne!(keys(&after[0]), keys(&after[1]), "the new ranks draw the same stream");
    // Once on 3 ranks, it resumes exactly again.
    let (first, mid) = run_ranks(&cfg, &pattern, 3, 1, Some(full(next.clone())));
    let (second, _) = run_ranks(&cfg, &pattern, 3, 2, Some(full(mid)));
    let (whole, _) = run_ranks(&cfg, &pattern, 3, 3, Some(full(next)));
    for rank in 0..3 {
        let joined: Vec<Batch> = first[rank].iter().chain(&second[rank]).cloned().collect();
        assert_eq!(keys(&joined), keys(&whole[rank]));
    }
}

/// Writes the whole 64-bit first draw of the sample's random stream into the pixels (16 bits per
/// value): two outputs are equal only if their augmentation streams are.
struct DrawTransform;

impl ImageTransform for DrawTransform {
    fn output_size(&self) -> usize {
        SIZE
    }
    fn apply(
        &self,
        _: &[u8],
        _: &str,
        rng: &mut SampleRng,
        out: &mut [u8],
    ) -> Result<Option<ferroclip_data::EraseBox>, DecodeError> {
        let d = rng.next_u64();
        for (i, o) in out.iter_mut().enumerate() {
            *o = (d >> (8 * (i % 8))) as u8;
        }
        Ok(None)
    }
}

/// Every image of each key, over all batches.
fn images_by_key(batches: &[Batch]) -> BTreeMap<String, Vec<Vec<u8>>> {
    let mut by_key: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
    for b in batches {
        let px = 3 * b.image_size * b.image_size;
        for (k, img) in b.keys.iter().zip(b.images().chunks(px)) {
            by_key.entry(k.clone()).or_default().push(img.to_vec());
        }
    }
    by_key
}

#[test]
fn every_occurrence_of_a_sample_gets_its_own_augmentation() {
    let dir = tempdir("elastic-draws");
    let pattern = dataset(&dir, 2, 3);
    // Resampled: 6 samples drawn over and over by 2 ranks x 2 readers, within and across epochs;
    // sequential with an epoch longer than the data: passes 0, 1, 2, … of the same shards.
    for cfg in
        [DataConfig { resampled: true, train_num_samples: 40, ..cfg() }, DataConfig { train_num_samples: 40, ..cfg() }]
    {
        let mut all = Vec::new();
        for rank in 0..2 {
            let mut o = opts(rank, 2, BS, Mode::Train, Arc::new(FakeTransform::default()), None);
            o.transform = Arc::new(DrawTransform);
            let mut l = Loader::new(&cfg, &pattern, o).unwrap();
            all.extend(take(&mut l, 15));
        }
        let by_key = images_by_key(&all);
        assert_eq!(by_key.len(), 6);
        for (key, images) in &by_key {
            assert!(images.len() >= 5, "{key} occurs only {} times", images.len());
            let mut distinct = images.clone();
            distinct.sort_by(|a, b| a.partial_cmp(b).unwrap());
            distinct.dedup();
            assert_eq!(
                distinct.len(),
                images.len(),
                "resampled={}: {key} got the same augmentation twice",
                cfg.resampled
            );
        }
    }
}
