//! Bad bytes never panic or hang the data path, and every sample is accounted for.
//!
//! A small valid shard from the synthetic writer ([`ferroclip_data::synth`]) is mutated a few
//! hundred ways, each mutant from its own fixed seed: bit flips, byte overwrites, truncation,
//! inserted and deleted byte runs anywhere; and aimed at what a parser trusts: tar header fields
//! (size, checksum, name, type flag, an inserted pax header), JPEG markers, segment lengths, frame
//! and table fields and the entropy-coded scan inside image members, and the captions (invalid
//! UTF-8, odd Unicode and HTML entities, broken JSON). Each mutant streams through the real loader
//! with the real train transform (decode, RandomResizedCrop, erasing) and CLIP tokenizer: once as
//! one ordered pass, where every key group the tar reader finds must come out delivered or skipped
//! under a recorded reason, and once as a training stream. Single JPEGs are mutated the same way
//! and fed to the decoders directly.
//!
//! The loader catches a panic on a sample and counts it as a `panic` skip, and a reader thread
//! that dies only ends its shard early: neither shows from outside. So a panic hook records every
//! panic in the process, and a mutant that caused one fails the test, naming its seed, as does a
//! mutant that runs past [`PER_MUTANT`]. `FERROCLIP_MUTANT=SEED` runs that mutant alone.

mod stream_support;

use std::collections::BTreeSet;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use ferroclip_data::augment::{AugmentConfig, EvalTransform, ImageTransform, TrainTransform};
use ferroclip_data::rng::SampleRng;
use ferroclip_data::sample::SampleGrouper;
use ferroclip_data::tar::{write_tar, TarReader};
use ferroclip_data::tokenize::{ClipTokenizer, Tokenizer};
use ferroclip_data::{DataConfig, Loader, LoaderOptions, Mode, StatsSnapshot};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use stream_support::{finishes_within, tempdir};

/// Mutated shards streamed through the loader.
const SHARD_MUTANTS: u64 = 600;
/// Mutated JPEGs fed to the decoders.
const JPEG_MUTANTS: u64 = 1000;
/// A mutant that takes longer hangs (the valid shard takes well under a second).
const PER_MUTANT: Duration = Duration::from_secs(30);
/// Samples in the valid shard.
const SAMPLES: usize = 6;
const BATCH: usize = 2;
/// Batches a training stream is asked for (it never ends by itself).
const TRAIN_BATCHES: usize = 3;
const IMAGE_SIZE: usize = 32;

/// The reasons a sample may be skipped for on bad data, every one with its counter.
const REASONS: [&str; 9] = [
    "missing_image",
    "missing_caption",
    "bad_caption",
    "empty_caption",
    "member_too_large",
    "empty_image",
    "unsupported_image",
    "corrupt_image",
    "image_too_large",
];

// ---------------------------------------------------------------------------------------------
// Every panic of the process, whoever catches it.

/// (thread name, message) of each panic so far.
static PANICS: Mutex<Vec<(String, String)>> = Mutex::new(Vec::new());
static HOOK: Once = Once::new();

fn record_panics() {
    HOOK.call_once(|| {
        // The loader's guard installs its quiet hook on first use; ours must be outside it, or
        // the panics the guard catches would never reach us.
        let _ = ferroclip_data::guard::guarded(|| ());
        let inner = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let thread = std::thread::current().name().unwrap_or("").to_string();
            PANICS.lock().unwrap_or_else(|p| p.into_inner()).push((thread, info.to_string()));
            inner(info);
        }));
    });
}

/// Panics recorded from index `from` on, on threads whose name starts with one of `prefixes`.
fn panics_since(from: usize, prefixes: &[&str]) -> (usize, Vec<String>) {
    let all = PANICS.lock().unwrap_or_else(|p| p.into_inner());
    let found = all[from..]
        .iter()
        .filter(|(t, _)| prefixes.iter().any(|p| t.starts_with(p)))
        .map(|(t, m)| format!("[{t}] {m}"))
        .collect();
    (all.len(), found)
}

// ---------------------------------------------------------------------------------------------
// The valid shard and its layout.

struct Base {
    tar: Vec<u8>,
    /// The loader's member limit here: just over the largest member, so that mutated size
    /// fields land on both sides of it inside the file.
    max_member: u64,
    /// (name, tar offset of its header, payload) of each member, in order.
    members: Vec<(String, usize, Vec<u8>)>,
}

