//! Decode + augreg throughput on LAION-like JPEGs (the numbers `bench-data` reports).
//!
//! `cargo run -p data --release --example bench_data -- [--threads 1,2] [--size 256]
//!  [--images 200] [--seconds 10] [--write-dir DIR]`
//! `--write-dir` also saves the JPEGs, so `scripts/bench-openclip-data.py --dir DIR` times
//! OpenCLIP's pipeline on the very same files.

use ferroclip_data::augment::{AugmentConfig, TrainTransform};
use ferroclip_data::bench::{bench_transform, laion_like_jpegs};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let threads: Vec<usize> = get("--threads").unwrap_or("1,2".into()).split(',').map(|t| t.parse()).collect::<Result<_, _>>()?;
    let size: usize = get("--size").unwrap_or("256".into()).parse()?;
    let n: usize = get("--images").unwrap_or("200".into()).parse()?;
    let seconds: f64 = get("--seconds").unwrap_or("10".into()).parse()?;
    let samples = laion_like_jpegs(n, 0);
    if let Some(dir) = get("--write-dir") {
        std::fs::create_dir_all(&dir)?;
        for (i, (bytes, ext)) in samples.iter().enumerate() {
            std::fs::write(std::path::Path::new(&dir).join(format!("{i:05}.{ext}")), bytes)?;
        }
    }
    let mean_kb = samples.iter().map(|s| s.0.len()).sum::<usize>() as f64 / n as f64 / 1024.0;
    println!("{n} LAION-like JPEGs, mean {mean_kb:.1} KiB; augreg TrainTransform at {size}px");
    let t = TrainTransform::new(size, &AugmentConfig::default(), 89_478_485);
    for th in threads {
        println!("{}", bench_transform(&samples, &t, th, seconds));
    }
    Ok(())
}
