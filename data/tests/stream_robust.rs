//! Bad data never crashes, hangs or silently stalls the loader: each case ends in a skipped
//! sample or shard, a counter in the stats, and the good samples still arrive. This includes a
//! sample that makes the transform or the tokenizer panic, and a shard whose reader stalls.

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
    for reason in [
        "empty_image",
        "corrupt_image",
        "bad_caption",
        "empty_caption",
        "image_too_large",
        "missing_caption",
        "missing_image",
    ] {
        assert_eq!(stats.skipped.get(reason), Some(&1), "{reason}: {:?}", stats.skipped);
    }
    assert_eq!(stats.samples_yielded, 2);
}

#[test]
fn members_over_max_member_bytes_are_skipped_and_counted() {
    let dir = tempdir("robust-member-limit");
    let mut s: Vec<_> = (0..4).map(|i| good(&format!("k{i}"))).collect();
    s[1][0].1 = [b"IMG:".as_slice(), &[0u8; 5000]].concat(); // image over the limit
    s[2][1].1 = vec![b'x'; 5000]; // caption over the limit
    std::fs::write(dir.join("0.tar"), tar_of(&s)).unwrap();
    let cfg = DataConfig { max_member_bytes: 4096, ..cfg() };
    let (keys, stats) = eval_all(&cfg, &format!("{}/0.tar", dir.display()), 2);
    assert_eq!(keys, ["k0", "k3"]);
    assert_eq!(stats.skipped.get("member_too_large"), Some(&2), "{:?}", stats.skipped);
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
            let mut l =
                Loader::new(&cfg, &pattern, opts(0, 1, 2, Mode::Train, Arc::new(FakeTransform::default()), None))
                    .unwrap();
            let b = l.next_batch();
            (b.is_none(), l.error().map(|e| e.to_string()), l.stats().shards_failed)
        });
        assert!(none, "resampled={resampled}");
        assert!(err.unwrap().contains("not a single full batch"));
        assert!(failed >= 3);
    }
}

#[test]
fn fixed_length_epochs_over_only_undecodable_images_end_with_an_error_not_a_hang() {
    // The samples are complete (image and caption), so the shard readers deliver every one; only
    // the transform rejects them. Pass after pass (draw after draw) would find the same: two
    // barren passes end it, and a resampled stream gives up after a long run of rejections.
    let dir = tempdir("robust-undecodable");
    let samples: Vec<_> = (0..4)
        .map(|i| {
            let mut s = good(&format!("k{i}"));
            s[0].1 = b"IMG CORRUPT".to_vec();
            s
        })
        .collect();
    std::fs::write(dir.join("0.tar"), tar_of(&samples)).unwrap();
    for resampled in [false, true] {
        let pattern = format!("{}/0.tar", dir.display());
        let (none, err, corrupt) = within(60, move || {
            let cfg = DataConfig { train_num_samples: 8, resampled, ..cfg() };
            let o = opts(0, 1, 2, Mode::Train, Arc::new(FakeTransform::default()), None);
            let mut l = Loader::new(&cfg, &pattern, o).unwrap();
            (
                l.next_batch().is_none(),
                l.error().map(|e| e.to_string()),
                l.stats().skipped.get("corrupt_image").copied(),
            )
        });
        assert!(none, "resampled={resampled}");
        let err = err.expect("the stream says why it ended");
        assert!(err.contains("no usable sample"), "resampled={resampled}: {err}");
        assert!(
            corrupt.is_some_and(|n| n >= 8),
            "resampled={resampled}: more than one pass was transformed: {corrupt:?}"
        );
    }
}

#[test]
fn epochs_shorter_than_a_batch_stop_instead_of_spinning() {
    let dir = tempdir("robust-short");
    let pattern = dataset(&dir, 1, 3);
    let none = within(60, move || {
        let mut l = Loader::new(&cfg(), &pattern, opts(0, 1, 8, Mode::Train, Arc::new(FakeTransform::default()), None))
            .unwrap();
        l.next_batch().is_none() && l.error().is_some()
    });
    assert!(none);
}

