//! WebDataset samples: consecutive tar members sharing a key, reduced to (image, caption).
//!
//! Grouping follows webdataset's `base_plus_ext` / `group_by_keys` (`tariterators.py`): the key
//! is the member path up to the first dot of its file name, the rest is the extension
//! (lower-cased here); a new key starts a new sample. Selection follows OpenCLIP's
//! `rename(image="jpg;png;jpeg;webp", text="txt")`: the first image extension present wins.
//!
//! Samples are numbered in shard order (their *ordinal*, counting every key group, usable or
//! not) and know the tar offsets where they start and where the next one starts: that is how a
//! cursor names a position in a shard and how a resume gets back to it without reading what
//! lies before.

use std::collections::BTreeMap;
use std::io;

use crate::config::DataConfig;
use crate::tar::{Payload, ShardStream, TarReader};

/// All members of one key, by extension.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawSample {
    pub key: String,
    /// extension → payload.
    pub members: BTreeMap<String, Payload>,
    /// Index of this key group in the shard (from the grouper's starting ordinal).
    pub ordinal: u64,
    /// Tar offset of the group's first member header.
    pub offset: u64,
    /// Tar offset where the next group starts (or the archive ends).
    pub end: u64,
}

/// Split a member path into (key, extension); `None` for names without an extension.
pub fn key_and_ext(name: &str) -> Option<(&str, String)> {
    let slash = name.rfind('/').map_or(0, |i| i + 1);
    let dot = name[slash..].find('.')? + slash;
    if dot == slash {
        return None; // hidden files such as `.DS_Store` have no key
    }
    Some((&name[..dot], name[dot + 1..].to_ascii_lowercase()))
}

/// Groups the members of a tar stream into [`RawSample`]s.
pub struct SampleGrouper<R> {
    tar: TarReader<R>,
    pending: Option<RawSample>,
    /// Ordinal of the next group to start.
    next_ordinal: u64,
}

impl<R: ShardStream> SampleGrouper<R> {
    /// The samples of a whole shard; members over `max_member_bytes` are not read.
    pub fn new(reader: R, max_member_bytes: u64) -> Self {
        Self::over(TarReader::new(reader, max_member_bytes), 0)
    }

    /// The samples of `tar` (positioned at a group boundary), numbered from `ordinal`.
    pub fn over(tar: TarReader<R>, ordinal: u64) -> Self {
        Self { tar, pending: None, next_ordinal: ordinal }
    }

    /// Ordinal of the next key group: after the end, how many groups the shard holds.
    pub fn next_ordinal(&self) -> u64 {
        self.next_ordinal
    }

    /// The next complete sample, `Ok(None)` at the end. After an `Err` the rest of the
    /// stream is unusable; the sample under construction is dropped (it may be incomplete).
    pub fn next_sample(&mut self) -> io::Result<Option<RawSample>> {
        self.next_sample_skipping(&|_| false)
    }

    /// Like [`next_sample`](Self::next_sample), but every member of a sample whose ordinal
    /// satisfies `skip` is passed over unread (seeked over where the stream allows): such
    /// samples come back with [`Payload::Skipped`] members, so positions stay known.
    pub fn next_sample_skipping(&mut self, skip: &dyn Fn(u64) -> bool) -> io::Result<Option<RawSample>> {
        loop {
            let (pending, next_ordinal) = (&self.pending, self.next_ordinal);
            let mut skip_member = |name: &str| match key_and_ext(name) {
                Some((key, _)) => match pending {
                    Some(s) if s.key == key => skip(s.ordinal),
                    _ => skip(next_ordinal),
                },
                None => true,
            };
            let Some(member) = self.tar.next_member(&mut skip_member)? else {
                let end = self.tar.position();
                return Ok(self.pending.take().map(|s| RawSample { end, ..s }));
            };
            let Some((key, ext)) = key_and_ext(&member.name) else { continue };
            match &mut self.pending {
                Some(s) if s.key == key => {
                    // A repeated extension within a key keeps the first (webdataset raises).
                    s.members.entry(ext).or_insert(member.payload);
                }
                _ => {
                    let mut next = RawSample {
                        key: key.to_string(),
                        members: BTreeMap::new(),
                        ordinal: self.next_ordinal,
                        offset: member.offset,
                        end: member.offset,
                    };
                    self.next_ordinal += 1;
                    next.members.insert(ext, member.payload);
                    if let Some(done) = self.pending.replace(next) {
                        return Ok(Some(RawSample { end: member.offset, ..done }));
                    }
                }
            }
        }
    }
}

