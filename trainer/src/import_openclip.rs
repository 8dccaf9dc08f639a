//! `trainer import-openclip`: an `open_clip_train.main` command line as a ferroclip config. Each
//! key carries a comment naming the flag it came from, or saying that the flag was left unset and
//! which OpenCLIP 3.3.0 default it takes (`open_clip_train/params.py`, `get_default_params` for the
//! per-architecture lr / betas / eps). Epoch-based intervals (`--save-frequency`,
//! `--zeroshot-frequency`, `--epochs-cooldown`) become steps through OpenCLIP's own epoch length
//! ([`RunPlan`], at the launch's world size). A flag a ferroclip config cannot express is an error
//! naming it; flags without effect here (`--ddp-static-graph`, `--torchcompile`, `--report-to`)
//! are accepted with a note of what they mean here.

use std::collections::BTreeMap;

use crate::config::{Config, ConfigError, RunPlan};

/// The flags accepted, by how they take values.
const SWITCHES: &[&str] = &[
    "--dataset-resampled",
    "--grad-checkpointing",
    "--local-loss",
    "--gather-with-grad",
    "--lock-image",
    "--lock-image-freeze-bn-stats",
    "--lock-text",
    "--lock-text-freeze-layer-norm",
    "--ddp-static-graph",
    "--torchcompile",
];
const VALUED: &[&str] = &[
    "--model",
    "--pretrained",
    "--train-data",
    "--train-data-upsampling-factors",
    "--train-num-samples",
    "--dataset-type",
    "--batch-size",
    "--epochs",
    "--lr",
    "--wd",
    "--beta1",
    "--beta2",
    "--eps",
    "--warmup",
    "--lr-scheduler",
    "--epochs-cooldown",
    "--lr-cooldown-power",
    "--lr-cooldown-end",
    "--precision",
    "--grad-clip-norm",
    "--accum-freq",
    "--force-image-size",
    "--lock-image-unlocked-groups",
    "--lock-text-unlocked-layers",
    "--seed",
    "--workers",
    "--save-frequency",
    "--zeroshot-frequency",
    "--imagenet-val",
    "--logs",
    "--name",
    "--resume",
    "--report-to",
    "--wandb-project-name",
    "--log-every-n-steps",
];
/// `--aug-cfg key=value ...` (argparse `nargs='*'`).
const AUG_CFG: &str = "--aug-cfg";

/// The sections in the order they are written.
const SECTIONS: &[&str] =
    &["", "model", "data", "data.augment", "train", "optim", "schedule", "checkpoint", "log", "eval"];

/// What the errors of a command line name as their file.
const COMMAND_LINE: &str = "<command line>";

fn usage(message: String) -> ConfigError {
    ConfigError { file: COMMAND_LINE.into(), message }
}

/// The parsed command line: flag -> values as given (switches have none).
struct Flags(BTreeMap<String, Vec<String>>);

impl Flags {
    fn parse(argv: &[String]) -> Result<Flags, ConfigError> {
        let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut i = 0;
        while i < argv.len() {
            let arg = &argv[i];
            i += 1;
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
                _ => (arg.clone(), None),
            };
            if !flag.starts_with("--") {
                return Err(usage(format!("`{arg}`: expected an open_clip_train flag (--name value)")));
            }
            if out.contains_key(&flag) {
                return Err(usage(format!("{flag}: given twice")));
            }
            let values = if SWITCHES.contains(&flag.as_str()) {
                if inline.is_some() {
                    return Err(usage(format!("{flag}: takes no value")));
                }
                Vec::new()
            } else if flag == AUG_CFG {
                let mut v: Vec<String> = inline.into_iter().collect();
                while i < argv.len() && !argv[i].starts_with("--") {
                    v.push(argv[i].clone());
                    i += 1;
                }
                v
            } else if VALUED.contains(&flag.as_str()) {
                match inline {
                    Some(v) => vec![v],
                    None if i < argv.len() => {
                        i += 1;
                        vec![argv[i - 1].clone()]
                    }
                    None => return Err(usage(format!("{flag}: expects a value"))),
                }
            } else {
                return Err(usage(format!(
                    "{flag}: not a flag a ferroclip config can express (README, \"Coming from OpenCLIP\", lists the \
                     flags import-openclip reads)"
                )));
            };
            out.insert(flag, values);
        }
        Ok(Flags(out))
    }

    fn has(&self, flag: &str) -> bool {
        self.0.contains_key(flag)
    }

    /// The comment of a key `flag` sets: the flag, or `{flag} unset{unset}` when it was left out.
    fn source(&self, flag: &str, unset: &str) -> String {
        if self.has(flag) {
            flag.to_string()
        } else {
            format!("{flag} unset{unset}")
        }
    }

    fn str(&self, flag: &str) -> Option<&str> {
        self.0.get(flag).and_then(|v| v.first()).map(String::as_str)
    }

    fn num<T: std::str::FromStr>(&self, flag: &str) -> Result<Option<T>, ConfigError> {
        match self.str(flag) {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| usage(format!("{flag} {v}: not a number of the right kind"))),
        }
    }
}