/// The fake transform, except that it panics on the image of `key` (as a decoder bug on one
/// crafted header would).
fn panics_on(key: &'static str) -> Arc<dyn ferroclip_data::augment::ImageTransform> {
    Arc::new(Around(move |e: &[u8], apply: &mut dyn FnMut() -> Applied| {
        if e == format!("IMG:{key}").as_bytes() {
            panic!("transform bug on {key}");
        }
        apply()
    }))
}

/// Byte tokens, except that it panics on one caption.
struct TokenizerPanicsOn(&'static str);

impl ferroclip_data::tokenize::Tokenizer for TokenizerPanicsOn {
    fn context_length(&self) -> usize {
        ByteTokenizer.context_length()
    }
    fn encode_into(&self, text: &str, out: &mut [i64]) {
        assert!(!text.ends_with(self.0), "tokenizer bug on {text:?}");
        ByteTokenizer.encode_into(text, out)
    }
}

#[test]
fn a_sample_that_panics_is_skipped_and_counted_and_every_other_arrives() {
    let dir = tempdir("robust-panic");
    let pattern = dataset(&dir, 3, 6);
    for mode in [Mode::Eval, Mode::Train] {
        let pattern = pattern.clone();
        let (keys, stats) = within(60, move || {
            let mut o = opts(0, 1, 2, mode, Arc::new(FakeTransform::default()), None);
            o.transform = panics_on("s1_03");
            o.tokenizer = Arc::new(TokenizerPanicsOn("s2_05"));
            let cfg = DataConfig { train_num_samples: 16, ..cfg() };
            let mut l = Loader::new(&cfg, &pattern, o).unwrap();
            // Eval: one pass; Train: one epoch of 16 samples. Both are all 18 but the two that panic.
            let keys: Vec<String> = take(&mut l, 8).into_iter().flat_map(|b| b.keys).collect();
            if mode == Mode::Eval {
                assert!(l.next_batch().is_none(), "one pass holds 8 batches");
            }
            (keys, l.stats())
        });
        let mut want: Vec<String> = (0..3).flat_map(|s| (0..6).map(move |i| format!("s{s}_{i:02}"))).collect();
        want.retain(|k| k != "s1_03" && k != "s2_05");
        assert_eq!(sorted(keys), want, "{mode:?}");
        if mode == Mode::Eval {
            // The whole pass was read: both panics are counted, and nothing else.
            assert_eq!(stats.skipped.get("panic"), Some(&2), "{mode:?}: {:?}", stats.skipped);
            assert_eq!(stats.skipped_total(), 2);
        } else {
            // Training goes on into the next epochs (where the two panic again).
            assert!(stats.skipped.get("panic").is_some_and(|&n| n >= 1), "{mode:?}: {:?}", stats.skipped);
            assert_eq!(stats.skipped.len(), 1, "{:?}", stats.skipped);
        }
    }
}

#[test]
fn panics_that_leave_no_full_batch_end_the_stream_with_an_error_not_a_hang() {
    let dir = tempdir("robust-panic-all");
    let pattern = dataset(&dir, 1, 3);
    let (none, err, panics) = within(60, move || {
        let mut o = opts(0, 1, 2, Mode::Train, Arc::new(FakeTransform::default()), None);
        o.transform = panics_on("s0_00");
        o.tokenizer = Arc::new(TokenizerPanicsOn("s0_01"));
        let mut l = Loader::new(&DataConfig { readers: 1, ..cfg() }, &pattern, o).unwrap();
        (l.next_batch().is_none(), l.error().map(|e| e.to_string()), l.stats().skipped.get("panic").copied())
    });
    assert!(none);
    assert!(err.unwrap().contains("not a single full batch"));
    assert_eq!(panics, Some(2));
}

#[test]
fn eval_splits_shards_across_ranks_and_stats_serialize() {
    let dir = tempdir("robust-eval-ranks");
    let pattern = dataset(&dir, 3, 3);
    let mut all = Vec::new();
    for rank in 0..2 {
        let mut l =
            Loader::new(&cfg(), &pattern, opts(rank, 2, 2, Mode::Eval, Arc::new(FakeTransform::default()), None))
                .unwrap();
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

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<String> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) {
                found.push(cmd);
            }
        }
    }
    found
}

