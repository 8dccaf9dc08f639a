//! Every config key `trainer config-docs` lists, tried with a value of the wrong type and with
//! values just outside its declared range (and NaN/inf for a float): each must end the `trainer`
//! process with status 2 and an error naming the key, never a panic, an abort or a signal. The
//! keys and ranges come from the declarations themselves ([`ferroclip::config::docs::sections`]),
//! so a key added later is swept too. Then the values that are in range for the type but not for
//! the model or the files (an image size the architecture cannot take, a shard pattern that
//! matches nothing, a positional embedding that is not a square grid).

mod support;

use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ferroclip::config::docs::sections;
use ferroclip_data::section::{Bound, Range};
use support::{test_arch, Fixture, TRAINER};

/// One value to set and why it must be refused.
struct Case {
    key: String,
    value: String,
    why: &'static str,
}

fn is_integer(ty: &str) -> bool {
    ["u64", "usize", "u32", "i64", "i32"].iter().any(|t| ty == *t || ty == format!("Option<{t}>"))
}

fn is_float(ty: &str) -> bool {
    ["f64", "f32"].iter().any(|t| ty == *t || ty == format!("Option<{t}>") || ty.contains(&format!("{t};")))
        || ty.starts_with("Vec<f")
}

fn is_list(ty: &str) -> bool {
    ty.starts_with('[') || ty.starts_with("Vec<")
}

/// A TOML value of the key's type, or a list of two of them for a list key.
fn literal(ty: &str, v: f64) -> String {
    let one = if is_integer(ty) { format!("{}", v as i128) } else { format!("{v:?}") };
    match is_list(ty) {
        true => format!("[{one}, {one}]"),
        false => one,
    }
}

/// Values just outside `range` for a key of type `ty`.
fn outside(ty: &str, range: &Range) -> Vec<String> {
    let step = |m: f64| if is_integer(ty) { 1.0 } else { (m.abs() * 1e-6).max(1e-6) };
    let mut out = Vec::new();
    match range.min {
        Bound::Inclusive(m) => out.push(literal(ty, m - step(m))),
        Bound::Exclusive(m) => out.push(literal(ty, m)),
        Bound::Unbounded => {}
    }
    match range.max {
        Bound::Inclusive(m) => out.push(literal(ty, m + step(m))),
        Bound::Exclusive(m) => out.push(literal(ty, m)),
        Bound::Unbounded => {}
    }
    if is_float(ty) {
        for special in ["nan", "inf", "-inf"] {
            out.push(match is_list(ty) {
                true => format!("[{special}, {special}]"),
                false => special.to_string(),
            });
        }
    }
    out
}

/// A value no key of type `ty` can take: a number for a string-like key, a string otherwise.
fn wrong_type(ty: &str) -> String {
    let string_like = matches!(ty, "String" | "PathBuf") || !(is_integer(ty) || is_float(ty) || ty == "bool");
    match string_like {
        true => "[1, 2]".to_string(),
        false => "\"x\"".to_string(),
    }
}

fn sweep_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for s in sections() {
        for k in s.keys {
            // A key holding a section of its own is swept through that section's keys.
            if matches!(s.defaults.get(k.key), Some(toml::Value::Table(_))) {
                continue;
            }
            let key = s.full_key(k.key);
            cases.push(Case { key: key.clone(), value: wrong_type(k.ty), why: "a value of the wrong type" });
            if let Some(range) = k.range {
                for value in outside(k.ty, &range) {
                    cases.push(Case { key: key.clone(), value, why: "outside the declared range" });
                }
            }
        }
    }
    cases
}

/// A refused value ends the process at once; one that is wrongly accepted starts training, which is
/// ended here (and reported as not refused) rather than left to run with, say, a huge batch.
const LIMIT: Duration = Duration::from_secs(120);

