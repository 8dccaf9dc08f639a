//! The training loop, top to bottom: set-up, then one optimizer step after another until
//! the run's last step, with logging, checkpoints, evaluation and preemption in between.
//! OpenCLIP's `open_clip_train/main.py` + `train.py`, without their callback maze.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use tch::{nn::VarStore, Kind, Tensor};

use ferroclip_data::augment::TrainTransform;
use ferroclip_data::loader::{Loader, LoaderOptions, Mode};
use ferroclip_data::{ResumeFrom, StreamCursor};

use crate::checkpoint::{self, CheckpointDir, Saved, Snapshot};
use crate::checkpoint_writer::CheckpointWriter;
use crate::config::Config;
use crate::cuda::SyncDebug;
use crate::dist::grad_buckets::{self, GradSync};
use crate::dist::watchdog::{self, Phase};
use crate::dist::{self, preempt, Collective, Control};
use crate::input::{self, DeviceInput};
use crate::log::{RunLogger, SampleKeyLog, StepStats};
use crate::loss::ClipLoss;
use crate::model::ContrastiveModel;
use crate::skips::SkippedSteps;
use crate::train_state::{Counters, TrainState};
use crate::world::World;
use crate::{eval, lock, run_lock, step};

pub fn run(cfg: &Config) -> Result<()> {
    // First thing: a preemption signal during set-up must not kill the process unsaved.
    let stop = preempt::install_signal_flag().context("installing the SIGTERM/SIGUSR1 handler")?;
    // Everything `[eval]` names is checked now, not after the last step (exit status 2).
    let eval_inputs = eval::EvalInputs::open(cfg)?;
    // Before the store and the process groups open their sockets.
    let open_files = dist::open_files::raise_to_hard_limit();
    let s = World::start(cfg)?;
    if s.rank_env.is_primary() {
        match open_files {
            Ok(Some((before, after))) => {
                eprintln!("ferroclip: raised the open-file limit (RLIMIT_NOFILE) from {before} to {after}")
            }
            Ok(None) => {}
            Err(e) => eprintln!("ferroclip: warning: could not raise the open-file limit: {e}"),
        }
    }
    let result = train(cfg, &s, &eval_inputs, &stop);
    if let Err(e) = &result {
        if run_lock::is_refusal(e) {
            // Rank 0's refusal, which every rank returned: the job ends in order and main exits 2.
            s.finish();
            return result.map(|_| ());
        }
    }
    if s.collective.world_size() > 1 {
        // The other ranks would wait forever for this one in their next collective: end the job.
        dist::fail_fast::exit_on_error(
            s.collective.as_ref(),
            result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}")),
        );
    }
    let stopped_at = result?;
    let is_main = s.rank_env.is_primary();
    s.finish();
    if let (Some(step), true) = (stopped_at, is_main) {
        requeue_after_preemption(cfg, step);
    }
    Ok(())
}

/// Rank 0, after every rank has stopped on a preemption signal and the checkpoint is written: under
/// an sbatch job, requeue it (`dist.requeue`), so that it starts again and resumes from that step.
fn requeue_after_preemption(cfg: &Config, step: u64) {
    if std::env::var_os("SLURM_JOB_ID").is_none() || !preempt::requeue_wanted(cfg.dist.requeue) {
        return;
    }
    match preempt::requeue_job() {
        Ok(job) => eprintln!("ferroclip: requeued Slurm job {job}; it resumes from step {step}"),
        Err(e) => eprintln!("ferroclip: the checkpoint of step {step} is saved, but the job was not requeued: {e:#}"),
    }
}

