//! Checkpoints: `checkpoints/step_{N:08}.safetensors` (the OpenCLIP-compatible model file),
//! `checkpoints/step_{N:08}.state.safetensors` (optimizer moments keyed by parameter name, counters,
//! data cursor, config — everything else a resume needs, in tensors and string metadata) and
//! `checkpoints/step_{N:08}.manifest.json` (the step, and each file's name, size and CRC32C).
//!
//! Crash safety: each file is written under a temporary name, fsynced, read back for its size and
//! CRC32C and renamed into place: model file, state file, then the manifest. A step counts as saved
//! once its manifest exists, so a crash at any point of a save leaves the previous checkpoint as the
//! newest complete one. A step with both files but no manifest (written before manifests existed,
//! or a save cut off between its state file and its manifest) also counts, and is checked by
//! parsing both files as safetensors instead. Resuming takes the newest checkpoint that
//! [verifies](CheckpointDir::verify), so a file truncated or corrupted after the save (a full disk,
//! a copy cut short) costs the steps since the previous checkpoint, not the run. Training writes
//! them in the background ([`crate::checkpoint_writer`]) from a [`Snapshot`] in host memory.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use crate::config::ConfigError;

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

/// `step_{N:08}.manifest.json`: what a save wrote, so that a later reader can tell a complete file
/// from a truncated or corrupted one without trusting its contents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub step: u64,
    /// The model file, then the state file.
    pub files: Vec<FileRecord>,
}

/// One file of a checkpoint as written.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// File name, in the manifest's folder.
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// CRC32C (Castagnoli) of the whole file.
    pub crc32c: u32,
}

/// How a checkpoint verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verified {
    /// Every file has the size and CRC32C its manifest records.
    Manifest,
    /// No manifest beside the files (a checkpoint written before manifests, or a save cut off just
    /// before its manifest): each file parses fully as safetensors.
    NoManifest,
}

/// Why a checkpoint file does not verify.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Reason {
    #[error("missing")]
    Missing,
    #[error("unreadable: {0}")]
    Unreadable(String),
    #[error("size {actual} bytes, expected {expected}")]
    Size { actual: u64, expected: u64 },
    #[error("CRC32C mismatch: {actual:08x}, the manifest records {expected:08x}")]
    Crc { actual: u32, expected: u32 },
    #[error("manifest unreadable: {0}")]
    ManifestUnreadable(String),
    #[error("no manifest, and not a complete safetensors file: {0}")]
    NotSafetensors(String),
}

/// A checkpoint that does not verify: the first file found wrong, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {reason}", file.display())]
pub struct BadFile {
    pub file: PathBuf,
    pub reason: Reason,
}

impl BadFile {
    fn new(file: &Path, reason: Reason) -> Self {
        Self { file: file.to_path_buf(), reason }
    }
}