#[test]
fn a_stalled_pipe_is_abandoned_after_the_read_timeout_and_the_stream_goes_on() {
    let dir = tempdir("robust-stall");
    let pattern = dataset(&dir, 4, 6);
    // `sleep` (its arguments add up, the second one marks it as this test's) under a shell, as a
    // hung download would be: ending the shell alone would leave it running.
    let marker = format!("sleep 3600 0.000{}", std::process::id());
    let sources = format!("pipe:{marker}; true::{pattern}");
    for mode in [Mode::Train, Mode::Eval] {
        let (sources, marker2) = (sources.clone(), marker.clone());
        let (keys, stats, lingering) = within(60, move || {
            let cfg = DataConfig { read_timeout_s: 1.0, ..cfg() };
            let o = opts(0, 1, 4, mode, Arc::new(FakeTransform::default()), None);
            let mut l = Loader::new(&cfg, &sources, o).unwrap();
            let keys: Vec<String> = take(&mut l, 6).into_iter().flat_map(|b| b.keys).collect();
            // Train may hand out every good sample before the stalled shard's time is up: wait for
            // the timeout to strike.
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while l.stats().shards_failed == 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let stats = l.stats();
            // Eval reads one pass: the abandoned command must be gone by itself. Training goes on
            // (a later epoch meets the shard again): stopping the loader must end that one too.
            if mode == Mode::Train {
                drop(l);
            }
            while !processes_with(&marker2).is_empty() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            (keys, stats, processes_with(&marker2))
        });
        let want: Vec<String> = (0..4).flat_map(|s| (0..6).map(move |i| format!("s{s}_{i:02}"))).collect();
        assert_eq!(sorted(keys), want, "{mode:?}");
        assert!(stats.shards_failed == 1 || (mode == Mode::Train && stats.shards_failed > 1), "{mode:?}: {stats:?}");
        assert!(lingering.is_empty(), "{mode:?}: the stalled command still runs: {lingering:?}");
    }
}

/// Set in the child process of [`a_hung_pipe_dies_with_the_process_that_started_it`].
const CHILD_MARKER: &str = "FERROCLIP_TEST_HUNG_PIPE_MARKER";

#[test]
fn a_hung_pipe_dies_with_the_process_that_started_it() {
    if let Ok(marker) = std::env::var(CHILD_MARKER) {
        // The child: a loader reading a shard whose command never writes; say when it runs, then
        // wait to be killed (SIGKILL: no destructor of this process runs).
        let dir = tempdir("robust-orphan");
        let sources = format!("pipe:{marker}; true::{}", dataset(&dir, 1, 2));
        let _l = Loader::new(&cfg(), &sources, opts(0, 1, 2, Mode::Train, Arc::new(FakeTransform::default()), None))
            .unwrap();
        while processes_with(&marker).is_empty() {
            std::thread::sleep(Duration::from_millis(20));
        }
        println!("pipe running");
        std::thread::sleep(Duration::from_secs(600));
        return;
    }
    use std::io::BufRead;
    let marker = format!("sleep 3600 0.0000{}", std::process::id());
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "a_hung_pipe_dies_with_the_process_that_started_it", "--nocapture", "--test-threads=1"])
        .env(CHILD_MARKER, &marker)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let running = within(60, {
        let out = child.stdout.take().unwrap();
        move || std::io::BufReader::new(out).lines().map_while(Result::ok).any(|l| l.contains("pipe running"))
    });
    assert!(running, "the child never started its pipe command");
    assert!(!processes_with(&marker).is_empty());
    child.kill().unwrap();
    child.wait().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !processes_with(&marker).is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let lingering = processes_with(&marker);
    assert!(lingering.is_empty(), "the pipe command outlived its killed process: {lingering:?}");
}

