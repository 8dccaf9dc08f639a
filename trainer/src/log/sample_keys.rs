//! `log.sample_keys`: every rank writes the keys of the samples it trains on,
//! `sample_keys/rank{R}.tsv`, one `step<TAB>epoch<TAB>key` line per sample. What a run saw can
//! then be checked after the fact (for instance that every sample of an epoch came exactly once
//! across a resume on another number of ranks).
//!
//! A resumed run appends to the file of its rank after dropping the lines of steps past the
//! checkpoint it resumed from (steps a killed run did but did not save).

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use ferroclip_data::Batch;

/// One rank's key log.
pub struct SampleKeyLog {
    out: BufWriter<File>,
}

impl SampleKeyLog {
    /// `run_dir/sample_keys/rank{rank}.tsv`.
    pub fn path(run_dir: &Path, rank: usize) -> PathBuf {
        run_dir.join("sample_keys").join(format!("rank{rank}.tsv"))
    }

    /// Open this rank's log for appending, keeping only the lines of steps up to `resumed_step`.
    pub fn open(run_dir: &Path, rank: usize, resumed_step: u64) -> io::Result<Self> {
        let path = Self::path(run_dir, rank);
        std::fs::create_dir_all(path.parent().expect("a parent"))?;
        if let Ok(text) = std::fs::read_to_string(&path) {
            let step_of = |line: &str| line.split('\t').next().and_then(|s| s.parse::<u64>().ok());
            let kept: String = text
                .lines()
                .filter(|l| step_of(l).is_some_and(|s| s <= resumed_step))
                .map(|l| format!("{l}\n"))
                .collect();
            std::fs::write(&path, kept)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Self { out: BufWriter::new(file) })
    }

    /// The samples of `batch`, trained on in optimizer step `step`.
    pub fn record(&mut self, step: u64, batch: &Batch) -> io::Result<()> {
        for key in &batch.keys {
            writeln!(self.out, "{step}\t{}\t{key}", batch.epoch)?;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_log_drops_the_steps_after_its_checkpoint() {
        let d = tempfile::tempdir().unwrap();
        let batch = |keys: &[&str], epoch| Batch {
            len: keys.len(),
            image_size: 0,
            context_length: 0,
            keys: keys.iter().map(|k| k.to_string()).collect(),
            epoch,
            ..Default::default()
        };
        let mut log = SampleKeyLog::open(d.path(), 1, 0).unwrap();
        for step in 1..=4 {
            log.record(step, &batch(&[&format!("a{step}"), &format!("b{step}")], 0)).unwrap();
        }
        drop(log);
        let mut log = SampleKeyLog::open(d.path(), 1, 2).unwrap();
        log.record(3, &batch(&["c3"], 1)).unwrap();
        log.flush().unwrap();
        let text = std::fs::read_to_string(SampleKeyLog::path(d.path(), 1)).unwrap();
        assert_eq!(text, "1\t0\ta1\n1\t0\tb1\n2\t0\ta2\n2\t0\tb2\n3\t1\tc3\n");
    }
}
