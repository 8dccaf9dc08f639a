//! `[checkpoint]` and `[log]`: what a run writes while it trains.

use ferroclip_data::section::Range;
ferroclip_data::config_section! {
    /// `[checkpoint]`
    pub struct CheckpointConfig {
        /// Save every N optimizer steps, and always at the end; 0 saves only at the end.
        pub every_steps: u64 = 1000,
        /// Keep the newest N checkpoints, and always the newest one that verifies; 0 keeps all.
        pub keep: usize = 3,
        /// `""` (fresh start), `"latest"` (the newest checkpoint of this run that verifies, as rank 0
        /// sees it, skipping newer ones that do not with a warning; a fresh start if there is none,
        /// exit status 2 if none verifies), or the path of a checkpoint (one that does not verify:
        /// exit status 2).
        pub resume: String = "",
        /// Resume even if what determines the data stream changed (shards, weights, readers, shuffle
        /// buffer, seed, resampled): the stream then continues as well as it can instead of exactly.
        pub allow_data_change: bool = false,
        /// Resume even if a key that decides the training itself changed (the model, optimizer,
        /// schedule, batch, precision, augmentation…; the error lists them): training goes on from
        /// the saved state under the new values, no longer as the uninterrupted run would have.
        pub allow_config_change: bool = false,
    }
}

ferroclip_data::config_section! {
    /// `[log]`
    pub struct LogConfig {
        /// TensorBoard scalars, a `metrics.jsonl` line and a plain log line every N optimizer steps
        /// (rank 0 only).
        pub every_steps: u64 = 10 => Range::at_least(1.0),
        /// Every rank writes the keys of the samples it trains on to `sample_keys/rank{R}.tsv`
        /// (`step<TAB>epoch<TAB>key` per sample), to check afterwards what a run saw.
        pub sample_keys: bool = false,
    }
}