/// The result of verifying a checkpoint.
pub type Verification = std::result::Result<Verified, BadFile>;

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

    pub fn manifest_path(&self, step: u64) -> PathBuf {
        self.dir.join(format!("step_{step:08}.manifest.json"))
    }

    /// Steps whose save completed, ascending: those with a manifest, and those without one that have
    /// both files. Complete is not verified: see [`CheckpointDir::verify`].
    pub fn complete_steps(&self) -> Result<Vec<u64>> {
        let mut steps = BTreeSet::new();
        let entries = match fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).with_context(|| format!("listing {}", self.dir.display())),
        };
        for entry in entries {
            let name = entry.with_context(|| format!("listing {}", self.dir.display()))?.file_name();
            let name = name.to_string_lossy();
            let Some(rest) = name.strip_prefix("step_") else { continue };
            if let Some(step) = rest.strip_suffix(".manifest.json").and_then(|n| n.parse::<u64>().ok()) {
                steps.insert(step);
            } else if let Some(step) = rest.strip_suffix(".state.safetensors").and_then(|n| n.parse::<u64>().ok()) {
                if self.model_path(step).is_file() {
                    steps.insert(step);
                }
            }
        }
        Ok(steps.into_iter().collect())
    }

    /// The newest complete step (verified or not).
    pub fn latest(&self) -> Result<Option<u64>> {
        Ok(self.complete_steps()?.last().copied())
    }

    /// Checks step `step`'s files on disk: see [`verify_files`].
    pub fn verify(&self, step: u64) -> Verification {
        verify_files(&self.model_path(step), &self.state_path(step))
    }

    /// Write both files of `step` and its manifest atomically, then drop old checkpoints as
    /// [`CheckpointDir::write`] does.
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

    /// Write a snapshot's two files atomically, model file first, then its manifest; verify the new
    /// checkpoint from disk and drop old ones (see `prune`). [`crate::checkpoint_writer`]
    /// calls this on its thread.
    pub fn write(&self, snapshot: &Snapshot, keep: usize) -> Result<Saved> {
        let step = snapshot.step;
        fs::create_dir_all(&self.dir).with_context(|| format!("creating {}", self.dir.display()))?;
        let saved = Saved { step, model: self.model_path(step), state: self.state_path(step) };
        let model = write_atomic(&saved.model, |tmp| snapshot.model.serialize_to(tmp))?;
        test_pause_between_files(step);
        let state = write_atomic(&saved.state, |tmp| snapshot.state.serialize_to(tmp))?;
        let manifest = serde_json::to_vec_pretty(&Manifest { step, files: vec![model, state] })
            .context("encoding the checkpoint manifest")?;
        write_atomic(&self.manifest_path(step), |tmp| Ok(fs::write(tmp, &manifest)?))?;
        self.prune(step, keep)?;
        Ok(saved)
    }

    /// After the save of `newest`: verify it from disk, then delete all complete checkpoints but the
    /// newest `keep` (0 keeps all) and the newest one that verifies, so that a bad new checkpoint
    /// never costs the last good one.
    fn prune(&self, newest: u64, keep: usize) -> Result<()> {
        let steps = self.complete_steps()?;
        let verified = match self.verify(newest) {
            Ok(_) => Some(newest),
            Err(bad) => {
                let older = steps.iter().rev().copied().filter(|&s| s < newest).find(|&s| self.verify(s).is_ok());
                let kept = older.map_or("no older checkpoint verifies".to_string(), |s| format!("keeping step {s}"));
                eprintln!("ferroclip: the checkpoint of step {newest} does not verify after writing ({bad}); {kept}");
                older
            }
        };
        if keep == 0 {
            return Ok(());
        }
        for &old in steps.iter().take(steps.len().saturating_sub(keep)) {
            if Some(old) == verified {
                continue;
            }
            // Manifest first, state next: a deletion cut off midway leaves either a checkpoint
            // without manifest whose files are whole, or no complete checkpoint.
            for path in [self.manifest_path(old), self.state_path(old), self.model_path(old)] {
                let _ = fs::remove_file(path);
            }
        }
        Ok(())
    }
}

/// `NAME` of a checkpoint file `NAME.safetensors`, `NAME.state.safetensors` or `NAME.manifest.json`.
fn checkpoint_stem(path: &Path) -> Option<&str> {
    let name = path.file_name()?.to_str()?;
    [".manifest.json", ".state.safetensors", ".safetensors"].iter().find_map(|s| name.strip_suffix(s))
}

/// The manifest a model file `NAME.safetensors` would have: `NAME.manifest.json` beside it.
fn manifest_beside(model: &Path) -> Option<PathBuf> {
    Some(model.with_file_name(format!("{}.manifest.json", checkpoint_stem(model)?)))
}

/// The model and state file of the checkpoint that `path` (its model file, state file or
/// manifest) belongs to; `None` for any other name.
pub fn checkpoint_files(path: &Path) -> Option<(PathBuf, PathBuf)> {
    let stem = checkpoint_stem(path)?;
    Some((path.with_file_name(format!("{stem}.safetensors")), path.with_file_name(format!("{stem}.state.safetensors"))))
}

/// Checks a checkpoint's two files. With the manifest beside the model file: both have the size and
/// CRC32C it records. Without one: both parse fully as safetensors (no checksum to compare).
pub fn verify_files(model: &Path, state: &Path) -> Verification {
    match manifest_beside(model).filter(|m| m.exists()) {
        Some(manifest) => verify_against(&manifest, &[model, state]),
        None => {
            parse_fully(model)?;
            parse_fully(state)?;
            Ok(Verified::NoManifest)
        }
    }
}

/// Checks a model file alone (`model.init`): against the manifest beside it if there is one, else
/// that it parses fully as safetensors.
pub fn verify_model_file(model: &Path) -> Verification {
    match manifest_beside(model).filter(|m| m.exists()) {
        Some(manifest) => verify_against(&manifest, &[model]),
        None => parse_fully(model).map(|()| Verified::NoManifest),
    }
}

