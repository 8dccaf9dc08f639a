//! WebDataset samples: consecutive tar members sharing a key, reduced to (image, caption).
//!
//! Grouping follows webdataset's `base_plus_ext` / `group_by_keys` (`tariterators.py`): the key
//! is the member path up to the first dot of its file name, the rest is the extension
//! (lower-cased here); a new key starts a new sample. Selection follows OpenCLIP's
//! `rename(image="jpg;png;jpeg;webp", text="txt")`: the first image extension present wins.

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
}

impl<R: ShardStream> SampleGrouper<R> {
    pub fn new(reader: R) -> Self {
        Self { tar: TarReader::new(reader), pending: None }
    }

    /// The next complete sample, `Ok(None)` at the end. After an `Err` the rest of the
    /// stream is unusable; the sample under construction is dropped (it may be incomplete).
    pub fn next_sample(&mut self) -> io::Result<Option<RawSample>> {
        self.next_sample_deferring(&[])
    }

    /// Like [`next_sample`](Self::next_sample), but members with an extension in `defer` are
    /// seeked over where the stream allows it (see [`Payload::At`]).
    pub fn next_sample_deferring(&mut self, defer: &[String]) -> io::Result<Option<RawSample>> {
        let defer_fn = |name: &str| !defer.is_empty() && key_and_ext(name).is_some_and(|(_, e)| defer.contains(&e));
        loop {
            let Some(member) = self.tar.next_member(&defer_fn)? else {
                return Ok(self.pending.take());
            };
            let Some((key, ext)) = key_and_ext(&member.name) else { continue };
            match &mut self.pending {
                Some(s) if s.key == key => {
                    // A repeated extension within a key keeps the first (webdataset raises).
                    s.members.entry(ext).or_insert(member.payload);
                }
                _ => {
                    let mut next = RawSample { key: key.to_string(), members: BTreeMap::new() };
                    next.members.insert(ext, member.payload);
                    if let Some(done) = self.pending.replace(next) {
                        return Ok(Some(done));
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
        }
    }
}

/// A sample ready for the image transform and the tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub key: String,
    /// The image member: bytes, or where to read them (deferred during a resume fast-forward).
    pub image: Payload,
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
        let image_ext = self.image_exts.iter().find(|e| raw.members.contains_key(*e)).ok_or(SkipReason::MissingImage)?.clone();
        let caption_bytes = raw.members.get(&self.caption_ext).ok_or(SkipReason::MissingCaption)?;
        let caption_bytes = caption_bytes.bytes().ok_or(SkipReason::MemberTooLarge)?;
        let caption = match &self.caption_field {
            None => std::str::from_utf8(caption_bytes).map_err(|_| SkipReason::BadCaption)?.to_string(),
            Some(field) => {
                let v: serde_json::Value = serde_json::from_slice(caption_bytes).map_err(|_| SkipReason::BadCaption)?;
                match v.get(field) {
                    Some(serde_json::Value::String(s)) => s.clone(),
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
        let image = raw.members.remove(&image_ext).expect("present");
        if image == Payload::TooLarge {
            return Err(SkipReason::MemberTooLarge);
        }
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
        let mut g = SampleGrouper::new(&tar[..]);
        let mut raws = Vec::new();
        while let Some(s) = g.next_sample().unwrap() {
            raws.push(s);
        }
        assert_eq!(raws.iter().map(|s| s.key.as_str()).collect::<Vec<_>>(), ["0", "1", "2"]);
        let mut cfg = DataConfig::default();
        let spec = SampleSpec::new(&cfg, None);
        let s = spec.select(raws[0].clone()).unwrap();
        assert_eq!((s.image, s.image_ext.as_str(), s.caption.as_str()), (Payload::Bytes(b"J".to_vec()), "jpg", "from txt"));
        assert_eq!(spec.select(raws[1].clone()), Err(SkipReason::MissingImage));
        assert_eq!(spec.select(raws[2].clone()), Err(SkipReason::EmptyCaption));
        cfg.caption_key = "json:caption".into();
        cfg.image_keys = "png;jpg".into();
        let s = SampleSpec::new(&cfg, None).select(raws[0].clone()).unwrap();
        assert_eq!((s.image, s.caption.as_str()), (Payload::Bytes(b"P".to_vec()), "from json"));
        assert_eq!(SampleSpec::new(&cfg, Some("cls")).select(raws[0].clone()), Err(SkipReason::MissingLabel));
    }
}
