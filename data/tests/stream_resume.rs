//! Exact resume: an interrupted-and-resumed stream yields exactly what the uninterrupted one
//! would have (same keys, order, epochs and pixels), for sequential and resampled modes and
//! two ranks, and never transforms the samples it skips over.

mod stream_support;

use std::sync::atomic::Ordering::SeqCst;
use std::sync::atomic::{AtomicBool, AtomicUsize};
use std::sync::Arc;

use ferroclip_data::rng::SampleRng;
use ferroclip_data::{Batch, DataConfig, Loader, Mode};
use rand::RngCore;
use stream_support::*;

/// Uninterrupted `total` batches vs. `cut` batches + a loader resumed from the cut's cursor.
fn check_resume(cfg: &DataConfig, pattern: &str, rank: usize, world: usize, total: usize, cut: usize) {
    let bs = 4;
    let mut full =
        Loader::new(cfg, pattern, opts(rank, world, bs, Mode::Train, Arc::new(FakeTransform::default()), None))
            .unwrap();
    let reference = take(&mut full, total);
    drop(full);

    let mut first =
        Loader::new(cfg, pattern, opts(rank, world, bs, Mode::Train, Arc::new(FakeTransform::default()), None))
            .unwrap();
    let mut got = take(&mut first, cut);
    drop(first);
    // The cursor goes through serde, as it does through a checkpoint.
    let json = serde_json::to_string(&got.last().unwrap().cursor).unwrap();
    let cursor = serde_json::from_str(&json).unwrap();
    let mut resumed =
        Loader::new(cfg, pattern, opts(rank, world, bs, Mode::Train, Arc::new(FakeTransform::default()), Some(cursor)))
            .unwrap();
    got.extend(take(&mut resumed, total - cut));

    assert_eq!(keys(&got), keys(&reference), "rank {rank}/{world}, cut after batch {cut}");
    for (a, b) in got.iter().zip(&reference) {
        assert_eq!(a.images, b.images, "pixels (per-sample rng) differ after resume");
        assert_eq!(a.tokens, b.tokens);
        assert_eq!(a.cursor, b.cursor);
    }
}

/// 6 shards x 7 samples, one corrupt image in shard 2 so candidates and yielded samples differ.
fn data(name: &str) -> String {
    let dir = tempdir(name);
    let pattern = dataset(&dir, 6, 7);
    let mut samples: Vec<_> = (0..7).map(|i| good(&format!("s2_{i:02}"))).collect();
    samples[3][0].1 = b"IMG CORRUPT".to_vec();
    std::fs::write(dir.join("002.tar"), tar_of(&samples)).unwrap();
    pattern
}

#[test]
fn sequential_resume_is_exact_for_two_ranks_mid_shard_and_across_epochs() {
    let pattern = data("resume-seq");
    // Each rank: 3 shards, 21 (or 20) usable samples per epoch; 40 / (4 x 2) -> 5 batches of 4.
    let cfg = DataConfig { train_num_samples: 40, ..cfg() };
    for rank in 0..2 {
        for cut in [1, 2, 5, 6, 9] {
            check_resume(&cfg, &pattern, rank, 2, 14, cut);
        }
    }
    // Ranks read disjoint shards within an epoch, and shard order changes between epochs.
    let epoch_keys = |rank| {
        let mut l =
            Loader::new(&cfg, &pattern, opts(rank, 2, 4, Mode::Train, Arc::new(FakeTransform::default()), None))
                .unwrap();
        keys(&take(&mut l, 10))
    };
    let (k0, k1) = (epoch_keys(0), epoch_keys(1));
    let shards_of = |ks: &[(u64, String)], e: u64| {
        let mut s: Vec<String> = ks.iter().filter(|(ep, _)| *ep == e).map(|(_, k)| k[..2].to_string()).collect();
        s.sort();
        s.dedup();
        s
    };
    for e in 0..2 {
        let (a, b) = (shards_of(&k0, e), shards_of(&k1, e));
        assert!(a.iter().all(|s| !b.contains(s)), "epoch {e}: ranks share shards {a:?} {b:?}");
        assert_eq!(a.len() + b.len(), 6, "epoch {e}: {a:?} {b:?}");
    }
    assert_ne!(k0[..20].iter().map(|k| &k.1).collect::<Vec<_>>(), k0[20..40].iter().map(|k| &k.1).collect::<Vec<_>>());
}

