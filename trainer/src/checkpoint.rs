//! Checkpoints: `checkpoints/step_{N:08}.safetensors` (the OpenCLIP-compatible model file) and
//! `checkpoints/step_{N:08}.state.safetensors` (optimizer moments keyed by parameter name, counters,
//! data cursor, config — everything else a resume needs, in tensors and string metadata).
//!
//! Crash safety: each file is written under a temporary name, fsynced and renamed into place,
//! model file first. A step counts as saved only once both of its files exist, so a crash at any
//! point of a save leaves the previous checkpoint as the newest complete one. Training writes
//! them in the background ([`crate::checkpoint_writer`]) from a [`Snapshot`] in host memory.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use tch::{Kind, Tensor};

/// Tensors with names, in file order.
pub type Named = Vec<(String, Tensor)>;

/// The `checkpoints/` folder of a run.
#[derive(Debug, Clone)]
pub struct CheckpointDir {
    dir: PathBuf,
}

/// What a save wrote.
#[derive(Debug, Clone)]
pub struct Saved {
    pub step: u64,
    pub model: PathBuf,
    pub state: PathBuf,
}

impl CheckpointDir {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn model_path(&self, step: u64) -> PathBuf {
        self.dir.join(format!("step_{step:08}.safetensors"))
    }

    pub fn state_path(&self, step: u64) -> PathBuf {
        self.dir.join(format!("step_{step:08}.state.safetensors"))
    }

    /// Steps with both files present, ascending.
    pub fn complete_steps(&self) -> Result<Vec<u64>> {
        let mut steps = Vec::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(steps),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.dir.display())),
        };
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            let Some(n) = name.strip_prefix("step_").and_then(|s| s.strip_suffix(".state.safetensors")) else {
                continue;
            };
            if let Ok(step) = n.parse::<u64>() {
                if self.model_path(step).is_file() {
                    steps.push(step);
                }
            }
        }
        steps.sort_unstable();
        Ok(steps)
    }

    pub fn latest(&self) -> Result<Option<u64>> {
        Ok(self.complete_steps()?.last().copied())
    }

    /// Write both files of `step` atomically, then drop all but the newest `keep` (0 keeps all).
    pub fn save(
        &self,
        step: u64,
        model: &[(String, Tensor)],
        model_meta: &BTreeMap<String, String>,
        state: &[(String, Tensor)],
        state_meta: &BTreeMap<String, String>,
        keep: usize,
    ) -> Result<Saved> {
        self.write(&Snapshot::take(step, model, model_meta, state, state_meta)?, keep)
    }

    /// Write a snapshot's two files atomically, model file first, then drop all but the newest
    /// `keep` checkpoints (0 keeps all). [`crate::checkpoint_writer`] calls this on its thread.
    pub fn write(&self, snapshot: &Snapshot, keep: usize) -> Result<Saved> {
        let step = snapshot.step;
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let saved = Saved { step, model: self.model_path(step), state: self.state_path(step) };
        write_atomic(&saved.model, &snapshot.model)?;
        test_pause_between_files(step);
        write_atomic(&saved.state, &snapshot.state)?;
        if keep > 0 {
            let steps = self.complete_steps()?;
            for old in steps.iter().take(steps.len().saturating_sub(keep)) {
                // State first: without it the step no longer counts as complete.
                let _ = fs::remove_file(self.state_path(*old));
                let _ = fs::remove_file(self.model_path(*old));
            }
        }
        Ok(saved)
    }
}

/// `FERROCLIP_TEST_CHECKPOINT_PAUSE=STEP:SECONDS`, for the crash tests only: the write of step
/// STEP sleeps between its model file and its state file, so that a test can kill the process
/// exactly while a (background) write is half done. Unset, it costs one environment lookup per save.
fn test_pause_between_files(step: u64) {
    let Ok(spec) = std::env::var("FERROCLIP_TEST_CHECKPOINT_PAUSE") else { return };
    let parsed = spec.split_once(':').and_then(|(s, t)| Some((s.parse::<u64>().ok()?, t.parse::<f64>().ok()?)));
    match parsed {
        Some((s, seconds)) if s == step => std::thread::sleep(std::time::Duration::from_secs_f64(seconds.max(0.0))),
        Some(_) => {}
        None => eprintln!("ferroclip: ignoring FERROCLIP_TEST_CHECKPOINT_PAUSE=`{spec}` (expected STEP:SECONDS)"),
    }
}

/// A state file's contents before they are written (what `TrainState::state` makes): the step, the optimizer's tensors by parameter name, and the metadata.
pub struct SavedState {
    pub step: u64,
    pub tensors: Vec<(String, Tensor)>,
    pub meta: BTreeMap<String, String>,
}

/// A checkpoint's two files in host memory: copies, so the live model and optimizer may change
/// while a background thread writes them.
pub struct Snapshot {
    pub step: u64,
    model: HostFile,
    state: HostFile,
}

