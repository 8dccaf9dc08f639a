//! Bad data never crashes, hangs or silently stalls the loader: each case ends in a skipped
//! sample or shard, a counter in the stats, and the good samples still arrive.

mod stream_support;

use std::sync::Arc;
use std::time::Duration;

use ferroclip_data::{DataConfig, DataError, Loader, Mode};
use stream_support::*;

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn truncated_tar_keeps_the_samples_before_the_cut() {
    let dir = tempdir("robust-trunc");
    let pattern = dataset(&dir, 2, 5);
    let bytes = std::fs::read(dir.join("001.tar")).unwrap();
    // Cut inside the 4th sample's image member (each sample: 2 headers + 2 payload blocks).
    std::fs::write(dir.join("001.tar"), &bytes[..3 * 2048 + 700]).unwrap();
    let (keys, stats) = eval_all(&cfg(), &pattern, 3);
    let mut want: Vec<String> = (0..5).map(|i| format!("s0_{i:02}")).collect();
    // The sample just before the failing member is dropped too: a read error leaves it
    // impossible to tell whether it was complete.
    want.extend((0..2).map(|i| format!("s1_{i:02}")));
    assert_eq!(sorted(keys), want);
    assert_eq!((stats.shards_opened, stats.shards_failed), (2, 1));
}

#[test]
fn bad_images_and_captions_are_skipped_and_counted() {
    let dir = tempdir("robust-samples");
    let mut s: Vec<_> = (0..9).map(|i| good(&format!("k{i}"))).collect();
    s[1][0].1 = Vec::new(); // zero-byte image
    s[2][0].1 = b"IMG CORRUPT data".to_vec(); // corrupt image
    s[3][1].1 = vec![0xff, 0xfe, 0x80]; // non-UTF-8 caption
    s[4][1].1 = b"  \n".to_vec(); // empty caption
    s[5][0].1 = b"HUGE 100000x100000".to_vec(); // decompression bomb, rejected by the transform
    s[6].remove(1); // no caption
    s[7].remove(0); // no image
    std::fs::write(dir.join("0.tar"), tar_of(&s)).unwrap();
    let (keys, stats) = eval_all(&cfg(), &format!("{}/0.tar", dir.display()), 2);
    assert_eq!(keys, ["k0", "k8"]);
    for reason in ["empty_image", "corrupt_image", "bad_caption", "empty_caption", "image_too_large", "missing_caption", "missing_image"] {
        assert_eq!(stats.skipped.get(reason), Some(&1), "{reason}: {:?}", stats.skipped);
    }
    assert_eq!(stats.samples_yielded, 2);
}

#[test]
fn missing_unreadable_and_garbage_shards_are_skipped() {
    let dir = tempdir("robust-shards");
    let pattern = dataset(&dir, 5, 2);
    std::fs::remove_file(dir.join("001.tar")).unwrap();
    std::fs::remove_file(dir.join("002.tar")).unwrap();
    std::fs::create_dir(dir.join("002.tar")).unwrap(); // opens, but reading fails
    std::fs::write(dir.join("003.tar"), vec![0x42u8; 3000]).unwrap(); // not a tar
    let (keys, stats) = eval_all(&cfg(), &pattern, 4);
    assert_eq!(sorted(keys), ["s0_00", "s0_01", "s4_00", "s4_01"]);
    assert_eq!(stats.shards_failed, 3, "{stats:?}");
}

#[test]
fn failing_pipe_commands_are_failed_shards() {
    let dir = tempdir("robust-pipe");
    let pattern = dataset(&dir, 1, 3);
    let sources = format!("pipe:false::pipe:cat /nonexistent/x.tar::{pattern}::pipe:exit 3");
    let (keys, stats) = eval_all(&cfg(), &sources, 4);
    assert_eq!(sorted(keys), ["s0_00", "s0_01", "s0_02"]);
    assert_eq!(stats.shards_failed, 3, "{stats:?}");
}

#[test]
fn start_up_errors_name_the_problem() {
    let t = || Arc::new(FakeTransform::default());
    let err = Loader::new(&cfg(), "/nonexistent/{0..9}.tar", opts(0, 1, 2, Mode::Train, t(), None)).err().unwrap();
    assert!(matches!(err, DataError::NoShards { .. }) && err.to_string().contains("matches no file"), "{err}");
    let dir = tempdir("robust-few");
    let pattern = dataset(&dir, 2, 2);
    let err = Loader::new(&cfg(), &pattern, opts(0, 4, 2, Mode::Train, t(), None)).err().unwrap();
    assert!(matches!(err, DataError::TooFewShards { shards: 2, world_size: 4 }), "{err}");
    let err = Loader::new(&cfg(), "x{1..", opts(0, 1, 2, Mode::Train, t(), None)).err().unwrap();
    assert!(matches!(err, DataError::BadPattern { .. }), "{err}");
}

