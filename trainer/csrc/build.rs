//! Compiles the C++ shim: the few functions tch 0.24 does not bind, one file per concept — `autocast.cpp`
//! (bf16 autocast on CUDA), `store.cpp` and `process_group.cpp` (c10d's TCPStore and ProcessGroupGloo,
//! the library torch.distributed runs on), `nccl_group.cpp` (ProcessGroupNCCL), `grad_buckets.cpp`
//! (gradient all-reduce overlapped with backward), `fused_adamw.cpp` (torch's fused AdamW kernel),
//! `backend_flags.cpp` (TF32, cuDNN benchmark), `copy_stream.cpp` (pinned memory, host-to-device copies
//! on a side stream with events), `allocator_stats.cpp` (the caching allocator's peak memory), and
//! `sync_debug.cpp` (CUDA's sync debug mode; compiled with the CUDA headers, a no-op without CUDA),
//! `activation_checkpoint.cpp` (a block recomputed in backward, `train.grad_checkpointing`),
//! `torch_save.cpp` (torch.save files read by libtorch's own reader: OpenCLIP's checkpoints).
//! The trainer's own `build.rs` adds the link-time fixes for a libtorch taken from the PyTorch wheel.
//!
//! What the wheel lacks for the shim: gloo's headers (Debian's `libgloo-dev`, headers only: gloo itself
//! is inside libtorch_cpu; elsewhere `$FERROCLIP_GLOO_INCLUDE`, the folder holding `gloo/`) and, for
//! ProcessGroupNCCL, CUDA 13.0's `crt/` and CCCL headers (header-only wheels that `scripts/setup`
//! installs into `.deps/cuda-headers`, or `$FERROCLIP_CUDA_HEADERS`).
//! The NCCL file is compiled whenever libtorch has CUDA, so every such build has the NCCL path.

use std::path::PathBuf;

/// The shim files compiled without CUDA headers.
const HOST_FILES: [&str; 10] = [
    "autocast.cpp",
    "store.cpp",
    "process_group.cpp",
    "grad_buckets.cpp",
    "fused_adamw.cpp",
    "backend_flags.cpp",
    "copy_stream.cpp",
    "allocator_stats.cpp",
    "activation_checkpoint.cpp",
    "torch_save.cpp",
];

/// The shim files that need the CUDA headers when libtorch has CUDA (and build as no-ops without).
const CUDA_FILES: [&str; 2] = ["nccl_group.cpp", "sync_debug.cpp"];

fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    println!("cargo:rerun-if-env-changed=FERROCLIP_CUDA_HEADERS");
    println!("cargo:rerun-if-env-changed=FERROCLIP_GLOO_INCLUDE");
    for f in HOST_FILES.iter().chain(&CUDA_FILES).chain(&["shim.h"]) {
        println!("cargo:rerun-if-changed={f}");
    }
    let lib = PathBuf::from(
        std::env::var("DEP_TCH_LIBTORCH_LIB").expect("torch-sys reports libtorch's lib dir (DEP_TCH_LIBTORCH_LIB)"),
    );
    let cuda = lib.join("libtorch_cuda.so").exists();
    let include = lib.parent().expect("lib dir has a parent").join("include");
    // Only a non-system folder goes on the include path: `-I /usr/include` would break libstdc++'s
    // `#include_next`.
    let gloo = std::env::var_os("FERROCLIP_GLOO_INCLUDE").map(PathBuf::from);
    let gloo_dir = gloo.clone().unwrap_or_else(|| "/usr/include".into());
    if !gloo_dir.join("gloo/algorithm.h").exists() {
        panic!(
            "gloo's headers are missing ({}/gloo): run scripts/install-system-deps (Debian's libgloo-dev), \
             or set FERROCLIP_GLOO_INCLUDE to the folder that holds gloo/ (README, \"GPU nodes older than the build machine\")",
            gloo_dir.display()
        );
    }

    let base = || {
        let mut b = cc::Build::new();
        b.cpp(true)
            .include(&include)
            .include(include.join("torch/csrc/api/include"))
            .flag("-std=c++17")
            .flag("-w")
            // No debug info: for these thin wrappers it is mostly torch's headers, and it doubles the
            // compile time of a dev build.
            .debug(false)
            .define("_GLIBCXX_USE_CXX11_ABI", "1");
        if let Some(dir) = &gloo {
            b.include(dir);
        }
        b
    };
    let mut host = base();
    host.define("USE_C10D_GLOO", None);
    for f in HOST_FILES {
        host.file(f);
    }
    host.compile("ferroclip_shim");

    let mut nccl = base();
    for f in CUDA_FILES {
        nccl.file(f);
    }
    if cuda {
        let nvidia = lib.join("../../nvidia");
        let headers = std::env::var_os("FERROCLIP_CUDA_HEADERS").map(PathBuf::from).unwrap_or_else(|| {
            PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../.deps/cuda-headers")
        });
        let crt = headers.join("nvidia/cu13/include");
        if !crt.join("crt/host_config.h").exists() || !crt.join("nv/target").exists() {
            panic!(
                "libtorch has CUDA but the CUDA headers for ProcessGroupNCCL are missing in {}: run scripts/setup \
                 (it installs the header-only wheels of scripts/requirements-cuda-headers.txt), or set FERROCLIP_CUDA_HEADERS",
                headers.display()
            );
        }
        nccl.define("USE_C10D_NCCL", None)
            .define("USE_CUDA", None)
            .include(nvidia.join("nccl/include"))
            .include(nvidia.join("cu13/include"))
            .include(&crt);
    } else {
        println!("cargo:warning=libtorch has no CUDA (libtorch_cuda.so missing): building without ProcessGroupNCCL");
    }
    nccl.compile("ferroclip_nccl");
}
