//! Checkpoints that verify, end to end: a truncated model file or a flipped byte in a state file of
//! the newest checkpoint makes `checkpoint.resume = "latest"` resume from the one before (with a
//! warning naming the file) instead of failing; a bad explicit `checkpoint.resume` path or
//! `model.init` file ends the run with status 2 before step 1; `trainer verify-checkpoint` reports
//! each checkpoint and exits 0 or 2.

mod support;

use std::path::Path;

use ferroclip::checkpoint::CheckpointDir;
use support::{metrics, run, Fixture};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Trains `name` (the fixture's 12 steps, a checkpoint every 4) and returns its checkpoints.
fn trained(f: &Fixture, name: &str, extra: &[&str]) -> CheckpointDir {
    let cfg = f.config(name, "");
    let out = run(&[&["--config", cfg.to_str().unwrap()][..], extra].concat());
    assert!(out.status.success(), "{}", stderr(&out));
    CheckpointDir::new(f.run_dir(name).join("checkpoints"))
}

/// Resumes `name` with `checkpoint.resume = "latest"` to step 16; returns its stderr.
fn resume_latest_to_16(f: &Fixture, name: &str, extra: &[&str]) -> String {
    let cfg = f.path().join(format!("{name}.toml"));
    let resume =
        ["--config", cfg.to_str().unwrap(), "--set", "train.max_steps=16", "--set", "checkpoint.resume=latest"];
    let out = run(&[&resume[..], extra].concat());
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    err
}

fn flip_middle_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

fn truncate_to_half(path: &Path) {
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len / 2).unwrap();
}

/// The run went on from step 8 to 16 and rewrote the checkpoints since, which now verify.
fn assert_resumed_from_8_to_16(f: &Fixture, name: &str, dir: &CheckpointDir, err: &str) {
    assert!(err.contains("at step 8"), "{err}");
    let steps: Vec<u64> = metrics(&f.run_dir(name)).iter().filter_map(|m| m["step"].as_u64()).collect();
    assert_eq!(steps.last(), Some(&16), "{err}");
    assert!(steps.contains(&9), "the resumed run did not log step 9: {steps:?}");
    let out = run(&["verify-checkpoint", dir.dir().to_str().unwrap()]);
    assert!(out.status.success(), "{}{}", stdout(&out), stderr(&out));
    assert_eq!(stdout(&out), "ok step 4\nok step 8\nok step 12\nok step 16\n");
}

#[test]
fn latest_skips_a_truncated_newest_model_file_and_resumes_from_the_previous_checkpoint() {
    let f = Fixture::new();
    let dir = trained(&f, "trunc", &[]);
    assert_eq!(dir.complete_steps().unwrap(), vec![4, 8, 12]);
    truncate_to_half(&dir.model_path(12));
    let err = resume_latest_to_16(&f, "trunc", &[]);
    assert!(err.contains("skipping checkpoint step 12"), "{err}");
    assert!(err.contains(&format!("{}: size", dir.model_path(12).display())), "{err}");
    assert_resumed_from_8_to_16(&f, "trunc", &dir, &err);
}

#[test]
fn latest_skips_a_newest_state_file_with_a_flipped_byte_of_the_same_size() {
    let f = Fixture::new();
    // keep = 2: the verified step 8 must survive the write of step 12 and stay the fallback.
    let keep = ["--set", "checkpoint.keep=2"];
    let dir = trained(&f, "flip", &keep);
    assert_eq!(dir.complete_steps().unwrap(), vec![8, 12]);
    let size = std::fs::metadata(dir.state_path(12)).unwrap().len();
    flip_middle_byte(&dir.state_path(12));
    assert_eq!(std::fs::metadata(dir.state_path(12)).unwrap().len(), size);
    let err = resume_latest_to_16(&f, "flip", &keep);
    assert!(err.contains("skipping checkpoint step 12"), "{err}");
    assert!(err.contains(&format!("{}: CRC32C mismatch", dir.state_path(12).display())), "{err}");
    assert!(err.contains("at step 8"), "{err}");
    // keep = 2 again after the resumed run.
    assert_eq!(dir.complete_steps().unwrap(), vec![12, 16]);
    assert!(dir.verify(12).is_ok() && dir.verify(16).is_ok());
}

#[test]
fn a_bad_explicit_resume_path_or_init_file_is_status_2_before_step_1() {
    let f = Fixture::new();
    let dir = trained(&f, "only", &["--set", "train.max_steps=4"]);
    assert_eq!(dir.complete_steps().unwrap(), vec![4]);
    flip_middle_byte(&dir.model_path(4));
    let model = dir.model_path(4).display().to_string();
    let cfg = f.path().join("only.toml");
    let cfg = cfg.to_str().unwrap();
    // Either file of the checkpoint as the path: the bad model file is named.
    for given in [model.clone(), dir.state_path(4).display().to_string()] {
        let resume = format!("checkpoint.resume={given}");
        let out = run(&["--config", cfg, "--set", "train.max_steps=8", "--set", &resume]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("checkpoint.resume") && err.contains(&model) && err.contains("CRC32C"), "{err}");
    }
    // `latest` over a folder whose only checkpoint is bad: exit 2 naming it, not a fresh start.
    let out = run(&["--config", cfg, "--set", "train.max_steps=8", "--set", "checkpoint.resume=latest"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("skipping checkpoint step 4") && err.contains(&model) && err.contains("none of the 1"),
        "{err}"
    );
    // The same file as model.init, and a file that is not safetensors at all.
    let garbage = f.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"{\"not\": \"safetensors\"}").unwrap();
    let fresh = f.config("fresh", "");
    for init in [model.clone(), garbage.display().to_string()] {
        let set = format!("model.init={init}");
        let out = run(&["--config", fresh.to_str().unwrap(), "--set", &set]);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("model.init") && err.contains(&init), "{err}");
    }
    assert!(!f.run_dir("fresh").join("metrics.jsonl").exists(), "training started despite a bad model.init");
}

#[test]
fn verify_checkpoint_reports_each_checkpoint_and_exits_0_or_2() {
    let f = Fixture::new();
    let dir = trained(&f, "cli", &["--set", "train.max_steps=8"]);
    let (m4, s8) = (dir.model_path(4), dir.state_path(8));
    let out = run(&["verify-checkpoint", m4.to_str().unwrap(), s8.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(stdout(&out), "ok step 4\nok step 8\n");

    truncate_to_half(&dir.state_path(4));
    // The manifest, the run folder and the checkpoints folder all name the same checkpoints.
    let manifest = dir.manifest_path(4);
    for path in [manifest.as_path(), f.run_dir("cli").as_path(), dir.dir()] {
        let out = run(&["verify-checkpoint", path.to_str().unwrap()]);
        assert_eq!(out.status.code(), Some(2), "{}{}", stdout(&out), stderr(&out));
        let text = stdout(&out);
        let bad = format!("BAD step 4: {}: size", dir.state_path(4).display());
        assert!(text.lines().next().is_some_and(|l| l.starts_with(&bad)), "{text}");
        if path != manifest.as_path() {
            assert_eq!(text.lines().nth(1), Some("ok step 8"), "{text}");
        }
    }

    // A checkpoint written before manifests: verified by parsing, and said so.
    std::fs::remove_file(dir.manifest_path(8)).unwrap();
    let out = run(&["verify-checkpoint", dir.model_path(8).to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).starts_with("ok step 8 (no manifest"), "{}", stdout(&out));
}