/// Run `f` on a thread and fail the test if it does not finish in time (a hang).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(f()).unwrap());
    rx.recv_timeout(Duration::from_secs(secs)).expect("loader hung")
}

#[test]
fn all_bad_shards_in_train_mode_end_with_an_error_not_a_hang() {
    for resampled in [false, true] {
        let dir = tempdir(&format!("robust-allbad-{resampled}"));
        for i in 0..3 {
            std::fs::write(dir.join(format!("{i}.tar")), vec![7u8; 2048]).unwrap();
        }
        let cfg = DataConfig { resampled, train_num_samples: 100, ..cfg() };
        let pattern = format!("{}/{{0..2}}.tar", dir.display());
        let (none, err, failed) = within(60, move || {
            let mut l = Loader::new(&cfg, &pattern, opts(0, 1, 2, Mode::Train, Arc::new(FakeTransform::default()), None)).unwrap();
            let b = l.next_batch();
            (b.is_none(), l.error().map(|e| e.to_string()), l.stats().shards_failed)
        });
        assert!(none, "resampled={resampled}");
        assert!(err.unwrap().contains("not a single full batch"));
        assert!(failed >= 3);
    }
}

#[test]
fn epochs_shorter_than_a_batch_stop_instead_of_spinning() {
    let dir = tempdir("robust-short");
    let pattern = dataset(&dir, 1, 3);
    let none = within(60, move || {
        let mut l = Loader::new(&cfg(), &pattern, opts(0, 1, 8, Mode::Train, Arc::new(FakeTransform::default()), None)).unwrap();
        l.next_batch().is_none() && l.error().is_some()
    });
    assert!(none);
}

struct Panics;

impl ferroclip_data::augment::ImageTransform for Panics {
    fn output_size(&self) -> usize {
        SIZE
    }
    fn apply(&self, _: &[u8], _: &str, _: &mut ferroclip_data::rng::SampleRng, _: &mut [f32]) -> Result<(), ferroclip_data::decode::DecodeError> {
        panic!("transform bug")
    }
}

#[test]
fn a_panicking_transform_ends_the_stream_with_an_error() {
    let dir = tempdir("robust-panic");
    let pattern = dataset(&dir, 1, 3);
    let (none, err) = within(60, move || {
        let mut o = opts(0, 1, 2, Mode::Train, Arc::new(FakeTransform::default()), None);
        o.transform = Arc::new(Panics);
        let mut l = Loader::new(&cfg(), &pattern, o).unwrap();
        (l.next_batch().is_none(), l.error().map(|e| e.to_string()))
    });
    assert!(none);
    assert!(err.unwrap().contains("transform bug"));
}

#[test]
fn eval_splits_shards_across_ranks_and_stats_serialize() {
    let dir = tempdir("robust-eval-ranks");
    let pattern = dataset(&dir, 3, 3);
    let mut all = Vec::new();
    for rank in 0..2 {
        let mut l = Loader::new(&cfg(), &pattern, opts(rank, 2, 2, Mode::Eval, Arc::new(FakeTransform::default()), None)).unwrap();
        let mut ks = Vec::new();
        while let Some(b) = l.next_batch() {
            assert_eq!(b.captions, b.keys.iter().map(|k| format!("a photo of {k}")).collect::<Vec<_>>());
            ks.extend(b.keys);
        }
        // Eval reads in shard order: rank 0 gets shards 0 and 2, rank 1 shard 1.
        let want: Vec<String> = if rank == 0 {
            (0..3).map(|i| format!("s0_{i:02}")).chain((0..3).map(|i| format!("s2_{i:02}"))).collect()
        } else {
            (0..3).map(|i| format!("s1_{i:02}")).collect()
        };
        assert_eq!(ks, want);
        let stats = l.stats();
        assert_eq!(stats.samples_yielded, ks.len() as u64);
        let json = serde_json::to_value(&stats).unwrap();
        assert!(json["wait_seconds"].as_f64().unwrap() >= 0.0 && json["bytes_read"].as_u64().unwrap() > 0, "{json}");
        all.extend(ks);
    }
    assert_eq!(all.len(), 9);
}
