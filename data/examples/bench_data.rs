//! Decode + augreg throughput on LAION-like JPEGs (the numbers `bench-data` reports).
//!
//! `cargo run -p data --release --example bench_data -- [--threads 1,2] [--size 256]
//!  [--images 200] [--seconds 10] [--write-dir DIR]`
//! `--write-dir` also saves the JPEGs, so `scripts/bench-openclip-data.py --dir DIR` times
//! OpenCLIP's pipeline on the very same files.

use ferroclip_data::augment::{AugmentConfig, TrainTransform};
use ferroclip_data::bench::{bench_transform, laion_like_jpegs, thread_cpu_ns};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let threads: Vec<usize> =
        get("--threads").unwrap_or("1,2".into()).split(',').map(|t| t.parse()).collect::<Result<_, _>>()?;
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
    if args.iter().any(|a| a == "--breakdown") {
        // Single-thread CPU time (not wall time: robust on a shared machine) of a full decode
        // alone and of the whole transform.
        let t0 = thread_cpu_ns();
        for (b, e) in &samples {
            std::hint::black_box(ferroclip_data::decode::decode_rgb(b, e, u64::MAX)?);
        }
        let t1 = thread_cpu_ns();
        let mut out = vec![0u8; 3 * size * size];
        for (i, (b, e)) in samples.iter().enumerate() {
            use ferroclip_data::augment::ImageTransform;
            t.apply(b, e, &mut ferroclip_data::rng::SampleRng::from_seed(i as u64), &mut out)?;
        }
        let t2 = thread_cpu_ns();
        let ms = |d: u64| d as f64 / 1e6 / n as f64;
        // Whole-image decode at each DCT scale m/8 (libjpeg-turbo has SIMD IDCTs for 8/8, 4/8,
        // 2/8 and 1/8 only).
        let mut line = String::from("cpu ms/image, whole-image decode at scale m/8:");
        for m in 1..=8 {
            let t = thread_cpu_ns();
            for (b, e) in &samples {
                let whole = (0, 0, u32::MAX, u32::MAX);
                std::hint::black_box(ferroclip_data::decode::decode_rgb_region(b, e, u64::MAX, m, whole)?);
            }
            line += &format!(" {m}:{:.2}", ms(thread_cpu_ns() - t));
        }
        println!("{line}");
        println!(
            "cpu ms/image: decode {:.2}, full transform {:.2} (= {:.0} images/s per busy core)",
            ms(t1 - t0),
            ms(t2 - t1),
            1e3 / ms(t2 - t1)
        );
    }
    for th in threads {
        println!("{}", bench_transform(&samples, &t, th, seconds));
    }
    Ok(())
}
