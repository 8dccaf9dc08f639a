//! Each shipped recipe config equals its published recipe: `trainer import-openclip` on the
//! recipe's open_clip_train command line, and the shipped file, resolve (`trainer show-config`) to
//! the same value for every key, at the world size the config is launched on. A key may differ
//! only where it is listed below with the reason. The command lines are the published ones
//! (model cards, OpenCLIP's `docs/script_examples/stability_example.sh`) with the launch adapted
//! as each `adapt` list says: data and log paths, the run name, the per-GPU batch for the ranks
//! our sbatch script starts (the same global batch), and the ImageNet validation folder.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

mod support;

use support::run;

struct Recipe {
    config: &'static str,
    world: usize,
    /// The published command line, as its flags.
    published: &'static [&'static str],
    /// (flag, value or None to drop it, why): the launch's differences from the published line.
    adapt: &'static [(&'static str, Option<&'static str>, &'static str)],
    /// (key, why): keys the shipped config sets beyond what the command line says.
    differ: &'static [(&'static str, &'static str)],
}

/// ferroclip-only keys no open_clip_train flag has.
const OURS: &[(&str, &str)] = &[
    ("checkpoint.keep", "OpenCLIP keeps every epoch's checkpoint; ours keeps the newest 3"),
    ("data.readers", "ferroclip's shard readers per rank"),
];

const LAION2B: &str = "/data/laion2b/{00000..231349}.tar";

