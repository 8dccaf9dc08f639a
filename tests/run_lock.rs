//! End-to-end tests of one run per output folder (`trainer/src/run_lock.rs`): a second trainer on a
//! busy folder exits 2 naming the holder (on every rank of a two-rank job) while the first finishes
//! unharmed; a SIGKILLed holder does
//! not lock its folder; where the folder is held by a lease, a stale lock file is taken over and a
//! fresh one refuses.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use ferroclip::run_lock::{format_utc, Holder, FILE_NAME};

mod support;

use support::{metrics, Fixture, TRAINER};

/// Starts the trainer on `cfg` in the background (output discarded), with `extra` arguments.
fn spawn(cfg: &Path, extra: &[&str]) -> Child {
    Command::new(TRAINER)
        .args(["--config", cfg.to_str().unwrap()])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// Runs the trainer on `cfg` to its end, with `env` set.
fn run_with(cfg: &Path, env: &[(&str, &str)]) -> Output {
    Command::new(TRAINER)
        .args(["--config", cfg.to_str().unwrap()])
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Runs the trainer on `cfg` as a job of two ranks (torchrun's variables, on a free local port).
fn two_ranks(cfg: &Path) -> Vec<Output> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
    let ranks: Vec<Child> = (0..2)
        .map(|rank| {
            Command::new(TRAINER)
                .args(["--config", cfg.to_str().unwrap(), "--set", "data.train_num_samples=96"])
                .envs([("RANK", rank.to_string()), ("LOCAL_RANK", rank.to_string())])
                .envs([("WORLD_SIZE", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", port.as_str())])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    ranks.into_iter().map(|r| r.wait_with_output().unwrap()).collect()
}

/// The lock file's holder once `child` has written it and finished a step.
fn wait_for_holder(lock: &Path, child: &mut Child) -> Holder {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(120) {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("the first run ended ({status}) before the test could start the second");
        }
        if let Some(h) = std::fs::read(lock).ok().and_then(|b| serde_json::from_slice::<Holder>(&b).ok()) {
            return h;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{} never appeared", lock.display());
}

#[test]
fn a_second_run_on_a_busy_folder_exits_2_naming_the_holder_and_the_first_finishes() {
    let f = Fixture::new();
    let cfg = f.config("busy", "");
    let lock = f.run_dir("busy").join(FILE_NAME);
    let mut first = spawn(&cfg, &["--set", "train.max_steps=400", "--set", "checkpoint.every_steps=100"]);
    let holder = wait_for_holder(&lock, &mut first);
    assert_eq!(holder.pid, first.id());

    let second = run_with(&cfg, &[]);
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("pid {}", first.id())), "{err}");
    assert!(err.contains(&format!("host {}", holder.host)) && err.contains(&holder.since), "{err}");
    assert!(err.contains(FILE_NAME) && err.contains("another `name`"), "{err}");

    // A job of two ranks: rank 0's refusal reaches rank 1, and both exit 2 with the same message.
    let refusals = two_ranks(&cfg);
    for (rank, out) in refusals.iter().enumerate() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "rank {rank}: {err}");
        assert!(err.contains(&format!("error on rank {rank} of 2: ")), "rank {rank}: {err}");
        assert!(err.contains(&format!("pid {}", first.id())), "rank {rank}: {err}");
    }
    let message = |out: &Output| {
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        err.lines().find_map(|l| l.split_once(" of 2: ").map(|(_, m)| m.to_string())).unwrap_or_default()
    };
    assert_eq!(message(&refusals[0]), message(&refusals[1]));
    assert!(first.try_wait().unwrap().is_none(), "the first run ended before the second was refused");

    let status = first.wait().unwrap();
    assert!(status.success(), "the first run failed: {status}");
    let steps: Vec<u64> = metrics(&f.run_dir("busy")).iter().map(|m| m["step"].as_u64().unwrap()).collect();
    assert_eq!(steps, (1..=400).collect::<Vec<u64>>(), "metrics.jsonl does not hold every step once");
    assert!(!lock.exists(), "run.lock outlived the run");
}

#[test]
fn a_killed_holder_does_not_lock_its_folder() {
    let f = Fixture::new();
    let cfg = f.config("killed", "");
    let lock = f.run_dir("killed").join(FILE_NAME);
    let mut first = spawn(&cfg, &["--set", "train.max_steps=400"]);
    wait_for_holder(&lock, &mut first);
    first.kill().unwrap(); // SIGKILL: no destructor runs, the file stays
    first.wait().unwrap();
    assert!(lock.exists(), "the killed run removed its lock file; the test proves nothing");

    let out = run_with(&cfg, &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("no longer holds it"), "{err}");
}

/// A lock file as another, never-refreshing run on another host left it, refreshed `ago`.
fn write_foreign_lock(run_dir: &Path, ago: Duration) {
    let refreshed = format_utc(SystemTime::now() - ago);
    let holder = Holder {
        host: "elsewhere".into(),
        pid: 31337,
        slurm_job_id: Some("999".into()),
        step: 5,
        since: refreshed.clone(),
        refreshed,
    };
    std::fs::create_dir_all(run_dir).unwrap();
    std::fs::write(run_dir.join(FILE_NAME), serde_json::to_vec(&holder).unwrap()).unwrap();
}

#[test]
fn a_lease_refuses_while_fresh_and_is_taken_over_when_stale() {
    let f = Fixture::new();
    let lease = [("FERROCLIP_TEST_RUN_LOCK", "lease")];
    let cfg = f.config("leased", "");

    write_foreign_lock(&f.run_dir("leased"), Duration::from_secs(1));
    let out = run_with(&cfg, &lease);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("host elsewhere, pid 31337, Slurm job 999"), "{err}");
    assert!(!f.run_dir("leased").join("config.toml").exists(), "the refused run wrote into the folder");

    // Older than dist.heartbeat_timeout_s (60 s by default): its holder is dead.
    write_foreign_lock(&f.run_dir("leased"), Duration::from_secs(3600));
    let out = run_with(&cfg, &lease);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("taking the stale lease over") && err.contains("pid 31337"), "{err}");
    assert_eq!(metrics(&f.run_dir("leased")).len(), 12);
    assert!(!f.run_dir("leased").join(FILE_NAME).exists(), "run.lock outlived the run");
}
