//! Link-time fixes for a libtorch taken from the PyTorch wheel:
//! - an rpath to libtorch's `lib/`, so `target/*/trainer` runs without LD_LIBRARY_PATH;
//! - `libtorch_cuda.so` kept with `--no-as-needed`: nothing references its symbols directly,
//!   so the default `--as-needed` drops it and CUDA silently disappears at run time.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!("cargo:warning=torch-sys did not report libtorch's lib dir; no rpath set");
        return;
    };
    let lib = PathBuf::from(lib);
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}