/// Which members make a training sample.
#[derive(Debug, Clone)]
pub struct SampleSpec {
    pub image_exts: Vec<String>,
    /// Member extension holding the caption.
    pub caption_ext: String,
    /// When set, the caption is this string field of the JSON member `caption_ext`.
    pub caption_field: Option<String>,
    /// Member holding an integer class label (e.g. `cls`), when labels are wanted.
    pub label_ext: Option<String>,
    /// Captions are cut to this many bytes (at a character boundary) before anything else
    /// touches them.
    pub max_caption_bytes: usize,
}

impl SampleSpec {
    pub fn new(cfg: &DataConfig, label_key: Option<&str>) -> Self {
        let ck = cfg.caption_key.trim();
        let (caption_ext, caption_field) = match ck.split_once(':') {
            Some((ext, field)) => (ext.to_ascii_lowercase(), Some(field.to_string())),
            None => (ck.to_ascii_lowercase(), None),
        };
        Self {
            image_exts: cfg.image_extensions(),
            caption_ext,
            caption_field,
            label_ext: label_key.map(|k| k.trim().to_ascii_lowercase()),
            max_caption_bytes: cfg.max_caption_bytes,
        }
    }
}

/// `bytes` as UTF-8, cut to at most `max` bytes at a character boundary; `None` when the kept
/// part is not UTF-8 (a character split by the cut is dropped, not an error).
pub fn truncated_utf8(bytes: &[u8], max: usize) -> Option<&str> {
    let head = &bytes[..bytes.len().min(max)];
    match std::str::from_utf8(head) {
        Ok(s) => Some(s),
        // `error_len() == None`: the input ends inside a character, i.e. the cut split it.
        Err(e) if e.error_len().is_none() && head.len() < bytes.len() => {
            Some(std::str::from_utf8(&head[..e.valid_up_to()]).expect("valid prefix"))
        }
        Err(_) => None,
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
fn truncate_str(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// A sample ready for the image transform and the tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub key: String,
    /// The encoded image member.
    pub image: Vec<u8>,
    pub image_ext: String,
    pub caption: String,
    pub label: Option<i64>,
}

/// Why a grouped sample cannot be used; the stable names are the stats counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SkipReason {
    MissingImage,
    MissingCaption,
    BadCaption,
    EmptyCaption,
    MissingLabel,
    MemberTooLarge,
}

impl SkipReason {
    pub fn name(self) -> &'static str {
        match self {
            SkipReason::MissingImage => "missing_image",
            SkipReason::MissingCaption => "missing_caption",
            SkipReason::BadCaption => "bad_caption",
            SkipReason::EmptyCaption => "empty_caption",
            SkipReason::MissingLabel => "missing_label",
            SkipReason::MemberTooLarge => "member_too_large",
        }
    }
}

