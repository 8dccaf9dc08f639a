//! The `trainer` command line. Each subcommand parses its arguments and hands over to the library.
//!
//! Exit status: 0 on success, 2 on a usage or config error, 1 on any other failure.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use ferroclip::config::{Config, ConfigError};

#[derive(Parser)]
#[command(name = "trainer", version, about = "Train CLIP-style contrastive image–text models (OpenCLIP-compatible)")]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Same as `trainer train --config ...`.
    #[command(flatten)]
    train: Option<ConfigArgs>,
}

#[derive(Args, Clone)]
struct ConfigArgs {
    /// Run config (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// Override a config key, e.g. `--set optim.lr=1e-4` (repeatable).
    #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Train (what `srun trainer --config FILE` runs).
    Train(ConfigArgs),
    /// Zero-shot, retrieval and validation-loss evaluation of a checkpoint.
    Eval {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// An OpenCLIP-compatible .safetensors model file.
        #[arg(long)]
        checkpoint: PathBuf,
        /// Write the results as flat JSON here.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Write L2-normalized image and text features of a checkpoint to a safetensors file.
    Embed {
        #[command(flatten)]
        cfg: ConfigArgs,
        #[arg(long)]
        checkpoint: PathBuf,
        /// Folder of images (features in sorted file-name order).
        #[arg(long)]
        images: Option<PathBuf>,
        /// Text file, one caption per line.
        #[arg(long)]
        texts: Option<PathBuf>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Walk the configured training shards and report counts, extensions and bad samples.
    DataCheck(ConfigArgs),
    /// Measure the input pipeline in images/s: the loader end to end on data.train's shards.
    BenchData {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Worker threads (default: data.workers).
        #[arg(long)]
        threads: Option<usize>,
        /// Minimum seconds to measure (each of: worker-only rate, end to end).
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Decode + augreg alone over LAION-like JPEGs generated in memory (data.train unused).
        #[arg(long)]
        synthetic: bool,
        /// Instead of measuring, write LAION-like shards (DIR/00000.tar ...) to measure on.
        #[arg(long, value_name = "DIR")]
        write_shards: Option<PathBuf>,
        /// With --write-shards: how many shards, and samples per shard.
        #[arg(long, default_value_t = 8)]
        shards: usize,
        #[arg(long, default_value_t = 250)]
        per_shard: usize,
    },
    /// Time full training steps on synthetic inputs (one JSON line; see scripts/bench-vs-openclip).
    BenchTrain {
        /// Architecture (OpenCLIP name).
        #[arg(long)]
        arch: String,
        #[arg(long)]
        image_size: i64,
        #[arg(long)]
        batch: i64,
        /// Timed steps.
        #[arg(long, default_value_t = 10)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// fp32 or amp_bf16 (CUDA only).
        #[arg(long, default_value = "fp32")]
        precision: String,
        /// libtorch threads (0: libtorch's default).
        #[arg(long, default_value_t = 0)]
        threads: usize,
        /// cpu or cuda.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Activation checkpointing (train.grad_checkpointing).
        #[arg(long)]
        grad_checkpointing: bool,
    },
    /// Check the GPU path's numerics against their references: gradients with vs without activation
    /// checkpointing under amp_bf16, normalization + random erasing on the device vs the CPU
    /// reference (one JSON line each; exit 1 when one fails; see scripts/gpu-check).
    CheckNumerics {
        /// Architecture (OpenCLIP name or model-config file) whose gradients are compared (repeatable).
        #[arg(long = "arch", required = true)]
        archs: Vec<PathBuf>,
        /// cpu or cuda.
        #[arg(long, default_value = "cuda")]
        device: String,
        /// fp32 or amp_bf16 (CUDA only).
        #[arg(long, default_value = "amp_bf16")]
        precision: String,
    },
    /// Check checkpoints on disk: each file's size and CRC32C against the manifest written with it
    /// (without a manifest: that both files parse fully as safetensors). One line per checkpoint,
    /// `ok step N` or `BAD step N: FILE: REASON`; exit 0 when all verify, 2 otherwise.
    VerifyCheckpoint {
        /// Model files, state files or manifests of checkpoints, or `checkpoints/` folders (every
        /// checkpoint in them).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Average model checkpoints of one architecture (a model soup) into one `.safetensors` file:
    /// ours or OpenCLIP's (`.bin`, `epoch_N.pt`, `.safetensors`); uniform unless `--weights`.
    Soup {
        /// The model file to write.
        #[arg(long)]
        out: PathBuf,
        /// One weight per checkpoint, comma-separated (normalized to sum to 1).
        #[arg(long, value_delimiter = ',')]
        weights: Option<Vec<f64>>,
        /// The checkpoints (at least two).
        #[arg(required = true, num_args = 2..)]
        inputs: Vec<PathBuf>,
    },
    /// Write the config equivalent to an `open_clip_train.main` command line (the flags after `--`),
    /// one comment per key naming the flag it came from or OpenCLIP's default it takes.
    ImportOpenclip {
        /// Write here instead of stdout.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Ranks of the launch: OpenCLIP counts checkpoint and eval intervals in epochs, whose
        /// steps depend on it.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        world: u64,
        /// open_clip_train.main's flags.
        #[arg(last = true, allow_hyphen_values = true)]
        flags: Vec<String>,
    },
    /// Print every config key with its default and meaning (the README's tables).
    ConfigDocs,
    /// Print the fully resolved config a run would use (every key after defaults and the
    /// architecture's choices, the unset ones named) with its derived totals at `--world` ranks:
    /// global batch, steps per epoch, optimizer steps, samples seen, warmup share.
    ShowConfig {
        #[command(flatten)]
        cfg: ConfigArgs,
        /// Ranks of the launch (e.g. 512 for 64 nodes x 8 GPUs).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
        world: u64,
    },
    /// Print the token ids of each stdin line as a JSON array.
    Tokenize {
        /// Run config (for the tokenizer choice); default: the CLIP BPE, context 77.
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long = "set", value_name = "SECTION.KEY=VALUE")]
        set: Vec<String>,
    },
    /// Write the synthetic demo dataset (WebDataset shards of shapes and captions).
    MakeDemoData {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Training shards to write.
        #[arg(long, default_value_t = 8)]
        shards: usize,
        /// Samples per training shard.
        #[arg(long, default_value_t = 400)]
        per_shard: usize,
        #[arg(long, default_value_t = 0)]
        seed: u64,
    },
    /// Check every collective against known results on all ranks (run under srun/mpirun/torchrun).
    #[command(hide = true)]
    DistSelftest {
        /// dist.backend: auto, gloo, nccl or mpi.
        #[arg(long, default_value = "auto")]
        backend: String,
        /// cpu or cuda.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Refuse control data in device collectives (dist.strict_device).
        #[arg(long)]
        strict: bool,
        /// dist.heartbeat_timeout_s.
        #[arg(long, default_value_t = 60)]
        heartbeat_timeout_s: u64,
        /// Rank that fails before its first collective.
        #[arg(long)]
        fail_rank: Option<usize>,
        /// Rank that panics before its first collective.
        #[arg(long)]
        panic_rank: Option<usize>,
        /// Rank that stalls (alive) before its first collective.
        #[arg(long)]
        stall_rank: Option<usize>,
        /// dist.timeout_s.
        #[arg(long, default_value_t = 600)]
        timeout_s: u64,
        /// Send a stop flag through the device collective (refused with --strict).
        #[arg(long)]
        misroute: bool,
    },
}

/// A command-line value of a config type, spelled as in a config file (`--device cuda`).
fn config_value<T: serde::de::DeserializeOwned>(flag: &str, value: &str) -> Result<T, ConfigError> {
    toml::Value::String(value.to_string())
        .try_into()
        .map_err(|e| ConfigError { file: "<command line>".into(), message: format!("--{flag} {value}: {e}") })
}

fn load(args: &ConfigArgs) -> Result<Config> {
    Ok(Config::load(&args.config, &args.set)?)
}

fn run(cli: Cli) -> Result<()> {
    use ferroclip::commands;
    match cli.command {
        None => {
            let Some(args) = cli.train else {
                return Err(ConfigError {
                    file: "<command line>".into(),
                    message: "missing --config FILE (see --help)".into(),
                }
                .into());
            };
            ferroclip::train::run(&load(&args)?)
        }
        Some(Command::Train(args)) => ferroclip::train::run(&load(&args)?),
        Some(Command::Eval { cfg, checkpoint, out }) => commands::eval(&load(&cfg)?, &checkpoint, out.as_deref()),
        Some(Command::Embed { cfg, checkpoint, images, texts, out }) => {
            commands::embed(&load(&cfg)?, &checkpoint, images.as_deref(), texts.as_deref(), &out)
        }
        Some(Command::DataCheck(args)) => commands::data_check(&load(&args)?),
        Some(Command::BenchData { cfg, threads, seconds, synthetic, write_shards, shards, per_shard }) => {
            let cfg = load(&cfg)?;
            match write_shards {
                Some(dir) => commands::write_bench_shards(&dir, shards, per_shard, cfg.seed),
                None => commands::bench_data(&cfg, threads, seconds, synthetic),
            }
        }
        Some(Command::BenchTrain {
            arch,
            image_size,
            batch,
            steps,
            warmup,
            precision,
            threads,
            device,
            grad_checkpointing,
        }) => commands::bench_train(&commands::BenchTrain {
            arch,
            image_size,
            batch,
            steps,
            warmup,
            precision: config_value("precision", &precision)?,
            threads,
            device: config_value("device", &device)?,
            grad_checkpointing,
        }),
        Some(Command::CheckNumerics { archs, device, precision }) => {
            let device: ferroclip::config::DeviceConfig = config_value("device", &device)?;
            ferroclip::numerics::run(&ferroclip::numerics::CheckNumerics {
                archs,
                device: device.resolve(0).map_err(anyhow::Error::msg)?,
                precision: config_value("precision", &precision)?,
            })
        }
        Some(Command::VerifyCheckpoint { paths }) => commands::verify_checkpoints(&paths),
        Some(Command::ImportOpenclip { out, world, flags }) => {
            let text = ferroclip::import_openclip::import(&flags, world as usize)?;
            match out {
                Some(path) => {
                    std::fs::write(&path, text).map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
                }
                None => {
                    print!("{text}");
                    Ok(())
                }
            }
        }
        Some(Command::Soup { out, weights, inputs }) => ferroclip::soup::soup(&inputs, weights.as_deref(), &out),
        Some(Command::ShowConfig { cfg, world }) => {
            print!("{}", ferroclip::config::show::resolved_toml(&load(&cfg)?, world as usize)?);
            Ok(())
        }
        Some(Command::ConfigDocs) => {
            print!("{}", ferroclip::config::docs::markdown());
            Ok(())
        }
        Some(Command::Tokenize { config, set }) => {
            let cfg = match config {
                Some(path) => Some(Config::load(&path, &set)?),
                None => None,
            };
            commands::tokenize(cfg.as_ref())
        }
        Some(Command::MakeDemoData { out, shards, per_shard, seed }) => {
            commands::make_demo_data(&out, shards, per_shard, seed)
        }
        Some(Command::DistSelftest {
            backend,
            device,
            strict,
            heartbeat_timeout_s,
            fail_rank,
            panic_rank,
            stall_rank,
            timeout_s,
            misroute,
        }) => {
            let backend = config_value("backend", &backend)?;
            let dist = ferroclip::config::DistConfig {
                backend,
                strict_device: strict,
                heartbeat_timeout_s,
                timeout_s,
                ..Default::default()
            };
            let device = config_value("device", &device)?;
            commands::dist_selftest(&commands::DistSelftest {
                dist,
                device,
                fail_rank,
                panic_rank,
                stall_rank,
                misroute,
            })
        }
    }
}

/// 2 when the error is the user's config or input (a [`ConfigError`] anywhere in the chain, a
/// data error that names a config value: a shard pattern that matches nothing, a bad `[data]`
/// value; a weights file that cannot be read into the model), else 1.
fn exit_code(e: &anyhow::Error) -> i32 {
    use ferroclip::model::WeightsError;
    let config = e.chain().any(|c| {
        c.downcast_ref::<ConfigError>().is_some()
            || c.downcast_ref::<ferroclip_data::DataError>().is_some_and(|d| d.is_config_error())
            || c.downcast_ref::<WeightsError>().is_some_and(|w| !matches!(w, WeightsError::Write { .. }))
    });
    if config {
        2
    } else {
        1
    }
}

fn main() -> ExitCode {
    ferroclip::dist::fail_fast::install_panic_hook();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { ExitCode::from(2) } else { ExitCode::SUCCESS };
        }
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = exit_code(&e);
            // The other ranks would wait forever in their next collective: tell them, through the
            // job's store (their watchdogs exit with this message), or MPI_Abort under MPI.
            ferroclip::dist::fail_fast::report_failure(&format!("{e:#}"));
            #[cfg(feature = "mpi")]
            ferroclip::dist::mpi::abort_world_if_initialized(code);
            ExitCode::from(code as u8)
        }
    }
}
