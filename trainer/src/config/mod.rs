//! The run configuration: one typed section per TOML table, each declared once with its keys'
//! docs and defaults ([`ferroclip_data::section`]), each validating its own keys and building its
//! parts (`ModelConfig::init`, `OptimConfig::init`, `ScheduleConfig::init`, `TokenizerConfig::init`,
//! `DeviceConfig::resolve`). Keys follow OpenCLIP's flags where one exists (`warmup`, `accum_freq`,
//! `local_loss`). [`docs`] prints the key reference the README's tables are checked against.

pub mod dist;
pub mod docs;
pub mod eval;
pub mod model;
pub mod optim;
pub mod outputs;
pub mod plan;
pub mod show;
pub mod train;

use std::path::{Path, PathBuf};

use ferroclip_data::section::Section;

pub use dist::{Backend, DistConfig, Requeue};
pub use eval::EvalConfig;
pub use ferroclip_data::augment::AugmentConfig;
pub use ferroclip_data::tokenize::TokenizerConfig;
pub use ferroclip_data::DataConfig;
pub use model::ModelConfig;
pub use optim::{OptimConfig, ScheduleConfig, ScheduleKind};
pub use outputs::{CheckpointConfig, LogConfig};
pub use plan::RunPlan;
pub use train::{DeviceConfig, Precision, TrainConfig};

/// A config that cannot be used. Always names the file and the key; `trainer` exits with status 2.
#[derive(Debug, thiserror::Error)]
#[error("{file}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub message: String,
}

ferroclip_data::config_section! {
    /// The whole run config (`trainer --config FILE`); its top-level keys.
    pub struct Config {
        /// Run name; outputs go to `{output_dir}/{name}/`.
        pub name: String = "run",
        /// Parent folder of all runs.
        pub output_dir: PathBuf = "runs",
        /// Seed for initialization, data order and augmentation.
        pub seed: u64 = 0,
        /// `[model]`
        pub model: ModelConfig = ModelConfig::default(),
        /// `[data]`
        pub data: DataConfig = DataConfig::default(),
        /// `[train]`
        pub train: TrainConfig = TrainConfig::default(),
        /// `[optim]`
        pub optim: OptimConfig = OptimConfig::default(),
        /// `[schedule]`
        pub schedule: ScheduleConfig = ScheduleConfig::default(),
        /// `[checkpoint]`
        pub checkpoint: CheckpointConfig = CheckpointConfig::default(),
        /// `[log]`
        pub log: LogConfig = LogConfig::default(),
        /// `[eval]`
        pub eval: EvalConfig = EvalConfig::default(),
        /// `[dist]`
        pub dist: DistConfig = DistConfig::default(),
    }
}

impl Config {
    /// Read `path`, apply `--set section.key=value` overrides, deserialize strictly and validate.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Config, ConfigError> {
        let file = path.display().to_string();
        let err = |message: String| ConfigError { file: file.clone(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let mut value: toml::Table = toml::from_str(&text).map_err(|e| err(format!("not valid TOML: {e}")))?;
        for o in overrides {
            apply_override(&mut value, o).map_err(|m| err(format!("--set {o}: {m}")))?;
        }
        length_from_command_line(&mut value, overrides);
        Config::from_table(value, &file)
    }

    /// Deserialize a TOML table strictly and validate it; errors name `file` and the key.
    pub fn from_table(value: toml::Table, file: &str) -> Result<Config, ConfigError> {
        let err = |message: String| ConfigError { file: file.to_string(), message };
        let cfg: Config = serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| {
            let path = e.path().to_string();
            err(format!("key `{path}`: {}", e.into_inner()))
        })?;
        cfg.validate().map_err(err)?;
        Ok(cfg)
    }

    /// Every section's rules and the rules across sections, each error naming its key.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty() || self.name.contains('/') {
            return Err("key `name`: must be a non-empty name without `/`".into());
        }
        check_ranges("", self)?;
        check_ranges("model", &self.model)?;
        self.data.validate().map_err(|e| format!("key `data.{}`: {}", e.key, e.message))?;
        if self.data.train.trim().is_empty() {
            return Err("key `data.train`: no training shards given".into());
        }
        self.train.validate()?;
        check_ranges("optim", &self.optim)?;
        check_ranges("schedule", &self.schedule)?;
        check_ranges("checkpoint", &self.checkpoint)?;
        check_ranges("log", &self.log)?;
        self.dist.validate()?;
        self.eval.validate()?;
        let arch = self.model.arch_config().map_err(|e| format!("{e:#}"))?;
        crate::lock::check(&self.train.lock_spec(), &arch)?;
        // What does not depend on the world size (the launch checks its own: train::run).
        RunPlan::new(self, 1)?;
        Ok(())
    }

    /// `{output_dir}/{name}`
    pub fn run_dir(&self) -> PathBuf {
        self.output_dir.join(&self.name)
    }
}

/// Every key of one section (`section`: its TOML name, `""` at the top level) within the range
/// declared with it ([`ferroclip_data::section::Range`]), or the first that is not, named in full.
fn check_ranges<S: Section>(section: &str, values: &S) -> Result<(), String> {
    values.check_ranges().map_err(|e| match section {
        "" => format!("key `{}`: {}", e.key, e.message),
        s => format!("key `{s}.{}`: {}", e.key, e.message),
    })
}