#[test]
fn sequential_resume_with_train_num_samples_bounding_the_epoch() {
    let pattern = data("resume-tns");
    // 24 samples / (4 x 2 ranks) = 3 batches per rank per epoch.
    let cfg = DataConfig { train_num_samples: 24, ..cfg() };
    for cut in [2, 3, 4] {
        check_resume(&cfg, &pattern, 1, 2, 8, cut);
    }
    let mut l =
        Loader::new(&cfg, &pattern, opts(0, 2, 4, Mode::Train, Arc::new(FakeTransform::default()), None)).unwrap();
    let epochs: Vec<u64> = take(&mut l, 7).iter().map(|b| b.epoch).collect();
    assert_eq!(epochs, [0, 0, 0, 1, 1, 1, 2]);
}

#[test]
fn resampled_resume_is_exact_for_two_ranks_and_across_epochs() {
    let pattern = data("resume-res");
    // 40 samples / (4 x 2) = 5 batches per rank per epoch.
    let cfg = DataConfig { resampled: true, train_num_samples: 40, ..cfg() };
    for rank in 0..2 {
        for cut in [1, 3, 5, 7] {
            check_resume(&cfg, &pattern, rank, 2, 12, cut);
        }
    }
    let mut l =
        Loader::new(&cfg, &pattern, opts(0, 2, 4, Mode::Train, Arc::new(FakeTransform::default()), None)).unwrap();
    let b = take(&mut l, 11);
    assert_eq!(b.iter().map(|b| b.epoch).collect::<Vec<_>>(), [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 2]);
    // With replacement: over 11 batches some sample shows up more than once.
    let mut ks: Vec<String> = b.iter().flat_map(|b| b.keys.clone()).collect();
    let n = ks.len();
    ks.sort();
    ks.dedup();
    assert!(ks.len() < n);
}

#[test]
fn resume_does_not_transform_skipped_samples() {
    let dir = tempdir("resume-count");
    let pattern = dataset(&dir, 4, 10);
    let cfg = DataConfig { shuffle_buffer: 8, ..cfg() };
    let mut first =
        Loader::new(&cfg, &pattern, opts(0, 1, 4, Mode::Train, Arc::new(FakeTransform::default()), None)).unwrap();
    let before: Vec<Batch> = take(&mut first, 5);
    drop(first);
    assert!(before.iter().all(|b| b.epoch == 0));

    let counting = Arc::new(FakeTransform::default());
    let mut resumed =
        Loader::new(&cfg, &pattern, opts(0, 1, 4, Mode::Train, counting.clone(), Some(before[4].cursor.clone())))
            .unwrap();
    take(&mut resumed, 2);
    drop(resumed);
    // Identify epoch-0 transforms by the sample's epoch-0 random stream.
    let shard_of = |k: &str| format!("{}/{:03}.tar", dir.display(), &k[1..k.find('_').unwrap()]);
    let seen = counting.seen.lock().unwrap();
    for k in before.iter().flat_map(|b| &b.keys) {
        let draw = SampleRng::for_sample(17, 0, &format!("{}/{k}", shard_of(k))).next_u64();
        let payload = format!("IMG:{k}").into_bytes();
        assert!(!seen.iter().any(|(p, d)| *p == payload && *d == draw), "skipped sample {k} was transformed on resume");
    }
    assert!(seen.len() >= 8, "the resumed loader transformed the batches it produced");
}

