//! The event files we write are read back by TensorBoard itself (its Python `EventAccumulator`,
//! through `scripts/read-tensorboard.py`), with the tags, steps and values we logged.

use std::path::PathBuf;
use std::process::Command;

use ferroclip::log::{RunLogger, StepStats, TensorBoardWriter};

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// Scalars per tag as `(step, value)`, read by TensorBoard.
fn read_with_tensorboard(dir: &std::path::Path) -> serde_json::Map<String, serde_json::Value> {
    let root = repo_root();
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} missing: create the venv with the `tensorboard` package", python.display());
    let out = Command::new(&python)
        .arg(root.join("scripts/read-tensorboard.py"))
        .arg(dir)
        .output()
        .expect("run read-tensorboard.py");
    assert!(out.status.success(), "read-tensorboard.py failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON from read-tensorboard.py")
}

fn points(tags: &serde_json::Map<String, serde_json::Value>, tag: &str) -> Vec<(i64, f64)> {
    tags.get(tag)
        .unwrap_or_else(|| panic!("tag {tag} not in {:?}", tags.keys().collect::<Vec<_>>()))
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap()))
        .collect()
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferroclip-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn tensorboard_reads_our_scalars() {
    let dir = temp_dir("tb-read");
    let mut w = TensorBoardWriter::create(&dir).unwrap();
    let losses: Vec<(u64, f64)> = (0..50).map(|s| (s * 10, 8.0 / (1.0 + s as f64))).collect();
    for &(step, loss) in &losses {
        w.add_scalar("train/loss", loss, step).unwrap();
        w.add_scalar("train/lr", 1e-3 * step as f64 / 490.0, step).unwrap();
    }
    w.add_scalar("train/zero", 0.0, 7).unwrap();
    w.add_scalar("train/negative", -2.5, 8).unwrap();
    w.flush().unwrap();

    let tags = read_with_tensorboard(&dir);
    assert_eq!(tags.len(), 4, "tags: {:?}", tags.keys().collect::<Vec<_>>());
    let read = points(&tags, "train/loss");
    assert_eq!(read.len(), losses.len());
    for ((step, value), &(want_step, want)) in read.iter().zip(&losses) {
        assert_eq!(*step, want_step as i64);
        // Stored as float32 like TensorFlow's simple_value (Python's protobuf may round the
        // widened double differently in the last bits, so compare as f32).
        assert_eq!(*value as f32, want as f32, "step {step}");
    }
    assert_eq!(points(&tags, "train/lr").last().unwrap().1 as f32, 1e-3f32);
    assert_eq!(points(&tags, "train/zero"), vec![(7, 0.0)]);
    assert_eq!(points(&tags, "train/negative"), vec![(8, -2.5)]);
    drop(w);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn run_logger_writes_tensorboard_and_metrics_jsonl() {
    let dir = temp_dir("runlogger");
    let mut logger = RunLogger::create(&dir, 100, true).unwrap();
    for step in [10u64, 20] {
        let stats = StepStats {
            step,
            total_steps: 100,
            samples_seen: step * 64,
            loss: 4.0 - step as f64 / 10.0,
            lr: 5e-4,
            logit_scale: 14.25,
            samples_per_s: 800.0 + step as f64,
        };
        logger.log_train(&stats, &[("grad_norm", 1.5)]).unwrap();
    }
    let mut eval = std::collections::BTreeMap::new();
    eval.insert("zeroshot_top1".to_string(), 0.625);
    logger.log_eval(20, &eval).unwrap();

    // Visible before finish(): every log step is flushed.
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    for key in ["step", "samples_seen", "loss", "lr", "logit_scale", "samples_per_s", "grad_norm"] {
        assert!(lines[0].get(key).is_some(), "metrics.jsonl record lacks {key}: {}", lines[0]);
    }
    assert_eq!(lines[1]["step"], 20);
    assert_eq!(lines[1]["samples_seen"], 1280);
    assert_eq!(lines[1]["loss"], 2.0);
    assert_eq!(lines[1]["samples_per_s"], 820);
    assert_eq!(lines[2]["eval/zeroshot_top1"], 0.625);

    let tags = read_with_tensorboard(&dir.join("tensorboard"));
    assert_eq!(points(&tags, "train/loss"), vec![(10, 3.0), (20, 2.0)]);
    assert_eq!(points(&tags, "train/logit_scale"), vec![(10, 14.25), (20, 14.25)]);
    assert_eq!(points(&tags, "train/samples_per_s"), vec![(10, 810.0), (20, 820.0)]);
    assert_eq!(points(&tags, "train/grad_norm").len(), 2);
    assert_eq!(points(&tags, "eval/zeroshot_top1"), vec![(20, 0.625)]);
    logger.finish().unwrap();
    drop(logger);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn disabled_logger_creates_nothing() {
    let dir = temp_dir("runlogger-off");
    let mut logger = RunLogger::create(&dir, 100, false).unwrap();
    logger.log_scalars(1, &[("loss", 1.0)]).unwrap();
    assert!(!dir.exists());
}
