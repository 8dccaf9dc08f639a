//! What a checkpoint's state file holds besides the model: the counters, the optimizer, every
//! rank's data cursor, and the config the run trained with. [`TrainState::state`] writes it and
//! [`TrainState::restore`] reads it back, checking that the config still describes the same run:
//! a key that changed in a way that breaks exact resume is named, and refused unless
//! `checkpoint.allow_config_change` (the data stream's own keys are the data cursor's to check).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};

use ferroclip_data::StreamCursor;

use crate::checkpoint::{self, SavedState};
use crate::config::{Config, ConfigError};
use crate::optim::adamw::AdamW;

/// Counters that, with the model, the optimizer and every rank's data cursor, make up the state.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Counters {
    pub step: u64,
    pub samples_seen: u64,
    pub skipped_steps: u64,
}

/// Config keys (or key prefixes, ending in `.`) whose value decides what training computes from a
/// given state: resuming with another value does not continue the saved run. Left out: where
/// outputs go and how often (`name`, `log.*`, `checkpoint.*`, `eval.*`), how ranks talk and how
/// fast (`dist.*`, `train.threads`, `train.device`, `data.workers`, `data.prefetch`, timeouts), the
/// weights a fresh start begins from (`model.init`, `model.text_init`), and the stream's own keys
/// (shards, weights, readers, shuffling, resampling: the data cursor's fingerprint checks them).
const RUN_KEYS: [&str; 19] = [
    "seed",
    "model.arch",
    "model.image_size",
    "model.drop_path",
    "model.head_dropout",
    "model.tokenizer",
    "train.precision",
    "train.accum_freq",
    "train.grad_clip_norm",
    "train.lock_",
    "train.grad_checkpointing",
    "optim.",
    "schedule.",
    "data.batch_size",
    "data.augment.",
    "data.image_keys",
    "data.caption_key",
    "data.max_caption_bytes",
    "data.max_image_pixels",
];

/// `train.max_steps` and `train.epochs` change the schedule's length too, but resuming with another
/// one is how a run is extended or shortened: they are named, not refused.
const LENGTH_KEYS: [&str; 2] = ["train.max_steps", "train.epochs"];

/// A resumed run's state, read back from a state file.
pub struct TrainState {
    pub counters: Counters,
    /// Every rank's data cursor when the state was saved, in rank order.
    pub cursors: Vec<StreamCursor>,
}

impl TrainState {
    /// The state file of this step; `cursors` are every rank's data cursor as JSON.
    pub fn state(cfg: &Config, opt: &AdamW, counters: &Counters, cursors: &[Vec<u8>]) -> Result<SavedState> {
        let cursors: Vec<serde_json::Value> = cursors
            .iter()
            .map(|b| serde_json::from_slice(b))
            .collect::<Result<_, _>>()
            .context("a rank sent a malformed data cursor")?;
        let meta = BTreeMap::from([
            ("counters".to_string(), serde_json::to_string(counters)?),
            ("optimizer_step".to_string(), opt.step_count().to_string()),
            ("data_cursors".to_string(), serde_json::to_string(&cursors)?),
            // No RNG state to store: every random draw is a function of (seed, step, rank, sample).
            ("rng".to_string(), format!("derived from seed {} and the step", cfg.seed)),
            ("config".to_string(), toml::to_string(cfg)?),
        ]);
        Ok(SavedState { step: counters.step, tensors: opt.state(), meta })
    }

    /// Reads the state file at `path` into `opt` after checking its config against `cfg`; says on
    /// stderr (when `report`) which keys changed where resuming goes on anyway.
    pub fn restore(path: &Path, opt: &mut AdamW, cfg: &Config, report: bool) -> Result<TrainState> {
        let (tensors, meta) = checkpoint::read(path)?;
        let file = path.display();
        let field = |k: &str| meta.get(k).with_context(|| format!("{file}: the state file lacks `{k}`"));
        match meta.get("config") {
            Some(saved) => check_config(saved, cfg, path, report)?,
            None if report => eprintln!("ferroclip: {file} stores no config; not compared with this one"),
            None => {}
        }
        let counters: Counters =
            serde_json::from_str(field("counters")?).with_context(|| format!("{file}: bad `counters`"))?;
        let cursors: Vec<StreamCursor> =
            serde_json::from_str(field("data_cursors")?).with_context(|| format!("{file}: bad `data_cursors`"))?;
        let opt_step: i64 =
            field("optimizer_step")?.parse().with_context(|| format!("{file}: bad `optimizer_step`"))?;
        opt.restore(&tensors, opt_step).with_context(|| format!("restoring the optimizer from {file}"))?;
        Ok(TrainState { counters, cursors })
    }
}

/// One config key whose value differs: (key, saved value, current value).
pub type Change = (String, String, String);

/// The keys of [`RUN_KEYS`] (and [`LENGTH_KEYS`]) whose values differ between `saved` and `now`.
pub fn changed_run_keys(saved: &Config, now: &Config) -> Vec<Change> {
    let (a, b) = (flatten(saved), flatten(now));
    let keys: std::collections::BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    let matters = |k: &str| {
        LENGTH_KEYS.contains(&k)
            || RUN_KEYS.iter().any(|p| if p.ends_with(['.', '_']) { k.starts_with(p) } else { k == *p })
    };
    keys.into_iter()
        .filter(|k| matters(k) && a.get(*k) != b.get(*k))
        .map(|k| {
            let show = |v: Option<&toml::Value>| v.map_or("(none)".to_string(), |v| v.to_string());
            (k.clone(), show(a.get(k)), show(b.get(k)))
        })
        .collect()
}

