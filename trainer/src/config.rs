//! The run configuration: one typed struct per TOML section, with defaults and validation here
//! and nowhere else. Keys follow OpenCLIP's flags where one exists (`warmup`, `accum_freq`, `local_loss`).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use ferroclip_data::DataConfig;

/// A config that cannot be used. Always names the file and the key; `trainer` exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

/// The whole run config (`trainer --config FILE`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Run name; outputs go to `{output_dir}/{name}/`. Default `"run"`.
    pub name: String,
    /// Parent folder of all runs. Default `"runs"`.
    pub output_dir: PathBuf,
    /// Seed for initialization, data order and augmentation. Default 0.
    pub seed: u64,
    pub model: ModelConfig,
    pub data: DataConfig,
    pub train: TrainConfig,
    pub optim: OptimConfig,
    pub schedule: ScheduleConfig,
    pub checkpoint: CheckpointConfig,
    pub log: LogConfig,
    pub eval: EvalConfig,
    pub dist: DistConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "run".into(),
            output_dir: "runs".into(),
            seed: 0,
            model: ModelConfig::default(),
            data: DataConfig::default(),
            train: TrainConfig::default(),
            optim: OptimConfig::default(),
            schedule: ScheduleConfig::default(),
            checkpoint: CheckpointConfig::default(),
            log: LogConfig::default(),
            eval: EvalConfig::default(),
            dist: DistConfig::default(),
        }
    }
}

/// `[model]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// OpenCLIP architecture name (`convnext_base_w`, `convnext_large_d_320`, `ViT-B-32`, …). Default `"convnext_base_w"`.
    pub arch: String,
    /// Input resolution; 0 keeps the architecture's own. Default 0.
    pub image_size: usize,
    /// Weights to start from (an OpenCLIP-compatible `.safetensors`); a fresh optimizer and schedule. Default `""`.
    pub init: String,
    /// Hugging Face text-encoder weights (e.g. `xlm-roberta-base` as safetensors, `roberta.*` or bare
    /// `embeddings.*`/`encoder.*` keys) to start the text tower of an HF-text architecture from;
    /// applied after `init`, ignored on resume. Default `""`.
    pub text_init: String,
    /// Stochastic depth rate of the image tower; negative keeps the architecture's (0.1 for the ConvNeXts). Default -1.
    pub drop_path: f64,
    /// Text tokenizer: `"clip"` (OpenAI CLIP BPE) or the path of a Hugging Face `tokenizer.json`. Default `"clip"`.
    pub tokenizer: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            arch: "convnext_base_w".into(),
            image_size: 0,
            init: String::new(),
            text_init: String::new(),
            drop_path: -1.0,
            tokenizer: "clip".into(),
        }
    }
}

/// `[train]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainConfig {
    /// Stop after this many optimizer steps, whatever the epoch plan. Default 1000.
    pub max_steps: u64,
    /// `"fp32"` or `"amp_bf16"` (bf16 autocast on CUDA, loss in fp32). Default `"fp32"`.
    pub precision: Precision,
    /// Micro-batches per optimizer step; the loss sees all their negatives (OpenCLIP `--accum-freq`). Default 1.
    pub accum_freq: usize,
    /// Each rank computes only its rows of the logits (OpenCLIP `--local-loss`); same gradients, less memory. Default false.
    pub local_loss: bool,
    /// Clip gradients to this global L2 norm; 0 disables. Default 0.
    pub grad_clip_norm: f64,
    /// Freeze the image tower (OpenCLIP `--lock-image`). Default false.
    pub lock_image: bool,
    /// With `lock_image`, leave the last N layer groups trainable. Default 0.
    pub lock_image_unlocked_groups: usize,
    /// Freeze the text tower (OpenCLIP `--lock-text`). Default false.
    pub lock_text: bool,
    /// With `lock_text`, leave the last N layers trainable. Default 0.
    pub lock_text_unlocked_layers: usize,
    /// Abort after this many consecutive steps with a non-finite loss or gradient (each is skipped). Default 20.
    pub max_bad_steps: u64,
    /// `"auto"` (CUDA if available), `"cpu"` or `"cuda"`. Default `"auto"`.
    pub device: String,
    /// libtorch intra-op threads per rank; 0 keeps libtorch's choice. Default 0.
    pub threads: usize,
    /// Recompute each ConvNeXt block and transformer block in backward instead of keeping its
    /// activations (OpenCLIP `--grad-checkpointing`): far less activation memory for one more
    /// forward pass; same gradients. Default false.
    pub grad_checkpointing: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            max_steps: 1000,
            precision: Precision::Fp32,
            accum_freq: 1,
            local_loss: false,
            grad_clip_norm: 0.0,
            lock_image: false,
            lock_image_unlocked_groups: 0,
            lock_text: false,
            lock_text_unlocked_layers: 0,
            max_bad_steps: 20,
            device: "auto".into(),
            threads: 0,
            grad_checkpointing: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    Fp32,
    AmpBf16,
}