impl Snapshot {
    /// Copies the tensors to host memory (from a GPU: one device-to-host copy each, which waits
    /// for the step that produced them).
    pub fn take(
        step: u64,
        model: &[(String, Tensor)],
        model_meta: &BTreeMap<String, String>,
        state: &[(String, Tensor)],
        state_meta: &BTreeMap<String, String>,
    ) -> Result<Self> {
        Ok(Self {
            step,
            model: HostFile::copy_from(model, model_meta).context("copying the model to host memory")?,
            state: HostFile::copy_from(state, state_meta).context("copying the optimizer state to host memory")?,
        })
    }

    /// The checkpoint of step `state.step`: the model in `vs` (sorted by name, OpenCLIP's keys) and
    /// the train state's tensors and metadata.
    pub fn of(vs: &tch::nn::VarStore, state: SavedState) -> Result<Self> {
        let mut model: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        model.sort_by(|a, b| a.0.cmp(&b.0));
        let model_meta = BTreeMap::from([("format".to_string(), "pt".to_string())]);
        Self::take(state.step, &model, &model_meta, &state.tensors, &state.meta)
    }

    /// Bytes of tensor data held.
    pub fn bytes(&self) -> usize {
        self.model.bytes() + self.state.bytes()
    }
}

/// Resolve `[checkpoint] resume`: `""` → none, `"latest"` → newest complete step of this run (none
/// if there is none yet, so a requeued job and a first start use the same config), else a path to
/// a model file or a state file of a complete checkpoint.
pub fn resolve_resume(spec: &str, dir: &CheckpointDir) -> Result<Option<(PathBuf, PathBuf)>> {
    match spec {
        "" => Ok(None),
        "latest" => Ok(dir.latest()?.map(|s| (dir.model_path(s), dir.state_path(s)))),
        path => {
            let p = PathBuf::from(path);
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let (model, state) = if let Some(stem) = name.strip_suffix(".state.safetensors") {
                (p.with_file_name(format!("{stem}.safetensors")), p.clone())
            } else if let Some(stem) = name.strip_suffix(".safetensors") {
                (p.clone(), p.with_file_name(format!("{stem}.state.safetensors")))
            } else {
                bail!("checkpoint.resume: `{path}` is not a .safetensors checkpoint file");
            };
            if !model.is_file() || !state.is_file() {
                bail!("checkpoint.resume: `{path}` needs both {} and {}", model.display(), state.display());
            }
            Ok(Some((model, state)))
        }
    }
}

