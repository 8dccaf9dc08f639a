//! `trainer show-config`: the config a run will use, as TOML: every key with the value the run
//! takes (its file's, a `--set`, the default, or the architecture's choice for an unset
//! `model.image_size`, `model.drop_path`, `optim.beta2`, `optim.eps`), the keys left unset named
//! with what unset means, and the totals derived at a world size ([`RunPlan`]). The values come
//! from the same functions training calls, so what it prints is what a launch would do. The
//! output loads as a config and describes the same run.

use anyhow::Result;

use super::docs::{one_line, sections};
use super::{Config, RunPlan};
use crate::model::VisionConfig;

/// The resolved config of `cfg` on `world` ranks, as TOML with the derived totals in comments.
pub fn resolved_toml(cfg: &Config, world: usize) -> Result<String> {
    let arch = cfg.model.arch_config()?;
    let plan = RunPlan::new(cfg, world).map_err(|message| super::ConfigError { file: "<config>".into(), message })?;
    let mut root = match toml::Value::try_from(cfg)? {
        toml::Value::Table(t) => t,
        other => anyhow::bail!("the config serializes to {other:?}, not a table"),
    };
    let mut set = |section: &str, key: &str, value: toml::Value| {
        if let Some(toml::Value::Table(t)) = root.get_mut(section) {
            t.entry(key.to_string()).or_insert(value);
        }
    };
    set("model", "image_size", toml::Value::Integer(arch.image_size()));
    if let VisionConfig::ConvNext(c) = &arch.vision {
        set("model", "drop_path", toml::Value::Float(c.drop_path_rate));
        set("model", "head_dropout", toml::Value::Float(c.head_drop));
    }
    let (beta2, eps) = cfg.optim.resolved_beta2_eps(&cfg.model.arch);
    set("optim", "beta2", toml::Value::Float(beta2));
    set("optim", "eps", toml::Value::Float(eps));
    if cfg.train.epochs.is_none() {
        set("train", "max_steps", toml::Value::Integer(plan.total_steps as i64));
    }

    let mut unset = Vec::new();
    for s in sections() {
        let table = match s.name {
            "" => Some(&root),
            name => name.split('.').try_fold(&root, |t, part| t.get(part)?.as_table()),
        };
        for k in s.keys {
            if !table.is_some_and(|t| t.contains_key(k.key)) {
                // The doc's first sentence.
                let doc = one_line(k.doc);
                let end = doc
                    .match_indices(". ")
                    .map(|(i, _)| i)
                    .find(|&i| !(doc[..i].ends_with("e.g") || doc[..i].ends_with("i.e")))
                    .unwrap_or(doc.len());
                let meaning = doc[..end].trim_end_matches('.');
                unset.push(format!("#   {} ({meaning})", s.full_key(k.key)));
            }
        }
    }

    let mut out = String::new();
    out.push_str(&format!("# Resolved config on {world} rank(s): every value this run uses.\n"));
    out.push_str(&format!("# global batch: {} samples per optimizer step\n", plan.global_batch));
    if let Some(per_epoch) = plan.steps_per_epoch {
        out.push_str(&format!("# steps per epoch: {per_epoch} (OpenCLIP's rounding)\n"));
    }
    out.push_str(&format!("# optimizer steps: {}\n", plan.total_steps));
    out.push_str(&format!("# samples seen: {}\n", plan.samples));
    out.push_str(&format!(
        "# warmup: {} steps, {:.2} % of the run\n",
        cfg.schedule.warmup_steps,
        100.0 * plan.warmup_share
    ));
    if !unset.is_empty() {
        out.push_str("# unset:\n");
        out.push_str(&unset.join("\n"));
        out.push('\n');
    }
    out.push('\n');
    out.push_str(&toml::to_string_pretty(&toml::Value::Table(root))?);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prints_the_architectures_choices_and_loads_back_as_the_same_run() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(
            &path,
            "[model]\narch = \"ViT-B-32\"\n[data]\ntrain = \"a.tar\"\nbatch_size = 10\ntrain_num_samples = 1000\n\
             workers = 3\n[train]\nepochs = 2\n",
        )
        .unwrap();
        let cfg = Config::load(&path, &[]).unwrap();
        let text = resolved_toml(&cfg, 4).unwrap();
        let v: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(v["model"]["image_size"].as_integer(), Some(224), "{text}");
        assert_eq!(v["optim"]["beta2"].as_float(), Some(0.98), "{text}");
        assert_eq!(v["optim"]["eps"].as_float(), Some(1e-6), "{text}");
        assert!(v["train"].get("max_steps").is_none(), "epochs decide: {text}");
        assert!(text.contains("# optimizer steps: 54"), "{text}");
        assert!(text.contains("train.grad_clip_norm"), "named as unset: {text}");
        std::fs::write(&path, &text).unwrap();
        let again = Config::load(&path, &[]).unwrap();
        assert_eq!(resolved_toml(&again, 4).unwrap(), text);
    }
}
