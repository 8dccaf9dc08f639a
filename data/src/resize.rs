//! Bicubic resampling bit-compatible with Pillow's `Image.resize(.., BICUBIC)`.
//!
//! Follows Pillow's `libImaging/Resample.c`: the bicubic kernel with `a = -0.5`, support
//! widened by the scale when downscaling (antialiasing), per-output-pixel coefficients
//! normalised to sum 1 then turned into 22-bit fixed point, a horizontal pass over only the
//! rows the vertical pass needs, clipping to `u8` between the passes, and the vertical pass.
//! torchvision's `Resize`/`RandomResizedCrop` on PIL images call exactly this.

use crate::decode::RgbImage;

/// Pillow's `PRECISION_BITS` for 8-bit images: 32 - 8 - 2.
const PRECISION_BITS: u32 = 22;

/// Pillow's bicubic kernel (`a = -0.5`), support 2.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point taps of one output pixel: `weights` apply to input indices `first..`.
struct Taps {
    first: Vec<usize>,
    len: Vec<usize>,
    ksize: usize,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the source range `in0..in1`
/// (in coordinates of an image `in_size` wide) mapped to `out_size` pixels. `offset` is added to
/// the resulting input indices (the input window starts there in the real buffer).
fn taps(in_size: usize, in0: f64, in1: f64, out_size: usize, offset: usize) -> Taps {
    let scale = (in1 - in0) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = 2.0 * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut first = Vec::with_capacity(out_size);
    let mut len = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = in0 + (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // C's `(int)` truncates toward zero; negatives clamp to 0 either way.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64).max(xmin as i64) as usize - xmin;
        let xmax = xmax.min(ksize);
        let mut ww = 0.0;
        for (x, kx) in k[..xmax].iter_mut().enumerate() {
            *kx = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            ww += *kx;
        }
        for x in 0..xmax {
            let v = if ww != 0.0 { k[x] / ww } else { k[x] };
            let f = v * (1u32 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if v < 0.0 { (f - 0.5) as i32 } else { (f + 0.5) as i32 };
        }
        first.push(xmin + offset);
        len.push(xmax);
    }
    Taps { first, len, ksize, weights }
}

#[inline]
fn clip8(v: i32) -> u8 {
    (v >> PRECISION_BITS).clamp(0, 255) as u8
}

/// A source window in image coordinates: `x0..x1 × y0..y1` (may be fractional) resampled from
/// the pixels inside the integer `clip` rectangle `(left, top, width, height)` — the pixels
/// an equivalent `img.crop(clip)` would keep, so results equal Pillow's crop-then-resize.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ResizeBox {
    pub x0: f64,
    pub y0: f64,
    pub x1: f64,
    pub y1: f64,
    pub clip: (u32, u32, u32, u32),
}

impl ResizeBox {
    /// The integer crop `(left, top, width, height)` itself (torchvision `resized_crop`).
    pub fn crop(left: u32, top: u32, width: u32, height: u32) -> Self {
        Self {
            x0: left as f64,
            y0: top as f64,
            x1: (left + width) as f64,
            y1: (top + height) as f64,
            clip: (left, top, width, height),
        }
    }
}

/// Resize the `region` of `src` to `out_w × out_h` RGB as Pillow's bicubic resample of the
/// cropped image does. Writes `out_w * out_h * 3` bytes into `out`.
pub fn resize_bicubic_into(src: &RgbImage, region: ResizeBox, out_w: usize, out_h: usize, out: &mut Vec<u8>) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { resize_avx2(src, region, out_w, out_h, out) };
    }
    resize_impl(src, region, out_w, out_h, out, false)
}

/// The same code with AVX2 kernels for both passes; integer arithmetic, so results are identical
/// to the baseline build.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn resize_avx2(src: &RgbImage, region: ResizeBox, out_w: usize, out_h: usize, out: &mut Vec<u8>) {
    resize_impl(src, region, out_w, out_h, out, true)
}