/// Checks `files` against the records of `manifest` with the same file names.
fn verify_against(manifest: &Path, files: &[&Path]) -> Verification {
    let unreadable = |why: String| BadFile::new(manifest, Reason::ManifestUnreadable(why));
    let text = fs::read(manifest).map_err(|e| unreadable(e.to_string()))?;
    let m: Manifest = serde_json::from_slice(&text).map_err(|e| unreadable(e.to_string()))?;
    for &file in files {
        let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let record = m
            .files
            .iter()
            .find(|r| r.name == name)
            .ok_or_else(|| unreadable(format!("it lists no file named `{name}`")))?;
        let bytes = match fs::metadata(file) {
            Ok(md) => md.len(),
            Err(e) => return Err(BadFile::new(file, io_reason(&e))),
        };
        if bytes != record.bytes {
            return Err(BadFile::new(file, Reason::Size { actual: bytes, expected: record.bytes }));
        }
        let (_, crc) = size_and_crc(file).map_err(|e| BadFile::new(file, io_reason(&e)))?;
        if crc != record.crc32c {
            return Err(BadFile::new(file, Reason::Crc { actual: crc, expected: record.crc32c }));
        }
    }
    Ok(Verified::Manifest)
}

/// A file without a manifest: whole and well-formed as safetensors (header, tensor offsets and
/// length agree).
fn parse_fully(path: &Path) -> std::result::Result<(), BadFile> {
    let bytes = fs::read(path).map_err(|e| BadFile::new(path, io_reason(&e)))?;
    safetensors::SafeTensors::deserialize(&bytes)
        .map(|_| ())
        .map_err(|e| BadFile::new(path, Reason::NotSafetensors(e.to_string())))
}

fn io_reason(e: &std::io::Error) -> Reason {
    match e.kind() {
        std::io::ErrorKind::NotFound => Reason::Missing,
        _ => Reason::Unreadable(e.to_string()),
    }
}

/// Size and CRC32C of a file, read in 1 MiB pieces.
fn size_and_crc(path: &Path) -> std::io::Result<(u64, u32)> {
    let mut f = fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut bytes, mut crc) = (0u64, 0u32);
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok((bytes, crc));
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        bytes += n as u64;
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

/// Resolve `[checkpoint] resume`: `""` → none; `"latest"` → the newest checkpoint of this run that
/// verifies, warning about each newer one skipped (none if there is none yet, so a requeued job and
/// a first start use the same config; an error if there are some and none verifies); else the path
/// of a checkpoint's model or state file, which must verify (a [`ConfigError`] otherwise).
pub fn resolve_resume(spec: &str, dir: &CheckpointDir) -> Result<Option<(PathBuf, PathBuf)>> {
    match spec {
        "" => Ok(None),
        "latest" => {
            let steps = dir.complete_steps()?;
            for &step in steps.iter().rev() {
                match dir.verify(step) {
                    Ok(how) => {
                        if how == Verified::NoManifest {
                            eprintln!("ferroclip: checkpoint step {step} has no manifest; both of its files parse as safetensors");
                        }
                        return Ok(Some((dir.model_path(step), dir.state_path(step))));
                    }
                    Err(bad) => eprintln!("ferroclip: skipping checkpoint step {step} ({bad})"),
                }
            }
            if steps.is_empty() {
                return Ok(None);
            }
            Err(ConfigError {
                file: dir.dir().display().to_string(),
                message: format!(
                    "key `checkpoint.resume` = \"latest\": none of the {} checkpoints verifies (see above)",
                    steps.len()
                ),
            }
            .into())
        }
        path => {
            let error = |message: String| ConfigError { file: path.to_string(), message };
            let Some((model, state)) = checkpoint_files(Path::new(path)) else {
                bail!(error("key `checkpoint.resume`: not a checkpoint's .safetensors file".into()));
            };
            match verify_files(&model, &state) {
                Ok(_) => Ok(Some((model, state))),
                Err(bad) if bad.file == Path::new(path) => {
                    bail!(error(format!("key `checkpoint.resume`: {}", bad.reason)))
                }
                Err(bad) => bail!(error(format!("key `checkpoint.resume`: {bad}"))),
            }
        }
    }
}

/// `model.init`'s file, checked before it loads: a bad one is a [`ConfigError`] naming the key.
/// A `torch.save` file (an OpenCLIP checkpoint) has no manifest and is checked whole as it loads
/// (`model::torch_file`: a truncated or corrupt one is an error naming it).
pub fn check_init_file(path: &Path) -> Result<()> {
    if let Ok(crate::model::torch_file::Format::TorchZip | crate::model::torch_file::Format::TorchLegacy) =
        crate::model::torch_file::Format::of_file(path)
    {
        return Ok(());
    }
    match verify_model_file(path) {
        Ok(_) => Ok(()),
        Err(bad) => {
            Err(ConfigError { file: path.display().to_string(), message: format!("key `model.init`: {}", bad.reason) }
                .into())
        }
    }
}

