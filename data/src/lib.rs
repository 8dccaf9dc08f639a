//! The ferroclip input pipeline, free of libtorch so it builds and tests in seconds.
//!
//! Read top to bottom, the modules are the pipeline a sample travels through
//! (the same stages as OpenCLIP's `--train-data` WebDataset pipeline):
//!
//! shards ([`source`]) → tar members ([`tar`]) → samples grouped by key ([`sample`])
//! → decoded RGB ([`decode`]) → augreg / eval transforms ([`augment`])
//! → token ids ([`tokenize`]) → batches with a resumable cursor ([`batch`], [`loader`]).
//!
//! [`config`] holds the typed `[data]` section, [`rng`] the per-sample random streams that
//! make augmentation independent of thread and rank, [`stats`] the counters the trainer logs,
//! [`check`] the dataset report behind `trainer data-check`.

pub mod config;
pub mod source;
pub mod tar;
pub mod sample;
pub mod decode;
pub mod resize;
pub mod augment;
pub mod tokenize;
pub mod batch;
pub mod loader;
pub mod rng;
pub mod stats;
pub mod check;
pub mod synth;
pub mod bench;

pub use batch::Batch;
pub use config::DataConfig;
pub use loader::{DataError, Loader, LoaderOptions, Mode, StreamCursor};
pub use stats::StatsSnapshot;