/// `simd`: the caller checked that AVX2 (hence SSE4.1) is available.
#[inline(always)]
fn resize_impl(src: &RgbImage, region: ResizeBox, out_w: usize, out_h: usize, out: &mut Vec<u8>, simd: bool) {
    let (cl, ct, cw, ch) =
        (region.clip.0 as usize, region.clip.1 as usize, region.clip.2 as usize, region.clip.3 as usize);
    assert!(
        cl + cw <= src.width as usize && ct + ch <= src.height as usize && cw > 0 && ch > 0,
        "resize region outside image"
    );
    let stride = src.width as usize * 3;
    let in_x0 = region.x0 - cl as f64;
    let in_x1 = region.x1 - cl as f64;
    let in_y0 = region.y0 - ct as f64;
    let in_y1 = region.y1 - ct as f64;
    let need_h = !(out_w == cw && in_x0 == 0.0 && in_x1 == cw as f64);
    let need_v = !(out_h == ch && in_y0 == 0.0 && in_y1 == ch as f64);

    let vert = taps(ch, in_y0, in_y1, out_h, 0);
    // Rows of the crop the vertical pass reads (Pillow's ybox_first..ybox_last).
    let (ybox_first, ybox_last) =
        if need_v { (vert.first[0], vert.first[out_h - 1] + vert.len[out_h - 1]) } else { (0, ch) };

    // Horizontal pass → `tmp` (`ybox_last - ybox_first` rows of `tw` pixels), a per-thread buffer.
    let tw = if need_h { out_w } else { cw };
    let rows = ybox_last - ybox_first;
    let mut tmp = TMP.with(|t| std::mem::take(&mut *t.borrow_mut()));
    tmp.clear();
    tmp.resize(tw * rows * 3, 0);
    if need_h {
        let hz = taps(cw, in_x0, in_x1, out_w, cl);
        #[cfg(target_arch = "x86_64")]
        let split = if simd { SplitTaps::new(&hz) } else { SplitTaps::default() };
        for r in 0..rows {
            let orow = &mut tmp[r * tw * 3..][..tw * 3];
            #[cfg(target_arch = "x86_64")]
            if simd {
                // SAFETY: `simd` is only set after detecting AVX2.
                unsafe { horizontal_row_avx2(&src.pixels, (ct + ybox_first + r) * stride, orow, &hz, &split) };
                continue;
            }
            let _ = simd;
            horizontal_row(&src.pixels, (ct + ybox_first + r) * stride, orow, &hz);
        }
    } else {
        for r in 0..rows {
            let row = &src.pixels[(ct + ybox_first + r) * stride + cl * 3..][..cw * 3];
            tmp[r * tw * 3..][..tw * 3].copy_from_slice(row);
        }
    }

    out.clear();
    out.resize(out_w * out_h * 3, 0);
    if need_v {
        vertical_pass(&tmp, tw * 3, ybox_first, &vert, out, simd);
    } else {
        out.copy_from_slice(&tmp);
    }
    TMP.with(|t| *t.borrow_mut() = tmp);
}

#[inline(always)]
fn vertical_pass(tmp: &[u8], row_len: usize, ybox_first: usize, vert: &Taps, out: &mut [u8], simd: bool) {
    #[cfg(target_arch = "x86_64")]
    if simd {
        // SAFETY: `simd` is only set after detecting AVX2.
        return unsafe { vertical_avx2(tmp, row_len, ybox_first, vert, out) };
    }
    let _ = simd;
    vertical(tmp, row_len, ybox_first, vert, out)
}