/// The run's length is one decision that either of two keys takes: a `--set` of one replaces
/// the file's other, so `--set train.max_steps=50` shortens a recipe that counts epochs (both
/// given with `--set` still conflict).
fn length_from_command_line(root: &mut toml::Table, overrides: &[String]) {
    let set: Vec<&str> = overrides.iter().filter_map(|o| o.split_once('=')).map(|(k, _)| k.trim()).collect();
    for (key, other) in [("max_steps", "epochs"), ("epochs", "max_steps")] {
        if set.contains(&format!("train.{key}").as_str()) && !set.contains(&format!("train.{other}").as_str()) {
            if let Some(toml::Value::Table(train)) = root.get_mut("train") {
                train.remove(other);
            }
        }
    }
}

/// Apply one `section.key=value` override to the raw TOML table. The value is read as TOML
/// (`3`, `1e-4`, `true`, `"s"`, `[1, 2]`), or taken as a plain string if it isn't TOML.
fn apply_override(root: &mut toml::Table, spec: &str) -> Result<(), String> {
    let (path, raw) = spec.split_once('=').ok_or("expected section.key=value")?;
    let keys: Vec<&str> = path.trim().split('.').collect();
    if keys.iter().any(|k| k.is_empty()) {
        return Err(format!("bad key path `{path}`"));
    }
    let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
        Ok(mut t) => t.remove("v").expect("parsed table has v"),
        Err(_) => toml::Value::String(raw.to_string()),
    };
    let (last, parents) = keys.split_last().expect("non-empty");
    let mut table = root;
    for k in parents {
        let entry = table.entry(k.to_string()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        table = entry.as_table_mut().ok_or_else(|| format!("`{k}` is not a section"))?;
    }
    table.insert(last.to_string(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        use std::io::Write;
        let mut f = tempfile::Builder::new().suffix(".toml").tempfile().unwrap();
        f.write_all(text.as_bytes()).unwrap();
        f
    }

    #[test]
    fn a_length_key_given_with_set_replaces_the_files_other() {
        let f = write("[data]\ntrain = \"a.tar\"\ntrain_num_samples = 1000\n[train]\nepochs = 3\n");
        let cfg = Config::load(f.path(), &["train.max_steps=7".into()]).unwrap();
        assert_eq!((cfg.train.max_steps, cfg.train.epochs), (Some(7), None));
        assert_eq!(Config::load(f.path(), &[]).unwrap().train.epochs, Some(3));
        let both = Config::load(f.path(), &["train.max_steps=7".into(), "train.epochs=2".into()]).unwrap_err();
        assert!(both.message.contains("not both"), "{both}");
        let f = write("[data]\ntrain = \"a.tar\"\n[train]\nmax_steps = 3\nepochs = 2\n");
        assert!(Config::load(f.path(), &[]).unwrap_err().message.contains("not both"), "a file with both is refused");
    }

    #[test]
    fn unknown_key_is_rejected_with_its_name_and_file() {
        let f = write("name = \"x\"\n[data]\ntrain = \"a.tar\"\nbatch_sise = 3\n");
        let e = Config::load(f.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("batch_sise"), "{e}");
        assert!(e.contains("data"), "{e}");
        assert!(e.contains(&f.path().display().to_string()), "{e}");
    }

    #[test]
    fn bad_value_is_rejected_with_its_key() {
        let f = write("[data]\ntrain = \"a.tar\"\nbatch_size = 0\n");
        let e = Config::load(f.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("data.batch_size"), "{e}");
        let f = write("[data]\ntrain = \"a.tar\"\n[train]\nprecision = \"fp8\"\n");
        let e = Config::load(f.path(), &[]).unwrap_err().to_string();
        assert!(e.contains("train.precision"), "{e}");
    }

    #[test]
    fn overrides_set_nested_keys_with_typed_values() {
        let f = write("[data]\ntrain = \"a.tar\"\n");
        let cfg = Config::load(
            f.path(),
            &["optim.lr=1e-3".into(), "data.batch_size=7".into(), "name=abc".into(), "data.augment.re_prob=0".into()],
        )
        .unwrap();
        assert_eq!(cfg.optim.lr, 1e-3);
        assert_eq!(cfg.data.batch_size, 7);
        assert_eq!(cfg.name, "abc");
        assert_eq!(cfg.data.augment.re_prob, 0.0);
        let e = Config::load(f.path(), &["optim.lrr=1".into()]).unwrap_err().to_string();
        assert!(e.contains("lrr"), "{e}");
    }

    #[test]
    fn enum_keys_name_the_key_and_the_choices() {
        let f = write("[data]\ntrain = \"a.tar\"\n");
        for (set, key, choice) in [
            ("schedule.kind=cosin", "schedule.kind", "const-cooldown"),
            ("train.device=gpu", "train.device", "cuda"),
            ("dist.backend=ucc", "dist.backend", "nccl"),
        ] {
            let e = Config::load(f.path(), &[set.into()]).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains(choice), "{set}: {e}");
        }
        let cfg =
            Config::load(f.path(), &["schedule.kind=const-cooldown".into(), "model.tokenizer=t/tokenizer.json".into()])
                .unwrap();
        assert_eq!(cfg.schedule.kind, ScheduleKind::ConstCooldown);
        assert_eq!(cfg.model.tokenizer, TokenizerConfig::HuggingFace("t/tokenizer.json".into()));
        let cfg = Config::load(f.path(), &["train.precision=amp_bfloat16".into()]).unwrap();
        assert_eq!(cfg.train.precision, Precision::AmpBf16, "OpenCLIP's spelling");
    }

    #[test]
    fn vit_gets_openclip_betas() {
        let o = OptimConfig::default();
        assert_eq!(o.resolved_beta2_eps("ViT-B-32"), (0.98, 1e-6));
        assert_eq!(o.resolved_beta2_eps("convnext_base_w"), (0.999, 1e-8));
    }
}
