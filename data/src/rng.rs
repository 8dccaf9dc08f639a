//! Per-sample random streams: the augmentation of a sample depends only on
//! (seed, epoch, sample identity), never on which thread or rank handles it, nor on a resume.
//! A sample's identity includes which reading of its shard it came from (the pass, or in
//! resampled mode the draw), so every occurrence of a sample gets its own augmentation.
//! The loader's other random choices (shard draws, shuffle-buffer picks) are streams keyed
//! on their position in the same way ([`SampleRng::keyed`]), so a cursor stores positions,
//! never generator states.

use rand::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// A random stream owned by one sample in one epoch.
#[derive(Debug, Clone)]
pub struct SampleRng(Xoshiro256PlusPlus);

/// SplitMix64 finalizer: spreads nearby inputs (epoch 3 vs 4) over unrelated seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// FNV-1a over the id bytes; stable across platforms and releases (unlike `DefaultHasher`).
fn hash_id(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ b as u64).wrapping_mul(0x0100_0000_01b3))
}

impl SampleRng {
    /// The stream of sample `sample_id` (e.g. `"{shard}/{key}"`) in `epoch` of a run seeded `seed`.
    pub fn for_sample(seed: u64, epoch: u64, sample_id: &str) -> Self {
        let s = mix(mix(mix(seed) ^ epoch) ^ hash_id(sample_id));
        Self(Xoshiro256PlusPlus::seed_from_u64(s))
    }

    /// The stream at a position named by numbers (e.g. `[epoch, rank, pick]`) of a run seeded `seed`.
    pub fn keyed(seed: u64, parts: &[u64]) -> Self {
        let s = parts.iter().fold(mix(seed), |h, &p| mix(h ^ p));
        Self(Xoshiro256PlusPlus::seed_from_u64(s))
    }

    /// A stream from a plain seed (tests, benchmarks).
    pub fn from_seed(seed: u64) -> Self {
        Self(Xoshiro256PlusPlus::seed_from_u64(mix(seed)))
    }
}

impl RngCore for SampleRng {
    fn next_u32(&mut self) -> u32 {
        self.0.next_u32()
    }
    fn next_u64(&mut self) -> u64 {
        self.0.next_u64()
    }
    fn fill_bytes(&mut self, dest: &mut [u8]) {
        self.0.fill_bytes(dest)
    }
    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.0.try_fill_bytes(dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn same_identity_same_stream_other_identity_other_stream() {
        let a: Vec<u64> = (0..4)
            .map({
                let mut r = SampleRng::for_sample(7, 1, "s/000");
                move |_| r.gen()
            })
            .collect();
        let b: Vec<u64> = (0..4)
            .map({
                let mut r = SampleRng::for_sample(7, 1, "s/000");
                move |_| r.gen()
            })
            .collect();
        let c: Vec<u64> = (0..4)
            .map({
                let mut r = SampleRng::for_sample(7, 2, "s/000");
                move |_| r.gen()
            })
            .collect();
        let d: Vec<u64> = (0..4)
            .map({
                let mut r = SampleRng::for_sample(7, 1, "s/001");
                move |_| r.gen()
            })
            .collect();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_ne!(a, d);
    }
}