#[test]
fn the_merge_serves_the_other_readers_while_one_waits() {
    let dir = tempdir("robust-wait");
    dataset(&dir, 4, 6);
    let flag = dir.join("go");
    // Reader 0 reads shard 0 (which waits for the flag), then 2; reader 1 reads shards 1 and 3.
    let wait = format!("pipe:while [ ! -e {} ]; do sleep 0.05; done; cat {}/000.tar", flag.display(), dir.display());
    let sources = format!("{wait}::{}/{{001..003}}.tar", dir.display());
    let keys = within(60, move || {
        let cfg = DataConfig { shuffle_shards: false, ..cfg() };
        let o = opts(0, 1, 2, Mode::Train, Arc::new(FakeTransform::default()), None);
        let mut l = Loader::new(&cfg, &sources, o).unwrap();
        // Reader 1's 12 samples minus what the shuffle buffer (5) keeps: 4 batches can come now.
        let early: Vec<String> = take(&mut l, 3).into_iter().flat_map(|b| b.keys).collect();
        std::fs::write(&flag, b"").unwrap();
        let late: Vec<String> = take(&mut l, 9).into_iter().flat_map(|b| b.keys).collect();
        (early, late)
    });
    assert!(keys.0.iter().all(|k| k.starts_with("s1_") || k.starts_with("s3_")), "{:?}", keys.0);
    let want: Vec<String> = (0..4).flat_map(|s| (0..6).map(move |i| format!("s{s}_{i:02}"))).collect();
    assert_eq!(sorted(keys.0.into_iter().chain(keys.1).collect()), want);
}

#[test]
fn a_reader_waiting_for_a_slow_consumer_is_not_taken_for_stalled() {
    let dir = tempdir("robust-slow-consumer");
    let pattern = dataset(&dir, 4, 40);
    // Readers fill their read-ahead (200 bytes: some 8 samples) and wait for the merge far
    // longer than the timeout while the consumer sleeps; then the merge empties them at once.
    let cfg = DataConfig { read_timeout_s: 0.3, prefetch: 1, shuffle_buffer: 4, read_ahead_bytes: 200, ..cfg() };
    let (keys, stats) = within(60, move || {
        let o = opts(0, 1, 4, Mode::Train, Arc::new(FakeTransform::default()), None);
        let mut l = Loader::new(&cfg, &pattern, o).unwrap();
        let mut keys: Vec<String> = take(&mut l, 1).into_iter().flat_map(|b| b.keys).collect();
        std::thread::sleep(Duration::from_millis(1500));
        keys.extend(take(&mut l, 39).into_iter().flat_map(|b| b.keys));
        (keys, l.stats())
    });
    assert_eq!(stats.shards_failed, 0, "a waiting reader was abandoned: {stats:?}");
    let mut distinct = sorted(keys);
    distinct.dedup();
    assert_eq!(distinct.len(), 160, "every sample of the epoch, once");
}

#[test]
fn read_ahead_is_bounded_in_bytes_and_spans_a_pipe_shard_switch() {
    // While the consumer holds off, a reader reads on by `read_ahead_bytes`, not a fixed handful
    // of samples: through the rest of one shard and all of a `pipe:` shard whose command starts
    // slowly, so the next shard's start-up is hidden behind what was read ahead.
    let dir = tempdir("robust-read-ahead");
    let mut total = 0;
    for (name, s) in [("a", 0), ("b", 1)] {
        let samples: Vec<_> = (0..300).map(|i| good(&format!("s{s}_{i:03}"))).collect();
        let tar = tar_of(&samples);
        total += tar.len() as u64;
        std::fs::write(dir.join(format!("{name}.tar")), tar).unwrap();
    }
    let sources = format!("{}/a.tar::pipe:sleep 0.2; cat {}/b.tar", dir.display(), dir.display());
    let cfg = DataConfig { readers: 1, workers: 1, prefetch: 1, ..cfg() };
    let keys = within(60, move || {
        let o = opts(0, 1, 1, Mode::Eval, Arc::new(FakeTransform::default()), None);
        let mut l = Loader::new(&cfg, &sources, o).unwrap();
        let mut keys: Vec<String> = take(&mut l, 1).into_iter().flat_map(|b| b.keys).collect();
        let t = std::time::Instant::now();
        while l.stats().bytes_read < total {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "the reader stopped reading ahead after {} of 600 samples were taken: {:?}, {total} bytes in the shards",
                keys.len(),
                l.stats()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        while let Some(b) = l.next_batch() {
            keys.extend(b.keys);
        }
        keys
    });
    let want: Vec<String> = (0..2).flat_map(|s| (0..300).map(move |i| format!("s{s}_{i:03}"))).collect();
    assert_eq!(keys, want, "both shards, in order, each sample once");
}
