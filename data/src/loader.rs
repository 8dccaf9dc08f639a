//! The loader: shards → samples → transformed batches, on background threads, resumable.

use serde::{Deserialize, Serialize};

/// Where a rank's sample stream stands; part of the training state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamCursor {
    pub epoch: u64,
    /// Samples this rank has handed out in `epoch`.
    pub samples_in_epoch: u64,
}
