//! Train (augreg) and eval image transforms, writing uint8 CHW pixels (what PIL/torchvision
//! hold before `ToTensor`) and, for training, the sample's erase box; normalization and the
//! erasing fill follow on the device ([`crate::normalize`] is their CPU reference).
//!
//! Follows timm's `create_transform(is_training=True, scale=(0.33, 1.0), re_prob=0.35,
//! re_mode='pixel', hflip=0, interpolation='bicubic')` + OpenAI CLIP normalization for training
//! (OpenCLIP `image_transform(.., is_train=True, aug_cfg=AugmentationCfg(use_timm=True, ..))`),
//! and OpenCLIP's eval transform (shortest-side bicubic resize, center crop).
//!
//! Samplers follow the references line by line: torchvision
//! `transforms.RandomResizedCrop.get_params`, timm `data/random_erasing.py`
//! (`RandomErasing._erase`), torchvision `CenterCrop`/`Resize` geometry. Python's `round` is
//! round-half-to-even, hence `round_ties_even` throughout.

use crate::section::Range;
use rand::{Rng, RngCore};

use crate::decode::{decode_rgb, decode_rgb_region, probe_size, recycle, DecodeError, RgbImage};
use crate::erase::EraseBox;
use crate::resize::{resize_bicubic_into, ResizeBox};
use crate::rng::SampleRng;

// The literals are OpenCLIP's `constants.py`, digit for digit (more than f32 holds).
/// OpenAI CLIP's per-channel mean (OpenCLIP `OPENAI_DATASET_MEAN`).
#[allow(clippy::excessive_precision)]
pub const OPENAI_MEAN: [f32; 3] = [0.48145466, 0.4578275, 0.40821073];
/// OpenAI CLIP's per-channel std (OpenCLIP `OPENAI_DATASET_STD`).
#[allow(clippy::excessive_precision)]
pub const OPENAI_STD: [f32; 3] = [0.26862954, 0.26130258, 0.27577711];

crate::config_section! {
    /// `[data.augment]`: the train-time augmentation recipe (defaults: augreg).
    pub struct AugmentConfig {
        /// RandomResizedCrop area fraction range (augreg: 0.33–1).
        pub scale: [f64; 2] = [0.33, 1.0] => Range::positive_to(1.0),
        /// RandomResizedCrop aspect ratio range.
        pub ratio: [f64; 2] = [3.0 / 4.0, 4.0 / 3.0] => Range::positive(),
        /// Random erasing probability, 'pixel' mode (augreg: 0.35).
        pub re_prob: f64 = 0.35 => Range::closed(0.0, 1.0),
        /// Color jitter strength (brightness, contrast, saturation); 0 disables.
        pub color_jitter: f64 = 0.0 => Range::at_least(0.0),
        /// Probability of converting to grayscale; 0 disables.
        pub grayscale_prob: f64 = 0.0 => Range::closed(0.0, 1.0),
    }
}

/// An invalid `[data.augment]` value.
#[derive(Debug)]
pub struct AugmentConfigError {
    pub key: String,
    pub message: String,
}

impl AugmentConfig {
    pub fn validate(&self) -> Result<(), AugmentConfigError> {
        let err = |key: &str, message: &str| Err(AugmentConfigError { key: key.into(), message: message.into() });
        use crate::section::Section;
        self.check_ranges().map_err(|e| AugmentConfigError { key: e.key.into(), message: e.message })?;
        if self.scale[0] > self.scale[1] {
            return err("scale", "must satisfy min <= max");
        }
        if self.ratio[0] > self.ratio[1] {
            return err("ratio", "must satisfy min <= max");
        }
        Ok(())
    }
}

/// Turns one encoded image into `3 × size × size` uint8 pixels (CHW) and, where the sample is
/// to be erased, its [`EraseBox`].
pub trait ImageTransform: Send + Sync {
    /// Side length of the square output.
    fn output_size(&self) -> usize;
    /// Decode `encoded` (member extension `ext`, lower-case) and write the CHW result into
    /// `out` (length `3 * size * size`). All randomness comes from `rng`.
    fn apply(
        &self,
        encoded: &[u8],
        ext: &str,
        rng: &mut SampleRng,
        out: &mut [u8],
    ) -> Result<Option<EraseBox>, DecodeError>;
}