#[test]
fn batches_do_not_depend_on_thread_timing_or_worker_count() {
    let pattern = data("determinism");
    let run = |workers| {
        let cfg = DataConfig { workers, ..cfg() };
        let mut o = opts(0, 1, 4, Mode::Train, Arc::new(FakeTransform::default()), None);
        // A clock-dependent sleep before each sample, so thread timing varies run to run.
        o.transform = Arc::new(Around(|_: &[u8], apply: &mut dyn FnMut() -> Applied| {
            let ns = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
            std::thread::sleep(std::time::Duration::from_micros((ns % 400) as u64));
            apply()
        }));
        let mut l = Loader::new(&cfg, &pattern, o).unwrap();
        take(&mut l, 15).into_iter().map(|b| (b.keys, b.images)).collect::<Vec<_>>()
    };
    let a = run(1);
    assert_eq!(a, run(3));
    assert_eq!(a, run(3));
}

/// 3 shards x 12 samples with a corrupt image every few samples, two of them adjacent: a rejected
/// candidate moves the end of its batch, while workers already transform the next batch's.
fn holey_data(name: &str) -> String {
    let dir = tempdir(name);
    let pattern = dataset(&dir, 3, 12);
    for (shard, bad) in [(0, &[3usize, 4, 9][..]), (1, &[0, 7][..]), (2, &[5, 6, 11][..])] {
        let mut samples: Vec<_> = (0..12).map(|i| good(&format!("s{shard}_{i:02}"))).collect();
        for &i in bad {
            samples[i][0].1 = b"IMG CORRUPT".to_vec();
        }
        std::fs::write(dir.join(format!("{shard:03}.tar")), tar_of(&samples)).unwrap();
    }
    pattern
}

#[test]
fn resume_is_exact_after_every_batch_when_rejected_samples_move_batch_ends() {
    let pattern = holey_data("resume-holey");
    // 28 usable samples in 7 batches of 4 per epoch, one rank: every cut, and across epochs.
    let cfg = DataConfig { workers: 3, ..cfg() };
    for cut in 1..=9 {
        check_resume(&cfg, &pattern, 0, 1, 10, cut);
    }
}