/// Trains for the run's steps ([`crate::config::RunPlan`]); returns the step it stopped at when a preemption signal ended it early.
fn train(
    cfg: &Config,
    s: &World,
    eval_inputs: &eval::EvalInputs,
    stop: &std::sync::atomic::AtomicBool,
) -> Result<Option<u64>> {
    let collective = s.collective.as_ref();
    let control = s.control.as_ref();
    let (rank, world) = (collective.rank(), collective.world_size());
    let is_main = rank == 0;
    let device = s.device;
    // The run's length and totals at this world size (the same on every rank).
    let plan = crate::config::RunPlan::new(cfg, world)
        .map_err(|message| crate::config::ConfigError { file: "<config>".into(), message })?;
    let total_steps = plan.total_steps;

    let run_dir = cfg.run_dir();
    // Before anything is written: a second run on this folder stops here, on every rank (status 2).
    let run_lock = run_lock::acquire_for_job(&run_dir, &run_lock::Settings::for_run(cfg), control)?;
    let publish_step = |step: u64| {
        if let Some(l) = &run_lock {
            l.set_step(step);
        }
    };
    let ckpt = CheckpointDir::new(run_dir.join("checkpoints"));
    if is_main {
        std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
        let resolved = toml::to_string_pretty(cfg).context("serializing the resolved config")?;
        std::fs::write(run_dir.join("config.toml"), resolved).context("writing the resolved config")?;
    }

    // Model: same seed everywhere, then rank 0's values broadcast so every rank starts identical.
    tch::manual_seed(cfg.seed as i64);
    let mut vs = VarStore::new(device);
    let (model, mcfg) = cfg.model.init(&vs, cfg.train.grad_checkpointing)?;
    let resume = choose_resume(&cfg.checkpoint.resume, &ckpt, control)?;
    if let Some((model_path, _)) = &resume {
        checkpoint::load_model_file(&mut vs, model_path, &mcfg)?;
    } else if let Some(init) = &cfg.model.init {
        // Fine-tune: weights only, a fresh optimizer, schedule and data stream (any image size).
        checkpoint::check_init_file(init).with_context(|| format!("model.init: {}", init.display()))?;
        checkpoint::load_model_file(&mut vs, init, &mcfg).context("model.init")?;
        if is_main {
            eprintln!("ferroclip: initialized weights from {}", init.display());
        }
    }
    if let (None, Some(text_init)) = (&resume, &cfg.model.text_init) {
        crate::model::load_hf_text_encoder(&mut vs, text_init, &mcfg)
            .with_context(|| format!("model.text_init: loading {}", text_init.display()))?;
        if is_main {
            eprintln!("ferroclip: initialized the text tower from {}", text_init.display());
        }
    }
    broadcast_parameters(&vs, collective);

    // Laid out in the order backward completes the gradients, so that gradient buckets fill in turn.
    let trainable =
        grad_buckets::gradient_ready_order(&vs, lock::trainable_parameters(&vs, &cfg.train.lock_spec(), &mcfg));
    let mut opt = cfg.optim.init(&trainable, &mcfg.arch)?;
    if is_main {
        eprintln!("ferroclip: {} ({} parameters)", opt.describe(), crate::model::num_params(&vs));
    }
    let mut grad_sync = GradSync::new(&opt, collective, cfg.dist.bucket_mb, cfg.dist.overlap)?;
    let schedule = cfg.schedule.init(cfg.optim.lr, total_steps);
    let loss_fn = ClipLoss { local_loss: cfg.train.local_loss };

    // Optimizer, schedule and counters do not depend on the world size; the data stream picks up
    // from every rank's cursor (exactly, or re-split over this job's ranks: ferroclip_data::resume).
    let mut counters = Counters::default();
    let mut cursor: Option<StreamCursor> = None;
    let mut data_resume = None;
    if let Some((_, state_path)) = &resume {
        let TrainState { counters: c, cursors } = TrainState::restore(state_path, &mut opt, cfg, is_main)?;
        counters = c;
        check_resumed_step(control, counters.step, state_path)?;
        if is_main {
            let ranks = match cursors.len() {
                n if n == world => String::new(),
                n => format!(" (written by {n} ranks, now {world})"),
            };
            eprintln!("ferroclip: resumed from {} at step {}{ranks}", state_path.display(), counters.step);
        }
        data_resume = Some(ResumeFrom { cursors, allow_data_change: cfg.checkpoint.allow_data_change });
    }

    let transform =
        Arc::new(TrainTransform::new(mcfg.image_size() as usize, &cfg.data.augment, cfg.data.max_image_pixels));
    // `dist.test_slices`: every rank reads the one-process stream at W× the batch and keeps its slice.
    let (stream_rank, stream_world, stream_batch) =
        if cfg.dist.test_slices { (0, 1, cfg.data.batch_size * world) } else { (rank, world, cfg.data.batch_size) };
    let mut loader = Loader::new(
        &cfg.data,
        &cfg.data.train,
        LoaderOptions {
            rank: stream_rank,
            world_size: stream_world,
            seed: cfg.seed,
            batch_size: stream_batch,
            mode: Mode::Train,
            transform,
            tokenizer: cfg.model.tokenizer()?,
            label_key: None,
            resume: data_resume,
            host_alloc: input::host_alloc(device),
        },
    )
    .with_context(|| format!("opening data.train `{}`", cfg.data.train))?;
    let mut key_log = match cfg.log.sample_keys {
        true => Some(SampleKeyLog::open(&run_dir, rank, counters.step).context("opening the sample key log")?),
        false => None,
    };

    let mut logger = RunLogger::create(&run_dir, total_steps, is_main).context("creating the run logs")?;
    let global_batch = plan.global_batch;
    let mut window = Window::new();
    let mut pending_loss: Vec<Tensor> = Vec::new();
    let mut skips = SkippedSteps::new(counters.skipped_steps, device);
    let mut input = DeviceInput::new(device)?;
    // FERROCLIP_SYNC_DEBUG: CUDA's sync debug mode over the steady-state steps (from the second on,
    // off while logging, checkpointing and evaluating, which read values back on purpose).
    let sync_debug = SyncDebug::from_env()?;
    if sync_debug != SyncDebug::Off && is_main {
        let effect = if SyncDebug::current().is_some() { "" } else { " (no effect: this libtorch has no CUDA)" };
        eprintln!("ferroclip: FERROCLIP_SYNC_DEBUG={sync_debug:?} over the steady-state steps{effect}");
    }
    let first_step = counters.step;

    let mut stopped_at = None;
    let mut stop_vote = preempt::StopVote::new(s.job.store_client()?);
    let mut buckets_reported = false;
    let mut writer = CheckpointWriter::new(ckpt.clone(), cfg.checkpoint.keep);
    watchdog::step_done(counters.step);
    publish_step(counters.step);
    while counters.step < total_steps {
        if counters.step > first_step && sync_debug != SyncDebug::Off {
            sync_debug.apply();
        }
        let t_wait = Instant::now();
        watchdog::set_phase(Phase::WaitingForData);
        let mut micro = Vec::with_capacity(cfg.train.accum_freq);
        for _ in 0..cfg.train.accum_freq {
            let Some(batch) = loader.next_batch() else {
                match loader.error() {
                    Some(e) => bail!("rank {rank}: the training data stream stopped: {e}"),
                    None => bail!("rank {rank}: the training data stream ended unexpectedly"),
                }
            };
            cursor = Some(batch.cursor.clone());
            if let Some(log) = key_log.as_mut() {
                log.record(counters.step + 1, &batch).context("writing the sample key log")?;
            }
            let (images, tokens) = input.upload(batch)?;
            micro.push(if cfg.dist.test_slices { own_slice(&images, &tokens, rank, world) } else { (images, tokens) });
        }
        window.data_wait += t_wait.elapsed().as_secs_f64();
        watchdog::set_phase(Phase::Computing);

        let lr = schedule.lr_at(counters.step);
        opt.set_lr(lr);
        opt.zero_grad();
        // Stochastic depth masks: a function of (seed, step, rank, micro-batch), so a resumed run
        // draws what the uninterrupted one would have.
        let rng_seed = step_seed(cfg.seed, counters.step, rank, world, cfg.train.accum_freq);
        let out = {
            let _autocast = cfg.train.precision.autocast(device);
            step::contrastive_step(&model, &micro, collective, &loss_fn, rng_seed, Some(&grad_sync))
        };
        grad_sync.finish(collective);
        if is_main && world > 1 && !buckets_reported {
            buckets_reported = true;
            eprintln!(
                "ferroclip: gradient all-reduce in {} bucket(s) of at most {} MB, {} of them started during backward{}",
                grad_sync.len(),
                cfg.dist.bucket_mb,
                grad_sync.started_during_backward(),
                if cfg.dist.overlap { "" } else { " (dist.overlap = false)" }
            );
        }

        // Decided on the device: a non-finite step leaves weights, moments and the optimizer's step
        // count unchanged, and is counted there; the host reads the counts at log steps.
        let (found_inf, grad_norm) = crate::skips::update(&mut opt, &out.loss, cfg.train.grad_clip_norm, &mut skips);
        step::clamp_logit_scale(&model, 100f64.ln());
        counters.step += 1;
        counters.samples_seen += global_batch;
        watchdog::step_done(counters.step);
        publish_step(counters.step);
        window.steps += 1;
        // The interval's mean loss over the applied steps: (loss or 0, applied).
        let applied = found_inf.neg() + 1.0;
        let loss = out.loss.detach().where_self(&applied.gt(0.5), &Tensor::zeros_like(&out.loss));
        pending_loss.push(Tensor::stack(&[loss, applied], 0));

        let last = counters.step == total_steps;
        let mut stats = StepStats {
            step: counters.step,
            total_steps,
            samples_seen: counters.samples_seen,
            lr,
            ..Default::default()
        };
        let due = cfg.checkpoint.every_steps > 0 && counters.step % cfg.checkpoint.every_steps == 0;
        let log_due = counters.step % cfg.log.every_steps == 0 || last;
        if log_due || due {
            SyncDebug::Off.apply();
            check_skipped(&mut skips, &mut counters, cfg.train.max_bad_steps, is_main)?;
        }
        if log_due {
            let sums = Tensor::stack(&pending_loss, 0).sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
            let (loss_sum, applied) = (sums.double_value(&[0]), sums.double_value(&[1]));
            stats.loss = if applied > 0.0 { loss_sum / applied } else { f64::NAN };
            pending_loss.clear();
            let elapsed = window.start.elapsed().as_secs_f64().max(1e-9);
            stats.samples_per_s = (window.steps * global_batch) as f64 / elapsed;
            stats.logit_scale = model.logit_scale().exp().double_value(&[]);
            let data = loader.stats();
            let mut extra: Vec<(String, f64)> = vec![
                ("samples_per_s_per_device".into(), stats.samples_per_s / world as f64),
                ("step_time".into(), elapsed / window.steps as f64),
                ("data_wait_fraction".into(), window.data_wait / elapsed),
                ("skipped_steps".into(), counters.skipped_steps as f64),
            ];
            if let Some(n) = &grad_norm {
                extra.push(("grad_norm".into(), n.double_value(&[])));
            }
            if let Some(mem) = crate::cuda::memory_stats(device) {
                extra.push(("gpu_peak_allocated_gib".into(), mem.peak_allocated as f64 / (1u64 << 30) as f64));
                extra.push(("gpu_peak_reserved_gib".into(), mem.peak_reserved as f64 / (1u64 << 30) as f64));
                // Each retry flushed the cache and synchronized: scripts/gpu-check requires 0.
                extra.push(("gpu_num_alloc_retries".into(), mem.num_alloc_retries as f64));
            }
            for (reason, n) in &data.skipped {
                extra.push((format!("data/skipped_{reason}"), *n as f64));
            }
            let extra: Vec<(&str, f64)> = extra.iter().map(|(k, v)| (k.as_str(), *v)).collect();
            logger.log_train(&stats, &extra).context("writing the run logs")?;
            window = Window::new();
        } else {
            logger.tick(&stats);
        }

        if is_main {
            report_saved(&logger, writer.poll()?);
        }
        let mut preempted = stop_vote.stop_now(counters.step, stop.load(Ordering::Relaxed))?;
        let eval_due = cfg.eval.every_steps > 0 && counters.step % cfg.eval.every_steps == 0;
        let eval_now = cfg.eval.any() && (eval_due || last) && !preempted;
        if due || last || preempted || eval_now {
            // A checkpoint and an evaluation read values back anyway; the skipped-step count the
            // checkpoint stores is current.
            SyncDebug::Off.apply();
            check_skipped(&mut skips, &mut counters, cfg.train.max_bad_steps, is_main)?;
        }
        // Every rank's cursor to rank 0, which snapshots the state and writes it in the background;
        // `wait`: the job ends after this step, so the checkpoint is on disk before any rank exits.
        // The sample key log is flushed first, so it covers every step the checkpoint does.
        let mut checkpoint_now = |wait: bool| -> Result<()> {
            if let Some(log) = key_log.as_mut() {
                log.flush().context("writing the sample key log")?;
            }
            let _phase = watchdog::enter(Phase::WritingCheckpoint, "");
            let cursor_json = serde_json::to_vec(cursor.as_ref().expect("a batch was read"))
                .context("serializing the data cursor")?;
            let cursors = control.all_gather_bytes(&cursor_json);
            control.check_same_u64(counters.step, "the step being saved")?;
            if is_main {
                // Rank 0 copies the state to host memory and writes it on a thread; training goes on.
                report_saved(
                    &logger,
                    writer.start(Snapshot::of(&vs, TrainState::state(cfg, &opt, &counters, &cursors)?)?)?,
                );
                if wait {
                    report_saved(&logger, writer.wait()?);
                }
            }
            s.job.after_rank0(rank, &format!("checkpoint/{}", counters.step))?;
            Ok(())
        };
        let saved = due || last || preempted;
        if saved {
            checkpoint_now(last || preempted)?;
        }
        if eval_now {
            logger.println(&format!("ferroclip: evaluating at step {}", counters.step));
            let _phase = watchdog::enter(Phase::Evaluating, "");
            // Every rank evaluates its share; a stop signal (also one that came while the
            // checkpoint above was written) ends the evaluation, and the job stops as on preemption.
            match eval::run::evaluate(cfg, eval_inputs, &model, collective, control, device, stop)? {
                Some(results) => {
                    logger.println(&results.to_string());
                    if let Some(line) = eval::run::zero_shot_summary(&results) {
                        logger.println(&line);
                    }
                    logger.log_eval(counters.step, &results.metrics).context("writing the run logs")?;
                }
                None => {
                    let step = counters.step;
                    logger.println(&format!("ferroclip: evaluation at step {step} stopped by a preemption signal"));
                    if !saved {
                        checkpoint_now(true)?;
                    }
                    preempted = true;
                }
            }
        }
        if preempted && last {
            logger.println("ferroclip: training is complete; `trainer eval --checkpoint` evaluates the saved model");
        }
        if preempted && !last {
            logger.println(&format!(
                "ferroclip: stopping at step {} on a preemption signal; the next start resumes with checkpoint.resume = \"latest\"",
                counters.step
            ));
            stopped_at = Some(counters.step);
            break;
        }
    }
    watchdog::set_phase(Phase::Finishing);
    report_saved(&logger, writer.wait()?);
    logger.finish().context("writing the run logs")?;
    Ok(stopped_at)
}

