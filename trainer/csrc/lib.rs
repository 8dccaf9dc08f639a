//! The C++ shim over libtorch: the few functions tch 0.24 does not bind, compiled and linked by
//! `build.rs` (which lists the files and what each one holds). No Rust items: each function is declared
//! in the trainer module that wraps it (`dist/c10d.rs`, `cuda.rs`, `precision.rs`, `optim/adamw.rs`,
//! `model/grad_checkpointing.rs`, `model/torch_file.rs`), so its safe handle and its `extern "C"` signature stay side by side.
//! The trainer refers to this crate once (`use torch_shim as _`) so that its static libraries are linked.