impl Base {
    fn new(tag: &str) -> Base {
        let dir = tempdir(&format!("mutation-base-{tag}"));
        let path = ferroclip_data::synth::write_shards(&dir, "base-", 1, SAMPLES, 41, false).unwrap().remove(0);
        let tar = std::fs::read(&path).unwrap();
        let mut reader = TarReader::new(&tar[..], u64::MAX);
        let mut members = Vec::new();
        while let Some(m) = reader.next_member(&mut |_| false).unwrap() {
            let data = m.payload.bytes().unwrap().to_vec();
            // One plain header per member (short names): its payload follows right after.
            assert_eq!(&tar[m.offset as usize + 512..][..data.len()], &data[..], "{}", m.name);
            members.push((m.name, m.offset as usize, data));
        }
        assert_eq!(members.len(), 3 * SAMPLES, "jpg, txt and json per sample");
        let max_member = members.iter().map(|m| m.2.len() as u64).max().unwrap() + 300;
        Base { tar, max_member, members }
    }

    fn of_ext<'a>(&'a self, ext: &'a str) -> impl Iterator<Item = usize> + 'a {
        self.members.iter().enumerate().filter(move |(_, m)| m.0.ends_with(ext)).map(|(i, _)| i)
    }

    fn jpegs(&self) -> Vec<&[u8]> {
        self.of_ext(".jpg").map(|i| &self.members[i].2[..]).collect()
    }

    /// The shard rebuilt (ustar headers) with member `i`'s payload replaced.
    fn with_payload(&self, i: usize, data: Vec<u8>) -> Vec<u8> {
        let mut payloads: Vec<(&str, Vec<u8>)> = self.members.iter().map(|m| (m.0.as_str(), m.2.clone())).collect();
        payloads[i].1 = data;
        write_tar(&payloads.iter().map(|(n, d)| (*n, d.as_slice())).collect::<Vec<_>>())
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations.

type Rand = Xoshiro256PlusPlus;

fn pick<'a, T>(items: &'a [T], rng: &mut Rand) -> &'a T {
    &items[rng.gen_range(0..items.len())]
}

fn random_bytes(n: usize, rng: &mut Rand) -> Vec<u8> {
    (0..n).map(|_| rng.gen()).collect()
}

fn flip_bits(rng: &mut Rand, data: &mut [u8]) -> String {
    let n = rng.gen_range(1..=8);
    for _ in 0..n {
        let i = rng.gen_range(0..data.len());
        data[i] ^= 1 << rng.gen_range(0..8);
    }
    format!("{n} bit flips")
}

fn overwrite(rng: &mut Rand, data: &mut [u8]) -> String {
    if rng.gen_bool(0.5) {
        let n = rng.gen_range(1..=16);
        for _ in 0..n {
            let i = rng.gen_range(0..data.len());
            data[i] = *pick(&[0x00, 0xff, 0x7f, 0x80, b' ', b'0', rng.gen()], rng);
        }
        format!("{n} bytes overwritten")
    } else {
        let at = rng.gen_range(0..data.len());
        let n = rng.gen_range(1..=64).min(data.len() - at);
        data[at..at + n].copy_from_slice(&random_bytes(n, rng));
        format!("{n} bytes overwritten at {at}")
    }
}

fn truncate(rng: &mut Rand, data: &mut Vec<u8>) -> String {
    let at = rng.gen_range(0..data.len());
    data.truncate(at);
    format!("cut at {at}")
}

fn insert_run(rng: &mut Rand, data: &mut Vec<u8>) -> String {
    let at = rng.gen_range(0..=data.len());
    let n = *pick(&[1, 3, 511, 512, 513, 1024, rng.gen_range(1..=1500)], rng);
    // Zeros make end-of-archive blocks and empty fields; random bytes make garbage.
    let run = if rng.gen_bool(0.3) { vec![0u8; n] } else { random_bytes(n, rng) };
    data.splice(at..at, run);
    format!("{n} bytes inserted at {at}")
}

fn delete_run(rng: &mut Rand, data: &mut Vec<u8>) -> String {
    let at = rng.gen_range(0..data.len());
    let n = (*pick(&[1, 2, 511, 512, 513, rng.gen_range(1..=1500)], rng)).min(data.len() - at);
    data.drain(at..at + n);
    format!("{n} bytes deleted at {at}")
}

