//! `[optim]` and `[schedule]`: AdamW and the learning rate by step, as OpenCLIP's defaults.

use ferroclip_data::section::Range;
use tch::Tensor;

use crate::optim::adamw::{AdamW, AdamWConfig, OptimError};
use crate::optim::schedule::Schedule;

ferroclip_data::config_section! {
    /// `[optim]`: AdamW. Betas and eps default to OpenCLIP's per-architecture choice.
    pub struct OptimConfig {
        /// Peak learning rate.
        pub lr: f64 = 5e-4 => Range::at_least(0.0),
        /// Decoupled weight decay; not applied where `ndim < 2` or the name contains `bn`, `ln`,
        /// `bias`, `logit_scale` (OpenCLIP 3.3.0's rule, logged at start-up).
        pub weight_decay: f64 = 0.2 => Range::at_least(0.0),
        /// Adam beta1.
        pub beta1: f64 = 0.9 => Range::below(0.0, 1.0),
        /// Adam beta2; unset picks OpenCLIP's: 0.98 for ViT, 0.999 otherwise.
        pub beta2: Option<f64> = None => Range::below(0.0, 1.0),
        /// Adam epsilon; unset picks OpenCLIP's: 1e-6 for ViT, 1e-8 otherwise.
        pub eps: Option<f64> = None => Range::positive(),
    }
}

impl OptimConfig {
    /// (beta2, eps) after applying OpenCLIP's per-architecture defaults (`get_default_params`:
    /// by whether the model name contains "vit").
    pub fn resolved_beta2_eps(&self, arch: &str) -> (f64, f64) {
        let vit = arch.to_ascii_lowercase().contains("vit");
        let beta2 = self.beta2.unwrap_or(if vit { 0.98 } else { 0.999 });
        let eps = self.eps.unwrap_or(if vit { 1e-6 } else { 1e-8 });
        (beta2, eps)
    }

    /// AdamW over `trainable` (name, parameter) pairs of the architecture `arch`.
    pub fn init(&self, trainable: &[(String, Tensor)], arch: &str) -> Result<AdamW, OptimError> {
        let (beta2, eps) = self.resolved_beta2_eps(arch);
        let cfg = AdamWConfig { lr: self.lr, betas: (self.beta1, beta2), eps, weight_decay: self.weight_decay };
        AdamW::new(trainable, cfg)
    }
}

/// `schedule.kind`, as OpenCLIP's `--lr-scheduler`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ScheduleKind {
    /// Linear warmup, then cosine to 0 at the run's last step.
    Cosine,
    /// Linear warmup, then constant.
    Const,
    /// Linear warmup, constant, then a polynomial cooldown over the last `cooldown_steps`.
    ConstCooldown,
}

ferroclip_data::config_section! {
    /// `[schedule]`: the learning rate by optimizer step, as OpenCLIP's `--lr-scheduler`.
    pub struct ScheduleConfig {
        /// `"cosine"` (linear warmup, cosine to 0 at the last step), `"const"` or `"const-cooldown"`.
        pub kind: ScheduleKind = ScheduleKind::Cosine,
        /// Linear warmup steps (OpenCLIP `--warmup`).
        pub warmup_steps: u64 = 10_000,
        /// `const-cooldown`: steps of the final cooldown.
        pub cooldown_steps: u64 = 0,
        /// `const-cooldown`: power of the cooldown curve.
        pub cooldown_power: f64 = 1.0 => Range::positive(),
        /// `const-cooldown`: learning rate at the end.
        pub cooldown_end_lr: f64 = 0.0 => Range::at_least(0.0),
    }
}

impl ScheduleConfig {
    /// The schedule of a run of `total_steps` optimizer steps peaking at `base_lr` (`optim.lr`).
    pub fn init(&self, base_lr: f64, total_steps: u64) -> Schedule {
        let warmup = self.warmup_steps;
        match self.kind {
            ScheduleKind::Cosine => Schedule::Cosine { base_lr, warmup, total_steps },
            ScheduleKind::Const => Schedule::Const { base_lr, warmup },
            ScheduleKind::ConstCooldown => Schedule::ConstCooldown {
                base_lr,
                warmup,
                total_steps,
                cooldown_steps: self.cooldown_steps,
                cooldown_power: self.cooldown_power,
                cooldown_end_lr: self.cooldown_end_lr,
            },
        }
    }
}