fn check_config(saved_toml: &str, cfg: &Config, path: &Path, report: bool) -> Result<()> {
    let file = path.display();
    // Keys added since the checkpoint was written take their defaults, as they did in that run.
    let saved: Config = match toml::from_str(saved_toml) {
        Ok(c) => unset_old_sentinels(c),
        Err(e) => {
            if report {
                eprintln!("ferroclip: {file}: its config no longer parses ({e}); not compared with this one");
            }
            return Ok(());
        }
    };
    let changes = changed_run_keys(&saved, cfg);
    let list = |cs: &[&Change]| cs.iter().map(|(k, a, b)| format!("{k} {a} -> {b}")).collect::<Vec<_>>().join(", ");
    let (length, run): (Vec<&Change>, Vec<&Change>) = changes.iter().partition(|c| LENGTH_KEYS.contains(&c.0.as_str()));
    if !run.is_empty() && !cfg.checkpoint.allow_config_change {
        return Err(ConfigError {
            file: file.to_string(),
            message: format!(
                "resuming with a config that changes the run: {}. Resume with the saved values, or set \
                 checkpoint.allow_config_change = true to go on from the saved state under the new ones",
                list(&run)
            ),
        }
        .into());
    }
    if report && !run.is_empty() {
        eprintln!("ferroclip: resuming under changed keys (checkpoint.allow_config_change): {}", list(&run));
    }
    if report && !length.is_empty() {
        eprintln!("ferroclip: resuming with {}; the schedule follows the new length", list(&length));
    }
    Ok(())
}

/// A config saved before these keys were `Option`s spelled "unset" as a value (`image_size = 0`,
/// `drop_path = -1`, `beta2 = 0`, `eps = 0`, `grad_clip_norm = 0`, `init = ""`): read those as unset, so that resuming such a run with
/// today's config does not count them as changed keys.
fn unset_old_sentinels(mut c: Config) -> Config {
    if c.model.image_size == Some(0) {
        c.model.image_size = None;
    }
    if c.model.drop_path.is_some_and(|r| r < 0.0) {
        c.model.drop_path = None;
    }
    if c.optim.beta2 == Some(0.0) {
        c.optim.beta2 = None;
    }
    if c.optim.eps == Some(0.0) {
        c.optim.eps = None;
    }
    if c.train.grad_clip_norm == Some(0.0) {
        c.train.grad_clip_norm = None;
    }
    for path in [&mut c.model.init, &mut c.model.text_init] {
        if path.as_deref().is_some_and(|p| p.as_os_str().is_empty()) {
            *path = None;
        }
    }
    c
}

/// `section.key` → value for every leaf of the config.
fn flatten(cfg: &Config) -> BTreeMap<String, toml::Value> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, toml::Value>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                    walk(&key, v, out);
                }
            }
            leaf => {
                out.insert(prefix.to_string(), leaf.clone());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", &toml::Value::try_from(cfg).expect("a config serializes"), &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_that_change_the_run_are_named_and_others_are_not() {
        let saved = Config::default();
        let mut now = saved.clone();
        now.name = "other".into();
        now.log.every_steps = 1;
        now.data.workers = 16;
        now.dist.timeout_s = 5;
        now.eval.every_steps = 100;
        assert!(changed_run_keys(&saved, &now).is_empty());
        now.optim.lr = 1e-3;
        now.data.augment.re_prob = 0.0;
        now.train.lock_image = true;
        now.train.max_steps = Some(5000);
        let keys: Vec<String> = changed_run_keys(&saved, &now).into_iter().map(|c| c.0).collect();
        assert_eq!(keys, ["data.augment.re_prob", "optim.lr", "train.lock_image", "train.max_steps"]);
    }

    #[test]
    fn a_changed_run_key_is_refused_unless_allowed_and_a_new_length_is_not() {
        let saved = Config::default();
        let path = Path::new("step_00000004.state.safetensors");
        let toml = toml::to_string(&saved).unwrap();
        let mut now = saved.clone();
        now.train.max_steps = Some(7);
        check_config(&toml, &now, path, false).unwrap();
        now.schedule.warmup_steps = 1;
        let e = check_config(&toml, &now, path, false).unwrap_err();
        let msg = format!("{e:#}");
        assert!(e.downcast_ref::<ConfigError>().is_some(), "{msg}");
        assert!(msg.contains("schedule.warmup_steps 10000 -> 1") && msg.contains(path.to_str().unwrap()), "{msg}");
        assert!(!msg.contains("max_steps"), "{msg}");
        now.checkpoint.allow_config_change = true;
        check_config(&toml, &now, path, false).unwrap();
    }

    #[test]
    fn a_config_saved_with_the_old_unset_values_resumes_as_unchanged() {
        let path = Path::new("step_00000004.state.safetensors");
        let mut toml = toml::to_string(&Config::default()).unwrap();
        toml = toml.replace("[model]\n", "[model]\nimage_size = 0\ndrop_path = -1.0\n");
        toml = toml.replace("[optim]\n", "[optim]\nbeta2 = 0.0\neps = 0.0\n");
        assert!(toml.contains("image_size = 0") && toml.contains("eps = 0.0"), "{toml}");
        check_config(&toml, &Config::default(), path, false).unwrap();
        let changed = toml.replace("image_size = 0", "image_size = 64");
        assert!(check_config(&changed, &Config::default(), path, false).is_err());
    }
}
