//! Loading OpenCLIP state dicts by exact key names (`open_clip/factory.py`: `load_state_dict`,
//! `load_checkpoint` with `strict=True`) from `.safetensors` or `torch.save` files (told apart by
//! their first bytes, [`torch_file::Format`]): ours, OpenCLIP's `open_clip_model.safetensors` and
//! `open_clip_pytorch_model.bin`, open_clip_train's `epoch_N.pt`; and saving them as safetensors.
//!
//! Files written by [`save_safetensors`] load with
//! `open_clip.create_model(ARCH, pretrained="model.safetensors")`: OpenCLIP reads any path ending
//! in `.safetensors` with `safetensors.torch.load_file` and loads it strictly.
//!
//! [`load_hf_text_encoder`] initializes an XLM-RoBERTa text tower from a Hugging Face checkpoint
//! (`XLMRobertaModel` / `XLMRobertaForMaskedLM` key names), as OpenCLIP's `HFTextEncoder` does
//! with `AutoModel.from_pretrained`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};

use super::clip::{ClipConfig, TextTower, VisionConfig};
use super::torch_file::{self, Format};
use super::vit::resize_pos_embed;

/// What went wrong loading or saving weights.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: tch::TchError },
    #[error("writing {path}: {message}")]
    Write { path: PathBuf, message: String },
    #[error(
        "{path} does not match the model ({arch}): missing keys {missing:?}; unexpected keys {unexpected:?}; \
         mis-shaped keys {mismatched:?}"
    )]
    Mismatch {
        path: PathBuf,
        arch: String,
        missing: Vec<String>,
        unexpected: Vec<String>,
        /// `key: file shape vs model shape`.
        mismatched: Vec<String>,
    },
    #[error("{arch} has no Hugging Face text tower to initialize from {path}")]
    NoHfTextTower { path: PathBuf, arch: String },
    #[error("{path}: tensor `{key}` {message}")]
    BadTensor { path: PathBuf, key: String, message: String },
    /// Not a weights file ferroclip reads: truncated, corrupt, legacy torch format, not a state dict.
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
}

impl From<torch_file::TorchFileError> for WeightsError {
    fn from(e: torch_file::TorchFileError) -> Self {
        match e {
            torch_file::TorchFileError::File { path, message } => WeightsError::BadFile { path, message },
            torch_file::TorchFileError::Key { path, key, message } => WeightsError::BadTensor { path, key, message },
        }
    }
}

/// What [`load_state_dict`] did besides plain copies.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LoadReport {
    /// Tensors copied into the model.
    pub loaded: usize,
    /// Keys whose tensors were resized (ViT `visual.positional_embedding` from another image size).
    pub resized: Vec<String>,
    /// File keys deliberately not loaded (stale buffers such as `embeddings.position_ids`; heads
    /// outside the text tower such as `lm_head.*` or `pooler.*` in Hugging Face checkpoints).
    pub skipped: Vec<String>,
}

/// Buffers older `transformers` versions saved in state dicts; OpenCLIP drops them on load
/// (`open_clip/factory.py`: `load_checkpoint`, "no longer expect position_ids after transformers==4.31").
fn is_stale_hf_buffer(key: &str) -> bool {
    key.ends_with("embeddings.position_ids") || key.ends_with("embeddings.token_type_ids")
}

/// A state-dict key without the `module.` DDP puts before it (open_clip_train saves the wrapped model).
pub fn without_ddp_prefix(key: &str) -> &str {
    key.strip_prefix("module.").unwrap_or(key)
}

/// The named tensors of a weights file in either format.
pub fn read_state_dict(path: &Path) -> Result<Vec<(String, Tensor)>, WeightsError> {
    let format = Format::of_file(path)
        .map_err(|e| WeightsError::BadFile { path: path.to_path_buf(), message: format!("cannot read: {e}") })?;
    match format {
        Format::TorchZip | Format::TorchLegacy => Ok(torch_file::state_dict(path)?),
        Format::Safetensors => {
            Tensor::read_safetensors(path).map_err(|source| WeightsError::Read { path: path.to_path_buf(), source })
        }
    }
}

/// Loads an OpenCLIP state dict (either format) into `vs` (built by `Clip::new(&vs.root(), cfg)`), strictly:
/// every model key must be present with its shape, and no extra key may exist. A leading
/// `module.` (DDP) is stripped, a 1-element `logit_scale` is reshaped, and a ViT positional
/// embedding for another grid is resized as OpenCLIP's `resize_pos_embed` does.
pub fn load_state_dict(vs: &mut tch::nn::VarStore, path: &Path, cfg: &ClipConfig) -> Result<LoadReport, WeightsError> {
    let read = read_state_dict(path)?;
    let mut file: HashMap<String, Tensor> =
        read.into_iter().map(|(k, v)| (without_ddp_prefix(&k).to_string(), v)).collect();
    let vars = vs.variables();
    let mut report = LoadReport::default();
    let stale: Vec<String> = file.keys().filter(|k| is_stale_hf_buffer(k) && !vars.contains_key(*k)).cloned().collect();
    for k in stale {
        file.remove(&k);
        report.skipped.push(k);
    }
    if let (VisionConfig::Vit(vit), Some(pos)) = (&cfg.vision, file.get("visual.positional_embedding")) {
        let g = vit.grid_size();
        if pos.dim() == 2 && pos.size()[0] != g * g + 1 {
            let resized = tch::no_grad(|| resize_pos_embed(&pos.to_kind(Kind::Float), g)).map_err(|message| {
                WeightsError::BadTensor { path: path.to_path_buf(), key: "visual.positional_embedding".into(), message }
            })?;
            file.insert("visual.positional_embedding".into(), resized);
            report.resized.push("visual.positional_embedding".into());
        }
    }
    let mut missing = Vec::new();
    let mut mismatched = Vec::new();
    for (k, var) in vars.iter() {
        match file.get_mut(k) {
            None => missing.push(k.clone()),
            Some(t) => {
                if t.size() != var.size() && t.numel() == var.numel() && var.dim() == 0 {
                    *t = t.reshape(var.size());
                }
                if t.size() != var.size() {
                    mismatched.push(format!("{k}: {:?} vs {:?}", t.size(), var.size()));
                }
            }
        }
    }
    report.loaded = copy_checked(path, cfg, vars.iter(), &file, missing, mismatched)?;
    Ok(report)
}

