//! Link-time fixes for a libtorch taken from the PyTorch wheel:
//! - an rpath to libtorch's `lib/`, so `target/*/trainer` runs without LD_LIBRARY_PATH;
//! - `libtorch_cuda.so` kept with `--no-as-needed`: nothing references its symbols directly,
//!   so the default `--as-needed` drops it and CUDA silently disappears at run time;
//! - `csrc/autocast.cpp`, the few lines of C++ that select bf16 for CUDA autocast.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-changed=csrc/autocast.cpp");
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports libtorch's lib dir (DEP_TCH_LIBTORCH_LIB)"),
    );
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-L{}", lib.display());
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
    let include = lib.parent().expect("lib dir has a parent").join("include");
    cc::Build::new()
        .cpp(true)
        .file("csrc/autocast.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-w")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .compile("ferroclip_autocast");
}
