//! What the end-to-end tests of the `trainer` binary share: a temp folder with demo shards, a tiny
//! run config over them, and readers of what a run writes.

#![allow(dead_code)] // each test crate uses its own part

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use ferroclip::checkpoint;

pub const TRAINER: &str = env!("CARGO_BIN_EXE_trainer");

pub struct Fixture {
    pub dir: tempfile::TempDir,
}

impl Fixture {
    /// A temp dir with 2 small training shards of the demo dataset.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = run(&[
            "make-demo-data",
            "--out",
            dir.path().join("data").to_str().unwrap(),
            "--shards",
            "2",
            "--per-shard",
            "48",
        ]);
        assert!(out.status.success(), "make-demo-data failed: {}", String::from_utf8_lossy(&out.stderr));
        Self { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write a config for a tiny run and return its path.
    pub fn config(&self, name: &str, extra: &str) -> PathBuf {
        let d = self.path();
        let text = format!(
            r#"name = "{name}"
output_dir = "{out}"
seed = 3

[model]
arch = "{arch}"
image_size = 32

[data]
train = "{data}/train/{{00000..00001}}.tar"
batch_size = 8
workers = 1
readers = 1
shuffle_buffer = 32

[train]
max_steps = 12
threads = 1

[optim]
lr = 2e-3

[schedule]
warmup_steps = 2

[checkpoint]
every_steps = 4
keep = 0

[log]
every_steps = 1
{extra}
"#,
            out = d.join("runs").display(),
            data = d.join("data").display(),
            arch = test_arch("convnext_test").display(),
        );
        let path = d.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    pub fn run_dir(&self, name: &str) -> PathBuf {
        self.path().join("runs").join(name)
    }
}

/// A test architecture (`tests/models/NAME.json`), as `model.arch` takes it.
pub fn test_arch(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/models").join(format!("{name}.json"))
}

/// A copy of test architecture `name` at `path` with `edit` applied: a model-config file of its own.
pub fn edited_arch(name: &str, path: &Path, edit: impl FnOnce(&mut serde_json::Value)) -> PathBuf {
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(test_arch(name)).unwrap()).unwrap();
    edit(&mut cfg);
    std::fs::write(path, cfg.to_string()).unwrap();
    path.to_path_buf()
}

pub fn run(args: &[&str]) -> Output {
    Command::new(TRAINER).args(args).stdin(Stdio::null()).output().expect("trainer runs")
}

pub fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics.jsonl written");
    text.lines().map(|l| serde_json::from_str(l).expect("metrics line is JSON")).collect()
}

pub fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let (named, _) = checkpoint::read(path).unwrap();
    named.into_iter().map(|(n, t)| (n, tensor_bytes(&t))).collect()
}

/// The bytes of a CPU tensor, in row-major order.
pub fn tensor_bytes(t: &tch::Tensor) -> Vec<u8> {
    let t = t.contiguous();
    let bytes = t.numel() * t.kind().elt_size_in_bytes();
    // SAFETY: contiguous CPU tensor of `bytes` bytes.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, bytes) }.to_vec()
}

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Runs `scripts/{name}` (an OpenCLIP fixture generator) with the repository's venv, which must exist.
pub fn python_script(name: &str, args: &[&str]) -> Output {
    let py = repo().join(".venv/bin/python");
    assert!(py.exists(), "{} missing: this test needs the venv with torch and open_clip", py.display());
    let out =
        Command::new(&py).arg(repo().join("scripts").join(name)).args(args).output().expect("runs .venv/bin/python");
    assert!(out.status.success(), "{name} {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
    out
}

/// Every tensor of a safetensors file, by name.
pub fn read_tensors(path: &Path) -> std::collections::HashMap<String, tch::Tensor> {
    tch::Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_iter().collect()
}

pub fn max_diff(a: &tch::Tensor, b: &tch::Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}