impl SampleSpec {
    /// Pick image, caption (and label) from a grouped sample.
    pub fn select(&self, mut raw: RawSample) -> Result<Sample, SkipReason> {
        let image_ext =
            self.image_exts.iter().find(|e| raw.members.contains_key(*e)).ok_or(SkipReason::MissingImage)?.clone();
        let caption_bytes = raw.members.get(&self.caption_ext).ok_or(SkipReason::MissingCaption)?;
        let caption_bytes = caption_bytes.bytes().ok_or(SkipReason::MemberTooLarge)?;
        let caption = match &self.caption_field {
            None => truncated_utf8(caption_bytes, self.max_caption_bytes).ok_or(SkipReason::BadCaption)?.to_string(),
            Some(field) => {
                let v: serde_json::Value = serde_json::from_slice(caption_bytes).map_err(|_| SkipReason::BadCaption)?;
                match v.get(field) {
                    Some(serde_json::Value::String(s)) => truncate_str(s.clone(), self.max_caption_bytes),
                    Some(serde_json::Value::Null) | None => return Err(SkipReason::MissingCaption),
                    Some(_) => return Err(SkipReason::BadCaption),
                }
            }
        };
        if caption.trim().is_empty() {
            return Err(SkipReason::EmptyCaption);
        }
        let label = match &self.label_ext {
            None => None,
            Some(ext) => {
                let bytes = raw.members.get(ext).and_then(|b| b.bytes()).ok_or(SkipReason::MissingLabel)?;
                let text = std::str::from_utf8(bytes).map_err(|_| SkipReason::MissingLabel)?;
                Some(text.trim().parse::<i64>().map_err(|_| SkipReason::MissingLabel)?)
            }
        };
        let image = match raw.members.remove(&image_ext) {
            Some(Payload::Bytes(b)) => b,
            _ => return Err(SkipReason::MemberTooLarge),
        };
        Ok(Sample { key: raw.key, image, image_ext, caption, label })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tar::write_tar;

    #[test]
    fn key_is_path_up_to_first_dot_of_the_file_name() {
        assert_eq!(key_and_ext("a.b/x/000.seg.JPG"), Some(("a.b/x/000", "seg.jpg".to_string())));
        assert_eq!(key_and_ext("000000001.txt"), Some(("000000001", "txt".to_string())));
        assert_eq!(key_and_ext("README"), None);
        assert_eq!(key_and_ext("d/.hidden"), None);
    }

    #[test]
    fn consecutive_members_group_and_selection_follows_priorities() {
        let tar = write_tar(&[
            ("0.png", b"P"),
            ("0.jpg", b"J"),
            ("0.json", br#"{"caption": "from json"}"#),
            ("0.txt", b"from txt"),
            ("1.txt", b"no image"),
            ("2.jpg", b"J2"),
            ("2.txt", b"   "),
        ]);
        let mut g = SampleGrouper::new(&tar[..], 1 << 20);
        let mut raws = Vec::new();
        while let Some(s) = g.next_sample().unwrap() {
            raws.push(s);
        }
        assert_eq!(raws.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(), ["0", "1", "2"]);
        let mut cfg = DataConfig::default();
        let spec = SampleSpec::new(&cfg, None);
        let s = spec.select(raws[0].clone()).unwrap();
        assert_eq!((s.image, s.image_ext.as_str(), s.caption.as_str()), (b"J".to_vec(), "jpg", "from txt"));
        assert_eq!(spec.select(raws[1].clone()), Err(SkipReason::MissingImage));
        assert_eq!(spec.select(raws[2].clone()), Err(SkipReason::EmptyCaption));
        cfg.caption_key = "json:caption".into();
        cfg.image_keys = "png;jpg".into();
        let s = SampleSpec::new(&cfg, None).select(raws[0].clone()).unwrap();
        assert_eq!((s.image, s.caption.as_str()), (b"P".to_vec(), "from json"));
        assert_eq!(SampleSpec::new(&cfg, Some("cls")).select(raws[0].clone()), Err(SkipReason::MissingLabel));
    }

    #[test]
    fn samples_know_their_ordinals_and_offsets_and_skipped_ones_are_not_read() {
        let members: [(&str, &[u8]); 5] =
            [("a.jpg", &[1u8; 700]), ("a.txt", b"A"), ("b.jpg", &[2u8; 10]), ("b.txt", b"B"), ("c.txt", b"C")];
        let tar = write_tar(&members);
        let mut g = SampleGrouper::new(&tar[..], 1 << 20);
        let mut all = Vec::new();
        while let Some(s) = g.next_sample_skipping(&|ord| ord == 1).unwrap() {
            all.push(s);
        }
        let got: Vec<(&str, u64, u64, u64)> =
            all.iter().map(|s| (s.key.as_str(), s.ordinal, s.offset, s.end)).collect();
        // a: header + 2 blocks, header + 1 block; b: two headers + two blocks; c: header + block.
        assert_eq!(got, [("a", 0, 0, 2560), ("b", 1, 2560, 4608), ("c", 2, 4608, 5632)]);
        assert!(all[1].members.values().all(|p| *p == Payload::Skipped));
        assert_eq!(all[2].members["txt"], Payload::Bytes(b"C".to_vec()));

        // Starting again at b's offset gives the same samples from ordinal 1 on.
        let tar_at = TarReader::starting_at(&tar[..], 2560, 1 << 20).unwrap();
        let mut g = SampleGrouper::over(tar_at, 1);
        let b = g.next_sample().unwrap().unwrap();
        assert_eq!((b.key.as_str(), b.ordinal, b.offset), ("b", 1, 2560));
        assert_eq!(b.members["txt"], Payload::Bytes(b"B".to_vec()));
    }

    #[test]
    fn captions_are_cut_at_a_character_boundary_before_use() {
        assert_eq!(truncated_utf8("héllo".as_bytes(), 2), Some("h"));
        assert_eq!(truncated_utf8("héllo".as_bytes(), 3), Some("hé"));
        assert_eq!(truncated_utf8(b"ok", 10), Some("ok"));
        assert_eq!(truncated_utf8(&[b'a', 0xff, b'b'], 10), None);
        let long = "word ".repeat(100_000);
        let json = format!(r#"{{"caption": "{long}"}}"#);
        let tar = write_tar(&[("k.jpg", b"J"), ("k.txt", long.as_bytes()), ("k.json", json.as_bytes())]);
        let raw = SampleGrouper::new(&tar[..], 1 << 30).next_sample().unwrap().unwrap();
        for key in ["txt", "json:caption"] {
            let cfg = DataConfig { caption_key: key.into(), max_caption_bytes: 12, ..DataConfig::default() };
            assert_eq!(SampleSpec::new(&cfg, None).select(raw.clone()).unwrap().caption, "word word wo", "{key}");
        }
    }
}