/// `checkpoint.resume`, decided once: rank 0 resolves and verifies it (`"latest"`: the newest
/// checkpoint it sees that verifies) and broadcasts its choice, so that a rank whose filesystem
/// view lags cannot pick another step. Every rank then checks that it can read the chosen files.
fn choose_resume(spec: &str, ckpt: &CheckpointDir, control: &dyn Control) -> Result<Option<(PathBuf, PathBuf)>> {
    let mine = if control.rank() == 0 {
        let choice = checkpoint::resolve_resume(spec, ckpt)?;
        serde_json::to_vec(&choice).context("encoding the checkpoint choice")?
    } else {
        Vec::new()
    };
    let chosen = control.broadcast_bytes(&mine, 0);
    let choice: Option<(PathBuf, PathBuf)> =
        serde_json::from_slice(&chosen).context("decoding rank 0's checkpoint choice")?;
    if let Some((model, state)) = &choice {
        for f in [model, state] {
            if !f.is_file() {
                bail!("rank {}: rank 0 resumes from {}, which this rank cannot see", control.rank(), f.display());
            }
        }
    }
    Ok(choice)
}

/// After a resume: every rank must have loaded the step rank 0 chose.
fn check_resumed_step(control: &dyn Control, step: u64, state: &Path) -> Result<()> {
    control
        .check_same_u64(step, &format!("the step resumed from {}", state.display()))
        .context("the ranks loaded different checkpoints")
}

