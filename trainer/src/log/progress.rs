//! Training progress for people: an `indicatif` bar when stderr is a terminal, and plain log lines
//! always, because under `srun` (or with stderr redirected to a file) indicatif draws nothing and a
//! redrawn bar would make an unreadable log anyway. Only rank 0 shows anything.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// What one training step reports to people and to the logs.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StepStats {
    /// Optimizer steps done (1-based after the first step).
    pub step: u64,
    /// Steps the run will do in total (0 when unknown).
    pub total_steps: u64,
    /// Samples consumed over all ranks since the start of training (including resumed steps).
    pub samples_seen: u64,
    pub loss: f64,
    pub lr: f64,
    /// `exp(logit_scale)`, the temperature the loss used.
    pub logit_scale: f64,
    /// Global throughput (all ranks) over the last logging interval.
    pub samples_per_s: f64,
}

/// The plain log line, e.g. `step 120/1000 loss 3.2100 lr 1.2e-4 scale 14.3 samples/s 812`.
pub fn format_line(s: &StepStats) -> String {
    let total = if s.total_steps > 0 { format!("/{}", s.total_steps) } else { String::new() };
    format!(
        "step {}{total} loss {:.4} lr {:.1e} scale {:.1} samples/s {:.0}",
        s.step, s.loss, s.lr, s.logit_scale, s.samples_per_s
    )
}

/// A progress bar on a terminal plus plain lines, or nothing when disabled (ranks other than 0).
pub struct Progress {
    bar: Option<ProgressBar>,
    enabled: bool,
}

impl Progress {
    /// Training progress over `total_steps` (0 when unknown: a spinner). `enabled` is false on
    /// every rank but 0.
    pub fn new(total_steps: u64, enabled: bool) -> Self {
        Self::with_style(total_steps, enabled, "{bar:30.cyan/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}")
    }

    /// A bar for a bounded job such as an evaluation pass, labelled with `prefix`.
    pub fn task(prefix: &str, total: u64, enabled: bool) -> Self {
        let p = Self::with_style(
            total,
            enabled,
            "{prefix} {bar:30.green/blue} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        );
        if let Some(bar) = &p.bar {
            bar.set_prefix(prefix.to_string());
        }
        p
    }

    fn with_style(total: u64, enabled: bool, template: &str) -> Self {
        let bar = (enabled && std::io::stderr().is_terminal()).then(|| {
            let bar = if total > 0 { ProgressBar::new(total) } else { ProgressBar::new_spinner() };
            bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(4));
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Self { bar, enabled }
    }

    /// Whether a bar is being drawn (rank 0 on a terminal).
    pub fn has_bar(&self) -> bool {
        self.bar.is_some()
    }

    /// Move the bar to `stats.step` and show loss, lr and throughput; cheap enough for every step.
    pub fn update(&self, stats: &StepStats) {
        if let Some(bar) = &self.bar {
            bar.set_position(stats.step);
            bar.set_message(format!("loss {:.4} lr {:.1e} samples/s {:.0}", stats.loss, stats.lr, stats.samples_per_s));
        }
    }

    /// Advance a [`task`](Self::task) bar by `n`.
    pub fn inc(&self, n: u64) {
        if let Some(bar) = &self.bar {
            bar.inc(n);
        }
    }

    /// Print the plain log line for `stats` (above the bar when there is one).
    pub fn log_line(&self, stats: &StepStats) {
        self.println(&format_line(stats));
    }

    /// Print a message to stderr without tearing the bar.
    pub fn println(&self, msg: &str) {
        if !self.enabled {
            return;
        }
        match &self.bar {
            Some(bar) => bar.suspend(|| eprintln!("{msg}")),
            None => eprintln!("{msg}"),
        }
    }

    /// Remove the bar (its last state stays on screen).
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(bar) = &self.bar {
            if !bar.is_finished() {
                bar.abandon();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_line_has_every_field() {
        let s = StepStats {
            step: 120,
            total_steps: 1000,
            samples_seen: 7680,
            loss: 3.21,
            lr: 1.2e-4,
            logit_scale: 14.28,
            samples_per_s: 812.4,
        };
        assert_eq!(format_line(&s), "step 120/1000 loss 3.2100 lr 1.2e-4 scale 14.3 samples/s 812");
        let open_ended = StepStats { total_steps: 0, ..s };
        assert!(format_line(&open_ended).starts_with("step 120 loss"));
    }

    #[test]
    fn disabled_progress_draws_nothing() {
        let p = Progress::new(10, false);
        assert!(!p.has_bar());
        p.update(&StepStats::default());
        p.log_line(&StepStats::default());
        p.finish();
    }
}
