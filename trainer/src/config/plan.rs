//! What a run derives from its config at a world size: the global batch, the optimizer steps
//! (`train.max_steps`, or OpenCLIP's epoch arithmetic for `train.epochs`), the samples it will see
//! and the warmup's share. Derived here only: training and `trainer show-config` both read them
//! from [`RunPlan`].

use super::{Config, ScheduleKind};

/// Optimizer steps of a run that sets neither `train.max_steps` nor `train.epochs`.
pub const DEFAULT_STEPS: u64 = 1000;

/// The derived totals of a run on `world` ranks.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunPlan {
    pub world: usize,
    /// Samples per optimizer step over all ranks: `data.batch_size × train.accum_freq × world`.
    pub global_batch: u64,
    /// OpenCLIP's optimizer steps per epoch, with `train.epochs`.
    pub steps_per_epoch: Option<u64>,
    /// Optimizer steps of the whole run.
    pub total_steps: u64,
    /// Samples the run trains on: `total_steps × global_batch`.
    pub samples: u64,
    /// `schedule.warmup_steps / total_steps`.
    pub warmup_share: f64,
}

impl RunPlan {
    /// The plan of `cfg` on `world` ranks, or the first key that makes it impossible.
    pub fn new(cfg: &Config, world: usize) -> Result<RunPlan, String> {
        let t = &cfg.train;
        let micro_batch = (cfg.data.batch_size * world) as u64;
        let global_batch = micro_batch * t.accum_freq as u64;
        let steps_per_epoch = match t.epochs {
            None => None,
            Some(_) if cfg.data.train_num_samples == 0 => {
                return Err("key `train.epochs`: needs data.train_num_samples (the samples of one epoch)".into())
            }
            Some(_) => {
                let batches =
                    openclip_batches_per_epoch(cfg.data.train_num_samples, micro_batch, cfg.data.workers as u64);
                let steps = batches / t.accum_freq as u64;
                if steps == 0 {
                    return Err(format!(
                        "key `train.epochs`: an epoch of {} samples is less than one optimizer step of {global_batch}",
                        cfg.data.train_num_samples
                    ));
                }
                Some(steps)
            }
        };
        let total_steps = match (t.max_steps, t.epochs, steps_per_epoch) {
            (Some(steps), _, _) => steps,
            (None, Some(epochs), Some(per_epoch)) => epochs * per_epoch,
            _ => DEFAULT_STEPS,
        };
        let s = &cfg.schedule;
        if s.kind == ScheduleKind::ConstCooldown && s.cooldown_steps > total_steps {
            return Err(format!("key `schedule.cooldown_steps`: longer than the run ({total_steps} steps)"));
        }
        Ok(RunPlan {
            world,
            global_batch,
            steps_per_epoch,
            total_steps,
            samples: total_steps * global_batch,
            warmup_share: s.warmup_steps as f64 / total_steps as f64,
        })
    }
}

/// Micro-batches per epoch as open_clip_train counts them for WebDataset training
/// (`get_wds_dataset`): `ceil(num_samples / global_batch)`, rounded up to a multiple of the
/// dataloader workers per rank (`max(1, workers)`), since each worker yields whole batches.
pub fn openclip_batches_per_epoch(num_samples: u64, global_micro_batch: u64, workers: u64) -> u64 {
    let workers = workers.max(1);
    num_samples.div_ceil(global_micro_batch).div_ceil(workers) * workers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openclip_epoch_arithmetic_matches_the_published_runs() {
        // convnext_base_w augreg: 203,666,042 samples per epoch at 81,920, 6 workers: 2490 steps.
        assert_eq!(openclip_batches_per_epoch(203_666_042, 81_920, 6), 2490);
        // convnext_large_d_320 fine-tune: at 131,072 an epoch is 1554 steps.
        assert_eq!(openclip_batches_per_epoch(203_666_042, 131_072, 6), 1554);
        assert_eq!(openclip_batches_per_epoch(10, 4, 0), 3, "workers 0 counts as 1");
    }

    #[test]
    fn epochs_give_the_steps_and_accumulation_divides_them() {
        let mut cfg = Config::default();
        cfg.data.train = "x.tar".into();
        cfg.data.train_num_samples = 1000;
        cfg.data.batch_size = 10;
        cfg.data.workers = 3;
        cfg.train.epochs = Some(2);
        // 1000 / (10 × 4) = 25 micro-batches, rounded up to 27 for 3 workers.
        let p = RunPlan::new(&cfg, 4).unwrap();
        assert_eq!((p.steps_per_epoch, p.total_steps, p.global_batch), (Some(27), 54, 40));
        cfg.train.accum_freq = 2;
        let p = RunPlan::new(&cfg, 4).unwrap();
        assert_eq!((p.steps_per_epoch, p.total_steps, p.global_batch, p.samples), (Some(13), 26, 80, 2080));
        cfg.data.train_num_samples = 0;
        assert!(RunPlan::new(&cfg, 4).unwrap_err().contains("train.epochs"));
        cfg.train.epochs = None;
        assert_eq!(RunPlan::new(&cfg, 4).unwrap().total_steps, DEFAULT_STEPS);
        cfg.train.max_steps = Some(7);
        assert_eq!(RunPlan::new(&cfg, 4).unwrap().total_steps, 7);
    }
}