/// `trainer ARGS`, killed after [`LIMIT`].
fn run_limited(args: &[&str]) -> Output {
    let mut child = Command::new(TRAINER)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("trainer starts");
    let start = Instant::now();
    while child.try_wait().expect("waiting for trainer").is_none() && start.elapsed() < LIMIT {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait_with_output().expect("trainer's output")
}

/// Runs `trainer --config CONFIG --set KEY=VALUE` for every case, two at a time.
fn run_all(config: &std::path::Path, cases: &[Case]) -> Vec<(usize, Output)> {
    let next = Mutex::new(0usize);
    let results = Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..2 {
            scope.spawn(|| loop {
                let i = {
                    let mut n = next.lock().unwrap();
                    *n += 1;
                    *n - 1
                };
                let Some(c) = cases.get(i) else { break };
                let set = format!("{}={}", c.key, c.value);
                let out = run_limited(&["--config", config.to_str().unwrap(), "--set", &set]);
                results.lock().unwrap().push((i, out));
            });
        }
    });
    results.into_inner().unwrap()
}

fn assert_refused(cases: &[Case], results: &[(usize, Output)]) {
    let mut failures = Vec::new();
    for (i, out) in results {
        let c = &cases[*i];
        let err = String::from_utf8_lossy(&out.stderr);
        let named = err.contains(&format!("`{}`", c.key)) || err.contains(&c.key);
        if out.status.code() != Some(2) || !named || err.contains("panicked") {
            failures.push(format!(
                "--set {}={} ({}): status {:?}, stderr:\n{}",
                c.key,
                c.value,
                c.why,
                out.status,
                err.trim()
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} values were not refused cleanly:\n{}",
        failures.len(),
        results.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_key_refuses_wrong_types_and_out_of_range_values_with_status_2_naming_it() {
    let f = Fixture::new();
    let cfg = f.config("sweep", "");
    let cases = sweep_cases();
    // Every key is swept, and the ranges the issue of record names are among the cases.
    let keys: std::collections::BTreeSet<&str> = cases.iter().map(|c| c.key.as_str()).collect();
    for key in ["model.image_size", "model.drop_path", "data.batch_size", "optim.eps", "data.augment.re_prob", "seed"] {
        assert!(keys.contains(key), "no case for `{key}`");
    }
    assert!(cases.iter().any(|c| c.key == "model.drop_path" && c.value == "1.0"), "drop_path = 1 not swept");
    assert!(
        cases.iter().any(|c| c.key == "data.batch_size" && c.value == "1048577"),
        "batch_size above its bound not swept"
    );
    let results = run_all(&cfg, &cases);
    assert_eq!(results.len(), cases.len());
    assert_refused(&cases, &results);
}

#[test]
fn values_the_model_or_the_files_cannot_take_are_refused_with_status_2() {
    let f = Fixture::new();
    let cfg = f.config("beyond", "");
    let vit = test_arch("vit_test");
    let missing = f.path().join("nowhere/{000..003}.tar");
    let cases = vec![
        Case { key: "model.image_size".into(), value: "7".into(), why: "below a ConvNeXt's smallest input" },
        Case { key: "model.image_size".into(), value: "1".into(), why: "below a ConvNeXt's smallest input" },
        Case { key: "model.image_size".into(), value: "34".into(), why: "not a multiple of the stem stride" },
        Case { key: "data.train".into(), value: format!("\"{}\"", missing.display()), why: "matches no file" },
        Case { key: "data.batch_size".into(), value: "1000000000000".into(), why: "far above its bound" },
        Case { key: "optim.eps".into(), value: "-1".into(), why: "negative" },
        Case { key: "model.drop_path".into(), value: "-0.5".into(), why: "negative" },
        Case { key: "model.drop_path".into(), value: "2".into(), why: "above 1" },
    ];
    let results = run_all(&cfg, &cases);
    assert_refused(&cases, &results);

    // A ViT's image must be tiled by its patches (the test ViT's are 8 px).
    let cases =
        vec![Case { key: "model.image_size".into(), value: "36".into(), why: "not a multiple of the patch size" }];
    let text = std::fs::read_to_string(&cfg).unwrap();
    let convnext = test_arch("convnext_test").display().to_string();
    let vit_cfg = f.path().join("vit.toml");
    std::fs::write(&vit_cfg, text.replace(&convnext, &vit.display().to_string())).unwrap();
    let results = run_all(&vit_cfg, &cases);
    assert_refused(&cases, &results);
}
