//! The subcommands other than training: each sets up what it needs and reports on stdout.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, ensure, Context, Result};
use tch::{nn::VarStore, Device, Kind, Tensor};

use ferroclip_data::augment::{EvalTransform, TrainTransform};
use ferroclip_data::tokenize::{ClipTokenizer, Tokenizer};

use crate::config::{Config, DeviceConfig, ModelConfig, OptimConfig, Precision};
use crate::eval::EvalInputs;
use crate::loss::l2_normalize;
use crate::model::clip::Clip;
use crate::model::ContrastiveModel;
use crate::world::World;

/// A model with weights from `checkpoint`, in eval mode semantics (callers pass `train = false`).
pub fn load_model(cfg: &Config, checkpoint: &Path, device: Device) -> Result<(VarStore, Clip)> {
    let mut vs = VarStore::new(device);
    let (model, arch) = cfg.model.init(&vs, false)?;
    crate::checkpoint::load_model_file(&mut vs, checkpoint, &arch)?;
    Ok((vs, model))
}

/// `trainer eval`: every rank the launcher started takes part (see [`crate::eval::split`]); rank 0
/// prints the results and writes `out`.
pub fn eval(cfg: &Config, checkpoint: &Path, out: Option<&Path>) -> Result<()> {
    if !cfg.eval.any() {
        bail!(crate::config::ConfigError {
            file: "<config>".into(),
            message: "key `eval`: set at least one of eval.zeroshot_data, eval.retrieval_data, eval.val_data".into(),
        });
    }
    // Before any rank joins the others or loads weights: a wrong path ends every rank with status 2.
    let inputs = EvalInputs::open(cfg)?;
    let s = World::start(cfg)?;
    let result = eval_on_ranks(cfg, &inputs, &s, checkpoint, out);
    if s.collective.world_size() > 1 {
        // The other ranks would wait forever for this one in their next collective: end the job.
        let outcome = result.as_ref().map(|_| ()).map_err(|e| format!("{e:#}"));
        crate::dist::fail_fast::exit_on_error(s.collective.as_ref(), outcome);
    }
    result
}