fn write_atomic(path: &Path, file: &HostFile) -> Result<()> {
    let tmp =
        path.with_file_name(format!(".{}.tmp", path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()));
    // Streamed from the host copy: no second buffer of the whole file.
    safetensors::serialize_to_file(file.views(), &Some(file.meta()), &tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    fs::File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Some(parent) = path.parent() {
        if let Ok(d) = fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

fn dtype_of(kind: Kind) -> Result<(safetensors::Dtype, usize)> {
    use safetensors::Dtype as D;
    Ok(match kind {
        Kind::Float => (D::F32, 4),
        Kind::Double => (D::F64, 8),
        Kind::BFloat16 => (D::BF16, 2),
        Kind::Half => (D::F16, 2),
        Kind::Int64 => (D::I64, 8),
        Kind::Int => (D::I32, 4),
        Kind::Uint8 => (D::U8, 1),
        Kind::Bool => (D::BOOL, 1),
        k => bail!("cannot store tensors of kind {k:?} in safetensors"),
    })
}

fn kind_of(dtype: safetensors::Dtype) -> Result<Kind> {
    use safetensors::Dtype as D;
    Ok(match dtype {
        D::F32 => Kind::Float,
        D::F64 => Kind::Double,
        D::BF16 => Kind::BFloat16,
        D::F16 => Kind::Half,
        D::I64 => Kind::Int64,
        D::I32 => Kind::Int,
        D::U8 => Kind::Uint8,
        D::BOOL => Kind::Bool,
        d => bail!("unsupported safetensors dtype {d:?}"),
    })
}

/// One tensor's bytes in host memory, in safetensors' terms.
struct HostTensor {
    dtype: safetensors::Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl safetensors::View for &HostTensor {
    fn dtype(&self) -> safetensors::Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// One safetensors file's contents: named tensors copied to host memory, and the metadata.
struct HostFile {
    tensors: Vec<(String, HostTensor)>,
    meta: BTreeMap<String, String>,
}

impl HostFile {
    fn copy_from(tensors: &[(String, Tensor)], meta: &BTreeMap<String, String>) -> Result<Self> {
        let mut out = Vec::with_capacity(tensors.len());
        for (name, t) in tensors {
            let t = t.detach().to_device(tch::Device::Cpu).contiguous();
            let (dtype, width) = dtype_of(t.kind()).with_context(|| format!("tensor `{name}`"))?;
            let numel = t.numel();
            let mut data = vec![0u8; numel * width];
            if numel > 0 {
                // SAFETY: `t` is a contiguous CPU tensor of exactly numel * width bytes. The copy
                // owns its bytes: on the CPU `to_device` and `contiguous` return `t` itself.
                let src = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, numel * width) };
                data.copy_from_slice(src);
            }
            let shape = t.size().iter().map(|&d| d as usize).collect();
            out.push((name.clone(), HostTensor { dtype, shape, data }));
        }
        Ok(Self { tensors: out, meta: meta.clone() })
    }

    fn views(&self) -> Vec<(&str, &HostTensor)> {
        self.tensors.iter().map(|(n, v)| (n.as_str(), v)).collect()
    }

    fn meta(&self) -> std::collections::HashMap<String, String> {
        self.meta.clone().into_iter().collect()
    }

    fn bytes(&self) -> usize {
        self.tensors.iter().map(|(_, t)| t.data.len()).sum()
    }
}

/// The safetensors encoding of named tensors (copied to contiguous CPU memory) with metadata.
pub fn serialize(tensors: &[(String, Tensor)], meta: &BTreeMap<String, String>) -> Result<Vec<u8>> {
    let file = HostFile::copy_from(tensors, meta)?;
    Ok(safetensors::serialize(file.views(), &Some(file.meta()))?)
}

/// Load an OpenCLIP-compatible model file (a checkpoint's, or `model.init`'s) into `vs`, whose
/// parameters are those of `arch`; a ViT's positional grid is resized to `arch`'s image size.
pub fn load_model_file(vs: &mut tch::nn::VarStore, path: &Path, arch: &crate::model::ClipConfig) -> Result<()> {
    crate::model::load_safetensors(vs, path, arch)
        .with_context(|| format!("loading weights from {}", path.display()))?;
    Ok(())
}

/// Read every tensor (on the CPU) and the metadata of a safetensors file.
pub fn read(path: &Path) -> Result<(Named, BTreeMap<String, String>)> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let meta: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a safetensors file", path.display()))?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        let kind = kind_of(view.dtype()).with_context(|| format!("{}: tensor `{name}`", path.display()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        out.push((name.to_string(), Tensor::from_data_size(view.data(), &shape, kind)));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((out, meta))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tensors(v: f32) -> Named {
        vec![
            ("a.weight".into(), Tensor::from_slice(&[v, 2.0, 3.0, 4.0]).view([2, 2])),
            ("b".into(), Tensor::from_slice(&[7i64, 8, 9])),
        ]
    }

    #[test]
    fn round_trips_values_kinds_and_metadata() {
        let d = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(d.path().join("checkpoints"));
        let meta = BTreeMap::from([("step".to_string(), "5".to_string())]);
        cd.save(5, &tensors(1.5), &BTreeMap::new(), &tensors(-1.0), &meta, 0).unwrap();
        let (m, _) = read(&cd.model_path(5)).unwrap();
        let (s, smeta) = read(&cd.state_path(5)).unwrap();
        assert_eq!(m[0].0, "a.weight");
        assert_eq!(Vec::<f32>::try_from(m[0].1.flatten(0, -1)).unwrap(), vec![1.5, 2.0, 3.0, 4.0]);
        assert_eq!(m[0].1.size(), vec![2, 2]);
        assert_eq!(Vec::<i64>::try_from(&s[1].1).unwrap(), vec![7, 8, 9]);
        assert_eq!(smeta.get("step").map(String::as_str), Some("5"));
    }

    #[test]
    fn keeps_newest_and_ignores_incomplete_saves() {
        let d = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(d.path());
        for step in [10, 20, 30] {
            cd.save(step, &tensors(step as f32), &BTreeMap::new(), &tensors(0.0), &BTreeMap::new(), 2).unwrap();
        }
        assert_eq!(cd.complete_steps().unwrap(), vec![20, 30]);
        // A save killed after the model file was renamed, before the state file was: step 40
        // must not count, and a leftover temp file must not either.
        fs::copy(cd.model_path(30), cd.model_path(40)).unwrap();
        fs::write(d.path().join(".step_00000050.state.safetensors.tmp"), b"partial").unwrap();
        assert_eq!(cd.latest().unwrap(), Some(30));
        let (model, state) = resolve_resume("latest", &cd).unwrap().unwrap();
        assert_eq!((model, state), (cd.model_path(30), cd.state_path(30)));
        assert!(read(&cd.state_path(30)).is_ok());
    }

    #[test]
    fn resume_paths_resolve_or_fail_clearly() {
        let d = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(d.path());
        assert!(resolve_resume("", &cd).unwrap().is_none());
        assert!(resolve_resume("latest", &cd).unwrap().is_none());
        cd.save(3, &tensors(1.0), &BTreeMap::new(), &tensors(1.0), &BTreeMap::new(), 0).unwrap();
        let by_state = resolve_resume(cd.state_path(3).to_str().unwrap(), &cd).unwrap().unwrap();
        assert_eq!(by_state.0, cd.model_path(3));
        let e = resolve_resume(d.path().join("nope.safetensors").to_str().unwrap(), &cd).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }
}