#[test]
fn workers_go_on_with_the_next_batch_while_a_batch_waits_for_its_last_sample() {
    // The last sample of the first batch is held until five others are transformed: three are
    // its own batch's, so the other two must be the next batch's, taken up while it waits.
    let dir = tempdir("cross-batch");
    let pattern = dataset(&dir, 1, 12);
    // Others transformed so far; set if the held sample waited 20 s for them in vain.
    let done = Arc::new(AtomicUsize::new(0));
    let starved = Arc::new(AtomicBool::new(false));
    let (done2, starved2) = (done.clone(), starved.clone());
    let hold = move |e: &[u8], apply: &mut dyn FnMut() -> Applied| {
        if e != b"IMG:s0_03" {
            let out = apply();
            done2.fetch_add(1, SeqCst);
            return out;
        }
        let t = std::time::Instant::now();
        while done2.load(SeqCst) < 5 {
            if t.elapsed() > std::time::Duration::from_secs(20) {
                starved2.store(true, SeqCst);
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        apply()
    };
    let cfg = DataConfig { workers: 2, readers: 1, ..cfg() };
    let mut o = opts(0, 1, 4, Mode::Eval, Arc::new(FakeTransform::default()), None);
    o.transform = Arc::new(Around(hold));
    let l = Loader::new(&cfg, &pattern, o).unwrap();
    let batches: Vec<Vec<String>> = l.map(|b| b.keys).collect();
    assert!(!starved.load(SeqCst), "the workers idled at the first batch's tail ({} others done)", done.load(SeqCst));
    let want: Vec<Vec<String>> = (0..3).map(|b| (0..4).map(|i| format!("s0_{:02}", 4 * b + i)).collect()).collect();
    assert_eq!(batches, want, "batches in draw order whatever order the workers finished in");
}

#[test]
fn resume_seeks_to_recorded_offsets_and_reads_no_payload_it_skips() {
    let dir = tempdir("resume-seek");
    const IMAGE: usize = 400_000;
    let samples: Vec<_> = (0..100)
        .map(|i| {
            let key = format!("s0_{i:03}");
            let mut image = format!("IMG:{key}:").into_bytes();
            image.resize(IMAGE, i as u8);
            vec![(format!("{key}.jpg"), image), (format!("{key}.txt"), format!("caption {key}").into_bytes())]
        })
        .collect();
    std::fs::write(dir.join("0.tar"), tar_of(&samples)).unwrap();
    let pattern = format!("{}/0.tar", dir.display());
    // One reader, a small read-ahead: what the resumed loader reads stays well inside the shard.
    let cfg = DataConfig { readers: 1, shuffle_buffer: 4, read_ahead_bytes: 1 << 20, ..cfg() };
    let t = || Arc::new(FakeTransform::default());
    let mut full = Loader::new(&cfg, &pattern, opts(0, 1, 4, Mode::Train, t(), None)).unwrap();
    let reference = take(&mut full, 16);
    drop(full);

    let cut = &reference[14].cursor;
    let emitted = 15 * 4;
    let mut resumed = Loader::new(&cfg, &pattern, opts(0, 1, 4, Mode::Train, t(), Some(cut.clone()))).unwrap();
    let next = take(&mut resumed, 1);
    assert_eq!(keys(&next), keys(&reference[15..]));
    assert_eq!(next[0].images, reference[15].images, "samples read back from their offsets differ");
    // Let the loader read ahead as far as it will (prefetch, shuffle buffer, read-ahead).
    std::thread::sleep(std::time::Duration::from_millis(300));
    let read = resumed.stats().bytes_read;
    // Replaying the 60 samples already emitted would read 24 MB of their images alone; the
    // resume may read only what is still to come (40 samples, 16 MB).
    let unemitted = ((100 - emitted) * IMAGE) as u64;
    assert!(read < unemitted, "resume read {read} bytes, more than the {unemitted} of samples not yet emitted");
    assert!(read > 4 * IMAGE as u64, "the resumed loader read almost nothing ({read} bytes): the test proves nothing");
}

#[test]
fn pipe_sources_re_read_only_the_shards_in_flight() {
    let dir = tempdir("resume-pipe");
    let local = dataset(&dir, 6, 20);
    let log = dir.join("opened.log");
    let pattern = (0..6)
        .map(|s| format!("pipe:echo {s} >> {log}; cat {dir}/{s:03}.tar", log = log.display(), dir = dir.display()))
        .collect::<Vec<_>>()
        .join("::");
    assert!(!local.is_empty());
    let cfg = DataConfig { train_num_samples: 0, ..cfg() };
    let t = || Arc::new(FakeTransform::default());
    let mut full = Loader::new(&cfg, &pattern, opts(0, 1, 4, Mode::Train, t(), None)).unwrap();
    let reference = take(&mut full, 20);
    drop(full);
    let cut = reference[15].cursor.clone();
    let in_flight: Vec<u32> = cut
        .readers
        .iter()
        .flat_map(|r| r.at.iter().chain(&r.todo).map(|u| u.shard))
        .chain(cut.buffer.iter().map(|g| g.shard))
        .collect();
    let done: Vec<u32> = (0..6).filter(|s| !in_flight.contains(s)).collect();
    assert!(!done.is_empty(), "no shard was finished at the cut: the test proves nothing ({cut:?})");

    std::fs::write(&log, "").unwrap();
    let mut resumed = Loader::new(&cfg, &pattern, opts(0, 1, 4, Mode::Train, t(), Some(cut))).unwrap();
    let rest = take(&mut resumed, 4);
    drop(resumed);
    assert_eq!(keys(&rest), keys(&reference[16..]));
    let opened: Vec<u32> = std::fs::read_to_string(&log).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    for s in &done {
        assert!(!opened.contains(s), "shard {s} was finished before the cut but read again (opened: {opened:?})");
    }
}