/// A crop rectangle in pixels (torchvision's `i, j, h, w` = `top, left, height, width`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CropRect {
    pub top: u32,
    pub left: u32,
    pub height: u32,
    pub width: u32,
}

/// Python's `int(round(x))`: round half to even.
fn py_round(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// `random.uniform(a, b)` / `torch.empty(1).uniform_(a, b)`.
fn uniform(rng: &mut SampleRng, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.gen::<f64>()
}

/// torchvision `RandomResizedCrop.get_params(img, scale, ratio)` for a `width × height` image.
pub fn random_resized_crop_params(
    width: u32,
    height: u32,
    scale: [f64; 2],
    ratio: [f64; 2],
    rng: &mut SampleRng,
) -> CropRect {
    let area = width as f64 * height as f64;
    let (log_r0, log_r1) = (ratio[0].ln(), ratio[1].ln());
    for _ in 0..10 {
        let target_area = area * uniform(rng, scale[0], scale[1]);
        let aspect = uniform(rng, log_r0, log_r1).exp();
        let w = py_round((target_area * aspect).sqrt());
        let h = py_round((target_area / aspect).sqrt());
        if 0 < w && w <= width as i64 && 0 < h && h <= height as i64 {
            let top = rng.gen_range(0..=(height as i64 - h)) as u32;
            let left = rng.gen_range(0..=(width as i64 - w)) as u32;
            return CropRect { top, left, height: h as u32, width: w as u32 };
        }
    }
    // Fallback: central crop with the ratio clamped into range.
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio[0].min(ratio[1]) {
        (width as i64, py_round(width as f64 / ratio[0].min(ratio[1])))
    } else if in_ratio > ratio[0].max(ratio[1]) {
        (py_round(height as f64 * ratio[0].max(ratio[1])), height as i64)
    } else {
        (width as i64, height as i64)
    };
    let (w, h) = (w.clamp(1, width as i64), h.clamp(1, height as i64));
    CropRect {
        top: ((height as i64 - h) / 2) as u32,
        left: ((width as i64 - w) / 2) as u32,
        height: h as u32,
        width: w as u32,
    }
}

/// timm `RandomErasing._erase` geometry (`min_area=0.02, max_area=1/3, min_aspect=0.3`,
/// `max_count=1`) on a `height × width` image: `None` when the draw skips erasing
/// (probability `1 - probability`) or all 10 attempts miss. The caller fills the rectangle.
pub fn random_erasing_params(height: u32, width: u32, probability: f64, rng: &mut SampleRng) -> Option<CropRect> {
    const MIN_AREA: f64 = 0.02;
    const MAX_AREA: f64 = 1.0 / 3.0;
    const MIN_ASPECT: f64 = 0.3;
    if rng.gen::<f64>() > probability {
        return None;
    }
    let area = height as f64 * width as f64;
    let (la0, la1) = (MIN_ASPECT.ln(), (1.0 / MIN_ASPECT).ln());
    for _ in 0..10 {
        let target_area = uniform(rng, MIN_AREA, MAX_AREA) * area;
        let aspect = uniform(rng, la0, la1).exp();
        let h = py_round((target_area * aspect).sqrt());
        let w = py_round((target_area / aspect).sqrt());
        if w < width as i64 && h < height as i64 {
            let top = rng.gen_range(0..=(height as i64 - h)) as u32;
            let left = rng.gen_range(0..=(width as i64 - w)) as u32;
            return Some(CropRect { top, left, height: h as u32, width: w as u32 });
        }
    }
    None
}

/// torchvision `Resize(size)` with an int size: the shorter side becomes `size`, the longer
/// `int(size * long / short)` (truncated). Returns `(width, height)`.
pub fn shorter_side_resize_size(width: u32, height: u32, size: u32) -> (u32, u32) {
    if width <= height {
        (size, ((size as u64 * height as u64) / width as u64) as u32)
    } else {
        (((size as u64 * width as u64) / height as u64) as u32, size)
    }
}

/// torchvision `CenterCrop(size)` on a `width × height` image no smaller than `size`:
/// `top = int(round((h - size) / 2))`, same for `left`.
pub fn center_crop_rect(width: u32, height: u32, size: u32) -> CropRect {
    let top = py_round((height as f64 - size as f64) / 2.0).max(0) as u32;
    let left = py_round((width as f64 - size as f64) / 2.0).max(0) as u32;
    CropRect { top, left, height: size.min(height), width: size.min(width) }
}

/// Packed RGB (HWC) → planar CHW, as `ToTensor` lays the pixels out.
pub fn hwc_to_chw(rgb: &[u8], out: &mut [u8]) {
    let n = rgb.len() / 3;
    assert_eq!(out.len(), n * 3, "output is not 3 × the pixel count");
    let (r, rest) = out.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    let mut done = 0;
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("ssse3") {
        // SAFETY: the CPU supports SSSE3 (checked just above).
        done = unsafe { hwc_to_chw_ssse3(rgb, r, g, b) };
    }
    for (i, p) in rgb.chunks_exact(3).enumerate().skip(done) {
        r[i] = p[0];
        g[i] = p[1];
        b[i] = p[2];
    }
}

/// [`hwc_to_chw`] 16 pixels at a time: each plane's 16 bytes gathered from the three 16-byte
/// loads by three byte shuffles (a byte-at-a-time loop costs as much as a sixth of the resize).
/// Returns how many pixels it converted.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "ssse3")]
#[allow(clippy::needless_range_loop)] // `i` is a pixel index that picks both the mask row and byte
unsafe fn hwc_to_chw_ssse3(rgb: &[u8], r: &mut [u8], g: &mut [u8], b: &mut [u8]) -> usize {
    use std::arch::x86_64::*;
    // mask[plane][load][i]: the byte of load `load` that is pixel i's channel `plane`, or -128 (zero).
    let mut mask = [[[-128i8; 16]; 3]; 3];
    for (plane, m) in mask.iter_mut().enumerate() {
        for i in 0..16 {
            let byte = 3 * i + plane;
            m[byte / 16][i] = (byte % 16) as i8;
        }
    }
    let m = mask.map(|p| p.map(|l| _mm_loadu_si128(l.as_ptr() as *const __m128i)));
    let blocks = rgb.len() / 48;
    for k in 0..blocks {
        let src = rgb.as_ptr().add(k * 48);
        let v = [0, 16, 32].map(|o| _mm_loadu_si128(src.add(o) as *const __m128i));
        for (plane, dst) in [&mut *r, &mut *g, &mut *b].into_iter().enumerate() {
            let x = _mm_or_si128(
                _mm_or_si128(_mm_shuffle_epi8(v[0], m[plane][0]), _mm_shuffle_epi8(v[1], m[plane][1])),
                _mm_shuffle_epi8(v[2], m[plane][2]),
            );
            // In bounds: 16(k + 1) <= blocks * 16 <= n, each plane's length.
            _mm_storeu_si128(dst.as_mut_ptr().add(k * 16) as *mut __m128i, x);
        }
    }
    blocks * 16
}

thread_local! {
    /// The resized HWC image before it is laid out as CHW (one per worker thread, reused).
    static RESIZED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// PIL's `convert('L')`: ITU-R 601-2 luma in 16-bit fixed point.
fn luma(p: &[u8]) -> u8 {
    ((p[0] as u32 * 19595 + p[1] as u32 * 38470 + p[2] as u32 * 7471 + 0x8000) >> 16) as u8
}

/// PIL `Image.blend(degenerate, img, factor)`: `d + f·(x - d)`, clipped, truncated.
fn blend(x: u8, d: u8, f: f32) -> u8 {
    let v = d as f32 + f * (x as f32 - d as f32);
    if v <= 0.0 {
        0
    } else if v >= 255.0 {
        255
    } else {
        v as u8
    }
}

/// torchvision `ColorJitter(brightness=s, contrast=s, saturation=s)` on a PIL image: the three
/// enhancements in a random order, each factor uniform in `[max(0, 1-s), 1+s]`.
fn color_jitter(rgb: &mut [u8], strength: f64, rng: &mut SampleRng) {
    let mut order = [0usize, 1, 2];
    // torch.randperm(3) equivalent (Fisher–Yates).
    for i in (1..3).rev() {
        let j = rng.gen_range(0..=i);
        order.swap(i, j);
    }
    let lo = (1.0 - strength).max(0.0);
    let factors = [(); 3].map(|_| uniform(rng, lo, 1.0 + strength) as f32);
    apply_color_jitter(rgb, order, factors);
}

/// torchvision `ColorJitter.forward` on a PIL image with its draws given: `order` is `fn_idx` (0
/// brightness, 1 contrast, 2 saturation), `factors` the three factors in that (0, 1, 2) numbering;
/// each enhancement is PIL's `ImageEnhance` (`Image.blend` against a degenerate image).
pub fn apply_color_jitter(rgb: &mut [u8], order: [usize; 3], factors: [f32; 3]) {
    for op in order {
        let f = factors[op];
        match op {
            0 => rgb.iter_mut().for_each(|v| *v = blend(*v, 0, f)),
            1 => {
                // ImageEnhance.Contrast: degenerate = mean of L, rounded.
                let n = (rgb.len() / 3).max(1) as f64;
                let mean = (rgb.chunks_exact(3).map(|p| luma(p) as f64).sum::<f64>() / n + 0.5) as u8;
                rgb.iter_mut().for_each(|v| *v = blend(*v, mean, f));
            }
            _ => rgb.chunks_exact_mut(3).for_each(|p| {
                let l = luma(p);
                p.iter_mut().for_each(|v| *v = blend(*v, l, f));
            }),
        }
    }
}

/// The JPEG DCT scale `m/8` to decode a crop at: the smallest `m` in {1, 2, 4, 8} that keeps the
/// scaled crop at least `size` on each side, so the resize still only shrinks (or keeps) it.
///
/// Only powers of two: libjpeg-turbo has SIMD IDCTs for 1/8, 2/8, 4/8 and 8/8 only, and its plain-C
/// scaled IDCTs for the others are slower than a full decode (measured with
/// `cargo run -p data --release --example bench_data -- --breakdown`, whole-image decode of
/// LAION-like JPEGs, CPU ms/image: 3/8 1.29, 4/8 1.26, 5/8 1.82, 6/8 2.16, 7/8 2.66, 8/8 1.44).
pub fn dct_scale(crop: &CropRect, size: u32) -> u32 {
    let need = |side: u32| (8 * size as u64).div_ceil(side.max(1) as u64);
    (need(crop.width).max(need(crop.height)).clamp(1, 8) as u32).next_power_of_two()
}

/// `crop` in the image scaled by `m/8`: the (fractional) window, and the integer rectangle of
/// the pixels covering it (at full size, exactly the crop, as PIL's `crop` keeps).
fn scaled_window(crop: &CropRect, m: u32) -> ([f64; 4], (u32, u32, u32, u32)) {
    let s = m as f64 / 8.0;
    let x0 = crop.left as f64 * s;
    let y0 = crop.top as f64 * s;
    let x1 = (crop.left + crop.width) as f64 * s;
    let y1 = (crop.top + crop.height) as f64 * s;
    let (l, t) = (x0.floor() as u32, y0.floor() as u32);
    let (r, b) = (x1.ceil() as u32, y1.ceil() as u32);
    ([x0, y0, x1, y1], (l, t, r - l, b - t))
}

/// augreg train transform: RandomResizedCrop(bicubic) → [color jitter] → [grayscale] → uint8
/// CHW, plus the RandomErasing('pixel') box and noise seed drawn right after (applied after
/// ToTensor + Normalize(OpenAI), on the device or by [`crate::normalize::normalize_and_erase`]).
#[derive(Debug, Clone)]
pub struct TrainTransform {
    size: usize,
    cfg: AugmentConfig,
    max_pixels: u64,
    /// Decode JPEGs at a reduced DCT scale when the kept crop allows it. Default true.
    pub reduced_decode: bool,
}

impl TrainTransform {
    pub fn new(size: usize, cfg: &AugmentConfig, max_pixels: u64) -> Self {
        Self { size, cfg: cfg.clone(), max_pixels, reduced_decode: true }
    }

    /// The transform on an already decoded image (no reduced decoding).
    pub fn apply_rgb(&self, img: &RgbImage, rng: &mut SampleRng, out: &mut [u8]) -> Option<EraseBox> {
        let crop = random_resized_crop_params(img.width, img.height, self.cfg.scale, self.cfg.ratio, rng);
        self.finish(img, ResizeBox::crop(crop.left, crop.top, crop.width, crop.height), rng, out)
    }

    fn finish(&self, img: &RgbImage, region: ResizeBox, rng: &mut SampleRng, out: &mut [u8]) -> Option<EraseBox> {
        let s = self.size;
        RESIZED.with(|rgb| {
            let mut rgb = rgb.borrow_mut();
            resize_bicubic_into(img, region, s, s, &mut rgb);
            if self.cfg.color_jitter > 0.0 {
                color_jitter(&mut rgb, self.cfg.color_jitter, rng);
            }
            if self.cfg.grayscale_prob > 0.0 && rng.gen::<f64>() < self.cfg.grayscale_prob {
                rgb.chunks_exact_mut(3).for_each(|p| {
                    let l = luma(p);
                    p.fill(l);
                });
            }
            hwc_to_chw(&rgb, out);
        });
        self.erase_box(rng)
    }

    /// RandomErasing's draw for this sample (after every other draw): the box, then the seed of
    /// its noise.
    fn erase_box(&self, rng: &mut SampleRng) -> Option<EraseBox> {
        if self.cfg.re_prob <= 0.0 {
            return None;
        }
        let s = self.size as u32;
        let r = random_erasing_params(s, s, self.cfg.re_prob, rng)?;
        Some(EraseBox { top: r.top, left: r.left, height: r.height, width: r.width, noise_seed: rng.next_u64() })
    }
}

impl ImageTransform for TrainTransform {
    fn output_size(&self) -> usize {
        self.size
    }

    fn apply(
        &self,
        encoded: &[u8],
        ext: &str,
        rng: &mut SampleRng,
        out: &mut [u8],
    ) -> Result<Option<EraseBox>, DecodeError> {
        let (img, region) = self.decode_crop(encoded, ext, rng)?;
        let erase = self.finish(&img, region, rng, out);
        recycle(img);
        Ok(erase)
    }
}

impl TrainTransform {
    /// The decode stage of [`ImageTransform::apply`]: draws the crop (the first draw of `rng`) and
    /// decodes what it needs; returns the pixels and the crop's window in them. Public so that
    /// benchmarks can time decoding apart from resampling.
    pub fn decode_crop(
        &self,
        encoded: &[u8],
        ext: &str,
        rng: &mut SampleRng,
    ) -> Result<(RgbImage, ResizeBox), DecodeError> {
        // Crop parameters depend only on the full size, so they are drawn from the header and
        // the decode scale chosen from them: the random stream is the same at every scale.
        let (w, h) = probe_size(encoded, ext)?;
        if w as u64 * h as u64 > self.max_pixels {
            return Err(DecodeError::TooLarge { width: w, height: h, limit: self.max_pixels });
        }
        let crop = random_resized_crop_params(w, h, self.cfg.scale, self.cfg.ratio, rng);
        self.decode_crop_rect(encoded, ext, &crop)
    }

    /// [`TrainTransform::decode_crop`] for a given crop (of the full-size image).
    pub fn decode_crop_rect(
        &self,
        encoded: &[u8],
        ext: &str,
        crop: &CropRect,
    ) -> Result<(RgbImage, ResizeBox), DecodeError> {
        let m = if self.reduced_decode { dct_scale(crop, self.size as u32) } else { 8 };
        let (_, rect) = scaled_window(crop, m);
        let d = decode_rgb_region(encoded, ext, self.max_pixels, m, rect)?;
        // What came back (PNG and WebP: the whole image, full size), from (d.left, d.top) on.
        let ([x0, y0, x1, y1], (l, t, w, h)) = scaled_window(crop, d.scale_num);
        let (ox, oy) = (d.left, d.top);
        let (r, b) = ((l + w - ox).min(d.img.width), (t + h - oy).min(d.img.height));
        let region = ResizeBox {
            x0: x0 - ox as f64,
            y0: y0 - oy as f64,
            x1: (x1 - ox as f64).min(r as f64),
            y1: (y1 - oy as f64).min(b as f64),
            clip: (l - ox, t - oy, r - (l - ox), b - (t - oy)),
        };
        Ok((d.img, region))
    }
}

/// OpenCLIP's default eval transform: bicubic resize of the shorter side to `size`,
/// center crop `size × size` (uint8 CHW; ToTensor + Normalize(OpenAI) follow as for training).
#[derive(Debug, Clone)]
pub struct EvalTransform {
    size: usize,
    max_pixels: u64,
}

impl EvalTransform {
    pub fn new(size: usize, max_pixels: u64) -> Self {
        Self { size, max_pixels }
    }

    /// The transform on an already decoded image.
    pub fn apply_rgb(&self, img: &RgbImage, out: &mut [u8]) {
        let s = self.size as u32;
        let (rw, rh) = shorter_side_resize_size(img.width, img.height, s);
        let mut resized = Vec::new();
        resize_bicubic_into(img, ResizeBox::crop(0, 0, img.width, img.height), rw as usize, rh as usize, &mut resized);
        let c = center_crop_rect(rw, rh, s);
        let mut rgb = Vec::with_capacity(self.size * self.size * 3);
        for y in c.top..c.top + s {
            let start = (y as usize * rw as usize + c.left as usize) * 3;
            rgb.extend_from_slice(&resized[start..start + self.size * 3]);
        }
        hwc_to_chw(&rgb, out);
    }
}

impl ImageTransform for EvalTransform {
    fn output_size(&self) -> usize {
        self.size
    }

    fn apply(
        &self,
        encoded: &[u8],
        ext: &str,
        _rng: &mut SampleRng,
        out: &mut [u8],
    ) -> Result<Option<EraseBox>, DecodeError> {
        let img = decode_rgb(encoded, ext, self.max_pixels)?;
        self.apply_rgb(&img, out);
        recycle(img);
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hwc_to_chw_puts_every_channel_in_its_plane() {
        // 16-pixel blocks and a tail that is not a whole block.
        for n in [1usize, 15, 16, 17, 100, 256 * 3 + 5] {
            let rgb: Vec<u8> = (0..n * 3).map(|i| (i * 7 + i / 5) as u8).collect();
            let mut out = vec![0u8; n * 3];
            hwc_to_chw(&rgb, &mut out);
            for i in 0..n {
                for c in 0..3 {
                    assert_eq!(out[c * n + i], rgb[i * 3 + c], "{n} pixels: pixel {i} channel {c}");
                }
            }
        }
    }

    #[test]
    fn dct_scale_keeps_the_crop_at_least_the_output_size() {
        let crop = |width, height| CropRect { top: 0, left: 0, width, height };
        assert_eq!(dct_scale(&crop(511, 2000), 256), 8); // 511·4/8 < 256
        assert_eq!(dct_scale(&crop(512, 600), 256), 4);
        assert_eq!(dct_scale(&crop(1024, 1100), 256), 2);
        assert_eq!(dct_scale(&crop(4000, 4000), 256), 1);
        assert_eq!(dct_scale(&crop(4000, 1023), 256), 4); // 1023·2/8 < 256
        assert_eq!(dct_scale(&crop(300, 257), 256), 8);
        assert_eq!(dct_scale(&crop(100, 100), 256), 8); // an upscale: full size
        for (w, h) in [(300u32, 700u32), (256, 256), (999, 401), (2000, 3000), (1792, 1800), (1791, 4000)] {
            let m = dct_scale(&crop(w, h), 224);
            assert!([1, 2, 4, 8].contains(&m), "{w}x{h}: {m}");
            assert!(w * m >= 8 * 224 && h * m >= 8 * 224 || m == 8, "{w}x{h}: {m}");
            assert!(m == 1 || w * (m / 2) < 8 * 224 || h * (m / 2) < 8 * 224, "{w}x{h}: {m} is not the smallest");
        }
    }
}
