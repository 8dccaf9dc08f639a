//! Compiles the libjpeg-turbo shim (csrc/jpeg.c) and links the system libjpeg-turbo
//! (Debian: libjpeg62-turbo-dev, Ubuntu: libjpeg-turbo8-dev; installed by scripts/install-system-deps).

fn main() {
    println!("cargo:rerun-if-changed=csrc/jpeg.c");
    let built = cc::Build::new().file("csrc/jpeg.c").opt_level(2).warnings(true).try_compile("ferroclip_jpeg");
    if let Err(e) = built {
        panic!(
            "compiling data/csrc/jpeg.c failed ({e}); it needs libjpeg-turbo's headers (jpeglib.h): \
             run scripts/install-system-deps (Debian libjpeg62-turbo-dev, Ubuntu libjpeg-turbo8-dev)"
        );
    }
    println!("cargo:rustc-link-lib=jpeg");
}
