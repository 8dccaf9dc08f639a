//! The ferroclip input pipeline, free of libtorch so it builds and tests in seconds.
//!
//! Read top to bottom, the modules are the pipeline a sample travels through
//! (the same stages as OpenCLIP's `--train-data` WebDataset pipeline):
//!
//! shards ([`source`]) → tar members ([`tar`]) → samples grouped by key ([`sample`])
//! → decoded RGB ([`decode`]) → augreg / eval transforms ([`augment`], uint8 CHW + the
//! [`erase`] box) → token ids ([`tokenize`]) → batches ([`batch`]) in reused [`host`] buffers.
//! The trainer normalizes and erases on its device; [`normalize`] is the CPU reference.
//!
//! The [`loader`] runs that path for one rank: the split [`plan`] says which shards each reader
//! thread reads, `reader` threads read them, `merge` merges them through the shuffle buffer,
//! `assemble` transforms and batches; every batch carries a [`cursor`] from which [`resume`]
//! continues, on the same or another number of ranks.
//!
//! [`config`] holds the typed `[data]` section, [`rng`] the per-sample random streams that
//! make augmentation independent of thread and rank, [`guard`] the panic guard around each
//! sample, [`stats`] the counters the trainer logs, [`check`] the dataset report behind
//! `trainer data-check`, [`error`] what the loader reports.

mod assemble;
pub mod augment;
pub mod batch;
pub mod bench;
pub mod check;
pub mod config;
pub mod cursor;
pub mod decode;
pub mod decoded;
pub mod erase;
pub mod error;
pub mod guard;
pub mod host;
pub mod jpeg;
pub mod loader;
mod merge;
pub mod normalize;
pub mod plan;
mod reader;
pub mod resize;
pub mod resume;
pub mod rng;
pub mod sample;
pub mod section;
pub mod source;
pub mod stats;
pub mod synth;
pub mod tar;
pub mod tokenize;

pub use batch::Batch;
pub use config::DataConfig;
pub use cursor::StreamCursor;
pub use erase::EraseBox;
pub use error::DataError;
pub use host::{AllocError, HostAlloc, HostBuf, HostMemory, PooledBuf, VecAlloc};
pub use loader::{Loader, LoaderOptions, Mode};
pub use resume::ResumeFrom;
pub use stats::StatsSnapshot;