thread_local! {
    /// The horizontal pass's output (one per thread, reused: it is as large as the crop).
    static TMP: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// One row (starting at `row_start` in `pixels`) of the horizontal pass. Each tap loads 4
/// bytes (the pixel plus the next one's red, weighted into an unused 4th lane) so a tap is
/// one widen + multiply-add on 4 lanes; only the image's very last pixel needs the 3-byte path.
#[inline(always)]
fn horizontal_row(pixels: &[u8], row_start: usize, orow: &mut [u8], hz: &Taps) {
    let half = 1i32 << (PRECISION_BITS - 1);
    for (xx, o) in orow.chunks_exact_mut(3).enumerate() {
        let n = hz.len[xx];
        let k = &hz.weights[xx * hz.ksize..][..n];
        let start = row_start + hz.first[xx] * 3;
        let mut acc = [half; 4];
        if start + n * 3 < pixels.len() {
            let px = &pixels[start..start + n * 3 + 1];
            for (t, &w) in k.iter().enumerate() {
                let p: &[u8; 4] = px[t * 3..t * 3 + 4].try_into().unwrap();
                for c in 0..4 {
                    acc[c] += p[c] as i32 * w;
                }
            }
        } else {
            for (p, &w) in pixels[start..start + n * 3].chunks_exact(3).zip(k) {
                for c in 0..3 {
                    acc[c] += p[c] as i32 * w;
                }
            }
        }
        o[0] = clip8(acc[0]);
        o[1] = clip8(acc[1]);
        o[2] = clip8(acc[2]);
    }
}

/// The horizontal taps split for `_mm256_madd_epi16` (16 × 16-bit products summed in pairs):
/// each 22-bit weight `w = hi · 2^12 + lo` with `0 <= lo < 2^12`, both halves fitting an i16, so
/// `Σ p·w = (Σ p·hi) << 12 + Σ p·lo` is Pillow's i32 sum exactly. Per output pixel, groups of four
/// taps, each a 16-lane vector `[w0 w1 w0 w1 w0 w1 0 0 | w2 w3 w2 w3 w2 w3 0 0]` matching the
/// pixel lanes `[R0 R1 G0 G1 B0 B1 _ _ | R2 R3 G2 G3 B2 B3 _ _]`.
#[cfg(target_arch = "x86_64")]
#[derive(Default)]
struct SplitTaps {
    groups: usize,
    hi: Vec<i16>,
    lo: Vec<i16>,
}

#[cfg(target_arch = "x86_64")]
impl SplitTaps {
    fn new(hz: &Taps) -> Self {
        let out_w = hz.first.len();
        let groups = hz.ksize.div_ceil(4);
        let (mut hi, mut lo) = (vec![0i16; out_w * groups * 16], vec![0i16; out_w * groups * 16]);
        for xx in 0..out_w {
            for (t, &w) in hz.weights[xx * hz.ksize..][..hz.len[xx]].iter().enumerate() {
                let (g, lane, pair) = (t / 4, (t % 4) / 2, t % 2);
                for c in 0..3 {
                    let i = (xx * groups + g) * 16 + lane * 8 + c * 2 + pair;
                    hi[i] = (w >> 12) as i16;
                    lo[i] = (w & 0xfff) as i16;
                }
            }
        }
        SplitTaps { groups, hi, lo }
    }
}

/// [`horizontal_row`] with AVX2, four taps of one output pixel per step: 16 bytes from the
/// group's first pixel broadcast to both lanes, shuffled into 16-bit `[R0 R1 G0 G1 B0 B1]` (low
/// lane) and the same of pixels 2 and 3 (high lane), then multiplied by both weight halves with
/// `madd`. Padding taps have weight 0. Same integer sums as Pillow's, hence the same results.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn horizontal_row_avx2(pixels: &[u8], row_start: usize, orow: &mut [u8], hz: &Taps, split: &SplitTaps) {
    use std::arch::x86_64::*;
    const Z: i8 = -128; // pshufb: a zero byte
    #[rustfmt::skip]
    let shuffle = _mm256_setr_epi8(
        0, Z, 3, Z, 1, Z, 4, Z, 2, Z, 5, Z, Z, Z, Z, Z,
        6, Z, 9, Z, 7, Z, 10, Z, 8, Z, 11, Z, Z, Z, Z, Z,
    );
    let half = _mm_set1_epi32(1 << (PRECISION_BITS - 1));
    let out_w = orow.len() / 3;
    let groups = split.groups;
    let mut xx = 0;
    while xx < out_w {
        let start = row_start + hz.first[xx] * 3;
        // Every group loads 16 bytes from its first pixel: all in bounds?
        if start + (groups - 1) * 12 + 16 > pixels.len() {
            break; // the image's last pixels: finish this row on the checked path below
        }
        let p = pixels.as_ptr().add(start);
        let (wh, wl) = (split.hi.as_ptr().add(xx * groups * 16), split.lo.as_ptr().add(xx * groups * 16));
        let (mut acc_hi, mut acc_lo) = (_mm256_setzero_si256(), _mm256_setzero_si256());
        for g in 0..groups {
            // In bounds: start + 12g + 16 <= len (checked above).
            let bytes = _mm_loadu_si128(p.add(g * 12) as *const __m128i);
            let px = _mm256_shuffle_epi8(_mm256_broadcastsi128_si256(bytes), shuffle);
            let h = _mm256_loadu_si256(wh.add(g * 16) as *const __m256i);
            let l = _mm256_loadu_si256(wl.add(g * 16) as *const __m256i);
            acc_hi = _mm256_add_epi32(acc_hi, _mm256_madd_epi16(px, h));
            acc_lo = _mm256_add_epi32(acc_lo, _mm256_madd_epi16(px, l));
        }
        let acc = _mm256_add_epi32(_mm256_slli_epi32::<12>(acc_hi), acc_lo);
        let sum = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256::<1>(acc));
        // clip8: arithmetic shift, then saturating packs clamp to 0..=255.
        let r = _mm_srai_epi32::<22>(_mm_add_epi32(sum, half));
        let v = _mm_cvtsi128_si32(_mm_packus_epi16(_mm_packs_epi32(r, r), _mm_setzero_si128())) as u32;
        let o = &mut orow[xx * 3..xx * 3 + 3];
        o.copy_from_slice(&v.to_le_bytes()[..3]);
        xx += 1;
    }
    if xx < out_w {
        let rest = Taps {
            first: hz.first[xx..].to_vec(),
            len: hz.len[xx..].to_vec(),
            ksize: hz.ksize,
            weights: hz.weights[xx * hz.ksize..].to_vec(),
        };
        horizontal_row(pixels, row_start, &mut orow[xx * 3..], &rest);
    }
}