/// The header checksum made right again (so that the mutated field is believed).
fn fix_checksum(header: &mut [u8]) {
    header[148..156].copy_from_slice(b"        ");
    let sum: u32 = header[..512].iter().map(|&b| b as u32).sum();
    header[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// A member's header in the valid shard: (its index, its offset).
fn header_of(rng: &mut Rand, base: &Base) -> (usize, usize) {
    let i = rng.gen_range(0..base.members.len());
    (i, base.members[i].1)
}

fn tar_size(rng: &mut Rand, base: &Base, tar: &mut [u8]) -> String {
    let (i, h) = header_of(rng, base);
    let size = base.members[i].2.len() as i64;
    let field: Vec<u8> = match rng.gen_range(0..7) {
        0 => format!("{:011o}\0", (size + rng.gen_range(-600..=600)).max(0)).into_bytes(),
        1 => format!("{:011o}\0", *pick(&[0, base.max_member - 1, base.max_member, base.max_member + 1], rng))
            .into_bytes(),
        2 => format!("{:011o}\0", rng.gen_range(0..8u64.pow(11))).into_bytes(),
        // GNU base-256, up to far beyond u64.
        3 => [vec![0x80], random_bytes(11, rng)].concat(),
        4 => [vec![0xff], vec![0xff; 11]].concat(),
        5 => b"9x9 garbage!".to_vec(),
        _ => b"            ".to_vec(),
    };
    tar[h + 124..h + 136].copy_from_slice(&field);
    let fixed = rng.gen_bool(0.8);
    if fixed {
        fix_checksum(&mut tar[h..h + 512]);
    }
    format!("size field of member {i} = {field:?} (checksum fixed: {fixed})")
}

fn tar_checksum(rng: &mut Rand, base: &Base, tar: &mut [u8]) -> String {
    let (i, h) = header_of(rng, base);
    let field: Vec<u8> = match rng.gen_range(0..4) {
        0 => random_bytes(8, rng),
        1 => b"        ".to_vec(),
        2 => [vec![0x80], random_bytes(7, rng)].concat(),
        _ => {
            // Right sum, wrong by one.
            fix_checksum(&mut tar[h..h + 512]);
            let mut f = tar[h + 148..h + 156].to_vec();
            f[5] = if f[5] == b'0' { b'1' } else { f[5] - 1 };
            f
        }
    };
    tar[h + 148..h + 156].copy_from_slice(&field);
    format!("checksum of member {i} = {field:?}")
}

fn tar_name(rng: &mut Rand, base: &Base, tar: &mut [u8]) -> String {
    let (i, h) = header_of(rng, base);
    let name: Vec<u8> = match rng.gen_range(0..7) {
        0 => random_bytes(rng.gen_range(1..100), rng),
        1 => b"000000000.jpg".to_vec(), // the first key again
        2 => b"no_extension".to_vec(),
        3 => b".hidden".to_vec(),
        4 => b"dir/sub/".to_vec(),
        5 => [b"k\xff\xfe".as_slice(), b".txt"].concat(),
        _ => {
            let mut n = base.members[i].0.clone().into_bytes();
            let j = rng.gen_range(0..n.len());
            n[j] = rng.gen();
            n
        }
    };
    tar[h..h + 100].fill(0);
    tar[h..h + name.len().min(100)].copy_from_slice(&name[..name.len().min(100)]);
    fix_checksum(&mut tar[h..h + 512]);
    format!("name of member {i} = {name:?}")
}

fn tar_type(rng: &mut Rand, base: &Base, tar: &mut [u8]) -> String {
    let (i, h) = header_of(rng, base);
    // Extended headers (their payload is parsed as records or a name), directories, links, ...
    let flag = *pick(&[b'x', b'L', b'g', b'5', b'1', b'2', b'K', 0, b'7', rng.gen()], rng);
    tar[h + 156] = flag;
    fix_checksum(&mut tar[h..h + 512]);
    format!("type flag of member {i} = {flag:#x}")
}

/// A pax extended header with odd records inserted before a member.
fn pax_header(rng: &mut Rand, base: &Base, tar: &mut Vec<u8>) -> String {
    let (i, h) = header_of(rng, base);
    let records: Vec<u8> = match rng.gen_range(0..5) {
        0 => b"999 path=x.jpg\n".to_vec(),
        1 => b"5 path=\n".to_vec(),
        2 => b"12 path=\xff\xfe.txt\n".to_vec(),
        3 => format!("{} path={}\n", 30, "a".repeat(rng.gen_range(0..40))).into_bytes(),
        _ => random_bytes(rng.gen_range(0..700), rng),
    };
    let mut header = ferroclip_data::tar::ustar_header("pax", records.len() as u64);
    header[156] = b'x';
    fix_checksum(&mut header);
    let mut block = header.to_vec();
    block.extend_from_slice(&records);
    block.resize(block.len().div_ceil(512) * 512, 0);
    tar.splice(h..h, block);
    format!("pax header {records:?} before member {i}")
}

/// (offset, marker, length field) of each segment up to the scan; the offset of the scan data.
fn jpeg_segments(jpg: &[u8]) -> (Vec<(usize, u8, usize)>, usize) {
    let mut segments = Vec::new();
    let mut i = 2;
    while i + 4 <= jpg.len() && jpg[i] == 0xff {
        let marker = jpg[i + 1];
        let len = u16::from_be_bytes([jpg[i + 2], jpg[i + 3]]) as usize;
        segments.push((i, marker, len));
        i += 2 + len;
        if marker == 0xda {
            break;
        }
    }
    (segments, i.min(jpg.len()))
}

/// A mutation aimed at the JPEG structure; the description says which.
fn mutate_jpeg(rng: &mut Rand, jpg: &mut Vec<u8>) -> String {
    let (segments, scan) = jpeg_segments(jpg);
    assert!(segments.len() >= 4 && scan < jpg.len(), "the synthetic JPEGs have tables, a frame and a scan");
    let (at, marker, len) = *pick(&segments, rng);
    match rng.gen_range(0..8) {
        0 => {
            let m = *pick(
                &[0xc0, 0xc1, 0xc2, 0xc3, 0xc4, 0xc9, 0xcc, 0xd8, 0xd9, 0xda, 0xdb, 0xdd, 0x00, 0xff, rng.gen()],
                rng,
            );
            jpg[at + 1] = m;
            format!("segment {marker:#x} at {at} becomes {m:#x}")
        }
        1 => {
            let l =
                *pick(&[0, 1, 2, 3, len.saturating_sub(1), len + 1, len + 100, 0xffff, rng.gen_range(0..0x10000)], rng);
            jpg[at + 2..at + 4].copy_from_slice(&(l as u16).to_be_bytes());
            format!("length of segment {marker:#x} at {at}: {len} → {l}")
        }
        2 => {
            // The frame header: precision, height, width, components and their sampling/tables.
            let (sof, _, sof_len) = *segments.iter().find(|s| (0xc0..=0xc2).contains(&s.1)).expect("a frame");
            let field = rng.gen_range(0..5);
            let what = match field {
                0 => {
                    jpg[sof + 4] = *pick(&[0, 1, 12, 16, 255], rng);
                    "precision"
                }
                1 | 2 => {
                    let v: u16 = *pick(&[0, 1, 7, 0x7fff, 0xffff, rng.gen()], rng);
                    jpg[sof + 5 + 2 * (field - 1)..][..2].copy_from_slice(&v.to_be_bytes());
                    if field == 1 {
                        "height"
                    } else {
                        "width"
                    }
                }
                3 => {
                    jpg[sof + 9] = *pick(&[0, 1, 2, 4, 5, 255], rng);
                    "component count"
                }
                _ => {
                    let j = sof + 10 + rng.gen_range(0..sof_len.saturating_sub(8).max(1));
                    jpg[j.min(sof + 1 + sof_len)] = *pick(&[0x00, 0x11, 0x22, 0x44, 0x99, 0xff, 3, 4, rng.gen()], rng);
                    "component field"
                }
            };
            format!("frame {what}")
        }
        3 => {
            // A byte inside a table (quantization, Huffman) or any other segment's body.
            let body = at + 4 + rng.gen_range(0..len.saturating_sub(2).max(1));
            let body = body.min(jpg.len() - 1);
            jpg[body] = rng.gen();
            format!("byte {body} in segment {marker:#x}")
        }
        4 => {
            // A marker inside the entropy-coded data.
            let m = *pick(&[0xd9, 0xd0, 0xd3, 0xd7, 0xc4, 0xda, 0xd8, 0xff, 0x00], rng);
            let j = rng.gen_range(scan..jpg.len());
            jpg.splice(j..j, [0xff, m]);
            format!("marker {m:#x} inserted in the scan at {j}")
        }
        5 => {
            let j = rng.gen_range(scan..jpg.len());
            jpg.truncate(j);
            format!("cut in the scan at {j}")
        }
        6 => {
            // A segment repeated or dropped.
            let seg = jpg[at..(at + 2 + len).min(jpg.len())].to_vec();
            if rng.gen_bool(0.5) {
                jpg.splice(at..at, seg);
                format!("segment {marker:#x} at {at} doubled")
            } else {
                jpg.drain(at..at + seg.len());
                format!("segment {marker:#x} at {at} dropped")
            }
        }
        _ => {
            let n = rng.gen_range(1..=12);
            for _ in 0..n {
                let j = rng.gen_range(scan..jpg.len());
                jpg[j] = rng.gen();
            }
            format!("{n} scan bytes changed")
        }
    }
}

/// A caption's bytes made invalid UTF-8, or odd but valid text.
fn mutate_caption(rng: &mut Rand, text: &[u8]) -> (String, Vec<u8>) {
    let mut t = text.to_vec();
    let bad: &[&[u8]] =
        &[b"\xff", b"\x80", b"\xc3", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82", b"\xfe\xff"];
    if rng.gen_bool(0.5) {
        let seq = *pick(bad, rng);
        let at = rng.gen_range(0..=t.len());
        t.splice(at..at, seq.iter().copied());
        return (format!("invalid UTF-8 {seq:?} at {at}"), t);
    }
    let pieces = [
        "\u{0}",
        "\u{1b}[31m",
        "\t\r\n",
        "\u{301}\u{302}\u{303}",
        "\u{200b}\u{200f}\u{202e}",
        "\u{fffd}",
        "&amp;",
        "&#x10FFFF;",
        "&#1114112;",
        "&#99999999999999999999;",
        "&#;",
        "&#x;",
        "&",
        "&lt",
        "ﬁ",
        "Ａ",
        "한국어",
        "漢字",
        "🦀👩‍👩‍👧",
        "\u{d7ff}",
        "İ",
        "ß",
        "Ω",
        "â€™",
        "<br/>",
        "   ",
        "a",
    ];
    let s: String = match rng.gen_range(0..4) {
        0 => String::new(),
        1 => " \u{3000}\u{a0}\n".into(),
        2 => "x".repeat(rng.gen_range(1000..20_000)), // one huge word, over max_caption_bytes
        _ => (0..rng.gen_range(1..60)).map(|_| *pick(&pieces, rng)).collect(),
    };
    (format!("caption {:?}", s.chars().take(40).collect::<String>()), s.into_bytes())
}

/// A JSON caption member broken or odd.
fn mutate_json(rng: &mut Rand) -> (String, Vec<u8>) {
    let v: Vec<u8> = match rng.gen_range(0..7) {
        0 => br#"{"caption": 12}"#.to_vec(),
        1 => br#"{"caption": null}"#.to_vec(),
        2 => br#"{"caption": "\ud800 lone surrogate"}"#.to_vec(),
        3 => [b"[".repeat(5000), b"]".repeat(5000)].concat(),
        4 => br#"{"caption": "ok", "caption": "twice"}"#.to_vec(),
        5 => b"{\"caption\": \"\xff\xfe\"}".to_vec(),
        _ => random_bytes(rng.gen_range(0..200), rng),
    };
    (format!("json {:?}", String::from_utf8_lossy(&v[..v.len().min(40)])), v)
}

/// One mutant of the valid shard: what was done, the bytes, and the caption key to read.
struct Mutant {
    seed: u64,
    what: String,
    tar: Vec<u8>,
    caption_key: &'static str,
    max_member: u64,
}

const KINDS: u64 = 16;

fn mutate_once(rng: &mut Rand, base: &Base, kind: u64, tar: &mut Vec<u8>, caption_key: &mut &'static str) -> String {
    match kind {
        0 => flip_bits(rng, tar),
        1 => overwrite(rng, tar),
        2 => truncate(rng, tar),
        3 => insert_run(rng, tar),
        4 => delete_run(rng, tar),
        5 => tar_size(rng, base, tar),
        6 => tar_checksum(rng, base, tar),
        7 => tar_name(rng, base, tar),
        8 => tar_type(rng, base, tar),
        9 => pax_header(rng, base, tar),
        10 | 11 => {
            // Aimed at one image member (the rest of the shard stays valid).
            let jpgs: Vec<usize> = base.of_ext(".jpg").collect();
            let i = *pick(&jpgs, rng);
            let mut jpg = base.members[i].2.clone();
            let what = mutate_jpeg(rng, &mut jpg);
            *tar = base.with_payload(i, jpg);
            format!("member {i}: {what}")
        }
        12 => {
            let txts: Vec<usize> = base.of_ext(".txt").collect();
            let i = *pick(&txts, rng);
            let (what, text) = mutate_caption(rng, &base.members[i].2);
            *tar = base.with_payload(i, text);
            format!("member {i}: {what}")
        }
        13 => {
            let jsons: Vec<usize> = base.of_ext(".json").collect();
            let i = *pick(&jsons, rng);
            let (what, json) = mutate_json(rng);
            *tar = base.with_payload(i, json);
            *caption_key = "json:caption";
            format!("member {i}: {what}")
        }
        14 => {
            // Every image member at once: a shard whose samples are complete but may all be
            // undecodable (a training stream must then end with an error, not pass over it forever).
            let mut payloads: Vec<(&str, Vec<u8>)> = base.members.iter().map(|m| (m.0.as_str(), m.2.clone())).collect();
            let mut whats = Vec::new();
            let cut_all = rng.gen_bool(0.5);
            for (name, data) in payloads.iter_mut().filter(|(n, _)| n.ends_with(".jpg")) {
                let what = if cut_all {
                    // Cut before the scan data: no crop of it decodes.
                    let (_, scan) = jpeg_segments(data);
                    let at = rng.gen_range(2..=scan);
                    data.truncate(at);
                    format!("cut at {at} before the scan")
                } else {
                    mutate_jpeg(rng, data)
                };
                whats.push(format!("{name}: {what}"));
            }
            *tar = write_tar(&payloads.iter().map(|(n, d)| (*n, d.as_slice())).collect::<Vec<_>>());
            whats.join(", ")
        }
        _ => {
            // A few byte-level mutations at once.
            let n = rng.gen_range(2..=4);
            let parts: Vec<String> = (0..n)
                .map(|_| {
                    let kind = rng.gen_range(0..5);
                    mutate_once(rng, base, kind, tar, caption_key)
                })
                .collect();
            parts.join(", ")
        }
    }
}

fn mutant(base: &Base, seed: u64) -> Mutant {
    let mut rng = Rand::seed_from_u64(seed);
    let mut tar = base.tar.clone();
    let mut caption_key = "txt";
    let what = mutate_once(&mut rng, base, seed % KINDS, &mut tar, &mut caption_key);
    if tar.is_empty() {
        tar.push(0);
    }
    Mutant { seed, what, tar, caption_key, max_member: base.max_member }
}

// ---------------------------------------------------------------------------------------------
// Streaming one mutant.

/// What the tar reader itself finds in a shard: key groups, and whether it ended in an error.
fn groups_in(tar: &[u8], max_member: u64) -> (u64, bool) {
    let mut grouper = SampleGrouper::new(tar, max_member);
    let mut groups = 0;
    loop {
        match grouper.next_sample() {
            Ok(Some(_)) => groups += 1,
            Ok(None) => return (groups, false),
            Err(_) => return (groups, true),
        }
    }
}

/// What the loader did with one mutant.
struct Outcome {
    groups: u64,
    reader_failed: bool,
    /// The ordered pass: batch sizes, final stats, the stream's error.
    pass_batches: Vec<usize>,
    pass: StatsSnapshot,
    pass_error: Option<String>,
    /// The training stream.
    train_batches: Vec<usize>,
    train: StatsSnapshot,
    train_error: Option<String>,
}

fn loader_cfg(m: &Mutant, train: bool) -> DataConfig {
    DataConfig {
        workers: 2,
        readers: 1,
        shuffle_buffer: 4,
        prefetch: 2,
        caption_key: m.caption_key.into(),
        max_member_bytes: m.max_member,
        train_num_samples: if train { (BATCH * TRAIN_BATCHES) as u64 } else { 0 },
        ..DataConfig::default()
    }
}

fn stream(
    m: &Mutant,
    path: &str,
    mode: Mode,
    tokenizer: &Arc<dyn Tokenizer>,
) -> (Vec<usize>, StatsSnapshot, Option<String>) {
    let train = mode == Mode::Train;
    let cfg = loader_cfg(m, train);
    let opts = LoaderOptions {
        rank: 0,
        world_size: 1,
        seed: m.seed,
        batch_size: BATCH,
        mode,
        transform: Arc::new(TrainTransform::new(IMAGE_SIZE, &AugmentConfig::default(), cfg.max_image_pixels)),
        tokenizer: tokenizer.clone(),
        label_key: None,
        resume: None,
        host_alloc: None,
    };
    let mut loader = Loader::new(&cfg, path, opts).unwrap_or_else(|e| panic!("opening {path}: {e}"));
    let mut batches = Vec::new();
    while !(train && batches.len() == TRAIN_BATCHES) {
        match loader.next_batch() {
            Some(b) => {
                assert_eq!(b.images().len(), b.len * 3 * IMAGE_SIZE * IMAGE_SIZE);
                assert_eq!(b.tokens().len(), b.len * tokenizer.context_length());
                batches.push(b.len);
            }
            None => break,
        }
    }
    let error = loader.error().map(|e| e.to_string());
    (batches, loader.stats(), error)
}

fn run_mutant(m: &Mutant, dir: &std::path::Path, tokenizer: &Arc<dyn Tokenizer>) -> Outcome {
    let path = dir.join(format!("m{}.tar", m.seed));
    std::fs::write(&path, &m.tar).unwrap();
    let path = path.display().to_string();
    let (groups, reader_failed) = groups_in(&m.tar, m.max_member);
    let (pass_batches, pass, pass_error) = stream(m, &path, Mode::Eval, tokenizer);
    let (train_batches, train, train_error) = stream(m, &path, Mode::Train, tokenizer);
    let _ = std::fs::remove_file(&path);
    Outcome { groups, reader_failed, pass_batches, pass, pass_error, train_batches, train, train_error }
}

/// Every assertion about one mutant's outcome; `Err` says what is wrong.
fn check(o: &Outcome) -> Result<(), String> {
    let known = |s: &StatsSnapshot| s.skipped.keys().all(|r| REASONS.contains(&r.as_str()));
    if !known(&o.pass) || !known(&o.train) {
        return Err(format!(
            "a skip reason outside the known ones (a caught panic is `panic`): {:?} / {:?}",
            o.pass.skipped, o.train.skipped
        ));
    }
    // The ordered pass: every key group the tar reader finds is delivered or skipped, counted.
    if let Some(e) = &o.pass_error {
        return Err(format!("the ordered pass ended in an error: {e}"));
    }
    let delivered: usize = o.pass_batches.iter().sum();
    if delivered as u64 != o.pass.samples_yielded {
        return Err(format!("{delivered} samples in the batches, {} counted", o.pass.samples_yielded));
    }
    if o.pass.samples_yielded + o.pass.skipped_total() != o.groups {
        return Err(format!(
            "{} delivered + {} skipped ({:?}) for {} key groups in the tar",
            o.pass.samples_yielded,
            o.pass.skipped_total(),
            o.pass.skipped,
            o.groups
        ));
    }
    if (o.pass.shards_opened, o.pass.shards_failed) != (1, o.reader_failed as u64) {
        return Err(format!(
            "shard opened {} times, failed {} times; the tar reader alone {}",
            o.pass.shards_opened,
            o.pass.shards_failed,
            if o.reader_failed { "fails" } else { "reads it to its end" }
        ));
    }
    // Training: full batches until asked to stop, or an error that says why it cannot go on.
    if o.train_batches.iter().any(|&n| n != BATCH) {
        return Err(format!("training batches of {:?} samples", o.train_batches));
    }
    match (&o.train_error, o.train_batches.len()) {
        (None, n) if n == TRAIN_BATCHES => {}
        (Some(e), n) if n < TRAIN_BATCHES && !e.contains("panicked") => {}
        (e, n) => return Err(format!("the training stream gave {n} batches, error {e:?}")),
    }
    Ok(())
}

#[test]
fn mutated_shards_never_panic_or_hang_and_every_sample_is_delivered_or_skipped() {
    record_panics();
    let base = Arc::new(Base::new("shards"));
    let dir = Arc::new(tempdir("mutation-shards"));
    let tokenizer: Arc<dyn Tokenizer> = Arc::new(ClipTokenizer::new());
    let only: Option<u64> = std::env::var("FERROCLIP_MUTANT").ok().map(|s| s.parse().expect("FERROCLIP_MUTANT=SEED"));
    // The valid shard first: all its samples arrive, nothing is skipped (the harness works).
    let control =
        Mutant { seed: 0, what: "none".into(), tar: base.tar.clone(), caption_key: "txt", max_member: base.max_member };
    let seeds: Vec<u64> = match only {
        Some(seed) => vec![seed],
        None => (1..=SHARD_MUTANTS).collect(),
    };
    let (mut totals, mut totals_runs) = ((0u64, 0u64, 0u64, BTreeSet::new()), 0);
    let started = Instant::now();
    let mut seen_panics = PANICS.lock().unwrap().len();
    for m in std::iter::once(control).chain(seeds.into_iter().map(|s| mutant(&base, s))) {
        let (seed, what) = (m.seed, m.what.clone());
        let run = {
            let (dir, tokenizer) = (dir.clone(), tokenizer.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::Builder::new()
                .name(format!("mutant-{seed}"))
                .spawn(move || {
                    let _ = tx.send(run_mutant(&m, &dir, &tokenizer));
                })
                .unwrap();
            rx.recv_timeout(PER_MUTANT)
        };
        let (next, panics) = panics_since(seen_panics, &["data-", "mutant-"]);
        seen_panics = next;
        let name = format!("mutant {seed} ({what}; FERROCLIP_MUTANT={seed} runs it alone)");
        assert!(panics.is_empty(), "{name} panicked: {panics:#?}");
        let outcome = match run {
            Ok(o) => o,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => panic!("{name} hung: not done after {PER_MUTANT:?}"),
            Err(_) => panic!("{name}: the run ended without a result"),
        };
        if let Err(e) = check(&outcome) {
            panic!("{name}: {e}");
        }
        if seed == 0 {
            assert_eq!(
                (outcome.groups, outcome.pass.samples_yielded),
                (SAMPLES as u64, SAMPLES as u64),
                "the valid shard"
            );
            assert!(
                outcome.pass.skipped.is_empty() && outcome.train_error.is_none(),
                "the valid shard: {:?}",
                outcome.pass
            );
        }
        totals.0 += outcome.pass.samples_yielded;
        totals.1 += outcome.pass.skipped_total();
        totals.2 += outcome.reader_failed as u64;
        totals.3.extend(outcome.pass.skipped.keys().cloned());
        totals_runs += 1;
    }
    let (delivered, skipped, failed, reasons) = totals;
    eprintln!(
        "{} mutants in {:.1?}: {delivered} samples delivered, {skipped} skipped ({reasons:?}), {failed} shards cut short",
        totals_runs,
        started.elapsed()
    );
    if only.is_none() {
        // The mutations reach every layer: unreadable tars, undecodable images, bad captions.
        for reason in ["corrupt_image", "bad_caption", "empty_caption", "missing_caption", "member_too_large"] {
            assert!(reasons.contains(reason), "no mutant was skipped as {reason}: {reasons:?}");
        }
        assert!(failed > 10 && delivered > 0 && skipped > 0, "{delivered} / {skipped} / {failed}");
    }
}

// ---------------------------------------------------------------------------------------------
// The decoders directly.

/// Every decoder entry point on `jpg`; `Err` names a result that breaks its contract.
fn decode_all_ways(jpg: &[u8], seed: u64) -> Result<(), String> {
    let limit = 89_478_485;
    let rgb_len = |w: u32, h: u32| w as usize * h as usize * 3;
    if let Ok(img) = ferroclip_data::decode::decode_rgb(jpg, "jpg", limit) {
        if img.pixels.len() != rgb_len(img.width, img.height) {
            return Err(format!("decode_rgb: {} bytes for {}x{}", img.pixels.len(), img.width, img.height));
        }
    }
    let _ = ferroclip_data::decode::probe_size(jpg, "jpg");
    let _ = ferroclip_data::jpeg::header(jpg);
    for (scale, region) in
        [(8, (0, 0, u32::MAX, u32::MAX)), (1, (0, 0, 4, 4)), (4, (3, 5, 17, 9)), (2, (u32::MAX, 0, 1, 1))]
    {
        if let Ok(d) = ferroclip_data::decode::decode_rgb_region(jpg, "jpg", limit, scale, region) {
            if d.img.pixels.len() != rgb_len(d.img.width, d.img.height) {
                return Err(format!("scale {scale}/8, region {region:?}: a short buffer"));
            }
        }
    }
    let mut out = vec![0u8; 3 * IMAGE_SIZE * IMAGE_SIZE];
    let train = TrainTransform::new(IMAGE_SIZE, &AugmentConfig::default(), limit);
    let _ = train.apply(jpg, "jpg", &mut SampleRng::from_seed(seed), &mut out);
    let _ = EvalTransform::new(IMAGE_SIZE, limit).apply(jpg, "jpg", &mut SampleRng::from_seed(seed), &mut out);
    Ok(())
}

#[test]
fn mutated_jpegs_decode_or_fail_but_never_panic_or_hang() {
    let base = Base::new("jpegs");
    let jpegs: Vec<Vec<u8>> = base.jpegs().into_iter().map(<[u8]>::to_vec).collect();
    for jpg in &jpegs {
        decode_all_ways(jpg, 0).unwrap();
        assert!(ferroclip_data::decode::decode_rgb(jpg, "jpg", u64::MAX).is_ok(), "the valid JPEGs decode");
    }
    let (mut decoded, mut failed) = (0, 0);
    for seed in 1..=JPEG_MUTANTS {
        let mut rng = Rand::seed_from_u64(seed ^ 0x4a50_4547);
        let mut jpg = pick(&jpegs, &mut rng).clone();
        let what = match seed % 4 {
            0 => flip_bits(&mut rng, &mut jpg),
            1 => match rng.gen_range(0..4) {
                0 => overwrite(&mut rng, &mut jpg),
                1 => truncate(&mut rng, &mut jpg),
                2 => insert_run(&mut rng, &mut jpg),
                _ => delete_run(&mut rng, &mut jpg),
            },
            _ => mutate_jpeg(&mut rng, &mut jpg),
        };
        let name = format!("JPEG mutant {seed} ({what})");
        let bytes = jpg.clone();
        let result = finishes_within(PER_MUTANT, move || {
            let run = catch_unwind(AssertUnwindSafe(|| decode_all_ways(&bytes, seed)));
            let ok = ferroclip_data::decode::decode_rgb(&bytes, "jpg", 89_478_485).is_ok();
            (run.map_err(|p| ferroclip_data::guard::panic_message(p.as_ref())), ok)
        });
        match result {
            None => panic!("{name} hung: not done after {PER_MUTANT:?}"),
            Some((Err(panic), _)) => panic!("{name} panicked: {panic}"),
            Some((Ok(Err(e)), _)) => panic!("{name}: {e}"),
            Some((Ok(Ok(())), ok)) => {
                if ok {
                    decoded += 1
                } else {
                    failed += 1
                }
            }
        }
    }
    // Both outcomes occur: the mutations are neither all harmless nor all fatal.
    assert!(decoded > 20 && failed > 100, "{decoded} decoded, {failed} refused");
}
