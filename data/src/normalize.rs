//! The end of the old train/eval transform, kept as the CPU reference of what the device does
//! with a batch: ToTensor + Normalize(OpenAI mean/std) + RandomErasing's fill.
//!
//! Batches carry uint8 CHW pixels and per-sample erase boxes ([`crate::erase`]); the trainer
//! normalizes and erases on the device. [`normalize_and_erase`] computes the same f32 tensor on
//! the CPU, so `TrainTransform` followed by it is exactly the f32 result torchvision + timm give
//! (`ToTensor` → `Normalize` → `RandomErasing(mode='pixel')`, with the noise of [`crate::erase`]).

use crate::augment::{OPENAI_MEAN, OPENAI_STD};
use crate::erase::EraseBox;

/// Per channel, `(v / 255 - mean) / std` for every `u8` value: the same f32 operations as torch
/// (`x.float().div(255)`, then `sub_(mean).div_(std)`).
fn lookup() -> [[f32; 256]; 3] {
    let mut lut = [[0f32; 256]; 3];
    for (c, table) in lut.iter_mut().enumerate() {
        for (v, slot) in table.iter_mut().enumerate() {
            *slot = (v as f32 / 255.0 - OPENAI_MEAN[c]) / OPENAI_STD[c];
        }
    }
    lut
}

/// `images`: `[n, 3, s, s]` uint8 with `n = erase.len()`; `out`: the same shape in f32,
/// normalized, each `Some` box filled with its noise.
pub fn normalize_and_erase(images: &[u8], erase: &[Option<EraseBox>], out: &mut [f32]) {
    let n = erase.len();
    assert_eq!(out.len(), images.len(), "output and input sizes differ");
    if n == 0 {
        assert!(images.is_empty(), "pixels for no images");
        return;
    }
    let plane = images.len() / (3 * n);
    let size = plane.isqrt();
    assert!(size * size * 3 * n == images.len(), "{} values are not {n} square 3-channel images", images.len());
    let lut = lookup();
    for ((img, dst), erase) in images.chunks_exact(3 * plane).zip(out.chunks_exact_mut(3 * plane)).zip(erase) {
        for (c, (src, dst)) in img.chunks_exact(plane).zip(dst.chunks_exact_mut(plane)).enumerate() {
            for (o, &v) in dst.iter_mut().zip(src) {
                *o = lut[c][v as usize];
            }
        }
        if let Some(b) = erase {
            b.fill(dst, size);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes_per_channel_and_erases_only_the_box() {
        // Two 2×2 images; the second erased at its bottom-right pixel.
        let images: Vec<u8> = (0..24).map(|v| (v * 10) as u8).collect();
        let b = EraseBox { top: 1, left: 1, height: 1, width: 1, noise_seed: 5 };
        let mut out = vec![0f32; 24];
        normalize_and_erase(&images, &[None, Some(b)], &mut out);
        for (i, &v) in images.iter().enumerate() {
            let c = (i / 4) % 3;
            let erased = i >= 12 && i % 4 == 3;
            let want = if erased {
                crate::erase::noise(5, ((i - 12) / 4) as u32)
            } else {
                (v as f32 / 255.0 - OPENAI_MEAN[c]) / OPENAI_STD[c]
            };
            assert_eq!(out[i], want, "value {i}");
        }
    }
}