/// One key of the config being written, with the comment saying where its value came from.
struct Entry {
    section: &'static str,
    key: &'static str,
    value: toml::Value,
    why: String,
}

#[derive(Default)]
struct Out {
    entries: Vec<Entry>,
    notes: Vec<String>,
}

impl Out {
    fn set(&mut self, section: &'static str, key: &'static str, value: impl Into<toml::Value>, why: impl Into<String>) {
        self.entries.push(Entry { section, key, value: value.into(), why: why.into() });
    }

    fn render(&self, header: &str) -> String {
        let mut text = String::new();
        for line in std::iter::once(header).chain(self.notes.iter().map(String::as_str)) {
            text.push_str(&format!("# {line}\n"));
        }
        for section in SECTIONS {
            let rows: Vec<&Entry> = self.entries.iter().filter(|e| e.section == *section).collect();
            if rows.is_empty() {
                continue;
            }
            if !section.is_empty() {
                text.push_str(&format!("\n[{section}]\n"));
            } else {
                text.push('\n');
            }
            for e in rows {
                let line = format!("{} = {}", e.key, e.value);
                text.push_str(&format!("{line:<44} # {}\n", e.why));
            }
        }
        text
    }
}

/// A `--aug-cfg` value as Python's `ast.literal_eval` reads the few forms it takes: a number,
/// `True` / `False`, or a tuple / list of numbers.
#[derive(Debug, PartialEq)]
enum Literal {
    Num(f64),
    Bool(bool),
    Seq(Vec<f64>),
}

fn literal(key: &str, raw: &str) -> Result<Literal, ConfigError> {
    let bad = || usage(format!("--aug-cfg {key}={raw}: not a number, True/False or a tuple of numbers"));
    let s = raw.trim().trim_matches(|c| c == '\'' || c == '"');
    match s {
        "True" => return Ok(Literal::Bool(true)),
        "False" => return Ok(Literal::Bool(false)),
        _ => {}
    }
    if let Some(inner) = s
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .or_else(|| s.strip_prefix('[').and_then(|r| r.strip_suffix(']')))
    {
        let items: Result<Vec<f64>, _> =
            inner.split(',').map(str::trim).filter(|x| !x.is_empty()).map(str::parse::<f64>).collect();
        return items.map(Literal::Seq).map_err(|_| bad());
    }
    s.parse::<f64>().map(Literal::Num).map_err(|_| bad())
}

fn pair(key: &str, v: &Literal) -> Result<toml::Value, ConfigError> {
    match v {
        Literal::Seq(x) if x.len() == 2 => Ok(toml::Value::Array(vec![x[0].into(), x[1].into()])),
        _ => Err(usage(format!("--aug-cfg {key}: expected a pair such as (0.5, 1.0)"))),
    }
}

