//! Compiles the libjpeg-turbo shim (csrc/jpeg.c) and links libjpeg-turbo **statically**
//! (Debian: libjpeg62-turbo-dev, Ubuntu: libjpeg-turbo8-dev; installed by scripts/install-system-deps).
//!
//! Static, because the library's soname differs between distributions (Debian's `libjpeg.so.62`,
//! Ubuntu's `libjpeg.so.8`, RHEL's `libjpeg.so.62` from another build): a trainer linked to one
//! does not start where only the other exists, and a GPU node has whichever its image ships. Both
//! distributions ship `libjpeg.a` compiled position-independent, with the same SIMD code as the
//! shared library, so the binary decodes bit for bit as before and needs no libjpeg on the node.
//! We take the distribution's archive rather than a crate that builds libjpeg-turbo from source:
//! that would add a CMake + NASM build to every clean build, and the archive is the very code the
//! decode tests were written against (Pillow's wheel bundles libjpeg-turbo too).
//!
//! `FERROCLIP_LIBJPEG_DIR` names the folder holding `libjpeg.a` where it is not in the system's
//! library folder (pkg-config's `libdir`, else `/usr/lib/<multiarch>`, `/usr/lib64`, `/usr/lib`).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=csrc/jpeg.c");
    println!("cargo:rerun-if-env-changed=FERROCLIP_LIBJPEG_DIR");
    let built = cc::Build::new().file("csrc/jpeg.c").opt_level(2).warnings(true).try_compile("ferroclip_jpeg");
    if let Err(e) = built {
        panic!(
            "compiling data/csrc/jpeg.c failed ({e}); it needs libjpeg-turbo's headers (jpeglib.h): \
             run scripts/install-system-deps (Debian libjpeg62-turbo-dev, Ubuntu libjpeg-turbo8-dev)"
        );
    }
    let Some(dir) = libjpeg_archive_dir() else {
        panic!(
            "no libjpeg.a found (pkg-config libjpeg's libdir, /usr/lib/<multiarch>, /usr/lib64, /usr/lib): \
             install libjpeg-turbo's development package (scripts/install-system-deps) or set \
             FERROCLIP_LIBJPEG_DIR to the folder holding libjpeg.a"
        );
    };
    println!("cargo:rustc-link-search=native={}", dir.display());
    println!("cargo:rustc-link-lib=static=jpeg");
}

/// The first folder holding `libjpeg.a`, in the order the module doc gives.
fn libjpeg_archive_dir() -> Option<PathBuf> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(dir) = std::env::var_os("FERROCLIP_LIBJPEG_DIR") {
        candidates.push(dir.into());
    }
    if let Ok(out) = Command::new("pkg-config").args(["--variable=libdir", "libjpeg"]).output() {
        let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && !dir.is_empty() {
            candidates.push(dir.into());
        }
    }
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    candidates.push(format!("/usr/lib/{arch}-linux-gnu").into());
    candidates.extend(["/usr/lib64", "/usr/lib"].map(PathBuf::from));
    candidates.into_iter().find(|d| Path::new(d).join("libjpeg.a").is_file())
}
