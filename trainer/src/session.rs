//! What every command that runs a model sets up the same way: ranks and collectives, the device,
//! threads, the model config resolved from `[model]`, weights, the tokenizer and precision.

use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use tch::{nn::VarStore, Device, Tensor};

use ferroclip_data::tokenize::Tokenizer;

use crate::config::{Config, Precision};
use crate::dist::{self, env::RankEnv, Collective, Control};
use crate::lock::{self, LockSpec, TowerDepths};
use crate::model::{ClipConfig, VisionConfig};

pub struct Session {
    pub rank_env: RankEnv,
    /// Model tensors between ranks (NCCL, Gloo, MPI, or one process).
    pub collective: Box<dyn Collective>,
    /// Host messages between ranks (stop vote, cursors, checkpoint choice).
    pub control: Box<dyn Control>,
    pub device: Device,
    /// The job's store and watchdog; [`Session::finish`] ends them in order.
    pub job: dist::Job,
}

impl Session {
    /// Join the job's ranks (the job's TCPStore under srun/mpirun/torchrun, else a single process),
    /// pick this rank's device and thread count, connect the collectives, and say so once. A failure
    /// after joining reaches the other ranks as the job's abort notice.
    pub fn start(cfg: &Config) -> Result<Session> {
        let rank_env = dist::env::detect().context("reading the launcher's rank environment")?;
        let joined = dist::join(&rank_env, &cfg.dist)?;
        let device = device(cfg, rank_env.local_rank)?;
        if cfg.train.threads > 0 {
            tch::set_num_threads(cfg.train.threads as i32);
        }
        let d = joined.connect(device, &cfg.dist)?;
        if device.is_cuda() {
            // As OpenCLIP's main.py: TF32 matmuls and convolutions, cuDNN picks its fastest kernels.
            crate::cuda::enable_tf32_and_cudnn_benchmark();
        }
        if rank_env.rank == 0 {
            eprintln!(
                "ferroclip: {} rank(s) via {:?}, {}; rank 0 on {device:?}, {} libtorch threads",
                rank_env.world_size,
                rank_env.launcher,
                d.description,
                tch::get_num_threads()
            );
            if cfg.train.precision == Precision::AmpBf16 && device == Device::Cpu {
                eprintln!("ferroclip: precision amp_bf16 applies on CUDA only; running fp32 on the CPU");
            }
        }
        Ok(Session { rank_env, collective: d.collective, control: d.control, device, job: d.job })
    }

    /// Ends the job in order (see [`dist::Job::shutdown`]).
    pub fn finish(self) {
        self.job.shutdown(self.control.as_ref());
    }
}

/// `train.device`: `cpu`, `cuda` (an error without a usable GPU) or `auto` (this rank's GPU if any; an
/// error when the launcher allocated GPUs that libtorch does not see, [`crate::device::auto`]).
pub fn device(cfg: &Config, local_rank: usize) -> Result<Device> {
    match cfg.train.device.as_str() {
        "cpu" => Ok(Device::Cpu),
        "cuda" if !tch::Cuda::is_available() => anyhow::bail!(
            "train.device = \"cuda\", but libtorch sees no CUDA device (a CPU-only torch wheel, no driver, \
             or CUDA_VISIBLE_DEVICES empty)"
        ),
        _ => crate::device::auto(local_rank, tch::Cuda::is_available(), |var| std::env::var(var).ok())
            .map_err(anyhow::Error::msg),
    }
}

/// The architecture named by `model.arch`, with `[model]` overrides applied.
pub fn model_config(cfg: &Config) -> ClipConfig {
    // `Config::validate` has resolved it once already.
    let mut m = ClipConfig::resolve(&cfg.model.arch).unwrap_or_else(|e| panic!("key `model.arch`: {e}"));
    if cfg.model.image_size > 0 {
        m = m.with_image_size(cfg.model.image_size as i64);
    }
    if cfg.model.drop_path >= 0.0 {
        m = m.with_drop_path(cfg.model.drop_path);
    }
    m.with_grad_checkpointing(cfg.train.grad_checkpointing)
}

/// Load an OpenCLIP-compatible model file into `vs`.
pub fn load_weights(vs: &mut VarStore, path: &Path, mcfg: &ClipConfig) -> Result<()> {
    crate::model::load_safetensors(vs, path, mcfg).with_context(|| format!("loading weights from {}", path.display()))?;
    Ok(())
}

/// The parameters the optimizer updates, sorted by name; frozen ones (`train.lock_*`) are set to
/// `requires_grad(false)` and left out.
pub fn trainable_parameters(vs: &VarStore, cfg: &Config, mcfg: &ClipConfig) -> Vec<(String, Tensor)> {
    let spec = LockSpec {
        lock_image: cfg.train.lock_image,
        image_unlocked_groups: cfg.train.lock_image_unlocked_groups,
        lock_text: cfg.train.lock_text,
        text_unlocked_layers: cfg.train.lock_text_unlocked_layers,
    };
    let depths = TowerDepths {
        text_layers: mcfg.text_layers() as usize,
        vit_layers: match &mcfg.vision {
            VisionConfig::Vit(v) => v.layers as usize,
            VisionConfig::ConvNext(_) => 0,
        },
        trunk_stages: match &mcfg.vision {
            VisionConfig::ConvNext(c) => c.depths.len(),
            VisionConfig::Vit(_) => 0,
        },
    };
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in vs.variables() {
        if lock::is_trainable(&name, &spec, &depths) {
            out.push((name, t));
        } else {
            let _ = t.set_requires_grad(false);
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// The tokenizer named by `model.tokenizer`, with the text tower's context length.
pub fn tokenizer(cfg: &Config) -> Result<Arc<dyn Tokenizer>> {
    let context = model_config(cfg).context_length() as usize;
    let spec = cfg.model.tokenizer.as_str();
    let t: Arc<dyn Tokenizer> = if spec == "clip" {
        Arc::new(ferroclip_data::tokenize::ClipTokenizer::with_context_length(context))
    } else {
        Arc::new(
            ferroclip_data::tokenize::HfTokenizer::from_file(Path::new(spec), context)
                .with_context(|| format!("model.tokenizer: loading `{spec}`"))?,
        )
    };
    Ok(t)
}

/// Mixed precision for a forward pass; a no-op for fp32 and on the CPU.
pub fn autocast(precision: Precision, device: Device) -> crate::precision::AutocastGuard {
    crate::precision::AutocastGuard::new(precision == Precision::AmpBf16 && device != Device::Cpu)
}