/// The config for the open_clip_train flags `argv`, launched on `world` ranks.
pub fn import(argv: &[String], world: usize) -> Result<String, ConfigError> {
    let f = Flags::parse(argv)?;
    let mut o = Out::default();

    // Top level.
    let name = f.str("--name").unwrap_or("run");
    o.set("", "name", name, f.source("--name", " (OpenCLIP names it by date; ferroclip's default)"));
    let logs = f.str("--logs").unwrap_or("./logs/");
    let logs = logs.trim_end_matches('/').trim_start_matches("./");
    o.set("", "output_dir", if logs.is_empty() { "." } else { logs }, f.source("--logs", ": OpenCLIP's ./logs/"));
    let seed: i64 = f.num("--seed")?.unwrap_or(0);
    o.set("", "seed", seed, f.source("--seed", ": 0"));

    // [model]
    let model = f.str("--model").unwrap_or("RN50");
    o.set("model", "arch", model, f.source("--model", ": OpenCLIP's RN50"));
    if let Some(size) = f.0.get("--force-image-size") {
        let size: i64 =
            size[0].parse().map_err(|_| usage(format!("--force-image-size {}: not an integer", size[0])))?;
        o.set("model", "image_size", size, "--force-image-size");
    }
    if let Some(p) = f.str("--pretrained").filter(|p| !p.is_empty()) {
        if !(p.contains('/') || p.contains('.')) {
            return Err(usage(format!(
                "--pretrained {p}: a pretrained tag downloads from the hub, which ferroclip does not; give the file \
                 (the hub's open_clip_pytorch_model.bin or open_clip_model.safetensors, or an epoch_N.pt)"
            )));
        }
        o.set("model", "init", p, "--pretrained (a torch.save or safetensors file; weights only)");
    }

    // [data]
    match f.str("--dataset-type").unwrap_or("auto") {
        "webdataset" | "auto" => {}
        other => return Err(usage(format!("--dataset-type {other}: only webdataset shards are read"))),
    }
    let train = f.str("--train-data").ok_or_else(|| usage("--train-data: required (the training shards)".into()))?;
    o.set("data", "train", train, "--train-data (`::` joins sources)");
    if let Some(w) = f.str("--train-data-upsampling-factors") {
        let weights: Result<Vec<f64>, _> = w.split("::").map(str::parse::<f64>).collect();
        let weights = weights
            .map_err(|_| usage(format!("--train-data-upsampling-factors {w}: expected numbers joined by `::`")))?;
        o.set(
            "data",
            "train_weights",
            toml::Value::Array(weights.into_iter().map(toml::Value::from).collect()),
            "--train-data-upsampling-factors",
        );
    }
    let batch: i64 = f.num("--batch-size")?.unwrap_or(64);
    o.set(
        "data",
        "batch_size",
        batch,
        if f.has("--batch-size") { "--batch-size (per GPU)" } else { "--batch-size unset: OpenCLIP's 64" },
    );
    let workers: i64 = f.num("--workers")?.unwrap_or(4);
    o.set("data", "workers", workers.max(1), f.source("--workers", ": OpenCLIP's 4"));
    o.set("data", "resampled", f.has("--dataset-resampled"), f.source("--dataset-resampled", ""));
    if let Some(n) = f.num::<i64>("--train-num-samples")? {
        o.set("data", "train_num_samples", n, "--train-num-samples");
    }

    // [data.augment]: `--aug-cfg`, else OpenCLIP's default train transform.
    let aug: Vec<(String, Literal)> =
        f.0.get(AUG_CFG)
            .map(|items| {
                items
                    .iter()
                    .map(|kv| {
                        let (k, v) =
                            kv.split_once('=').ok_or_else(|| usage(format!("--aug-cfg {kv}: expected key=value")))?;
                        Ok((k.to_string(), literal(k, v)?))
                    })
                    .collect::<Result<Vec<_>, ConfigError>>()
            })
            .transpose()?
            .unwrap_or_default();
    let use_timm = aug.iter().any(|(k, v)| k == "use_timm" && *v == Literal::Bool(true));
    let mut scale = toml::Value::Array(vec![0.9.into(), 1.0.into()]);
    let mut scale_why = "--aug-cfg scale unset: OpenCLIP's (0.9, 1.0)".to_string();
    let mut re_prob = toml::Value::Float(0.0);
    let mut re_why = "--aug-cfg re_prob unset: no random erasing".to_string();
    for (k, v) in &aug {
        match k.as_str() {
            "use_timm" => {}
            "scale" => {
                scale = pair(k, v)?;
                scale_why = format!("--aug-cfg scale={}", scale);
            }
            // OpenCLIP's own transform (without use_timm) builds RandomResizedCrop from `scale` alone.
            "ratio" | "re_prob" | "re_count" | "color_jitter" if !use_timm => {
                return Err(usage(format!(
                    "--aug-cfg {k}: OpenCLIP applies it only with use_timm=True (without it the key is ignored); add \
                     use_timm=True or drop it"
                )))
            }
            "re_prob" => match v {
                Literal::Num(p) => {
                    re_prob = toml::Value::Float(*p);
                    re_why = format!("--aug-cfg re_prob={p} (use_timm=True)");
                }
                _ => return Err(usage("--aug-cfg re_prob: expected a probability".into())),
            },
            "re_count" if *v == Literal::Num(1.0) => {}
            "color_jitter" => {
                match v {
                    Literal::Num(c) => o.set("data.augment", "color_jitter", *c, "--aug-cfg color_jitter"),
                    _ => return Err(usage(
                        "--aug-cfg color_jitter: only one strength for brightness, contrast and saturation is built"
                            .into(),
                    )),
                }
            }
            "ratio" => o.set("data.augment", "ratio", pair(k, v)?, "--aug-cfg ratio (use_timm=True)"),
            "gray_scale_prob" if use_timm => {
                return Err(usage(
                    "--aug-cfg gray_scale_prob: OpenCLIP drops it with use_timm=True (only its own transform applies \
                     it); drop use_timm or the key"
                        .into(),
                ))
            }
            "gray_scale_prob" => match v {
                Literal::Num(p) => o.set("data.augment", "grayscale_prob", *p, "--aug-cfg gray_scale_prob"),
                _ => return Err(usage("--aug-cfg gray_scale_prob: expected a probability".into())),
            },
            other => return Err(usage(format!("--aug-cfg {other}: not an augmentation ferroclip builds"))),
        }
    }
    o.set("data.augment", "scale", scale, scale_why);
    o.set("data.augment", "re_prob", re_prob, re_why);

    // [train]
    let epochs: i64 = f.num("--epochs")?.unwrap_or(32);
    o.set("train", "epochs", epochs, f.source("--epochs", ": OpenCLIP's 32"));
    let precision = match f.str("--precision") {
        Some("amp_bf16" | "amp_bfloat16") => "amp_bf16",
        Some("fp32") => "fp32",
        Some(other) => {
            return Err(usage(format!("--precision {other}: not built (ferroclip trains in fp32 or amp_bfloat16)")))
        }
        None => return Err(usage(
            "--precision unset: OpenCLIP's default `amp` (fp16 autocast with a gradient scaler) is not built; pass \
                 --precision amp_bfloat16 or fp32"
                .into(),
        )),
    };
    o.set("train", "precision", precision, "--precision");
    o.set("train", "device", "cuda", "--device: OpenCLIP's default cuda");
    if let Some(c) = f.num::<f64>("--grad-clip-norm")? {
        o.set("train", "grad_clip_norm", c, "--grad-clip-norm");
    }
    let accum: i64 = f.num("--accum-freq")?.unwrap_or(1);
    o.set("train", "accum_freq", accum, f.source("--accum-freq", ": 1"));
    let why_loss = if f.has("--gather-with-grad") {
        " (--gather-with-grad: ferroclip's loss always has exact gradients over the global batch)"
    } else {
        ""
    };
    o.set("train", "local_loss", f.has("--local-loss"), format!("{}{why_loss}", f.source("--local-loss", "")));
    if f.has("--grad-checkpointing") {
        o.set("train", "grad_checkpointing", true, "--grad-checkpointing");
    }
    if f.has("--lock-image") {
        o.set("train", "lock_image", true, "--lock-image");
        let n: i64 = f.num("--lock-image-unlocked-groups")?.unwrap_or(0);
        o.set(
            "train",
            "lock_image_unlocked_groups",
            n,
            "--lock-image-unlocked-groups (timm's groups, as OpenCLIP counts them)",
        );
    }
    if f.has("--lock-image-freeze-bn-stats") {
        o.notes.push(
            "--lock-image-freeze-bn-stats: no effect here (the towers ferroclip builds have no batch norm)".into(),
        );
    }
    if f.has("--lock-text") {
        o.set("train", "lock_text", true, "--lock-text");
        let n: i64 = f.num("--lock-text-unlocked-layers")?.unwrap_or(0);
        o.set("train", "lock_text_unlocked_layers", n, "--lock-text-unlocked-layers");
        if f.has("--lock-text-freeze-layer-norm") {
            o.set("train", "lock_text_freeze_layer_norm", true, "--lock-text-freeze-layer-norm");
        }
    }

    // [optim]: OpenCLIP's get_default_params for what is unset.
    let vit = model.to_ascii_lowercase().contains("vit");
    let (d_beta2, d_eps) = if vit { (0.98, 1e-6) } else { (0.999, 1e-8) };
    let kind = if vit { "a ViT model" } else { "a non-ViT model" };
    for (flag, key, default, why) in [
        ("--lr", "lr", 5e-4, format!("OpenCLIP's 5e-4 for {kind}")),
        ("--wd", "weight_decay", 0.2, "OpenCLIP's 0.2".to_string()),
        ("--beta1", "beta1", 0.9, "OpenCLIP's 0.9".to_string()),
        ("--beta2", "beta2", d_beta2, format!("OpenCLIP's {d_beta2} for {kind}")),
        ("--eps", "eps", d_eps, format!("OpenCLIP's {d_eps:e} for {kind}")),
    ] {
        match f.num::<f64>(flag)? {
            Some(v) => o.set("optim", key, v, flag),
            None => o.set("optim", key, default, format!("{flag} unset: {why}")),
        }
    }

    // [schedule]
    let kind = f.str("--lr-scheduler").unwrap_or("cosine");
    if !matches!(kind, "cosine" | "const" | "const-cooldown") {
        return Err(usage(format!("--lr-scheduler {kind}: expected cosine, const or const-cooldown")));
    }
    o.set("schedule", "kind", kind, f.source("--lr-scheduler", ": cosine"));
    let warmup: i64 = f.num("--warmup")?.unwrap_or(10_000);
    o.set("schedule", "warmup_steps", warmup, f.source("--warmup", ": OpenCLIP's 10000"));
    if kind == "const-cooldown" {
        o.set("schedule", "cooldown_power", f.num::<f64>("--lr-cooldown-power")?.unwrap_or(1.0), "--lr-cooldown-power");
        o.set("schedule", "cooldown_end_lr", f.num::<f64>("--lr-cooldown-end")?.unwrap_or(0.0), "--lr-cooldown-end");
    }

    // [checkpoint]: --resume; the epoch intervals follow once the epoch length is known.
    match f.str("--resume") {
        None => {}
        Some("latest") => o.set("checkpoint", "resume", "latest", "--resume latest"),
        Some(p) => {
            return Err(usage(format!(
                "--resume {p}: an open_clip_train checkpoint cannot be resumed here (its optimizer and data state are \
                 OpenCLIP's); start from its weights with --pretrained {p}, or resume a ferroclip run with --resume latest"
            )))
        }
    }
    let log_every: i64 = f.num("--log-every-n-steps")?.unwrap_or(100);
    o.set("log", "every_steps", log_every, f.source("--log-every-n-steps", ": OpenCLIP's 100"));
    if let Some(v) = f.str("--imagenet-val") {
        o.set("eval", "zeroshot_data", v, "--imagenet-val");
    }
    if f.has("--ddp-static-graph") {
        o.notes.push(
            "--ddp-static-graph: no effect here (gradients are all-reduced in fixed buckets as backward produces them)"
                .into(),
        );
    }
    if f.has("--torchcompile") {
        o.notes.push("--torchcompile: no effect here (libtorch's kernels run eagerly)".into());
    }
    if let Some(r) = f.str("--report-to") {
        o.notes.push(format!(
            "--report-to {r}: ferroclip always writes TensorBoard events and metrics.jsonl; nothing else"
        ));
    }
    if let Some(p) = f.str("--wandb-project-name") {
        o.notes.push(format!("--wandb-project-name {p}: no effect (no wandb)"));
    }

    let header = format!(
        "Imported from open_clip_train flags with `trainer import-openclip --world {world}` (OpenCLIP 3.3.0 defaults for unset flags)."
    );
    // OpenCLIP's epoch length at this world size, for the intervals counted in epochs.
    let plan = {
        let cfg = parse(&o.render(&header))?;
        RunPlan::new(&cfg, world).map_err(usage)?
    };
    let per_epoch = plan.steps_per_epoch.unwrap_or(0);
    let save: i64 = f.num("--save-frequency")?.unwrap_or(1);
    let epoch_steps = |n: i64| (n.max(0) as u64) * per_epoch;
    o.set(
        "checkpoint",
        "every_steps",
        epoch_steps(save) as i64,
        format!(
            "--save-frequency {save}{}: every {save} epoch(s) of {per_epoch} steps at {world} ranks",
            if f.has("--save-frequency") { "" } else { " (unset)" }
        ),
    );
    if f.has("--imagenet-val") {
        let z: i64 = f.num("--zeroshot-frequency")?.unwrap_or(2);
        o.set(
            "eval",
            "every_steps",
            epoch_steps(z) as i64,
            format!(
                "--zeroshot-frequency {z}{}: every {z} epoch(s)",
                if f.has("--zeroshot-frequency") { "" } else { " (unset: OpenCLIP's 2)" }
            ),
        );
    }
    if kind == "const-cooldown" {
        let e: i64 = f
            .num("--epochs-cooldown")?
            .ok_or_else(|| usage("--epochs-cooldown: required with --lr-scheduler const-cooldown".into()))?;
        o.set("schedule", "cooldown_steps", epoch_steps(e) as i64, format!("--epochs-cooldown {e}: {e} epoch(s)"));
    }
    let text = o.render(&header);
    parse(&text)?;
    Ok(text)
}

