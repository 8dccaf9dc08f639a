//! Optimization: AdamW over flat parameter buffers and the learning-rate schedules.

pub mod adamw;
pub mod schedule;

pub use adamw::{weight_decay_applies, AdamW, AdamWConfig, OptimError};
pub use schedule::Schedule;
