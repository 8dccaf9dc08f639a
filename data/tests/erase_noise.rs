//! The counter-based erasing noise (`ferroclip_data::erase`) is a standard normal: mean 0,
//! variance 1, Kolmogorov–Smirnov against N(0, 1), and no correlation between neighbours or
//! between seeds.

use ferroclip_data::erase::noise;

/// Φ(x) through erfc (W. J. Cody's rational approximation as in Numerical Recipes' `erfcc`,
/// relative error < 1.2e-7 — far below the KS threshold used here).
fn normal_cdf(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -z * z - 1.265_512_23
        + t * (1.000_023_68
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_203_98 + t * (1.488_515_87 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    let erfc = t * poly.exp();
    if x >= 0.0 {
        1.0 - 0.5 * erfc
    } else {
        0.5 * erfc
    }
}

/// Noise of a 224×224 box's worth of elements for each of a few seeds (what erasing draws).
fn draws() -> Vec<f64> {
    let seeds = [0u64, 1, 0x9E37_79B9_7F4A_7C15, u64::MAX, 123_456_789_012_345];
    seeds.iter().flat_map(|&s| (0..3 * 224 * 224u32).map(move |i| noise(s, i) as f64)).collect()
}

#[test]
fn noise_has_mean_0_and_variance_1() {
    let v = draws();
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / n;
    // Standard errors: 1/sqrt(n) for the mean, sqrt(2/n) for the variance; 5 of them.
    assert!(m.abs() < 5.0 / n.sqrt(), "mean {m}");
    assert!((var - 1.0).abs() < 5.0 * (2.0 / n).sqrt(), "variance {var}");
    let kurt = v.iter().map(|x| (x - m).powi(4)).sum::<f64>() / n / (var * var);
    assert!((kurt - 3.0).abs() < 5.0 * (24.0 / n).sqrt(), "kurtosis {kurt}");
    assert!(v.iter().all(|x| x.abs() <= 6.67), "|z| is bounded by sqrt(-2 ln 2^-32)");
}

#[test]
fn noise_passes_kolmogorov_smirnov_against_the_standard_normal() {
    let mut v = draws();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len() as f64;
    let d = v
        .iter()
        .enumerate()
        .map(|(i, &x)| {
            let f = normal_cdf(x);
            (f - i as f64 / n).abs().max(((i + 1) as f64 / n - f).abs())
        })
        .fold(0.0f64, f64::max);
    // Critical value at α = 0.001: 1.95 / sqrt(n).
    assert!(d < 1.95 / n.sqrt(), "KS statistic {d} over {n} draws (critical {})", 1.95 / n.sqrt());
}

#[test]
fn neighbouring_elements_and_nearby_seeds_are_uncorrelated() {
    let n = 200_000u32;
    let corr = |a: &dyn Fn(u32) -> f64, b: &dyn Fn(u32) -> f64| {
        let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
        for i in 0..n {
            let (x, y) = (a(i), b(i));
            sab += x * y;
            saa += x * x;
            sbb += y * y;
        }
        sab / (saa * sbb).sqrt()
    };
    let limit = 5.0 / (n as f64).sqrt();
    let next = corr(&|i| noise(7, i) as f64, &|i| noise(7, i + 1) as f64);
    assert!(next.abs() < limit, "element i vs i+1: {next}");
    let seeds = corr(&|i| noise(7, i) as f64, &|i| noise(8, i) as f64);
    assert!(seeds.abs() < limit, "seed 7 vs 8: {seeds}");
    let halves = corr(&|i| noise(1 << 32, i) as f64, &|i| noise(1, i) as f64);
    assert!(halves.abs() < limit, "seed halves swapped: {halves}");
}

#[test]
fn noise_matches_an_independent_numpy_int64_implementation_of_the_spec() {
    // scripts/gen-erase-fixtures.py: the spec's operations on numpy int64 arrays, as torch does.
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/erase_noise.json");
    let cases: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut compared = 0;
    for case in &cases {
        let seed: u64 = case["seed"].as_str().unwrap().parse().unwrap();
        let index = case["index"].as_array().unwrap();
        for (k, i) in index.iter().enumerate() {
            let i = i.as_u64().unwrap() as u32;
            assert_eq!(
                ferroclip_data::erase::noise_bits(seed, i).0 as u64,
                case["bits"][k].as_u64().unwrap(),
                "bits, seed {seed} index {i}"
            );
            let want = case["value"][k].as_f64().unwrap() as f32;
            let got = noise(seed, i);
            // numpy's and Rust's libm may differ in the last f64 bit: at most 1 f32 ulp.
            assert!(got.to_bits().abs_diff(want.to_bits()) <= 1, "seed {seed} index {i}: {got} vs {want}");
            compared += 1;
        }
    }
    assert_eq!(compared, 5 * 68);
}
