//! ferroclip's trainer: everything between a batch and a checkpoint.
pub mod device;
pub mod dist;
pub mod eval;
pub mod log;
pub mod model;
pub mod loss;
pub mod optim;
pub mod step;
