//! End-to-end tests of the `trainer` binary on the project's own synthetic shards: the loss falls,
//! config errors name their key, a run killed with SIGKILL (also while the background checkpoint
//! writer is half done) resumes to bitwise the same parameters,
//! SIGTERM checkpoints and stops, and a fine-tune loads weights from a smaller image size.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferroclip::checkpoint;

const TRAINER: &str = env!("CARGO_BIN_EXE_trainer");

struct Fixture {
    dir: tempfile::TempDir,
}

impl Fixture {
    /// A temp dir with 2 small training shards of the demo dataset.
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = run(&["make-demo-data", "--out", dir.path().join("data").to_str().unwrap(), "--shards", "2", "--per-shard", "48"]);
        assert!(out.status.success(), "make-demo-data failed: {}", String::from_utf8_lossy(&out.stderr));
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Write a config for a tiny run and return its path.
    fn config(&self, name: &str, extra: &str) -> PathBuf {
        let d = self.path();
        let text = format!(
            r#"name = "{name}"
output_dir = "{out}"
seed = 3

[model]
arch = "convnext_test"
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
        );
        let path = d.join(format!("{name}.toml"));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn run_dir(&self, name: &str) -> PathBuf {
        self.path().join("runs").join(name)
    }
}

fn run(args: &[&str]) -> Output {
    Command::new(TRAINER).args(args).stdin(Stdio::null()).output().expect("trainer runs")
}

fn metrics(run_dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).expect("metrics.jsonl written");
    text.lines().map(|l| serde_json::from_str(l).expect("metrics line is JSON")).collect()
}

fn tensors(path: &Path) -> Vec<(String, Vec<u8>)> {
    let (named, _) = checkpoint::read(path).unwrap();
    named
        .into_iter()
        .map(|(n, t)| {
            let t = t.contiguous();
            let bytes = t.numel() * t.kind().elt_size_in_bytes();
            // SAFETY: contiguous CPU tensor of `bytes` bytes.
            let data = unsafe { std::slice::from_raw_parts(t.data_ptr() as *const u8, bytes) }.to_vec();
            (n, data)
        })
        .collect()
}