/// The written config read back: what import writes must load (a failure is this module's fault,
/// or a value the flags gave that the config refuses, named by key).
fn parse(text: &str) -> Result<Config, ConfigError> {
    let value: toml::Table =
        toml::from_str(text).map_err(|e| usage(format!("the imported config is not TOML: {e}")))?;
    Config::from_table(value, COMMAND_LINE)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn aug_cfg_literals_read_as_python_does() {
        assert_eq!(literal("scale", "(0.5, 1.0)").unwrap(), Literal::Seq(vec![0.5, 1.0]));
        assert_eq!(literal("scale", "'(0.5,1.0)'").unwrap(), Literal::Seq(vec![0.5, 1.0]));
        assert_eq!(literal("use_timm", "True").unwrap(), Literal::Bool(true));
        assert_eq!(literal("re_prob", "0.4").unwrap(), Literal::Num(0.4));
        assert!(literal("re_prob", "lots").is_err());
    }

    #[test]
    fn flags_a_config_cannot_express_are_refused_by_name() {
        for (cmd, flag) in [
            ("--train-data a.tar --precision fp32 --remote-sync s3://x", "--remote-sync"),
            ("--train-data a.tar --precision amp", "--precision amp"),
            ("--train-data a.tar", "--precision unset"),
            ("--train-data a.tar --precision fp32 --pretrained laion2b_s34b_b79k", "--pretrained"),
            ("--train-data a.tar --precision fp32 --resume /x/epoch_3.pt", "--resume"),
            ("--train-data a.tar --precision fp32 --aug-cfg re_prob=0.3", "use_timm"),
            ("--train-data a.tar --precision fp32 --aug-cfg ratio=(0.5,2.0)", "use_timm"),
            ("--train-data a.tar --precision fp32 --aug-cfg use_timm=True gray_scale_prob=0.2", "use_timm"),
            ("--train-data a.tar --precision fp32 --dataset-type csv", "--dataset-type"),
        ] {
            let e = import(&args(cmd), 8).unwrap_err();
            assert!(e.message.contains(flag), "{cmd}: {e}");
        }
    }

    #[test]
    fn unset_flags_take_openclips_defaults_per_architecture() {
        let text = import(
            &args("--model ViT-B-32 --train-data a.tar --train-num-samples 1000 --precision fp32 --dataset-resampled"),
            2,
        )
        .unwrap();
        let cfg = parse(&text).unwrap();
        assert_eq!((cfg.optim.lr, cfg.optim.beta2, cfg.optim.eps), (5e-4, Some(0.98), Some(1e-6)), "{text}");
        assert_eq!((cfg.data.batch_size, cfg.data.workers, cfg.train.epochs), (64, 4, Some(32)));
        assert_eq!(cfg.data.augment.scale, [0.9, 1.0]);
        // 1000 / 128 = 8 batches (7.8 rounded up), already a multiple of 4 workers: one epoch = 8 steps.
        assert_eq!(cfg.checkpoint.every_steps, 8, "{text}");
        assert!(text.contains("# --wd unset: OpenCLIP's 0.2"), "{text}");
        let text = import(&args("--model convnext_base_w --train-data a.tar --train-num-samples 1000 --precision fp32 --dataset-resampled"), 2).unwrap();
        let cfg = parse(&text).unwrap();
        assert_eq!((cfg.optim.beta2, cfg.optim.eps), (Some(0.999), Some(1e-8)));
    }
}
