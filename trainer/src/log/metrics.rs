//! `metrics.jsonl`: one JSON object per log step, for scripts and plots that should not need
//! TensorBoard. Each record is flushed as it is written so a crashed or killed run keeps every
//! line it logged, and a resumed run appends to the same file.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

/// Appends JSON records, one per line, to a file.
pub struct MetricsWriter {
    out: BufWriter<File>,
    path: PathBuf,
}

impl MetricsWriter {
    /// Open `path` for appending (creating it and its parent directory if needed).
    pub fn create(path: impl AsRef<Path>) -> io::Result<Self> {
        let path = path.as_ref().to_path_buf();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(&path)?;
        Ok(Self { out: BufWriter::new(file), path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write one record as a line and flush it.
    pub fn write(&mut self, record: &Map<String, Value>) -> io::Result<()> {
        serde_json::to_writer(&mut self.out, record)?;
        self.out.write_all(b"\n")?;
        self.out.flush()
    }

    /// Write a record built from `step` and `(key, value)` pairs, in that order. Non-finite values
    /// (a NaN loss) become `null`, since JSON has no NaN and the line must stay parseable.
    pub fn write_scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> io::Result<()> {
        self.write(&scalar_record(step, scalars))
    }
}

/// `{"step": step, key: value, ...}` with non-finite values as `null`.
pub fn scalar_record(step: u64, scalars: &[(&str, f64)]) -> Map<String, Value> {
    let mut record = Map::new();
    record.insert("step".to_string(), Value::from(step));
    for &(key, value) in scalars {
        // serde_json maps non-finite f64 to Null; integral counters stay integers for readability.
        let v = if value.is_finite() && value.fract() == 0.0 && value.abs() < 9.0e15 {
            Value::from(value as i64)
        } else {
            Value::from(value)
        };
        record.insert(key.to_string(), v);
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn appends_one_parseable_line_per_record() {
        let dir = std::env::temp_dir().join(format!("ferroclip-metrics-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("metrics.jsonl");
        let mut w = MetricsWriter::create(&path).unwrap();
        w.write_scalars(10, &[("loss", 3.25), ("samples_seen", 640.0), ("lr", f64::NAN)]).unwrap();
        // Visible without dropping the writer: each write is flushed.
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 1);
        drop(w);
        // A second writer (a resumed run) appends rather than truncating.
        let mut w = MetricsWriter::create(&path).unwrap();
        w.write_scalars(20, &[("loss", 2.5)]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["step"], 10);
        assert_eq!(lines[0]["loss"], 3.25);
        assert_eq!(lines[0]["samples_seen"], 640);
        assert!(lines[0]["lr"].is_null());
        assert_eq!(lines[1]["step"], 20);
        assert_eq!(lines[1]["loss"], 2.5);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