/// `[optim]` — AdamW. Betas and eps default to OpenCLIP's per-architecture choice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Peak learning rate. Default 5e-4.
    pub lr: f64,
    /// Decoupled weight decay (not applied to gains, biases, `logit_scale`). Default 0.2.
    pub weight_decay: f64,
    /// Adam beta1. Default 0.9.
    pub beta1: f64,
    /// Adam beta2; 0 picks OpenCLIP's: 0.98 for ViT, 0.999 otherwise. Default 0.
    pub beta2: f64,
    /// Adam epsilon; 0 picks OpenCLIP's: 1e-6 for ViT, 1e-8 otherwise. Default 0.
    pub eps: f64,
}

impl Default for OptimConfig {
    fn default() -> Self {
        Self { lr: 5e-4, weight_decay: 0.2, beta1: 0.9, beta2: 0.0, eps: 0.0 }
    }
}

impl OptimConfig {
    /// (beta2, eps) after applying OpenCLIP's per-architecture defaults.
    pub fn resolved_beta2_eps(&self, arch: &str) -> (f64, f64) {
        let vit = arch.to_ascii_lowercase().contains("vit");
        let beta2 = if self.beta2 > 0.0 { self.beta2 } else if vit { 0.98 } else { 0.999 };
        let eps = if self.eps > 0.0 { self.eps } else if vit { 1e-6 } else { 1e-8 };
        (beta2, eps)
    }
}

/// `[schedule]` — learning rate by optimizer step, as OpenCLIP's `--lr-scheduler`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// `"cosine"` (warmup then cosine to 0 at `max_steps`), `"const"`, `"const-cooldown"`. Default `"cosine"`.
    pub kind: String,
    /// Linear warmup steps (OpenCLIP `--warmup`). Default 10000.
    pub warmup_steps: u64,
    /// `const-cooldown`: steps of the final cooldown. Default 0.
    pub cooldown_steps: u64,
    /// `const-cooldown`: power of the cooldown curve. Default 1.0.
    pub cooldown_power: f64,
    /// `const-cooldown`: learning rate at the end. Default 0.
    pub cooldown_end_lr: f64,
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        Self { kind: "cosine".into(), warmup_steps: 10_000, cooldown_steps: 0, cooldown_power: 1.0, cooldown_end_lr: 0.0 }
    }
}

impl ScheduleConfig {
    /// The schedule of a run of `total_steps` optimizer steps peaking at `base_lr` (`optim.lr`).
    pub fn build(&self, base_lr: f64, total_steps: u64) -> crate::optim::schedule::Schedule {
        use crate::optim::schedule::Schedule;
        let warmup = self.warmup_steps;
        match self.kind.as_str() {
            "const" => Schedule::Const { base_lr, warmup },
            "const-cooldown" => Schedule::ConstCooldown {
                base_lr,
                warmup,
                total_steps,
                cooldown_steps: self.cooldown_steps,
                cooldown_power: self.cooldown_power,
                cooldown_end_lr: self.cooldown_end_lr,
            },
            // `validate` admits only these three.
            _ => Schedule::Cosine { base_lr, warmup, total_steps },
        }
    }
}

