//! Learning-rate schedules by optimizer step, as OpenCLIP's `open_clip_train/scheduler.py`:
//! linear warmup `base_lr * (step + 1) / warmup`, then cosine to zero, constant, or constant with a
//! polynomial cooldown at the end.

/// A learning-rate schedule; [`Schedule::lr_at`] gives the rate of a step (0-based).
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// OpenCLIP `cosine_lr`: warmup, then `0.5 * (1 + cos(pi * e / es)) * base_lr`.
    Cosine { base_lr: f64, warmup: u64, total_steps: u64 },
    /// OpenCLIP `const_lr`: warmup, then `base_lr`.
    Const { base_lr: f64, warmup: u64 },
    /// OpenCLIP `const_lr_cooldown`: warmup, `base_lr`, and over the last `cooldown_steps` a decay
    /// `(1 - e/es)^cooldown_power` from `base_lr` to `cooldown_end_lr`.
    ConstCooldown {
        base_lr: f64,
        warmup: u64,
        total_steps: u64,
        cooldown_steps: u64,
        /// 1.0 is linear (OpenCLIP's default).
        cooldown_power: f64,
        /// OpenCLIP's default 0.0.
        cooldown_end_lr: f64,
    },
}

fn warmup_lr(base_lr: f64, warmup: u64, step: u64) -> f64 {
    base_lr * (step + 1) as f64 / warmup as f64
}

impl Schedule {
    /// The learning rate at optimizer step `step` (0-based, as OpenCLIP's `step`).
    ///
    /// Departures from OpenCLIP only where it would fail: a cosine with `total_steps == warmup`
    /// gives 0 after warmup (OpenCLIP divides by zero), and the cooldown's progress is capped at 1
    /// past `total_steps` (OpenCLIP would raise a negative number to a fractional power).
    pub fn lr_at(&self, step: u64) -> f64 {
        match *self {
            Schedule::Cosine { base_lr, warmup, total_steps } => {
                if step < warmup {
                    return warmup_lr(base_lr, warmup, step);
                }
                let e = (step - warmup) as f64;
                let es = total_steps.saturating_sub(warmup) as f64;
                if es == 0.0 {
                    return 0.0;
                }
                0.5 * (1.0 + (std::f64::consts::PI * e / es).cos()) * base_lr
            }
            Schedule::Const { base_lr, warmup } => {
                if step < warmup {
                    warmup_lr(base_lr, warmup, step)
                } else {
                    base_lr
                }
            }
            Schedule::ConstCooldown {
                base_lr,
                warmup,
                total_steps,
                cooldown_steps,
                cooldown_power,
                cooldown_end_lr,
            } => {
                let start_cooldown = total_steps.saturating_sub(cooldown_steps);
                if step < warmup {
                    warmup_lr(base_lr, warmup, step)
                } else if step < start_cooldown {
                    base_lr
                } else {
                    let e = (step - start_cooldown) as f64;
                    let es = (total_steps - start_cooldown) as f64;
                    let progress = if es == 0.0 { 1.0 } else { (e / es).min(1.0) };
                    let decay = (1.0 - progress).powf(cooldown_power);
                    decay * (base_lr - cooldown_end_lr) + cooldown_end_lr
                }
            }
        }
    }

    /// The peak rate, for logging.
    pub fn base_lr(&self) -> f64 {
        match *self {
            Schedule::Cosine { base_lr, .. }
            | Schedule::Const { base_lr, .. }
            | Schedule::ConstCooldown { base_lr, .. } => base_lr,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} vs {b}");
    }

    /// OpenCLIP's `cosine_lr`, `const_lr` and `const_lr_cooldown` step by step, from
    /// `scripts/gen-schedule-fixtures.py`.
    #[test]
    fn matches_openclips_schedules() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures/optim/schedule.json");
        let text = std::fs::read_to_string(path).expect("run scripts/gen-schedule-fixtures.py");
        let fx: serde_json::Value = serde_json::from_str(&text).unwrap();
        for case in fx["cases"].as_array().unwrap() {
            let u = |k: &str| case[k].as_u64().unwrap();
            let f = |k: &str| case[k].as_f64().unwrap();
            let (base_lr, warmup, total_steps) = (f("base_lr"), u("warmup"), u("steps"));
            let s = match case["kind"].as_str().unwrap() {
                "cosine" => Schedule::Cosine { base_lr, warmup, total_steps },
                "const" => Schedule::Const { base_lr, warmup },
                _ => Schedule::ConstCooldown {
                    base_lr,
                    warmup,
                    total_steps,
                    cooldown_steps: u("cooldown_steps"),
                    cooldown_power: f("cooldown_power"),
                    cooldown_end_lr: f("cooldown_end_lr"),
                },
            };
            let want = case["lr"].as_array().unwrap();
            for (step, lr) in case["at"].as_array().unwrap().iter().zip(want) {
                let (step, lr) = (step.as_u64().unwrap(), lr.as_f64().unwrap());
                let got = s.lr_at(step);
                // To rounding: JSON's decimal floats and the platform's cos/pow.
                assert!((got - lr).abs() <= 1e-12 * lr.abs(), "{s:?} step {step}: {got} vs OpenCLIP's {lr}");
            }
        }
    }

    #[test]
    fn cosine_warms_up_linearly_then_decays_to_zero() {
        let s = Schedule::Cosine { base_lr: 5e-4, warmup: 10, total_steps: 110 };
        close(s.lr_at(0), 5e-4 * 1.0 / 10.0);
        close(s.lr_at(9), 5e-4);
        close(s.lr_at(10), 5e-4); // cos(0)
        close(s.lr_at(60), 0.5 * 5e-4); // half way: cos(pi/2) = 0
        close(s.lr_at(35), 0.5 * (1.0 + (std::f64::consts::PI * 25.0 / 100.0).cos()) * 5e-4);
        assert!(s.lr_at(110).abs() < 1e-18);
    }

    #[test]
    fn const_holds_after_warmup() {
        let s = Schedule::Const { base_lr: 1e-3, warmup: 4 };
        close(s.lr_at(1), 1e-3 * 2.0 / 4.0);
        close(s.lr_at(4), 1e-3);
        close(s.lr_at(1_000_000), 1e-3);
    }

    #[test]
    fn const_cooldown_decays_polynomially_to_end_lr() {
        let s = Schedule::ConstCooldown {
            base_lr: 1e-3,
            warmup: 2,
            total_steps: 20,
            cooldown_steps: 8,
            cooldown_power: 2.0,
            cooldown_end_lr: 1e-5,
        };
        close(s.lr_at(0), 5e-4);
        close(s.lr_at(11), 1e-3);
        close(s.lr_at(12), 1e-3); // e = 0
        let decay = (1.0f64 - 3.0 / 8.0).powf(2.0);
        close(s.lr_at(15), decay * (1e-3 - 1e-5) + 1e-5);
        close(s.lr_at(20), 1e-5);
        close(s.lr_at(25), 1e-5);
        let linear = Schedule::ConstCooldown {
            base_lr: 1.0,
            warmup: 0,
            total_steps: 10,
            cooldown_steps: 4,
            cooldown_power: 1.0,
            cooldown_end_lr: 0.0,
        };
        close(linear.lr_at(8), 0.5);
    }
}
