//! `trainer data-check`: walk every shard once, in order, and report what a training run
//! would see (sample counts, member extensions, skipped samples and why, failed shards).
//!
//! Uses the same source, tar and sample code as the loader and the same panic guard, so a clean
//! report means the loader will read the same samples; the CLI's validator runs the train
//! transform and the tokenizer on each, so a sample that would crash a worker shows up here as
//! `panic`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;

use crate::config::DataConfig;
use crate::error::DataError;
use crate::guard::guarded;
use crate::sample::{Sample, SampleGrouper, SampleSpec};
use crate::source::{expand_shards, open_shard, Activity};

/// How many bad samples the report lists by name.
pub const MAX_LISTED_BAD_SAMPLES: usize = 20;

/// A sample that would be skipped.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BadSample {
    pub shard: String,
    pub key: String,
    pub reason: String,
}

/// What [`check_shards`] found.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct CheckReport {
    /// Shards in the pattern.
    pub shards: u64,
    /// Shards that could not be opened or ended in a read error, with the error.
    pub failed_shards: Vec<(String, String)>,
    /// Key groups found in the tar members.
    pub groups: u64,
    /// Samples a training run would use.
    pub samples: u64,
    /// Member extension → how many members had it.
    pub extensions: BTreeMap<String, u64>,
    /// Skip reason → samples.
    pub skipped: BTreeMap<String, u64>,
    /// The first [`MAX_LISTED_BAD_SAMPLES`] skipped samples.
    pub bad_samples: Vec<BadSample>,
    /// Raw bytes read.
    pub bytes: u64,
}

impl CheckReport {
    fn skip(&mut self, shard: &str, key: &str, reason: &str) {
        *self.skipped.entry(reason.to_string()).or_insert(0) += 1;
        if self.bad_samples.len() < MAX_LISTED_BAD_SAMPLES {
            self.bad_samples.push(BadSample { shard: shard.into(), key: key.into(), reason: reason.into() });
        }
    }
}

/// Decides whether a sample is usable; `Err` gives the skip reason (a stats counter name).
pub type SampleValidator<'a> = &'a dyn Fn(&Sample) -> Result<(), String>;

/// Walk all shards of `shards` (no shuffle). `validate(sample)` decides whether a sample is usable
/// (the CLI runs the train transform and the tokenizer); a panic inside it counts as `panic`.
pub fn check_shards(cfg: &DataConfig, shards: &str, validate: SampleValidator<'_>) -> Result<CheckReport, DataError> {
    cfg.validate()?;
    let weights: &[f64] = if shards == cfg.train { &cfg.train_weights } else { &[] };
    let list = expand_shards(shards, weights)?;
    let spec = SampleSpec::new(cfg, None);
    let bytes = Arc::new(AtomicU64::new(0));
    let activity = Arc::new(Activity::default());
    let mut report = CheckReport { shards: list.len() as u64, ..Default::default() };
    for shard in &list {
        let reader = match open_shard(shard, bytes.clone(), activity.clone()) {
            Ok(r) => r,
            Err(e) => {
                report.failed_shards.push((shard.url.clone(), e.to_string()));
                continue;
            }
        };
        let mut grouper = SampleGrouper::new(reader, cfg.max_member_bytes);
        loop {
            let next = guarded(|| grouper.next_sample())
                .unwrap_or_else(|p| Err(std::io::Error::other(format!("the tar reader panicked: {p}"))));
            match next {
                Ok(Some(raw)) => {
                    report.groups += 1;
                    for ext in raw.members.keys() {
                        *report.extensions.entry(ext.clone()).or_insert(0) += 1;
                    }
                    let key = raw.key.clone();
                    match spec.select(raw) {
                        Ok(sample) => match guarded(|| validate(&sample)) {
                            Ok(Ok(())) => report.samples += 1,
                            Ok(Err(reason)) => report.skip(&shard.url, &key, &reason),
                            Err(_panic) => report.skip(&shard.url, &key, "panic"),
                        },
                        Err(reason) => report.skip(&shard.url, &key, reason.name()),
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    report.failed_shards.push((shard.url.clone(), e.to_string()));
                    break;
                }
            }
        }
    }
    report.bytes = bytes.load(Ordering::Relaxed);
    Ok(report)
}

impl fmt::Display for CheckReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let skipped: u64 = self.skipped.values().sum();
        writeln!(
            f,
            "shards:  {} ({} failed), {:.1} MB read",
            self.shards,
            self.failed_shards.len(),
            self.bytes as f64 / 1e6
        )?;
        writeln!(f, "samples: {} usable of {} keys ({} skipped)", self.samples, self.groups, skipped)?;
        writeln!(f, "extensions:")?;
        for (ext, n) in &self.extensions {
            writeln!(f, "  {ext:<12} {n}")?;
        }
        if !self.skipped.is_empty() {
            writeln!(f, "skipped by reason:")?;
            for (reason, n) in &self.skipped {
                writeln!(f, "  {reason:<20} {n}")?;
            }
        }
        if !self.bad_samples.is_empty() {
            writeln!(f, "first bad samples:")?;
            for b in &self.bad_samples {
                writeln!(f, "  {} {} ({})", b.shard, b.key, b.reason)?;
            }
        }
        for (shard, err) in &self.failed_shards {
            writeln!(f, "failed shard: {shard}: {err}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tar::write_tar;

    #[test]
    fn report_counts_samples_extensions_and_bad_samples() {
        let dir = std::env::temp_dir().join(format!("ferroclip-check-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let tar = write_tar(&[
            ("a.jpg", b"ok"),
            ("a.txt", b"cap"),
            ("a.json", b"{}"),
            ("p.jpg", b"panics"),
            ("p.txt", b"cap"),
            ("b.jpg", b"bad"),
            ("b.txt", b"cap"),
            ("c.txt", b"no image"),
        ]);
        std::fs::write(dir.join("0.tar"), &tar).unwrap();
        std::fs::write(dir.join("1.tar"), &tar[..700]).unwrap();
        let pattern = format!("{}/{{0..1}}.tar", dir.display());
        let validate = |s: &Sample| match s.image.as_slice() {
            b"ok" => Ok(()),
            b"panics" => panic!("decoder bug"),
            _ => Err("corrupt_image".to_string()),
        };
        let r = check_shards(&DataConfig::default(), &pattern, &validate).unwrap();
        assert_eq!((r.shards, r.samples, r.groups, r.failed_shards.len()), (2, 1, 4, 1));
        assert_eq!(r.extensions.get("txt"), Some(&4));
        assert_eq!(r.extensions.get("json"), Some(&1));
        assert_eq!(r.skipped.get("corrupt_image"), Some(&1));
        assert_eq!(r.skipped.get("missing_image"), Some(&1));
        assert_eq!(r.skipped.get("panic"), Some(&1));
        let shard = format!("{}/0.tar", dir.display());
        let bad = |key: &str, reason: &str| BadSample { shard: shard.clone(), key: key.into(), reason: reason.into() };
        assert_eq!(r.bad_samples[..2], [bad("p", "panic"), bad("b", "corrupt_image")]);
        let text = r.to_string();
        assert!(text.contains("1 usable of 4 keys") && text.contains("failed shard"), "{text}");
        assert!(text.contains("missing_image") && text.contains("panic"), "{text}");
    }
}
