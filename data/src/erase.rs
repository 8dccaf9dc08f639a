//! Random erasing ('pixel' mode, timm `RandomErasing`): where a sample is erased, and the
//! counter-based noise that fills the box — defined here once, for the CPU and the device.
//!
//! The loader draws the box (timm's geometry, [`crate::augment::random_erasing_params`]) and
//! then a 64-bit `noise_seed` from the sample's random stream; the batch carries both
//! ([`EraseBox`]) and the pixels stay uint8. Normalization and the fill happen on the device
//! (or in [`crate::normalize::normalize_and_erase`], the CPU reference). So the noise must be a
//! function of `(noise_seed, position)` alone that tensor code can compute bit for bit.
//!
//! # The noise, exactly
//!
//! For a box of `height × width` (`h × w`) on a 3-channel image, the element at channel `c`,
//! row `y`, column `x` (inside the box) has the index, channel-major within the box,
//!
//! `i = c·h·w + (y − top)·w + (x − left)`  (`i < 2^31`).
//!
//! With `lo = seed & 0xffff_ffff` and `hi = seed >> 32` (logical shift; on the device the two
//! halves are computed on the host) and the 32-bit mixer
//!
//! ```text
//! mix32(x) = x ^= x >> 16;  x = (x * 0x21f0aaad) & 0xffffffff;
//!            x ^= x >> 15;  x = (x * 0x735a2d97) & 0xffffffff;
//!            x ^= x >> 15
//! ```
//!
//! (Wellons' hash-prospector low-bias 32-bit hash; both constants are below 2^31 and every input
//! below 2^32, so each product is below 2^63 and exact in int64 tensors), the two uniforms are
//!
//! `b1 = mix32(mix32((2i) ^ lo) ^ hi)`, `b2 = mix32(mix32((2i + 1) ^ lo) ^ hi)`,
//! `u1 = (b1 + 1) · 2^-32`, `u2 = (b2 + 1) · 2^-32`  (in `(0, 1]`, exact in f64),
//!
//! and the value is Box–Muller in **f64**, rounded once to f32:
//!
//! `z = (sqrt(−2 · ln(u1)) · cos(2π · u2)) as f32`  with `2π = 6.283185307179586`.
//!
//! Tolerance between implementations: the integer part is exact; `ln`, `sqrt`, `cos` of two
//! libms may differ in the last f64 bit, which changes the f32 result by at most 1 ulp (and
//! rarely). Pixels outside the boxes must be equal exactly. `|z| ≤ 6.67` (u1 ≥ 2^-32).

use serde::{Deserialize, Serialize};

/// One sample's erased rectangle and the seed of its noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EraseBox {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
    pub noise_seed: u64,
}

/// The 32-bit mixer of the spec (module docs).
#[inline]
pub fn mix32(x: u32) -> u32 {
    let mut x = x as u64;
    x ^= x >> 16;
    x = (x * 0x21f0_aaad) & 0xffff_ffff;
    x ^= x >> 15;
    x = (x * 0x735a_2d97) & 0xffff_ffff;
    x ^= x >> 15;
    x as u32
}

/// The two 32-bit hashes of element `index` under `seed` (module docs).
#[inline]
pub fn noise_bits(seed: u64, index: u32) -> (u32, u32) {
    let (lo, hi) = (seed as u32, (seed >> 32) as u32);
    let counter = 2 * index;
    (mix32(mix32(counter ^ lo) ^ hi), mix32(mix32((counter + 1) ^ lo) ^ hi))
}

/// The standard normal value of element `index` of a box erased with `seed` (module docs).
#[inline]
pub fn noise(seed: u64, index: u32) -> f32 {
    const SCALE: f64 = 1.0 / 4_294_967_296.0;
    let (b1, b2) = noise_bits(seed, index);
    let u1 = (b1 as f64 + 1.0) * SCALE;
    let u2 = (b2 as f64 + 1.0) * SCALE;
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

impl EraseBox {
    /// Fill the box in one normalized CHW image of side `size` with the noise.
    pub fn fill(&self, image: &mut [f32], size: usize) {
        let (h, w) = (self.height as usize, self.width as usize);
        assert!(
            self.top as usize + h <= size && self.left as usize + w <= size,
            "erase box {self:?} outside a {size}x{size} image"
        );
        for c in 0..3 {
            for dy in 0..h {
                let row = &mut image[c * size * size + (self.top as usize + dy) * size + self.left as usize..][..w];
                let base = (c * h * w + dy * w) as u32;
                for (dx, v) in row.iter_mut().enumerate() {
                    *v = noise(self.noise_seed, base + dx as u32);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mixer_matches_hand_computed_values() {
        // Worked by hand from the spec (python: see the module docs' formulas).
        assert_eq!(mix32(0), 0);
        let x: u64 = 1;
        let x = x ^ (x >> 16);
        let x = (x * 0x21f0aaad) & 0xffffffff;
        let x = x ^ (x >> 15);
        let x = (x * 0x735a2d97) & 0xffffffff;
        let x = x ^ (x >> 15);
        assert_eq!(mix32(1) as u64, x);
        // A bijection on a sample of inputs: no collisions among 1e5 consecutive values.
        let mut seen: Vec<u32> = (0..100_000u32).map(mix32).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 100_000);
    }

    #[test]
    fn fill_touches_only_the_box_and_depends_on_seed_and_position_only() {
        let b = EraseBox { top: 1, left: 2, height: 2, width: 3, noise_seed: 42 };
        let mut img = vec![7.0f32; 3 * 6 * 6];
        b.fill(&mut img, 6);
        let changed = img.iter().filter(|&&v| v != 7.0).count();
        assert_eq!(changed, 3 * 2 * 3);
        // Element (c=1, y'=1, x'=2) has index 1*6 + 1*3 + 2 = 11.
        assert_eq!(img[36 + 2 * 6 + 4], noise(42, 11));
        // The same box elsewhere in the image carries the same noise.
        let moved = EraseBox { top: 3, left: 0, ..b };
        let mut img2 = vec![0.0f32; 3 * 6 * 6];
        moved.fill(&mut img2, 6);
        assert_eq!(img2[36 + 4 * 6 + 2], noise(42, 11));
    }
}