/// [`vertical`] with AVX2, 32 columns at a time held in registers over all of an output row's taps
/// (the plain loop reloads and stores its i32 row of sums once per tap). Same integer arithmetic.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn vertical_avx2(tmp: &[u8], row_len: usize, ybox_first: usize, vert: &Taps, out: &mut [u8]) {
    use std::arch::x86_64::*;
    let half = _mm256_set1_epi32(1 << (PRECISION_BITS - 1));
    let blocks = row_len / 32;
    for (yy, orow) in out.chunks_exact_mut(row_len).enumerate() {
        let k = &vert.weights[yy * vert.ksize..][..vert.len[yy]];
        let base = tmp.as_ptr().add((vert.first[yy] - ybox_first) * row_len);
        // In bounds: the taps' rows lie within `tmp` (ybox_first..ybox_last), 32b + 32 <= row_len.
        for b in 0..blocks {
            let mut acc = [half; 4];
            for (t, &w) in k.iter().enumerate() {
                let w = _mm256_set1_epi32(w);
                let row = base.add(t * row_len + b * 32);
                for (j, a) in acc.iter_mut().enumerate() {
                    let px = _mm256_cvtepu8_epi32(_mm_loadl_epi64(row.add(j * 8) as *const __m128i));
                    *a = _mm256_add_epi32(*a, _mm256_mullo_epi32(px, w));
                }
            }
            let r: [__m256i; 4] = acc.map(|a| _mm256_srai_epi32::<22>(a));
            // packs/packus work per 128-bit lane: undo their lane interleave with one permute.
            let words = (_mm256_packs_epi32(r[0], r[1]), _mm256_packs_epi32(r[2], r[3]));
            let lanes = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
            let bytes = _mm256_permutevar8x32_epi32(_mm256_packus_epi16(words.0, words.1), lanes);
            _mm256_storeu_si256(orow.as_mut_ptr().add(b * 32) as *mut __m256i, bytes);
        }
        for (x, out) in orow.iter_mut().enumerate().take(row_len).skip(blocks * 32) {
            let mut a = 1i32 << (PRECISION_BITS - 1);
            for (t, &w) in k.iter().enumerate() {
                a += *base.add(t * row_len + x) as i32 * w;
            }
            *out = clip8(a);
        }
    }
}

/// Vertical pass: whole rows at a time, which vectorizes (i32 multiply-add over the row).
#[inline(always)]
fn vertical(tmp: &[u8], row_len: usize, ybox_first: usize, vert: &Taps, out: &mut [u8]) {
    let mut acc = vec![0i32; row_len];
    for (yy, orow) in out.chunks_exact_mut(row_len).enumerate() {
        acc.iter_mut().for_each(|a| *a = 1 << (PRECISION_BITS - 1));
        let k = &vert.weights[yy * vert.ksize..][..vert.len[yy]];
        let y0 = vert.first[yy] - ybox_first;
        for (row, &w) in tmp[y0 * row_len..].chunks_exact(row_len).zip(k) {
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * w;
            }
        }
        for (o, &a) in orow.iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn simd_and_scalar_paths_agree_exactly() {
        let (w, h) = (83u32, 61u32);
        let mut state = 12345u32;
        let pixels: Vec<u8> = (0..w * h * 3)
            .map(|_| {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                (state >> 16) as u8
            })
            .collect();
        let img = RgbImage { width: w, height: h, pixels };
        // Crops touching the image's last pixel exercise the over-read guard.
        for (region, ow, oh) in [
            (ResizeBox::crop(0, 0, w, h), 40, 33),
            (ResizeBox::crop(20, 11, 63, 50), 17, 71),
            (ResizeBox::crop(5, 7, 30, 20), 64, 64),
            (ResizeBox { x0: 2.5, y0: 3.25, x1: 80.0, y1: 60.5, clip: (2, 3, 81, 58) }, 24, 24),
            // Downscales of 2x and 9x (9 and 37 taps per output pixel) and an upscale.
            (ResizeBox::crop(1, 0, 80, 60), 40, 30),
            (ResizeBox::crop(0, 0, w, h), 9, 7),
            (ResizeBox::crop(40, 30, 43, 31), 129, 93),
        ] {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            resize_bicubic_into(&img, region, ow, oh, &mut a);
            resize_impl(&img, region, ow, oh, &mut b, false);
            assert_eq!(a, b, "{region:?}");
        }
    }

    #[test]
    fn identity_size_is_a_copy_and_constant_stays_constant() {
        let img = RgbImage { width: 5, height: 4, pixels: (0..60).map(|v| (v * 4) as u8).collect() };
        let mut out = Vec::new();
        resize_bicubic_into(&img, ResizeBox::crop(0, 0, 5, 4), 5, 4, &mut out);
        assert_eq!(out, img.pixels);
        let flat = RgbImage { width: 9, height: 7, pixels: vec![77; 9 * 7 * 3] };
        resize_bicubic_into(&flat, ResizeBox::crop(1, 1, 8, 5), 3, 11, &mut out);
        assert!(out.iter().all(|&v| v == 77));
    }
}
