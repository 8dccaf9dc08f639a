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
        for x in 0..xmax {
            let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
            k[x] = w;
            ww += w;
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
    let (cl, ct, cw, ch) = (region.clip.0 as usize, region.clip.1 as usize, region.clip.2 as usize, region.clip.3 as usize);
    assert!(cl + cw <= src.width as usize && ct + ch <= src.height as usize && cw > 0 && ch > 0, "resize region outside image");
    let stride = src.width as usize * 3;
    let in_x0 = region.x0 - cl as f64;
    let in_x1 = region.x1 - cl as f64;
    let in_y0 = region.y0 - ct as f64;
    let in_y1 = region.y1 - ct as f64;
    let need_h = !(out_w == cw && in_x0 == 0.0 && in_x1 == cw as f64);
    let need_v = !(out_h == ch && in_y0 == 0.0 && in_y1 == ch as f64);

    let vert = taps(ch, in_y0, in_y1, out_h, 0);
    // Rows of the crop the vertical pass reads (Pillow's ybox_first..ybox_last).
    let (ybox_first, ybox_last) = if need_v {
        (vert.first[0], vert.first[out_h - 1] + vert.len[out_h - 1])
    } else {
        (0, ch)
    };

    // Horizontal pass → `tmp` (`ybox_last - ybox_first` rows of `tw` pixels).
    let tw = if need_h { out_w } else { cw };
    let rows = ybox_last - ybox_first;
    let mut tmp = vec![0u8; tw * rows * 3];
    if need_h {
        let hz = taps(cw, in_x0, in_x1, out_w, cl);
        for r in 0..rows {
            let row = &src.pixels[(ct + ybox_first + r) * stride..][..stride];
            let orow = &mut tmp[r * tw * 3..][..tw * 3];
            for xx in 0..out_w {
                let k = &hz.weights[xx * hz.ksize..][..hz.len[xx]];
                let base = hz.first[xx] * 3;
                let (mut s0, mut s1, mut s2) = (1i32 << (PRECISION_BITS - 1), 1i32 << (PRECISION_BITS - 1), 1i32 << (PRECISION_BITS - 1));
                for (x, &w) in k.iter().enumerate() {
                    let p = &row[base + x * 3..base + x * 3 + 3];
                    s0 += p[0] as i32 * w;
                    s1 += p[1] as i32 * w;
                    s2 += p[2] as i32 * w;
                }
                orow[xx * 3] = clip8(s0);
                orow[xx * 3 + 1] = clip8(s1);
                orow[xx * 3 + 2] = clip8(s2);
            }
        }
    } else {
        for r in 0..rows {
            let row = &src.pixels[(ct + ybox_first + r) * stride + cl * 3..][..cw * 3];
            tmp[r * tw * 3..][..tw * 3].copy_from_slice(row);
        }
    }

    out.clear();
    out.resize(out_w * out_h * 3, 0);
    if !need_v {
        out.copy_from_slice(&tmp);
        return;
    }
    // Vertical pass: accumulate whole rows at a time (cache friendly).
    let row_len = tw * 3;
    let mut acc = vec![0i32; row_len];
    for yy in 0..out_h {
        acc.iter_mut().for_each(|a| *a = 1 << (PRECISION_BITS - 1));
        let k = &vert.weights[yy * vert.ksize..][..vert.len[yy]];
        let y0 = vert.first[yy] - ybox_first;
        for (y, &w) in k.iter().enumerate() {
            let row = &tmp[(y0 + y) * row_len..][..row_len];
            for (a, &p) in acc.iter_mut().zip(row) {
                *a += p as i32 * w;
            }
        }
        for (o, &a) in out[yy * row_len..][..row_len].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