const RECIPES: &[Recipe] = &[
    Recipe {
        // CLIP-convnext_base_w-laion2B-s13B-b82K-augreg: 160 GPUs x 512 = 81,920.
        config: "configs/base_w_augreg.toml",
        world: 512,
        published: &[
            "--save-frequency", "1", "--name", "convnext_256", "--resume", "latest",
            "--train-data", "pipe:aws s3 cp s3://mybucket/path/laion{00000..xxxxx}.tar -",
            "--train-num-samples", "203666042", "--dataset-type", "webdataset", "--precision", "amp_bfloat16",
            "--warmup", "10000", "--batch-size", "512", "--epochs", "64", "--dataset-resampled",
            "--aug-cfg", "use_timm=True", "scale=(0.33, 1.0)", "re_prob=0.35", "--grad-clip-norm", "5.0",
            "--lr", "1e-3", "--workers", "6", "--model", "convnext_base_w", "--seed", "0",
            "--ddp-static-graph", "--local-loss", "--gather-with-grad",
        ],
        adapt: &[
            ("--name", Some("convnext_base_w-laion2b-augreg"), "run name"),
            ("--train-data", Some(LAION2B), "local shards"),
            ("--batch-size", Some("160"), "512 ranks x 160 = 81,920, the card's global batch"),
            ("--logs", Some("runs"), "output folder"),
            ("--imagenet-val", Some("/data/imagenet/val"), "zero-shot ImageNet each epoch"),
            ("--zeroshot-frequency", Some("1"), "zero-shot ImageNet each epoch"),
        ],
        differ: &[],
    },
    Recipe {
        // CLIP-convnext_large_d.laion2B-s26B-b102K-augreg: its card gives the hyperparameters
        // (global batch 102,400, 128 epochs of 203,666,042 samples, augreg, head MLP dropout 0.1)
        // but prints no command line; this is the base_w line with them.
        config: "configs/large_d_augreg.toml",
        world: 512,
        published: &[
            "--save-frequency", "1", "--name", "convnext_large_256", "--resume", "latest",
            "--train-data", "pipe:aws s3 cp s3://mybucket/path/laion{00000..xxxxx}.tar -",
            "--train-num-samples", "203666042", "--dataset-type", "webdataset", "--precision", "amp_bfloat16",
            "--warmup", "10000", "--batch-size", "200", "--epochs", "128", "--dataset-resampled",
            "--aug-cfg", "use_timm=True", "scale=(0.33, 1.0)", "re_prob=0.35", "--grad-clip-norm", "5.0",
            "--lr", "1e-3", "--workers", "6", "--model", "convnext_large_d", "--seed", "0",
            "--ddp-static-graph", "--local-loss", "--gather-with-grad", "--grad-checkpointing",
        ],
        adapt: &[
            ("--name", Some("convnext_large_d-laion2b-augreg"), "run name"),
            ("--train-data", Some(LAION2B), "local shards"),
            ("--logs", Some("runs"), "output folder"),
            ("--imagenet-val", Some("/data/imagenet/val"), "zero-shot ImageNet each epoch"),
            ("--zeroshot-frequency", Some("1"), "zero-shot ImageNet each epoch"),
        ],
        differ: &[(
            "model.head_dropout",
            "the card's head MLP dropout 0.1: OpenCLIP sets it in the model config (timm_drop), no flag",
        )],
    },
    Recipe {
        // CLIP-convnext_large_d_320.laion2B-s29B-b131K-ft: 12 epochs at 131,072 from the 256 px
        // run's epoch_128.pt.
        config: "configs/large_d_320_ft.toml",
        world: 512,
        published: &[
            "--save-frequency", "1", "--name", "convnext_large_320", "--pretrained", "/runs/convnext_large_256/epoch_128.pt",
            "--resume", "latest", "--train-data", "pipe:aws s3 cp s3://mybucket/path/laion{00000..xxxxx}.tar -",
            "--train-num-samples", "203666042", "--dataset-type", "webdataset", "--precision", "amp_bfloat16",
            "--beta2", "0.98", "--warmup", "2000", "--batch-size", "256", "--epochs", "12", "--dataset-resampled",
            "--aug-cfg", "use_timm=True", "scale=(0.5, 1.0)", "re_prob=0.4", "--grad-clip-norm", "5.0",
            "--lr", "5e-5", "--workers", "6", "--model", "convnext_large_d_320", "--seed", "0",
            "--ddp-static-graph", "--local-loss", "--gather-with-grad", "--grad-checkpointing",
            "--report-to", "tensorboard",
        ],
        adapt: &[
            ("--name", Some("convnext_large_d_320-ft"), "run name"),
            ("--train-data", Some(LAION2B), "local shards"),
            ("--logs", Some("runs"), "output folder"),
            ("--imagenet-val", Some("/data/imagenet/val"), "zero-shot ImageNet each epoch"),
            ("--zeroshot-frequency", Some("1"), "zero-shot ImageNet each epoch"),
        ],
        differ: &[(
            "model.init",
            "the final checkpoint of configs/large_d_augreg.toml's run instead of the card's epoch_128.pt path \
             (README: starting it from an OpenCLIP file)",
        )],
    },
    Recipe {
        // ViT-B/32 at 90k on LAION-5B: OpenCLIP's stability_example.sh, 30 nodes x 8 x 375.
        config: "configs/xlmr_b32.toml",
        world: 240,
        published: &[
            "--save-frequency", "1",
            "--train-data", "pipe:aws s3 cp s3://s-datasets/laion5b/{laion2B-data/{000000..231349}.tar,laion2B-multi-data/{000000..226687}.tar,laion1B-nolang-data/{000000..127231}.tar} -",
            "--train-num-samples", "135646078", "--dataset-type", "webdataset", "--dataset-resampled",
            "--warmup", "2000", "--batch-size", "375", "--epochs", "97", "--lr", "1e-3", "--workers", "8",
            "--report-to", "wandb", "--name", "test-B-32-laion5b-lr1e-3-bs90k", "--logs", "/scratch/logs/",
            "--model", "ViT-B-32", "--seed", "0", "--ddp-static-graph", "--local-loss", "--gather-with-grad",
            "--grad-checkpointing", "--precision", "amp_bfloat16", "--wandb-project-name", "open_clip6",
            "--resume", "latest", "--remote-sync", "s3://s-laion/mitchellw/logs",
        ],
        adapt: &[
            ("--model", Some("xlm-roberta-base-ViT-B-32"), "the XLM-R text tower of the LAION-5B multilingual model"),
            ("--name", Some("xlm-roberta-base-vit-b-32-laion5b"), "run name"),
            ("--train-data", Some("/data/laion5b/{000000..588000}.tar"), "local shards"),
            ("--logs", Some("runs"), "output folder"),
            ("--remote-sync", None, "checkpoints go to the shared filesystem"),
            ("--imagenet-val", Some("/data/imagenet/val"), "zero-shot ImageNet (OpenCLIP's default: every 2 epochs)"),
        ],
        differ: &[
            ("model.tokenizer", "XLM-R's tokenizer.json: OpenCLIP fetches it from the hub by the model config's name"),
            ("model.text_init", "XLM-R's weights: OpenCLIP fetches them from the hub by the model config's name"),
        ],
    },
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// `published` with the `adapt` flags replaced, dropped or added.
fn adapted(r: &Recipe) -> Vec<String> {
    let mut flags: Vec<Vec<String>> = Vec::new();
    for a in r.published {
        if a.starts_with("--") {
            flags.push(vec![a.to_string()]);
        } else {
            flags.last_mut().expect("a flag first").push(a.to_string());
        }
    }
    for (flag, value, _why) in r.adapt {
        let at = flags.iter().position(|f| f[0] == *flag);
        match (at, value) {
            (Some(i), Some(v)) => flags[i] = vec![flag.to_string(), v.to_string()],
            (Some(i), None) => {
                flags.remove(i);
            }
            (None, Some(v)) => flags.push(vec![flag.to_string(), v.to_string()]),
            (None, None) => panic!("{}: {flag} is not in the published line", r.config),
        }
    }
    flags.concat()
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "trainer {args:?}:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Every `section.key = value` of a resolved config.
fn flat(text: &str) -> BTreeMap<String, toml::Value> {
    fn walk(prefix: &str, t: &toml::Table, out: &mut BTreeMap<String, toml::Value>) {
        for (k, v) in t {
            let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
            match v {
                toml::Value::Table(inner) => walk(&key, inner, out),
                v => {
                    out.insert(key, v.clone());
                }
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", &toml::from_str(text).unwrap_or_else(|e| panic!("{e}\n{text}")), &mut out);
    out
}

#[test]
fn each_shipped_recipe_is_its_published_command_line() {
    let dir = tempfile::tempdir().unwrap();
    for r in RECIPES {
        let world = r.world.to_string();
        let flags = adapted(r);
        let imported = dir.path().join(Path::new(r.config).file_name().unwrap());
        let mut args = vec!["import-openclip", "--world", &world, "--out", imported.to_str().unwrap(), "--"];
        args.extend(flags.iter().map(String::as_str));
        ok(&args);
        let text = std::fs::read_to_string(&imported).unwrap();
        // One comment per key, naming the flag or the default it came from.
        for line in text.lines().filter(|l| l.contains(" = ") && !l.starts_with('#')) {
            assert!(line.contains(" # "), "{}: `{line}` has no source comment", r.config);
        }

        let shipped = repo().join(r.config);
        let ours = flat(&ok(&["show-config", "--config", shipped.to_str().unwrap(), "--world", &world]));
        let theirs = flat(&ok(&["show-config", "--config", imported.to_str().unwrap(), "--world", &world]));
        let allowed: Vec<&str> = OURS.iter().chain(r.differ).map(|(k, _)| *k).collect();
        let keys: std::collections::BTreeSet<&String> = ours.keys().chain(theirs.keys()).collect();
        let mut differences = Vec::new();
        for k in keys {
            if allowed.contains(&k.as_str()) {
                continue;
            }
            if ours.get(k) != theirs.get(k) {
                differences.push(format!("{k}: shipped {:?}, published {:?}", ours.get(k), theirs.get(k)));
            }
        }
        assert!(differences.is_empty(), "{} differs from its recipe:\n{}", r.config, differences.join("\n"));
        for (k, why) in r.differ {
            assert_ne!(ours.get(*k), theirs.get(*k), "{}: {k} is listed as differing ({why}) but does not", r.config);
        }
    }
}