#[test]
fn bad_config_key_is_rejected_with_its_name_and_status_2() {
    let f = Fixture::new();
    let cfg = f.config("bad", "\n[optim]\nlrr = 1\n");
    let text = std::fs::read_to_string(&cfg).unwrap().replace("[optim]\nlr = 2e-3\n", "");
    std::fs::write(&cfg, text).unwrap();
    let out = run(&["--config", cfg.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("lrr"), "{err}");
    assert!(err.contains("bad.toml"), "{err}");

    let cfg = f.config("bad2", "");
    let out = run(&["--config", cfg.to_str().unwrap(), "--set", "data.batch_size=0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("data.batch_size"), "{err}");

    let out = run(&["--config", f.path().join("missing.toml").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let out = run(&["--bogus-flag"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn loss_falls_and_outputs_are_written() {
    let f = Fixture::new();
    let cfg = f.config("falls", "");
    let out = run(&["--config", cfg.to_str().unwrap(), "--set", "train.max_steps=40", "--set", "checkpoint.every_steps=20"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m = metrics(&f.run_dir("falls"));
    assert_eq!(m.len(), 40);
    for key in ["step", "samples_seen", "loss", "lr", "logit_scale", "samples_per_s"] {
        assert!(m[0].get(key).is_some(), "metrics.jsonl lacks {key}: {}", m[0]);
    }
    let mean = |xs: &[serde_json::Value]| xs.iter().map(|v| v["loss"].as_f64().unwrap()).sum::<f64>() / xs.len() as f64;
    let (first, last) = (mean(&m[..5]), mean(&m[35..]));
    assert!(last < first - 0.2, "loss did not fall: first {first:.3}, last {last:.3}");
    assert_eq!(m[39]["samples_seen"].as_u64(), Some(40 * 8));
    let ckpt = f.run_dir("falls").join("checkpoints");
    assert!(ckpt.join("step_00000020.safetensors").is_file());
    assert!(ckpt.join("step_00000040.state.safetensors").is_file());
    assert!(f.run_dir("falls").join("config.toml").is_file());
    let tb = std::fs::read_dir(f.run_dir("falls").join("tensorboard")).unwrap().count();
    assert!(tb >= 1, "no TensorBoard event file");
}

fn wait_for(path: &Path, child: &mut std::process::Child, limit: Duration) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if path.is_file() {
            return true;
        }
        if let Ok(Some(_)) = child.try_wait() {
            return path.is_file();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

#[test]
fn killed_and_resumed_run_ends_bitwise_equal_to_uninterrupted_run() {
    let f = Fixture::new();
    let steps = ["--set", "train.max_steps=16", "--set", "checkpoint.every_steps=2"];

    let whole = f.config("whole", "");
    let out = run(&[&["--config", whole.to_str().unwrap()][..], &steps[..]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let cut = f.config("cut", "");
    let mut args = vec!["--config", cut.to_str().unwrap()];
    args.extend_from_slice(&steps);
    let mut child = Command::new(TRAINER).args(&args).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let first = f.run_dir("cut").join("checkpoints").join("step_00000004.state.safetensors");
    assert!(wait_for(&first, &mut child, Duration::from_secs(120)), "no checkpoint at step 4");
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let final_model = f.run_dir("cut").join("checkpoints").join("step_00000016.safetensors");
    assert!(!final_model.exists(), "the run finished before it could be killed; the test proves nothing");

    let mut args = vec!["--config", cut.to_str().unwrap(), "--set", "checkpoint.resume=latest"];
    args.extend_from_slice(&steps);
    let out = run(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resumed from"), "{err}");

    assert_same_end("whole", "cut", &f, 16);
}

/// Runs `a` and `b` of `f` ended with bitwise the same model and optimizer state at `step`, and
/// (the data stream resumed exactly: the same samples were seen) the same last logged loss.
fn assert_same_end(a: &str, b: &str, f: &Fixture, step: u64) {
    let (da, db) = (f.run_dir(a).join("checkpoints"), f.run_dir(b).join("checkpoints"));
    for file in [format!("step_{step:08}.safetensors"), format!("step_{step:08}.state.safetensors")] {
        let (ta, tb) = (tensors(&da.join(&file)), tensors(&db.join(&file)));
        assert_eq!(ta.len(), tb.len());
        for ((na, xa), (nb, xb)) in ta.iter().zip(&tb) {
            assert_eq!(na, nb);
            assert!(xa == xb, "{file}: `{na}` differs after resume");
        }
    }
    let (ma, mb) = (metrics(&f.run_dir(a)), metrics(&f.run_dir(b)));
    let last = |m: &[serde_json::Value]| m.last().unwrap()["loss"].as_f64().unwrap();
    assert_eq!(last(&ma), last(&mb));
}

/// The last step in `metrics.jsonl` (0 before the first line).
fn logged_step(run_dir: &Path) -> u64 {
    let text = std::fs::read_to_string(run_dir.join("metrics.jsonl")).unwrap_or_default();
    text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()?["step"].as_u64()).max().unwrap_or(0)
}

#[test]
fn killed_while_the_background_writer_runs_leaves_the_previous_checkpoint_and_resumes_bitwise() {
    let f = Fixture::new();
    let steps = ["--set", "train.max_steps=16", "--set", "checkpoint.every_steps=2"];
    let whole = f.config("whole", "");
    let out = run(&[&["--config", whole.to_str().unwrap()][..], &steps[..]].concat());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The writer of step 4 stops between its two files (a test-only pause) until the kill.
    let cut = f.config("cut", "");
    let mut args = vec!["--config", cut.to_str().unwrap()];
    args.extend_from_slice(&steps);
    let mut child = Command::new(TRAINER)
        .args(&args)
        .env("FERROCLIP_TEST_CHECKPOINT_PAUSE", "4:600")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let dir = checkpoint::CheckpointDir::new(f.run_dir("cut").join("checkpoints"));
    assert!(wait_for(&dir.model_path(4), &mut child, Duration::from_secs(120)), "no model file at step 4");
    // Training goes on while step 4 is half written: the save does not stall the step.
    let t = Instant::now();
    while logged_step(&f.run_dir("cut")) < 5 && t.elapsed() < Duration::from_secs(120) {
        assert!(child.try_wait().unwrap().is_none(), "the trainer exited while its checkpoint writer was paused");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(logged_step(&f.run_dir("cut")) >= 5, "training stalled while the checkpoint of step 4 was written");
    assert!(!dir.state_path(4).exists(), "the writer of step 4 did not pause between its files");
    child.kill().unwrap(); // SIGKILL, with the writer between the two files of step 4
    child.wait().unwrap();

    // The previous checkpoint is the newest complete one, and loads.
    assert_eq!(dir.latest().unwrap(), Some(2));
    let (model, state) = checkpoint::resolve_resume("latest", &dir).unwrap().unwrap();
    assert!(!tensors(&model).is_empty() && !tensors(&state).is_empty());

    let mut args = vec!["--config", cut.to_str().unwrap(), "--set", "checkpoint.resume=latest"];
    args.extend_from_slice(&steps);
    let out = run(&args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("at step 2"), "{err}");
    assert_same_end("whole", "cut", &f, 16);
}

#[test]
fn sigterm_checkpoints_and_stops_then_latest_resumes() {
    let f = Fixture::new();
    let cfg = f.config("preempt", "");
    let args = ["--config", cfg.to_str().unwrap(), "--set", "train.max_steps=100000", "--set", "checkpoint.every_steps=0"];
    let mut child = Command::new(TRAINER).args(args).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let metrics_file = f.run_dir("preempt").join("metrics.jsonl");
    assert!(wait_for(&metrics_file, &mut child, Duration::from_secs(120)), "training did not start");
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let steps = checkpoint::CheckpointDir::new(f.run_dir("preempt").join("checkpoints")).complete_steps().unwrap();
    assert_eq!(steps.len(), 1, "{err}");
    assert!(steps[0] < 100000);

    let out = run(&["--config", cfg.to_str().unwrap(), "--set", &format!("train.max_steps={}", steps[0] + 2), "--set", "checkpoint.resume=latest"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains(&format!("at step {}", steps[0])), "{err}");
}

#[test]
fn fine_tune_initializes_a_larger_image_size_from_a_checkpoint() {
    let f = Fixture::new();
    let base = f.config("base", "");
    let out = run(&["--config", base.to_str().unwrap(), "--set", "train.max_steps=2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let init = f.run_dir("base").join("checkpoints").join("step_00000002.safetensors");

    // lr 0: AdamW changes nothing, so the fine-tune's saved weights must equal the init file.
    let ft = f.config("ft", "");
    let out = run(&[
        "--config",
        ft.to_str().unwrap(),
        "--set",
        "model.image_size=48",
        "--set",
        &format!("model.init={}", init.display()),
        "--set",
        "optim.lr=0",
        "--set",
        "train.max_steps=2",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("initialized weights from"), "{err}");
    let saved = f.run_dir("ft").join("checkpoints").join("step_00000002.safetensors");
    assert_eq!(tensors(&init), tensors(&saved));
    // A fresh schedule: the fine-tune starts at step 0, not at the init's step.
    assert_eq!(metrics(&f.run_dir("ft"))[0]["step"].as_u64(), Some(1));
}

/// Extract a demo eval shard into the two folder layouts evaluation accepts: `classes/<class>/<key>.jpg`
/// (zero-shot) and `pairs/<key>.jpg` + `pairs/captions.tsv` (retrieval).
fn shard_to_folders(shard: &Path, out: &Path, classnames: &[String]) {
    let raw = out.join("raw");
    std::fs::create_dir_all(&raw).unwrap();
    let st = Command::new("tar").arg("-xf").arg(shard).arg("-C").arg(&raw).status().unwrap();
    assert!(st.success());
    let mut keys: Vec<String> = std::fs::read_dir(&raw)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter_map(|n| n.strip_suffix(".jpg").map(String::from))
        .collect();
    keys.sort();
    let pairs = out.join("pairs");
    std::fs::create_dir_all(&pairs).unwrap();
    // Every class gets a folder, even one without images, so folder order is label order.
    for c in classnames {
        std::fs::create_dir_all(out.join("classes").join(c)).unwrap();
    }
    let mut tsv = String::new();
    for k in &keys {
        let label: usize = std::fs::read_to_string(raw.join(format!("{k}.cls"))).unwrap().trim().parse().unwrap();
        let class_dir = out.join("classes").join(&classnames[label]);
        std::fs::create_dir_all(&class_dir).unwrap();
        std::fs::copy(raw.join(format!("{k}.jpg")), class_dir.join(format!("{k}.jpg"))).unwrap();
        std::fs::copy(raw.join(format!("{k}.jpg")), pairs.join(format!("{k}.jpg"))).unwrap();
        for line in std::fs::read_to_string(raw.join(format!("{k}.txt"))).unwrap().lines().filter(|l| !l.trim().is_empty()) {
            tsv.push_str(&format!("{k}.jpg\t{line}\n"));
        }
    }
    std::fs::write(pairs.join("captions.tsv"), tsv).unwrap();
}

#[test]
fn eval_standalone_agrees_between_shards_and_folders_and_writes_flat_json() {
    let f = Fixture::new();
    let cfg = f.config("ev", "");
    let out = run(&["--config", cfg.to_str().unwrap(), "--set", "train.max_steps=3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let model = f.run_dir("ev").join("checkpoints").join("step_00000003.safetensors");
    let data = f.path().join("data");
    let classnames: Vec<String> = std::fs::read_to_string(data.join("classnames.txt")).unwrap().lines().map(String::from).collect();
    // Folder class names sort alphabetically (ImageFolder order); name them so that order is label order.
    let numbered: Vec<String> = classnames.iter().enumerate().map(|(i, c)| format!("{i:03} {c}")).collect();
    std::fs::write(f.path().join("numbered.txt"), numbered.join("\n") + "\n").unwrap();
    shard_to_folders(&data.join("eval").join("00000.tar"), &f.path().join("folders"), &numbered);

    let eval = |name: &str, sets: &[String]| -> serde_json::Value {
        let json = f.path().join(format!("{name}.json"));
        let mut args: Vec<String> =
            vec!["eval".into(), "--config".into(), cfg.display().to_string(), "--checkpoint".into(), model.display().to_string()];
        args.extend(["--out".into(), json.display().to_string()]);
        for s in sets {
            args.extend(["--set".into(), s.clone()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&args);
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(stdout.contains("zeroshot_top1"), "no result table: {stdout}");
        serde_json::from_str(&std::fs::read_to_string(json).unwrap()).unwrap()
    };
    let names = f.path().join("numbered.txt").display().to_string();
    let shards = eval(
        "shards",
        &[
            format!("eval.zeroshot_data={}", data.join("eval").join("00000.tar").display()),
            format!("eval.zeroshot_classnames={names}"),
            format!("eval.retrieval_data={}", data.join("eval").join("00000.tar").display()),
            format!("eval.val_data={}", data.join("eval").join("00000.tar").display()),
        ],
    );
    let folders = eval(
        "folders",
        &[
            format!("eval.zeroshot_data={}", f.path().join("folders").join("classes").display()),
            format!("eval.retrieval_data={}", f.path().join("folders").join("pairs").display()),
        ],
    );
    for key in ["zeroshot_top1", "zeroshot_top5", "i2t_recall@1", "i2t_recall@5", "i2t_recall@10", "t2i_recall@1", "t2i_recall@5", "t2i_recall@10"] {
        let (a, b) = (shards[key].as_f64().unwrap(), folders[key].as_f64().unwrap());
        assert!((0.0..=1.0).contains(&a), "{key} = {a}");
        assert!((a - b).abs() < 1e-9, "{key}: shards {a} vs folders {b}");
    }
    assert!(shards["val_loss"].as_f64().unwrap().is_finite());
    assert!(folders.get("val_loss").is_none(), "val_loss reported without val_data");
}

#[test]
fn xlm_roberta_tower_trains_with_a_hugging_face_tokenizer() {
    let f = Fixture::new();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let tokenizer = root.join("data/tests/fixtures/tokenizer/xlmr_tiny_tokenizer.json");
    let cfg = f.config("xlmr", "");
    let args = |extra: &[String]| -> Output {
        let mut a: Vec<String> = vec!["--config".into(), cfg.display().to_string()];
        for s in ["model.arch=xlmr_vit_test".to_string(), format!("model.tokenizer={}", tokenizer.display()), "train.max_steps=3".into()]
            .iter()
            .chain(extra)
        {
            a.extend(["--set".into(), s.clone()]);
        }
        run(&a.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let out = args(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let saved = tensors(&f.run_dir("xlmr").join("checkpoints").join("step_00000003.safetensors"));
    assert!(saved.iter().any(|(n, _)| n.starts_with("text.transformer.encoder.layer.")), "no XLM-R keys in the saved model");
    assert!(metrics(&f.run_dir("xlmr")).iter().all(|r| r["loss"].as_f64().unwrap().is_finite()));

    // A text-encoder file of another vocabulary size is refused, naming the key and the tensor.
    let hf_text = root.join("tests/fixtures/models/xlmr_vit_test/hf_text.safetensors");
    let out = args(&[format!("model.text_init={}", hf_text.display()), "name=xlmr2".into()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("model.text_init") && err.contains("word_embeddings"), "{err}");
}

#[test]
fn gpu_check_dry_run_runs_every_stage_on_the_cpu_and_writes_the_report() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = tempfile::tempdir().unwrap();
    let report = out.path().join("report");
    let run = Command::new(root.join("scripts/gpu-check"))
        .args(["--dry-run", report.to_str().unwrap()])
        .env("TRAINER", TRAINER)
        .stdin(Stdio::null())
        .output()
        .expect("scripts/gpu-check runs");
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "gpu-check --dry-run failed:\n{err}");
    let md = std::fs::read_to_string(report.join("gpu-check.md")).expect("gpu-check.md written");
    let summary = std::fs::read_to_string(report.join("summary.txt")).unwrap();
    for stage in ["torch", "demo-data", "train-debug", "bench", "e2e-data", "e2e"] {
        assert!(summary.lines().any(|l| l.starts_with(&format!("PASS {stage}"))), "stage {stage} did not pass:\n{summary}");
    }
    // The sync-debug stage runs whenever the trainer has the mode, and says so when it has not.
    assert!(summary.contains("sync-debug"), "{summary}");
    assert!(!summary.contains("FAIL"), "{summary}");
    // Both sides of the benchmark measured, with a ratio and an MFU cell.
    let rows: Vec<&str> = md.lines().filter(|l| l.starts_with("| ferroclip |") || l.starts_with("| open_clip |")).collect();
    assert_eq!(rows.len(), 2, "{md}");
    assert!(rows.iter().all(|r| !r.contains("**") && r.trim_end().trim_end_matches('|').trim().ends_with('%')), "{md}");
    // The end-to-end row: steps after the first window, a data-wait percentage.
    let e2e = md.split("## End to end").nth(1).expect("an end-to-end section");
    assert!(e2e.lines().any(|l| l.starts_with("| 4..6 |") && l.trim_end().ends_with("% |")), "{e2e}");
}
