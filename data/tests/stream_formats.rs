//! Shard formats: a shard written by Python's `webdataset.ShardWriter` (committed fixture,
//! see `scripts/gen-webdataset-fixture.py`), `pipe:` sources, `.tar.gz` and `.tar.zst`.

mod stream_support;

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use ferroclip_data::augment::ImageTransform;
use ferroclip_data::decode::DecodeError;
use ferroclip_data::rng::SampleRng;
use ferroclip_data::{DataConfig, Loader, Mode};
use stream_support::*;

fn fixture() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/wds-000000.tar")
}

/// Accepts JPEG payloads only (SOI marker), like the real decoder would.
struct JpegMagic;

impl ImageTransform for JpegMagic {
    fn output_size(&self) -> usize {
        SIZE
    }
    fn apply(
        &self,
        encoded: &[u8],
        ext: &str,
        _rng: &mut SampleRng,
        out: &mut [u8],
    ) -> Result<Option<ferroclip_data::EraseBox>, DecodeError> {
        if ext != "jpg" || !encoded.starts_with(&[0xff, 0xd8, 0xff]) {
            return Err(DecodeError::Corrupt("not a JPEG".into()));
        }
        out.fill(encoded.len() as u8);
        Ok(None)
    }
}

fn read_all(cfg: &DataConfig, pattern: &str) -> (Vec<String>, Vec<String>, ferroclip_data::StatsSnapshot) {
    let mut o = opts(0, 1, 2, Mode::Eval, Arc::new(FakeTransform::default()), None);
    o.transform = Arc::new(JpegMagic);
    let mut l = Loader::new(cfg, pattern, o).unwrap();
    let (mut keys, mut captions) = (Vec::new(), Vec::new());
    while let Some(b) = l.next_batch() {
        keys.extend(b.keys);
        captions.extend(b.captions);
    }
    (keys, captions, l.stats())
}

const KEYS: [&str; 4] = ["000000000", "000000001", "000000002", "000000004"];
const CAPTIONS: [&str; 4] = ["a red square", "a green square", "a blue square", "a grey square"];

#[test]
fn python_webdataset_shardwriter_layout_reads_as_expected() {
    let path = fixture();
    for caption_key in ["txt", "json:caption"] {
        let cfg = DataConfig { caption_key: caption_key.into(), ..cfg() };
        let (keys, captions, stats) = read_all(&cfg, path.to_str().unwrap());
        assert_eq!(keys, KEYS, "{caption_key}");
        assert_eq!(captions, CAPTIONS, "{caption_key}");
        // Sample 3 has an empty caption.
        assert_eq!(stats.skipped.get("empty_caption"), Some(&1), "{caption_key}: {stats:?}");
        assert_eq!((stats.shards_opened, stats.shards_failed), (1, 0));
        assert_eq!(stats.bytes_read, std::fs::metadata(&path).unwrap().len());
    }
}

#[test]
fn pipe_gzip_and_zstd_sources_read_the_same_samples() {
    let dir = tempdir("formats");
    let tar = std::fs::read(fixture()).unwrap();
    let gz = dir.join("shard.tar.gz");
    let mut enc = flate2::write::GzEncoder::new(std::fs::File::create(&gz).unwrap(), flate2::Compression::default());
    enc.write_all(&tar).unwrap();
    enc.finish().unwrap();
    let zst = dir.join("shard.tar.zst");
    std::fs::write(&zst, zstd::encode_all(&tar[..], 3).unwrap()).unwrap();

    let fixture = fixture();
    for pattern in [
        format!("pipe:cat {}", fixture.display()),
        gz.display().to_string(),
        zst.display().to_string(),
        format!("pipe:cat {}", zst.display()),
    ] {
        let (keys, captions, stats) = read_all(&cfg(), &pattern);
        assert_eq!(keys, KEYS, "{pattern}");
        assert_eq!(captions, CAPTIONS, "{pattern}");
        assert_eq!(stats.shards_failed, 0, "{pattern}");
    }
}

#[test]
fn weighted_sources_are_drawn_in_proportion_in_resampled_mode() {
    let (a, b) = (tempdir("weights-a"), tempdir("weights-b"));
    let pa = dataset(&a, 2, 4);
    // Source b: same layout, different keys.
    for s in 0..2 {
        let samples: Vec<_> = (0..4).map(|i| good(&format!("b{s}_{i:02}"))).collect();
        std::fs::write(b.join(format!("{s:03}.tar")), tar_of(&samples)).unwrap();
    }
    let pb = format!("{}/{{000..001}}.tar", b.display());
    let train = format!("{pa}::{pb}");
    let cfg = DataConfig {
        train: train.clone(),
        train_weights: vec![1.0, 4.0],
        resampled: true,
        train_num_samples: 4000,
        ..cfg()
    };
    let mut l =
        Loader::new(&cfg, &train, opts(0, 1, 8, Mode::Train, Arc::new(FakeTransform::default()), None)).unwrap();
    let batches = take(&mut l, 100);
    let from_b = batches.iter().flat_map(|b| &b.keys).filter(|k| k.starts_with('b')).count() as f64 / 800.0;
    assert!((0.7..0.9).contains(&from_b), "share of source b {from_b}, expected ~0.8");
}

#[test]
fn labels_come_from_the_label_member_and_unlabelled_samples_are_skipped() {
    let dir = tempdir("labels");
    let mut s: Vec<_> = (0..4)
        .map(|i| {
            let mut m = good(&format!("k{i}"));
            m.push((format!("k{i}.cls"), format!(" {} \n", 10 + i).into_bytes()));
            m
        })
        .collect();
    s[2].pop();
    s[3][2].1 = b"not a number".to_vec();
    std::fs::write(dir.join("0.tar"), tar_of(&s)).unwrap();
    let mut o = opts(0, 1, 4, Mode::Eval, Arc::new(FakeTransform::default()), None);
    o.label_key = Some("cls".into());
    let mut l = Loader::new(&cfg(), &format!("{}/0.tar", dir.display()), o).unwrap();
    let b = l.next_batch().unwrap();
    assert_eq!((b.keys.clone(), b.labels.clone()), (vec!["k0".to_string(), "k1".into()], vec![10, 11]));
    assert!(l.next_batch().is_none());
    assert_eq!(l.stats().skipped.get("missing_label"), Some(&2));
}