/// `[checkpoint]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CheckpointConfig {
    /// Save every N optimizer steps (and always at the end); 0 saves only at the end. Default 1000.
    pub every_steps: u64,
    /// Keep the newest N checkpoints; 0 keeps all. Default 3.
    pub keep: usize,
    /// `""` (fresh start), `"latest"` (newest in this run's `checkpoints/`, fresh if none), or a path. Default `""`.
    pub resume: String,
    /// Resume even if what determines the data stream changed (shards, weights, readers, shuffle
    /// buffer, seed, resampled): the stream then continues as well as it can instead of exactly. Default false.
    pub allow_data_change: bool,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        Self { every_steps: 1000, keep: 3, resume: String::new(), allow_data_change: false }
    }
}

/// `[log]`
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Log (TensorBoard, metrics.jsonl, a plain line) every N optimizer steps. Default 10.
    pub every_steps: u64,
    /// Every rank writes the keys of the samples it trains on to `sample_keys/rank{R}.tsv`
    /// (step, epoch, key per line). Default false.
    pub sample_keys: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { every_steps: 10, sample_keys: false }
    }
}

/// `[eval]` — zero-shot classification, retrieval and validation loss.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EvalConfig {
    /// Zero-shot data: a folder of class sub-folders (`root/<class>/<image>`), or shards with an
    /// image, a caption and a `cls` member (the class index). Default `""`.
    pub zeroshot_data: String,
    /// Class names. For a class-folder set: lines `folder<TAB>class name` (or `class name` for a
    /// folder of that name), matched to the folders by name, in any order; `""`: each folder's
    /// name is its class name. For `cls` shards: one name per line in index order (the part after
    /// a tab if any); `""`: the ImageNet-1k names. Default `""`.
    pub zeroshot_classnames: String,
    /// Prompt templates, one per line with `{}`; `""` uses the 80 OpenAI templates. Default `""`.
    pub zeroshot_templates: String,
    /// Image–caption shards, or a folder of images with `captions.tsv`, for recall@k. Default `""`.
    pub retrieval_data: String,
    /// Held-out shards for the validation loss. Default `""`.
    pub val_data: String,
    /// Evaluate every N optimizer steps during training (and at the end); 0 only at the end. Default 0.
    pub every_steps: u64,
    /// Images or captions per forward pass. Default 64.
    pub batch_size: usize,
}

impl Default for EvalConfig {
    fn default() -> Self {
        Self {
            zeroshot_data: String::new(),
            zeroshot_classnames: String::new(),
            zeroshot_templates: String::new(),
            retrieval_data: String::new(),
            val_data: String::new(),
            every_steps: 0,
            batch_size: 64,
        }
    }
}

/// `[dist]` — how the ranks of a job talk, and what ends a job that can no longer make progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DistConfig {
    /// Collectives for the training tensors: `"auto"` (NCCL on CUDA, Gloo on the CPU), `"nccl"`, `"gloo"`,
    /// or `"mpi"` (builds with the `mpi` feature). Control messages always take a host path. Default `"auto"`.
    pub backend: Backend,
    /// Seconds the rendezvous, any collective or any store read may take before the job ends. Default 600.
    pub timeout_s: u64,
    /// A rank whose heartbeat (every few seconds, through the job's store) stops for this long ends the
    /// job, naming it. Default 60.
    pub heartbeat_timeout_s: u64,
    /// End the job when a rank has not finished a step for this long, saying what it was doing; 0: never.
    /// Counts set-up, evaluation and checkpoint writing too. Default 1800.
    pub step_timeout_s: u64,
    /// Gradient all-reduce bucket size in MB (DDP's `bucket_cap_mb`). Default 25.
    pub bucket_mb: f64,
    /// All-reduce each gradient bucket during backward, as soon as it is complete. Default true.
    pub overlap: bool,
    /// After a preemption checkpoint under an sbatch job, rank 0 requeues the job (`scontrol requeue`):
    /// `"sigusr1"` (on SIGUSR1, what `--signal=USR1@N` sends before the time limit), `"any"` (on SIGTERM
    /// too; `scancel` also sends SIGTERM), `"never"`. Default `"sigusr1"`.
    pub requeue: Requeue,
    /// For tests: device collectives refuse what NCCL would refuse on a GPU (tensors off the training
    /// device) and, since on the CPU the host is the device, integer, bool and byte tensors, which only
    /// control messages (flags, counters, cursors) use. Default false.
    pub strict_device: bool,
    /// For tests: every rank reads the one-process data stream with `data.batch_size` × world size and
    /// keeps its own slice, so a W-rank run sees exactly the batches of a one-process run. Default false.
    pub test_slices: bool,
}

