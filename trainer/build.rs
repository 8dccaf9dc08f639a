//! Link-time fixes for a libtorch taken from the PyTorch wheel (the C++ shim is the `torch-shim` crate,
//! `csrc/`, compiled once for every feature set of this crate):
//! - an rpath to libtorch's `lib/`, so `target/*/trainer` runs without LD_LIBRARY_PATH;
//! - `libtorch_cuda.so` kept with `--no-as-needed`: nothing references its symbols directly,
//!   so the default `--as-needed` drops it and CUDA silently disappears at run time.
//!
//! Link arguments apply only to the targets of the package that prints them, so they stay here.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports libtorch's lib dir (DEP_TCH_LIBTORCH_LIB)"),
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-lc10_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