fn eval_on_ranks(cfg: &Config, inputs: &EvalInputs, s: &World, checkpoint: &Path, out: Option<&Path>) -> Result<()> {
    let (_vs, model) = load_model(cfg, checkpoint, s.device)?;
    // Without a handler SIGTERM ends the process at once, which is what a standalone evaluation wants.
    let never = std::sync::atomic::AtomicBool::new(false);
    let results =
        crate::eval::run::evaluate(cfg, inputs, &model, s.collective.as_ref(), s.control.as_ref(), s.device, &never)?
            .expect("no stop flag is ever set");
    if s.collective.rank() != 0 {
        return Ok(());
    }
    println!("{results}");
    if let Some(line) = crate::eval::run::zero_shot_summary(&results) {
        println!("{line}");
    }
    if let Some(out) = out {
        std::fs::write(out, results.to_json()).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

/// `trainer embed`
pub fn embed(cfg: &Config, checkpoint: &Path, images: Option<&Path>, texts: Option<&Path>, out: &Path) -> Result<()> {
    if images.is_none() && texts.is_none() {
        bail!(crate::config::ConfigError {
            file: "<command line>".into(),
            message: "embed needs --images DIR and/or --texts FILE".into()
        });
    }
    // One process: the GPU of local rank 0 (or as `train.device` says).
    let device = cfg.train.device.resolve(0).map_err(anyhow::Error::msg)?;
    let size = cfg.model.arch_config()?.image_size() as usize;
    let (_vs, model) = load_model(cfg, checkpoint, device)?;
    let mut named: Vec<(String, Tensor)> = Vec::new();
    tch::no_grad(|| -> Result<()> {
        if let Some(dir) = images {
            let transform = EvalTransform::new(size, cfg.data.max_image_pixels);
            let files = crate::eval::inputs::image_files(dir).map_err(anyhow::Error::msg)?;
            let mut feats = Vec::new();
            for chunk in files.chunks(cfg.eval.batch_size) {
                let batch = crate::eval::run::load_images(chunk, &transform, cfg.data.workers, device)?;
                feats.push(l2_normalize(&model.encode_image(&batch, false)));
            }
            named.push(("image_features".into(), Tensor::cat(&feats, 0).to_device(Device::Cpu)));
            let list = files
                .iter()
                .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
                .collect::<Vec<_>>();
            eprintln!("ferroclip: embedded {} images", list.len());
        }
        if let Some(file) = texts {
            let tok = cfg.model.tokenizer()?;
            let text = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
            let lines: Vec<&str> = text.lines().collect();
            let mut feats = Vec::new();
            for chunk in lines.chunks(cfg.eval.batch_size) {
                let ids = crate::input::tokens(tok.as_ref(), chunk);
                feats.push(l2_normalize(&model.encode_text(&ids.to_device(device), false)));
            }
            named.push(("text_features".into(), Tensor::cat(&feats, 0).to_device(Device::Cpu)));
        }
        named.push(("logit_scale".into(), model.logit_scale().exp().to_device(Device::Cpu).view([1])));
        Ok(())
    })?;
    let bytes = crate::checkpoint::serialize(&named, &BTreeMap::new())?;
    std::fs::write(out, bytes).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("ferroclip: wrote {}", out.display());
    Ok(())
}

/// `trainer data-check`: each sample goes through what training does to it (the train
/// transform at the model's size, the tokenizer), so whatever would be skipped is reported.
pub fn data_check(cfg: &Config) -> Result<()> {
    use ferroclip_data::augment::ImageTransform;
    let size = cfg.model.arch_config()?.image_size() as usize;
    let transform = TrainTransform::new(size, &cfg.data.augment, cfg.data.max_image_pixels);
    let tokenizer = cfg.model.tokenizer()?;
    let validate = move |s: &ferroclip_data::sample::Sample| -> Result<(), String> {
        let mut out = vec![0u8; 3 * size * size];
        let mut rng = ferroclip_data::rng::SampleRng::for_sample(cfg.seed, 0, &s.key);
        transform.apply(&s.image, &s.image_ext, &mut rng, &mut out).map_err(|e| e.reason().to_string())?;
        tokenizer.encode(&s.caption);
        Ok(())
    };
    let report = ferroclip_data::check::check_shards(&cfg.data, &cfg.data.train, &validate)?;
    println!("{report}");
    Ok(())
}

/// `trainer bench-data`: the real loader end to end on the config's `data.train` shards (tar
/// reading, decode, augreg, tokenization, batching into the pooled buffers the trainer consumes),
/// with the stage costs and the loader's efficiency; `--synthetic`: decode + augreg alone over
/// LAION-like JPEGs made in memory. Both print a human summary, then one JSON line.
pub fn bench_data(cfg: &Config, threads: Option<usize>, seconds: f64, synthetic: bool) -> Result<()> {
    let size = cfg.model.arch_config()?.image_size() as usize;
    let mut data = cfg.data.clone();
    if let Some(t) = threads {
        data.workers = t;
    }
    let transform = TrainTransform::new(size, &data.augment, data.max_image_pixels);
    if synthetic {
        let samples = ferroclip_data::bench::laion_like_jpegs(256, cfg.seed);
        let report = ferroclip_data::bench::bench_transform(&samples, &transform, data.workers, seconds);
        println!("{report}");
        let json = serde_json::json!({
            "impl": "ferroclip", "kind": "data", "source": "synthetic", "image_size": size,
            "threads": report.threads, "images_per_s": report.images_per_s,
        });
        println!("{json}");
        return Ok(());
    }
    let tokenizer = cfg.model.tokenizer()?;
    let report = ferroclip_data::bench::bench_loader(&data, Arc::new(transform), tokenizer, cfg.seed, seconds)
        .with_context(|| format!("bench-data on data.train `{}`", data.train))?;
    println!("{report}");
    let mut json = serde_json::to_value(&report)?;
    json["impl"] = "ferroclip".into();
    json["kind"] = "data".into();
    json["source"] = "shards".into();
    json["threads"] = report.workers.into();
    println!("{json}");
    Ok(())
}

/// `trainer bench-data --write-shards DIR`: LAION-like WebDataset shards to benchmark on.
pub fn write_bench_shards(dir: &Path, shards: usize, per_shard: usize, seed: u64) -> Result<()> {
    let paths = ferroclip_data::bench::write_laion_like_shards(dir, shards, per_shard, seed)
        .with_context(|| format!("writing shards under {}", dir.display()))?;
    eprintln!("ferroclip: wrote {} shards of {per_shard} samples under {}", paths.len(), dir.display());
    Ok(())
}

/// `trainer tokenize`
pub fn tokenize(cfg: Option<&Config>) -> Result<()> {
    let tok: Arc<dyn Tokenizer> = match cfg {
        Some(cfg) => cfg.model.tokenizer()?,
        None => Arc::new(ClipTokenizer::new()),
    };
    let stdin = std::io::stdin();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for line in stdin.lock().lines() {
        let line = line.context("reading stdin")?;
        let ids = tok.encode(&line);
        writeln!(out, "{}", serde_json::to_string(&ids)?)?;
    }
    out.flush()?;
    Ok(())
}

/// `trainer make-demo-data`: training shards, held-out labelled shards (1000 samples, another
/// seed, so no training image is among them) and the class names in label order.
pub fn make_demo_data(out: &Path, shards: usize, per_shard: usize, seed: u64) -> Result<()> {
    use ferroclip_data::synth;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let train = synth::write_shards(&out.join("train"), "", shards, per_shard, seed, false)?;
    let eval = synth::write_shards(&out.join("eval"), "", 4, 250, seed.wrapping_add(1_000_003), true)?;
    std::fs::write(out.join("classnames.txt"), synth::class_names().join("\n") + "\n")?;
    std::fs::write(out.join("templates.txt"), "a photo of a {}.\na {}.\n")?;
    eprintln!("ferroclip: wrote {} training and {} evaluation shards under {}", train.len(), eval.len(), out.display());
    Ok(())
}

/// `trainer verify-checkpoint`: each path a model file, state file or manifest of a checkpoint, or a
/// `checkpoints/` folder (or the run folder above one: every checkpoint in it). Prints `ok step N`
/// or `BAD step N: FILE: REASON` per checkpoint; any bad one is a [`ConfigError`] (status 2).
pub fn verify_checkpoints(paths: &[PathBuf]) -> Result<()> {
    use crate::checkpoint::{self, CheckpointDir, Verified};
    // (what to call it, its model and state file), or (a path that names no checkpoint, why).
    type Found = std::result::Result<(String, PathBuf, PathBuf), (PathBuf, String)>;
    let mut found: Vec<Found> = Vec::new();
    for path in paths {
        if path.is_dir() {
            let dir = match path.join("checkpoints") {
                run if run.is_dir() => CheckpointDir::new(run),
                _ => CheckpointDir::new(path),
            };
            let steps = dir.complete_steps()?;
            if steps.is_empty() {
                found.push(Err((dir.dir().to_path_buf(), "no checkpoints".into())));
            }
            for step in steps {
                found.push(Ok((format!("step {step}"), dir.model_path(step), dir.state_path(step))));
            }
        } else {
            match checkpoint::checkpoint_files(path) {
                Some((model, state)) => found.push(Ok((label_of(&model), model, state))),
                None => found
                    .push(Err((path.clone(), "not a checkpoint's model, state or manifest file, nor a folder".into()))),
            }
        }
    }
    let mut out = std::io::stdout().lock();
    let mut bad: Vec<String> = Vec::new();
    for entry in &found {
        match entry {
            Ok((label, model, state)) => match checkpoint::verify_files(model, state) {
                Ok(Verified::Manifest) => writeln!(out, "ok {label}")?,
                Ok(Verified::NoManifest) => writeln!(out, "ok {label} (no manifest: both files parse as safetensors)")?,
                Err(e) => {
                    writeln!(out, "BAD {label}: {e}")?;
                    bad.push(e.file.display().to_string());
                }
            },
            Err((path, why)) => {
                writeln!(out, "BAD {}: {why}", path.display())?;
                bad.push(path.display().to_string());
            }
        }
    }
    out.flush()?;
    match bad.first() {
        None => Ok(()),
        Some(first) => Err(crate::config::ConfigError {
            file: first.clone(),
            message: format!("{} of {} checkpoints do not verify", bad.len(), found.len()),
        }
        .into()),
    }
}

/// `step N` for a model file `step_{N:08}.safetensors`, else the file's path.
fn label_of(model: &Path) -> String {
    let step = model
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("step_")?.strip_suffix(".safetensors")?.parse::<u64>().ok());
    match step {
        Some(step) => format!("step {step}"),
        None => model.display().to_string(),
    }
}

/// `trainer dist-selftest`
/// What `trainer dist-selftest` checks, and the faults it injects for the distributed tests.
pub struct DistSelftest {
    pub dist: crate::config::DistConfig,
    /// The device collectives run on (`cuda`: this rank's GPU).
    pub device: DeviceConfig,
    /// This rank fails before its first collective; the job must end within seconds.
    pub fail_rank: Option<usize>,
    /// This rank panics before its first collective.
    pub panic_rank: Option<usize>,
    /// This rank sleeps for an hour before its first collective (alive: its heartbeat goes on), so
    /// the others' first collective must time out after `dist.timeout_s`.
    pub stall_rank: Option<usize>,
    /// Sends a stop flag through the device collective, as `any_rank` once did (with
    /// `dist.strict_device` the job must end naming the operation).
    pub misroute: bool,
}

/// `trainer dist-selftest`: every collective and control message against known results on all ranks.
pub fn dist_selftest(t: &DistSelftest) -> Result<()> {
    use crate::dist::{self, fail_fast};
    let env = dist::env::detect()?;
    let joined = dist::join(&env, &t.dist)?;
    let device = t.device.resolve(env.local_rank).map_err(anyhow::Error::msg)?;
    let d = joined.connect(device, &t.dist)?;
    let (rank, world) = (env.rank, env.world_size);
    let result = (|| -> Result<()> {
        if t.fail_rank == Some(rank) {
            bail!("injected failure on rank {rank}");
        }
        if t.panic_rank == Some(rank) {
            panic!("injected panic on rank {rank}");
        }
        if t.stall_rank == Some(rank) {
            std::thread::sleep(std::time::Duration::from_secs(3600));
        }
        if t.misroute {
            let mut flag = Tensor::from_slice(&[(rank == 0) as i64]);
            d.collective.all_reduce_sum(&mut flag);
            ensure!(flag.int64_value(&[0]) == 1, "the misrouted flag did not sum");
        }
        dist::selftest::run_on(d.collective.as_ref(), d.control.as_ref(), device, !t.dist.strict_device)
    })();
    fail_fast::exit_on_error(d.collective.as_ref(), result);
    println!("rank {rank} of {world}: dist selftest passed ({})", d.description);
    d.job.shutdown(d.control.as_ref());
    Ok(())
}

/// What `trainer bench-train` measures.
pub struct BenchTrain {
    pub arch: String,
    pub image_size: i64,
    pub batch: i64,
    pub steps: usize,
    pub warmup: usize,
    pub precision: Precision,
    pub threads: usize,
    pub device: DeviceConfig,
    /// Activation checkpointing, as `train.grad_checkpointing`.
    pub grad_checkpointing: bool,
}

/// `trainer bench-train`: full training steps (forward, InfoNCE, backward, AdamW) on synthetic
/// inputs, timed after warm-up; one JSON line on stdout, the same as `scripts/bench-openclip-train.py`.
pub fn bench_train(b: &BenchTrain) -> Result<()> {
    if b.threads > 0 {
        tch::set_num_threads(b.threads as i32);
    }
    let device = b.device.resolve(0).map_err(anyhow::Error::msg)?;
    if device.is_cuda() {
        // As training (`World::start`) and OpenCLIP's side of the benchmark: TF32, cuDNN benchmark.
        crate::cuda::enable_tf32_and_cudnn_benchmark();
    }
    // The constructors training uses, with the config's defaults ([optim] as OpenCLIP's).
    let model_cfg = ModelConfig { arch: b.arch.clone(), image_size: Some(b.image_size as usize), ..Default::default() };
    tch::manual_seed(0);
    let vs = VarStore::new(device);
    let (model, mcfg) = model_cfg.init(&vs, b.grad_checkpointing).context("--arch")?;
    let named = crate::lock::trainable_parameters(&vs, &Default::default(), &mcfg);
    let mut opt = OptimConfig::default().init(&named, &mcfg.arch)?;
    let images = Tensor::randn([b.batch, 3, b.image_size, b.image_size], (Kind::Float, device));
    let ctx = mcfg.context_length();
    let tokens = Tensor::randint_low(1, mcfg.text.vocab_size(), [b.batch, ctx], (Kind::Int64, device));
    let micro = [(images, tokens)];
    let loss = crate::loss::ClipLoss::default();
    let single = crate::dist::single::Single;
    let sync = || {
        if let Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
    };
    // As OpenCLIP's side: the peak over warm-up and timed steps.
    crate::cuda::reset_peak_memory(device)?;
    let mut start = std::time::Instant::now();
    for i in 0..b.warmup + b.steps {
        if i == b.warmup {
            sync();
            start = std::time::Instant::now();
        }
        opt.zero_grad();
        let _autocast = b.precision.autocast(device);
        crate::step::contrastive_step(&model, &micro, &single, &loss, i as i64, None);
        opt.step();
        crate::step::clamp_logit_scale(&model, 100f64.ln());
    }
    sync();
    let secs = start.elapsed().as_secs_f64() / b.steps.max(1) as f64;
    let memory = crate::cuda::memory_stats(device);
    let line = serde_json::json!({
        "impl": "ferroclip",
        "arch": b.arch,
        "image_size": b.image_size,
        "batch": b.batch,
        "precision": b.precision,
        "threads": tch::get_num_threads(),
        "device": b.device,
        "grad_checkpointing": b.grad_checkpointing,
        "steps": b.steps,
        "step_time_s": secs,
        "samples_per_s": b.batch as f64 / secs,
        "peak_rss_mb": peak_rss_mb(),
        // `torch.cuda.max_memory_allocated()`, as OpenCLIP's side reports it.
        "peak_gpu_mb": memory.map(|m| m.peak_allocated as f64 / (1u64 << 20) as f64),
        "peak_gpu_reserved_mb": memory.map(|m| m.peak_reserved as f64 / (1u64 << 20) as f64),
        "num_alloc_retries": memory.map(|m| m.num_alloc_retries),
    });
    println!("{line}");
    Ok(())
}

/// Peak resident set size of this process, in MiB.
pub fn peak_rss_mb() -> f64 {
    // SAFETY: getrusage fills the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}
