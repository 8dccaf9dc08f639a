//! Run logging on rank 0: TensorBoard scalars ([`tensorboard`]), `metrics.jsonl` ([`metrics`]) and
//! progress for people ([`progress`]), joined in [`RunLogger`] so the training loop makes one call
//! per log step. Tag names follow OpenCLIP's `open_clip_train/train.py` grouping (`train/...`).

pub mod metrics;
pub mod progress;
pub mod sample_keys;
pub mod tensorboard;

use std::collections::BTreeMap;
use std::io;
use std::path::Path;

pub use metrics::MetricsWriter;
pub use progress::{Progress, StepStats};
pub use sample_keys::SampleKeyLog;
pub use tensorboard::TensorBoardWriter;

/// Everything a run writes for monitoring. On ranks other than 0 (`enabled == false`) every
/// method is a no-op and no file is created.
pub struct RunLogger {
    tensorboard: Option<TensorBoardWriter>,
    metrics: Option<MetricsWriter>,
    progress: Progress,
}

impl RunLogger {
    /// Log under `run_dir`: event files in `run_dir/tensorboard/`, records appended to
    /// `run_dir/metrics.jsonl`, and a progress bar over `total_steps` (0 when unknown).
    pub fn create(run_dir: impl AsRef<Path>, total_steps: u64, enabled: bool) -> io::Result<Self> {
        if !enabled {
            return Ok(Self::disabled());
        }
        let run_dir = run_dir.as_ref();
        Ok(Self {
            tensorboard: Some(TensorBoardWriter::create(run_dir.join("tensorboard"))?),
            metrics: Some(MetricsWriter::create(run_dir.join("metrics.jsonl"))?),
            progress: Progress::new(total_steps, true),
        })
    }

    /// A logger that records nothing (non-zero ranks, tests).
    pub fn disabled() -> Self {
        Self { tensorboard: None, metrics: None, progress: Progress::new(0, false) }
    }

    pub fn is_enabled(&self) -> bool {
        self.metrics.is_some()
    }

    /// The progress display, e.g. to print an evaluation table without tearing the bar.
    pub fn progress(&self) -> &Progress {
        &self.progress
    }

    /// Record `(key, value)` pairs at `step` as one `metrics.jsonl` line (`{"step": .., key: ..}`)
    /// and as TensorBoard scalars. A key without a `/` is a training metric and gets the tag
    /// `train/{key}`; a key with one (`eval/zeroshot_top1`) is used as the tag unchanged.
    pub fn log_scalars(&mut self, step: u64, scalars: &[(&str, f64)]) -> io::Result<()> {
        if let Some(tb) = &mut self.tensorboard {
            for &(key, value) in scalars {
                if key.contains('/') {
                    tb.add_scalar(key, value, step)?;
                } else {
                    tb.add_scalar(&format!("train/{key}"), value, step)?;
                }
            }
            tb.flush()?;
        }
        if let Some(m) = &mut self.metrics {
            m.write_scalars(step, scalars)?;
        }
        Ok(())
    }

    /// A training log step: the standard record (`samples_seen`, `loss`, `lr`, `logit_scale`,
    /// `samples_per_s`) plus `extra` scalars (grad norm, data-wait fraction, ...) to TensorBoard and
    /// `metrics.jsonl`, and the plain log line.
    pub fn log_train(&mut self, stats: &StepStats, extra: &[(&str, f64)]) -> io::Result<()> {
        let mut scalars: Vec<(&str, f64)> = vec![
            ("samples_seen", stats.samples_seen as f64),
            ("loss", stats.loss),
            ("lr", stats.lr),
            ("logit_scale", stats.logit_scale),
            ("samples_per_s", stats.samples_per_s),
        ];
        scalars.extend_from_slice(extra);
        self.log_scalars(stats.step, &scalars)?;
        self.progress.update(stats);
        self.progress.log_line(stats);
        Ok(())
    }

    /// Move the progress bar (every step; writes no file).
    pub fn tick(&self, stats: &StepStats) {
        self.progress.update(stats);
    }

    /// Record evaluation results at `step` under `eval/{key}` (TensorBoard tag and jsonl key).
    pub fn log_eval(&mut self, step: u64, results: &BTreeMap<String, f64>) -> io::Result<()> {
        let keys: Vec<String> = results.keys().map(|k| format!("eval/{k}")).collect();
        let scalars: Vec<(&str, f64)> = keys.iter().map(String::as_str).zip(results.values().copied()).collect();
        self.log_scalars(step, &scalars)
    }

    /// Print a message (e.g. an evaluation table) on rank 0 without tearing the bar.
    pub fn println(&self, msg: &str) {
        self.progress.println(msg);
    }

    pub fn finish(&mut self) -> io::Result<()> {
        self.progress.finish();
        if let Some(tb) = &mut self.tensorboard {
            tb.flush()?;
        }
        Ok(())
    }
}