/// Writes `path` through `write` under a temporary name, fsyncs it, reads it back for its size and
/// CRC32C (which also proves the bytes reached the file) and renames it into place.
fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<FileRecord> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    write(&tmp).with_context(|| format!("writing {}", tmp.display()))?;
    fs::File::open(&tmp).and_then(|f| f.sync_all()).with_context(|| format!("syncing {}", tmp.display()))?;
    let (bytes, crc32c) = size_and_crc(&tmp).with_context(|| format!("reading back {}", tmp.display()))?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Some(parent) = path.parent() {
        if let Ok(d) = fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(FileRecord { name, bytes, crc32c })
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

    /// Streamed from the host copy: no second buffer of the whole file.
    fn serialize_to(&self, path: &Path) -> Result<()> {
        Ok(safetensors::serialize_to_file(self.views(), &Some(self.meta()), path)?)
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
    crate::model::load_state_dict(vs, path, arch)
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

    /// Flips every bit of the byte in the middle of `path`: same size, other contents.
    fn flip_middle_byte(path: &Path) {
        let mut bytes = fs::read(path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        fs::write(path, bytes).unwrap();
    }

    fn truncate(path: &Path, by: u64) {
        let f = fs::OpenOptions::new().write(true).open(path).unwrap();
        let len = f.metadata().unwrap().len();
        f.set_len(len - by).unwrap();
    }

    fn saved(cd: &CheckpointDir, steps: &[u64]) {
        for &step in steps {
            cd.save(step, &tensors(step as f32), &BTreeMap::new(), &tensors(0.5), &BTreeMap::new(), 0).unwrap();
        }
    }

    #[test]
    fn manifest_records_each_files_size_and_crc32c() {
        let d = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(d.path());
        saved(&cd, &[7]);
        let m: Manifest = serde_json::from_slice(&fs::read(cd.manifest_path(7)).unwrap()).unwrap();
        assert_eq!(m.step, 7);
        let names: Vec<&str> = m.files.iter().map(|r| r.name.as_str()).collect();
        assert_eq!(names, ["step_00000007.safetensors", "step_00000007.state.safetensors"]);
        for (record, path) in m.files.iter().zip([cd.model_path(7), cd.state_path(7)]) {
            let bytes = fs::read(&path).unwrap();
            assert_eq!(record.bytes, bytes.len() as u64);
            assert_eq!(record.crc32c, crc32c::crc32c(&bytes));
        }
        assert_eq!(cd.verify(7), Ok(Verified::Manifest));
        assert_eq!(verify_model_file(&cd.model_path(7)), Ok(Verified::Manifest));
        // No temporary file is left behind.
        let mut names: Vec<String> =
            fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(
            names,
            ["step_00000007.manifest.json", "step_00000007.safetensors", "step_00000007.state.safetensors"]
        );
    }

    #[test]
    fn truncated_file_fails_on_its_size() {
        let d = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(d.path());
        saved(&cd, &[1]);
        let full = fs::metadata(cd.model_path(1)).unwrap().len();
        truncate(&cd.model_path(1), 10);
        let bad = cd.verify(1).unwrap_err();
        assert_eq!(bad, BadFile { file: cd.model_path(1), reason: Reason::Size { actual: full - 10, expected: full } });
        assert!(bad.to_string().contains("step_00000001.safetensors: size"), "{bad}");
    }

    #[test]
    fn flipped_byte_of_same_size_fails_on_its_crc() {
        let d = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(d.path());
        saved(&cd, &[1]);
        let size = fs::metadata(cd.state_path(1)).unwrap().len();
        flip_middle_byte(&cd.state_path(1));
        assert_eq!(fs::metadata(cd.state_path(1)).unwrap().len(), size);
        let bad = cd.verify(1).unwrap_err();
        assert_eq!(bad.file, cd.state_path(1));
        assert!(matches!(bad.reason, Reason::Crc { actual, expected } if actual != expected), "{bad}");
        // The model file alone still verifies against the same manifest.
        assert_eq!(verify_model_file(&cd.model_path(1)), Ok(Verified::Manifest));
    }

    #[test]
    fn unreadable_manifest_and_missing_file_are_named() {
        let d = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(d.path());
        saved(&cd, &[1, 2]);
        fs::write(cd.manifest_path(1), b"{\"step\": 1, ").unwrap();
        let bad = cd.verify(1).unwrap_err();
        assert_eq!(bad.file, cd.manifest_path(1));
        assert!(matches!(bad.reason, Reason::ManifestUnreadable(_)), "{bad}");
        // With its manifest, a step missing its state file is complete but does not verify.
        fs::remove_file(cd.state_path(2)).unwrap();
        assert_eq!(cd.complete_steps().unwrap(), vec![1, 2]);
        assert_eq!(cd.verify(2), Err(BadFile { file: cd.state_path(2), reason: Reason::Missing }));
    }

    #[test]
    fn checkpoint_without_manifest_verifies_by_parsing_both_files() {
        let d = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(d.path());
        saved(&cd, &[4, 8]);
        // As written before manifests existed.
        fs::remove_file(cd.manifest_path(4)).unwrap();
        fs::remove_file(cd.manifest_path(8)).unwrap();
        assert_eq!(cd.complete_steps().unwrap(), vec![4, 8]);
        assert_eq!(cd.verify(8), Ok(Verified::NoManifest));
        assert_eq!(verify_model_file(&cd.model_path(8)), Ok(Verified::NoManifest));
        truncate(&cd.state_path(8), 3);
        let bad = cd.verify(8).unwrap_err();
        assert_eq!(bad.file, cd.state_path(8));
        assert!(matches!(bad.reason, Reason::NotSafetensors(_)), "{bad}");
        assert!(bad.to_string().contains("no manifest"), "{bad}");
        // `latest` falls back to the older one.
        let (model, state) = resolve_resume("latest", &cd).unwrap().unwrap();
        assert_eq!((model, state), (cd.model_path(4), cd.state_path(4)));
    }

    #[test]
    fn latest_skips_newer_checkpoints_that_do_not_verify() {
        let d = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(d.path());
        saved(&cd, &[4, 8, 12]);
        truncate(&cd.model_path(12), 1);
        flip_middle_byte(&cd.state_path(8));
        let (model, _) = resolve_resume("latest", &cd).unwrap().unwrap();
        assert_eq!(model, cd.model_path(4));
        // None verifying is an error (status 2), not a silent fresh start.
        flip_middle_byte(&cd.model_path(4));
        let e = resolve_resume("latest", &cd).unwrap_err();
        assert!(e.downcast_ref::<ConfigError>().is_some(), "{e:#}");
        assert!(format!("{e:#}").contains("none of the 3 checkpoints verifies"), "{e:#}");
    }

    #[test]
    fn explicit_resume_path_that_does_not_verify_is_a_config_error_naming_the_file() {
        let d = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(d.path());
        saved(&cd, &[3]);
        flip_middle_byte(&cd.model_path(3));
        // Given the state file, the bad model file is named too.
        let given = cd.state_path(3).display().to_string();
        let e = resolve_resume(&given, &cd).unwrap_err();
        let ce = e.downcast_ref::<ConfigError>().expect("a ConfigError");
        assert_eq!(ce.file, given);
        assert!(
            ce.message.contains("checkpoint.resume") && ce.message.contains("step_00000003.safetensors: CRC32C"),
            "{}",
            ce.message
        );
        let garbage = d.path().join("garbage.safetensors");
        fs::write(&garbage, b"not safetensors").unwrap();
        let e = check_init_file(&garbage).unwrap_err();
        let ce = e.downcast_ref::<ConfigError>().expect("a ConfigError");
        assert!(ce.file.ends_with("garbage.safetensors") && ce.message.contains("model.init"), "{ce}");
        assert!(check_init_file(&cd.model_path(3)).unwrap_err().to_string().contains("CRC32C"));
    }

    #[test]
    fn keep_never_deletes_the_newest_verified_checkpoint_for_a_newer_unverified_one() {
        let d = tempfile::tempdir().unwrap();
        let cd = CheckpointDir::new(d.path());
        saved(&cd, &[10, 20, 30]);
        truncate(&cd.state_path(30), 5);
        cd.prune(30, 1).unwrap();
        assert_eq!(cd.complete_steps().unwrap(), vec![20, 30]);
        assert!(!cd.model_path(10).exists() && !cd.manifest_path(10).exists());
        assert_eq!(cd.verify(20), Ok(Verified::Manifest));
        // Once a newer one verifies, the rule is plain keep = 1 again.
        cd.save(40, &tensors(4.0), &BTreeMap::new(), &tensors(0.0), &BTreeMap::new(), 1).unwrap();
        assert_eq!(cd.complete_steps().unwrap(), vec![40]);
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
        assert!(e.to_string().contains("nope") && e.to_string().contains("missing"), "{e}");
        assert!(e.downcast_ref::<ConfigError>().is_some(), "{e:#}");
    }
}
