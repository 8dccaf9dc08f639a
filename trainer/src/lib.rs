//! ferroclip's trainer: everything between a batch and a checkpoint.
//!
//! [`config`] (the typed run config, whose sections build the model, optimizer, schedule,
//! tokenizer and device) → [`world`] (this rank, its device, the collectives to the others) →
//! [`model`] (OpenCLIP-compatible towers) → [`step`] (exact global InfoNCE step, [`loss`]) →
//! [`optim`] (AdamW on flat buffers, schedules) → [`checkpoint`] (the model file and the
//! [`train_state`]: counters, optimizer, data cursors, config; written by
//! [`checkpoint_writer`] in the background) → [`log`] / [`eval`]; [`run_lock`] keeps a second run out
//! of the run folder.
//! [`train`] is the one loop that strings them together; [`commands`] the other subcommands;
//! [`numerics`] checks the GPU path's numerics against their references.
//! On the GPU: [`input`] (uint8 batches to normalized device tensors), [`skips`] (non-finite steps
//! skipped and counted on the device), [`cuda`] (the CUDA pieces tch does not bind).
pub mod checkpoint;
pub mod checkpoint_writer;
pub mod commands;
pub mod config;
pub mod cuda;
pub mod device;
pub mod dist;
pub mod eval;
pub mod import_openclip;
pub mod input;
pub mod lock;
pub mod log;
pub mod loss;
pub mod model;
pub mod numerics;
pub mod optim;
pub mod precision;
pub mod run_lock;
pub mod skips;
pub mod soup;
pub mod step;
pub mod train;
pub mod train_state;
pub mod world;

// The C++ shim's static libraries are linked only into crates that name it; its functions are declared in
// the modules that wrap them.
use torch_shim as _;