/// Initializes the text tower of an XLM-RoBERTa model (`cfg.text` is [`TextTower::XlmRoberta`])
/// from a Hugging Face checkpoint (`model.safetensors` or `pytorch_model.bin`): keys `embeddings.*` / `encoder.*`,
/// optionally under `roberta.` (`XLMRobertaForMaskedLM`) or `module.`, map onto
/// `text.transformer.*` by prefix. Every `text.transformer.*` variable must be present with its
/// shape; `lm_head.*`, `pooler.*` and stale buffers are skipped; anything else is unexpected.
/// The projection `text.proj.*`, the image tower and `logit_scale` are left as they are.
pub fn load_hf_text_encoder(
    vs: &mut tch::nn::VarStore,
    path: &Path,
    cfg: &ClipConfig,
) -> Result<LoadReport, WeightsError> {
    const PREFIX: &str = "text.transformer.";
    if !matches!(cfg.text, TextTower::XlmRoberta(_)) {
        return Err(WeightsError::NoHfTextTower { path: path.to_path_buf(), arch: cfg.arch.clone() });
    }
    let mut report = LoadReport::default();
    let mut file: HashMap<String, Tensor> = HashMap::new();
    for (key, t) in read_state_dict(path)? {
        let bare = without_ddp_prefix(&key);
        let bare = bare.strip_prefix("roberta.").unwrap_or(bare);
        if is_stale_hf_buffer(bare) || !(bare.starts_with("embeddings.") || bare.starts_with("encoder.")) {
            report.skipped.push(key);
        } else {
            file.insert(format!("{PREFIX}{bare}"), t);
        }
    }
    let vars: BTreeMap<String, Tensor> = vs.variables().into_iter().filter(|(k, _)| k.starts_with(PREFIX)).collect();
    let missing: Vec<String> = vars.keys().filter(|k| !file.contains_key(*k)).cloned().collect();
    let mismatched: Vec<String> = vars
        .iter()
        .filter_map(|(k, v)| {
            let t = file.get(k)?;
            (t.size() != v.size()).then(|| format!("{k}: {:?} vs {:?}", t.size(), v.size()))
        })
        .collect();
    report.loaded = copy_checked(path, cfg, vars.iter(), &file, missing, mismatched)?;
    report.skipped.sort();
    Ok(report)
}

/// Writes every variable of `vs` as fp32, contiguous CPU tensors, keys sorted, with `metadata`
/// in the safetensors header.
pub fn save_safetensors(
    vs: &tch::nn::VarStore,
    path: &Path,
    metadata: &BTreeMap<String, String>,
) -> Result<(), WeightsError> {
    let werr = |message: String| WeightsError::Write { path: path.to_path_buf(), message };
    let mut named: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let bytes = crate::checkpoint::serialize(&named, metadata).map_err(|e| werr(format!("{e:#}")))?;
    std::fs::write(path, bytes).map_err(|e| werr(e.to_string()))
}

/// Refuses a file whose keys do not match `vars` exactly (listing what is missing, unexpected and
/// mis-shaped), else copies every tensor into its variable; returns how many were loaded.
fn copy_checked<'a>(
    path: &Path,
    cfg: &ClipConfig,
    vars: impl Iterator<Item = (&'a String, &'a Tensor)> + Clone,
    file: &HashMap<String, Tensor>,
    mut missing: Vec<String>,
    mut mismatched: Vec<String>,
) -> Result<usize, WeightsError> {
    let known: std::collections::HashSet<&String> = vars.clone().map(|(k, _)| k).collect();
    let mut unexpected: Vec<String> = file.keys().filter(|k| !known.contains(k)).cloned().collect();
    if !missing.is_empty() || !unexpected.is_empty() || !mismatched.is_empty() {
        missing.sort();
        unexpected.sort();
        mismatched.sort();
        return Err(WeightsError::Mismatch {
            path: path.to_path_buf(),
            arch: cfg.arch.clone(),
            missing,
            unexpected,
            mismatched,
        });
    }
    let mut n = 0;
    tch::no_grad(|| {
        for (k, var) in vars {
            let mut var = var.shallow_clone();
            var.copy_(&file[k].to_kind(var.kind()).to_device(var.device()));
            n += 1;
        }
    });
    Ok(n)
}