impl Default for DistConfig {
    fn default() -> Self {
        Self {
            backend: Backend::Auto,
            timeout_s: 600,
            heartbeat_timeout_s: 60,
            step_timeout_s: 1800,
            bucket_mb: 25.0,
            overlap: true,
            requeue: Requeue::Sigusr1,
            strict_device: false,
            test_slices: false,
        }
    }
}

/// `dist.backend`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    Auto,
    Nccl,
    Gloo,
    Mpi,
}

/// `dist.requeue`
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Requeue {
    Sigusr1,
    Any,
    Never,
}

impl EvalConfig {
    pub fn any(&self) -> bool {
        !(self.zeroshot_data.is_empty() && self.retrieval_data.is_empty() && self.val_data.is_empty())
    }
}

impl Config {
    /// Read `path`, apply `--set section.key=value` overrides, deserialize strictly and validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let err = |message: String| ConfigError { file: file.clone(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let mut value: toml::Table = toml::from_str(&text).map_err(|e| err(format!("not valid TOML: {e}")))?;
        for o in overrides {
            apply_override(&mut value, o).map_err(|m| err(format!("--set {o}: {m}")))?;
        }
        let de = toml::Value::Table(value);
        let cfg: Config = serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            err(format!("key `{path}`: {}", e.into_inner()))
        })?;
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// Every cross-field rule, each error naming its key.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.contains('/') {
            return Err("key `name`: must be a non-empty name without `/`".into());
        }
        self.data.validate().map_err(|e| format!("key `data.{}`: {}", e.key, e.message))?;
        if self.data.train.trim().is_empty() {
            return Err("key `data.train`: no training shards given".into());
        }
        if self.train.max_steps == 0 {
            return Err("key `train.max_steps`: must be at least 1".into());
        }
        if self.train.accum_freq == 0 {
            return Err("key `train.accum_freq`: must be at least 1".into());
        }
        if !["auto", "cpu", "cuda"].contains(&self.train.device.as_str()) {
            return Err(format!("key `train.device`: `{}` is not one of auto, cpu, cuda", self.train.device));
        }
        if !(self.optim.lr >= 0.0 && self.optim.lr.is_finite()) {
            return Err("key `optim.lr`: must be a finite number >= 0".into());
        }
        if !(self.optim.weight_decay >= 0.0) {
            return Err("key `optim.weight_decay`: must be >= 0".into());
        }
        if !(0.0..1.0).contains(&self.optim.beta1) || !(0.0..1.0).contains(&self.optim.beta2) {
            return Err("key `optim.beta1`/`optim.beta2`: must be in [0, 1)".into());
        }
        if !["cosine", "const", "const-cooldown"].contains(&self.schedule.kind.as_str()) {
            return Err(format!("key `schedule.kind`: `{}` is not one of cosine, const, const-cooldown", self.schedule.kind));
        }
        if self.schedule.kind == "const-cooldown" && self.schedule.cooldown_steps > self.train.max_steps {
            return Err("key `schedule.cooldown_steps`: longer than train.max_steps".into());
        }
        if !(self.train.grad_clip_norm >= 0.0) {
            return Err("key `train.grad_clip_norm`: must be >= 0".into());
        }
        if self.log.every_steps == 0 {
            return Err("key `log.every_steps`: must be at least 1".into());
        }
        if self.dist.timeout_s == 0 || self.dist.heartbeat_timeout_s == 0 {
            return Err("key `dist.timeout_s`/`dist.heartbeat_timeout_s`: must be at least 1".into());
        }
        if !(self.dist.bucket_mb > 0.0 && self.dist.bucket_mb.is_finite()) {
            return Err("key `dist.bucket_mb`: must be a number > 0".into());
        }
        if self.dist.backend == Backend::Mpi && !cfg!(feature = "mpi") {
            return Err("key `dist.backend`: \"mpi\" needs a trainer built with `--features mpi`".into());
        }
        if self.eval.batch_size == 0 {
            return Err("key `eval.batch_size`: must be at least 1".into());
        }
        let zero_shot_lists = [
            ("zeroshot_classnames", &self.eval.zeroshot_classnames),
            ("zeroshot_templates", &self.eval.zeroshot_templates),
        ];
        for (key, value) in zero_shot_lists {
            if !value.is_empty() && self.eval.zeroshot_data.is_empty() {
                return Err(format!("key `eval.{key}`: set, but eval.zeroshot_data is empty (nothing would use it)"));
            }
        }
        if let Err(e) = crate::model::ClipConfig::resolve(&self.model.arch) {
            return Err(format!("key `model.arch`: {e}"));
        }
        Ok(())
    }

    /// `{output_dir}/{name}`
    pub fn run_dir(&self) -> PathBuf {
        self.output_dir.join(&self.name)
    }
}