/// This rank's rows of a batch of the one-process stream (`dist.test_slices`).
fn own_slice(images: &Tensor, tokens: &Tensor, rank: usize, world: usize) -> (Tensor, Tensor) {
    let n = images.size()[0] / world as i64;
    (images.narrow(0, rank as i64 * n, n), tokens.narrow(0, rank as i64 * n, n))
}

/// Seed of torch's RNG for the stochastic-depth masks of one step on one rank; micro-batch `i`
/// uses `seed + i`, so consecutive (step, rank) pairs are `accum` apart.
fn step_seed(seed: u64, step: u64, rank: usize, world: usize, accum: usize) -> i64 {
    let index = (step * world as u64 + rank as u64) * accum as u64;
    ((seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 1) as i64 & 0x3FFF_FFFF_FFFF_FFFF).wrapping_add(index as i64)
        & i64::MAX
}

/// Throughput over one logging interval.
struct Window {
    start: Instant,
    steps: u64,
    data_wait: f64,
}

impl Window {
    fn new() -> Self {
        Self { start: Instant::now(), steps: 0, data_wait: 0.0 }
    }
}

/// At a log or checkpoint step: reads the device-side skip counters into `counters`, reports the
/// steps skipped since the last read, and stops the run after `max_bad` consecutive ones.
fn check_skipped(skips: &mut SkippedSteps, counters: &mut Counters, max_bad: u64, is_main: bool) -> Result<()> {
    let n = skips.read();
    counters.skipped_steps = n.total;
    if n.since_last_read > 0 && is_main {
        eprintln!(
            "ferroclip: {} step(s) up to step {} skipped: non-finite loss or gradient ({} in a row at most)",
            n.since_last_read, counters.step, n.longest_run
        );
    }
    if n.longest_run >= max_bad {
        bail!("{} consecutive steps with a non-finite loss or gradient (train.max_bad_steps): stopping", n.longest_run);
    }
    Ok(())
}

fn broadcast_parameters(vs: &VarStore, collective: &dyn Collective) {
    if collective.world_size() == 1 {
        return;
    }
    let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (_, v) in vars.iter_mut() {
            collective.broadcast(v, 0);
        }
    });
}

fn report_saved(logger: &RunLogger, saved: Option<Saved>) {
    if let Some(saved) = saved {
        logger.println(&format!("ferroclip: saved {}", saved.model.display()));
    }
}