/// Apply one `section.key=value` override to the raw TOML table. The value is read as TOML
/// (`3`, `1e-4`, `true`, `"s"`, `[1, 2]`), or taken as a plain string if it isn't TOML.
fn apply_override(root: &mut toml::Table, spec: &str) -> Result<(), String> {
    let (path, raw) = spec.split_once('=').ok_or("expected section.key=value")?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(format!("bad key path `{path}`"));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed table has v"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let (last, parents) = keys.split_last().expect("non-empty");
    let mut table = root;
    for k in parents {
        let entry = table.entry(k.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| format!("`{k}` is not a section"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name_and_file() {
        let f = write("name = \"x\"\n[data]\ntrain = \"a.tar\"\nbatch_sise = 3\n");
        let e = Config::load(f.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("batch_sise"), "{e}");
        assert!(e.contains("data"), "{e}");
        assert!(e.contains(&f.path().display().to_string()), "{e}");
    }

    #[test]
    fn bad_value_is_rejected_with_its_key() {
        let f = write("[data]\ntrain = \"a.tar\"\nbatch_size = 0\n");
        let e = Config::load(f.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("data.batch_size"), "{e}");
        let f = write("[data]\ntrain = \"a.tar\"\n[train]\nprecision = \"fp8\"\n");
        let e = Config::load(f.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("train.precision"), "{e}");
    }

    #[test]
    fn overrides_set_nested_keys_with_typed_values() {
        let f = write("[data]\ntrain = \"a.tar\"\n");
        let cfg = Config::load(
            f.path(),
            &["optim.lr=1e-3".into(), "data.batch_size=7".into(), "name=abc".into(), "data.augment.re_prob=0".into()],
        )
        .unwrap();
        assert_eq!(cfg.optim.lr, 1e-3);
        assert_eq!(cfg.data.batch_size, 7);
        assert_eq!(cfg.name, "abc");
        assert_eq!(cfg.data.augment.re_prob, 0.0);
        let e = Config::load(f.path(), &["optim.lrr=1".into()]).unwrap_err().to_string();
        assert!(e.contains("lrr"), "{e}");
    }

    #[test]
    fn vit_gets_openclip_betas() {
        let o = OptimConfig::default();
        assert_eq!(o.resolved_beta2_eps("ViT-B-32"), (0.98, 1e-6));
        assert_eq!(o.resolved_beta2_eps("convnext_base_w"), (0.999, 1e-8));
    }
}
