//! The device side of the uint8 batch contract: from the loader's pooled host buffers to the model's
//! f32 input on the training device.
//!
//! The loader hands `[n, 3, s, s]` uint8 CHW pixels, one optional [`EraseBox`] per sample and the
//! token ids, in buffers it takes from an allocator the trainer supplies ([`host_alloc`]): pinned
//! (page-locked) host memory on CUDA, so that the host-to-device copy can run asynchronously. Here:
//!
//! 1. the buffers are copied to the GPU on a side stream ([`crate::cuda::CopyStream`]) without
//!    blocking the host; the compute stream waits for the copy through an event, and the batch (its
//!    buffers) is held until that event completes, so the loader never refills memory in flight;
//! 2. on the device: `x.float() / 255`, Normalize with OpenAI's mean and std, then timm's
//!    `RandomErasing` ('pixel' mode) fill of every box with the counter-based noise of
//!    [`ferroclip_data::erase`], computed in int64 tensor ops for all erased elements of the batch at
//!    once and scattered into place.
//!
//! On the CPU the same tensor code runs on CPU tensors; it equals the data crate's CPU reference
//! ([`ferroclip_data::normalize::normalize_and_erase`]) exactly outside the boxes and within one f32
//! ulp inside them (the f64 `ln`/`cos` of torch's vectorized kernels against the Rust libm, see the
//! spec in `ferroclip_data::erase`).

use std::collections::VecDeque;
use std::sync::Arc;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use ferroclip_data::augment::{OPENAI_MEAN, OPENAI_STD};
use ferroclip_data::tokenize::Tokenizer;
use ferroclip_data::{AllocError, Batch, EraseBox, HostAlloc, HostBuf, HostMemory, PooledBuf};

use crate::cuda::{self, CopyStream, Event};

/// Uploads that may be in flight before the host waits for the oldest (the GPU is then that many
/// batches behind the loader; normally the copies finish long before).
const MAX_IN_FLIGHT: usize = 8;

/// Page-locked host memory from torch's caching host allocator, as the loader's buffers.
pub struct PinnedAlloc;

impl HostAlloc for PinnedAlloc {
    /// A failure (no pinned memory left, or a size libtorch cannot hold) goes back to the loader,
    /// which reports it naming `data.batch_size`.
    fn alloc(&self, bytes: usize) -> Result<HostBuf, AllocError> {
        if i64::try_from(bytes).is_err() {
            return Err(AllocError::new(bytes, "more than a tensor can hold"));
        }
        let tensor = cuda::pinned_empty(bytes.max(8)).map_err(|e| AllocError::new(bytes, format!("{e:#}")))?;
        Ok(HostBuf::new(PinnedMemory { tensor }))
    }
}

/// One pinned buffer: a uint8 CPU tensor in page-locked memory.
pub struct PinnedMemory {
    tensor: Tensor,
}

impl PinnedMemory {
    /// The first `bytes` bytes as a uint8 tensor (a view of the pinned memory).
    fn bytes(&self, bytes: usize) -> Tensor {
        self.tensor.narrow(0, 0, bytes as i64)
    }
}

impl HostMemory for PinnedMemory {
    fn as_bytes(&self) -> &[u8] {
        // SAFETY: a contiguous uint8 tensor of `numel` bytes that lives as long as `self`.
        unsafe { std::slice::from_raw_parts(self.tensor.data_ptr() as *const u8, self.tensor.numel()) }
    }

    fn as_bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above; `&mut self` makes the borrow unique.
        unsafe { std::slice::from_raw_parts_mut(self.tensor.data_ptr() as *mut u8, self.tensor.numel()) }
    }
}

/// The loader's allocator for batches bound to `device`: pinned memory on CUDA; on the CPU `None`
/// (the loader's plain `Vec` buffers: there is no copy to overlap).
pub fn host_alloc(device: Device) -> Option<Arc<dyn HostAlloc>> {
    device.is_cuda().then(|| Arc::new(PinnedAlloc) as Arc<dyn HostAlloc>)
}

/// Columns of the erase table: one row per erased sample.
const SAMPLE: i64 = 0;
const TOP: i64 = 1;
const LEFT: i64 = 2;
const HEIGHT: i64 = 3;
const WIDTH: i64 = 4;
const SEED_LO: i64 = 5;
const SEED_HI: i64 = 6;
const COLUMNS: i64 = 7;

/// The erase boxes of a batch as a row-major `[k, 7]` int64 table (sample, top, left, height, width,
/// seed low 32 bits, seed high 32 bits) and the number of erased elements, `sum 3·h·w`.
fn erase_table(erase: &[Option<EraseBox>]) -> (Vec<i64>, i64) {
    let mut rows = Vec::new();
    let mut elements = 0i64;
    for (i, b) in erase.iter().enumerate() {
        if let Some(b) = b {
            let seed = b.noise_seed;
            rows.extend_from_slice(&[
                i as i64,
                b.top as i64,
                b.left as i64,
                b.height as i64,
                b.width as i64,
                (seed & 0xffff_ffff) as i64,
                (seed >> 32) as i64,
            ]);
            elements += 3 * b.height as i64 * b.width as i64;
        }
    }
    (rows, elements)
}

/// The erasing noise of `ferroclip_data::erase` (its module doc is the spec) for the element indices
/// `index` within their boxes, under the seeds' 32-bit halves `lo` and `hi` (all int64, one per
/// element): only xor, shifts of non-negative values, and products below 2^63 masked to 32 bits,
/// so the integer part is exact on every device; Box–Muller in f64, rounded once to f32.
pub fn erase_noise(index: &Tensor, lo: &Tensor, hi: &Tensor) -> Tensor {
    const MASK: i64 = 0xffff_ffff;
    let xorshift = |x: &Tensor, s: i64| x.bitwise_xor_tensor(&x.bitwise_right_shift_tensor_scalar(s));
    let mix32 = |x: &Tensor| {
        let x = xorshift(x, 16);
        let x = xorshift(&x.g_mul_scalar(0x21f0_aaad_i64).bitwise_and(MASK), 15);
        xorshift(&x.g_mul_scalar(0x735a_2d97_i64).bitwise_and(MASK), 15)
    };
    let counter = index.g_mul_scalar(2);
    let b1 = mix32(&mix32(&counter.bitwise_xor_tensor(lo)).bitwise_xor_tensor(hi));
    let b2 = mix32(&mix32(&counter.g_add_scalar(1).bitwise_xor_tensor(lo)).bitwise_xor_tensor(hi));
    let uniform = |b: Tensor| b.g_add_scalar(1).to_kind(Kind::Double) * (1.0 / 4_294_967_296.0);
    let (u1, u2) = (uniform(b1), uniform(b2));
    ((u1.log() * -2.0).sqrt() * (u2 * std::f64::consts::TAU).cos()).to_kind(Kind::Float)
}

/// ToTensor + Normalize(OpenAI mean/std) + RandomErasing's fill, as tensor ops on one device.
pub struct Normalizer {
    /// `[1, 3, 1, 1]` fp32.
    mean: Tensor,
    std: Tensor,
    /// 255 as a 0-dim fp32 tensor on the device: a true division on every device (CUDA multiplies
    /// by the reciprocal of a host scalar divisor, one ulp off the reference).
    scale: Tensor,
}

impl Normalizer {
    pub fn new(device: Device) -> Self {
        let channel = |v: [f32; 3]| Tensor::from_slice(&v).view([1, 3, 1, 1]).to_device(device);
        let scale = Tensor::from(255f32).to_device(device);
        Normalizer { mean: channel(OPENAI_MEAN), std: channel(OPENAI_STD), scale }
    }

    /// `images`: `[n, 3, s, s]` uint8; `table`: the `[k, 7]` int64 erase table of [`erase_table`]
    /// (on the same device) with `elements` erased values in all. Returns `[n, 3, s, s]` fp32.
    pub fn apply(&self, images: &Tensor, table: &Tensor, elements: i64) -> Tensor {
        let x = ((images.to_kind(Kind::Float) / &self.scale) - &self.mean) / &self.std; // [n, 3, s, s]
        if elements == 0 {
            return x;
        }
        let device = images.device();
        let s = images.size()[2];
        let col = |j: i64| table.select(1, j); // [k]
        let area = col(HEIGHT) * col(WIDTH);
        let counts = &area * 3;
        // Element e of the batch's erased values belongs to box `owner[e]`, at index `i` within it.
        let owner = Tensor::repeat_interleave(&counts, Some(elements)); // [E]
        let starts = counts.cumsum(0, Kind::Int64) - &counts;
        let i = Tensor::arange(elements, (Kind::Int64, device)) - starts.index_select(0, &owner);
        let per = |t: &Tensor| t.index_select(0, &owner); // [k] -> [E]
        let (area, width) = (per(&area), per(&col(WIDTH)));
        // i = c·h·w + y'·w + x'
        let c = i.floor_divide(&area);
        let rest = &i - &c * &area;
        let y = rest.floor_divide(&width);
        let x_in = &rest - &y * &width;
        let dest = per(&col(SAMPLE)) * (3 * s * s) + &c * (s * s) + (per(&col(TOP)) + y) * s + per(&col(LEFT)) + x_in;
        let noise = erase_noise(&i, &per(&col(SEED_LO)), &per(&col(SEED_HI)));
        // A scatter (the destinations are distinct): no bounds check read back to the host.
        let _ = x.view([-1]).scatter_(0, &dest, &noise);
        x
    }
}

/// Token ids of `texts`, `[n, context]`.
pub fn tokens(tok: &dyn Tokenizer, texts: &[impl AsRef<str>]) -> Tensor {
    let c = tok.context_length();
    let mut ids = vec![0i64; texts.len() * c];
    for (row, t) in ids.chunks_mut(c).zip(texts) {
        tok.encode_into(t.as_ref(), row);
    }
    Tensor::from_slice(&ids).view([texts.len() as i64, c as i64])
}

/// A batch as `(images [n,3,s,s] f32, tokens [n,ctx] i64)` on `device`, normalized and erased there
/// by [`Normalizer`]; copies synchronously from wherever the buffers live (evaluation, tests). The
/// training loop uses [`DeviceInput`].
pub fn to_device(batch: &Batch, device: Device) -> (Tensor, Tensor) {
    let (n, ctx) = (batch.len as i64, batch.context_length as i64);
    let tokens = Tensor::from_slice(batch.tokens()).view([n, ctx]).to_device(device);
    (images_to_device(batch.images(), &batch.erase, batch.image_size, device), tokens)
}

/// uint8 CHW pixels of `erase.len()` images of `size`² (what the transforms write) as `[n, 3, s, s]`
/// f32 on `device`, normalized and erased there by [`Normalizer`]; a synchronous copy.
pub fn images_to_device(pixels: &[u8], erase: &[Option<EraseBox>], size: usize, device: Device) -> Tensor {
    let (n, s) = (erase.len() as i64, size as i64);
    let images = Tensor::from_slice(pixels).view([n, 3, s, s]).to_device(device);
    let (rows, elements) = erase_table(erase);
    let table = Tensor::from_slice(&rows).view([rows.len() as i64 / COLUMNS, COLUMNS]).to_device(device);
    Normalizer::new(device).apply(&images, &table, elements)
}

/// The training loop's path from a [`Batch`] to device tensors (see the module doc).
pub struct DeviceInput {
    device: Device,
    normalizer: Normalizer,
    /// On CUDA: the side stream and the batches whose copies may still be running.
    copy: Option<CopyStream>,
    in_flight: VecDeque<(Batch, Event)>,
}

impl DeviceInput {
    pub fn new(device: Device) -> Result<Self> {
        let copy = match device {
            Device::Cuda(_) => Some(CopyStream::new(device)?),
            _ => None,
        };
        Ok(DeviceInput { device, normalizer: Normalizer::new(device), copy, in_flight: VecDeque::new() })
    }

    /// `(images [n,3,s,s] f32, tokens [n,ctx] i64)` on the device; on CUDA without a host sync (the
    /// batch's buffers go back to the loader once its copy has completed).
    pub fn upload(&mut self, batch: Batch) -> Result<(Tensor, Tensor)> {
        let Some(copy) = &self.copy else {
            return Ok(to_device(&batch, self.device));
        };
        let (n, s, ctx) = (batch.len as i64, batch.image_size as i64, batch.context_length as i64);
        let (rows, elements) = erase_table(&batch.erase);
        let table_host = pinned_copy_of(bytemuck_i64(&rows))?;
        let sources = [host_view(&batch.images), host_view(&batch.tokens), table_host];
        let (targets, done) = copy.upload(&sources.iter().collect::<Vec<_>>()).context("copying a batch to the GPU")?;
        self.in_flight.push_back((batch, done));
        self.release_completed()?;
        let Ok([images, tokens, table]) = <[Tensor; 3]>::try_from(targets) else {
            anyhow::bail!("the copy stream returned a wrong number of tensors");
        };
        let images = images.view([n, 3, s, s]);
        let tokens = tokens.view_dtype(Kind::Int64).view([n, ctx]);
        let table = table.view_dtype(Kind::Int64).view([rows.len() as i64 / COLUMNS, COLUMNS]);
        Ok((self.normalizer.apply(&images, &table, elements), tokens))
    }

    /// Drops (returns to the loader) the batches whose copies have completed; waits for the oldest
    /// only when more than [`MAX_IN_FLIGHT`] are outstanding.
    fn release_completed(&mut self) -> Result<()> {
        while let Some((_, done)) = self.in_flight.front() {
            if !done.is_done()? {
                if self.in_flight.len() <= MAX_IN_FLIGHT {
                    break;
                }
                done.wait()?;
            }
            self.in_flight.pop_front();
        }
        Ok(())
    }
}

/// The used bytes of a pooled buffer as a uint8 CPU tensor: a view of the pinned memory when the
/// buffer came from [`PinnedAlloc`], else a (pageable) copy.
fn host_view(buf: &PooledBuf) -> Tensor {
    match buf.memory().and_then(|m| m.downcast_ref::<PinnedMemory>()) {
        Some(pinned) => pinned.bytes(buf.len()),
        None => Tensor::from_slice(buf.as_bytes()),
    }
}

/// `bytes` in a fresh pinned tensor (torch's caching host allocator keeps it until its copy is done).
fn pinned_copy_of(bytes: &[u8]) -> Result<Tensor> {
    let t = cuda::pinned_empty(bytes.len().max(8))?;
    // SAFETY: a fresh contiguous uint8 tensor of at least `bytes.len()` bytes.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), t.data_ptr() as *mut u8, bytes.len()) };
    Ok(t.narrow(0, 0, bytes.len() as i64))
}

fn bytemuck_i64(v: &[i64]) -> &[u8] {
    // SAFETY: any i64 slice is a valid byte slice of 8× the length.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferroclip_data::normalize::normalize_and_erase;

    #[test]
    fn a_pinned_allocation_that_fails_is_an_error_naming_its_size() {
        // Beyond a tensor's size, then beyond any memory (or, without CUDA, any pinned memory):
        // both are errors the loader reports, neither a panic.
        for bytes in [usize::MAX, 1 << 62] {
            let err = PinnedAlloc.alloc(bytes).err().unwrap_or_else(|| panic!("{bytes} bytes of pinned memory"));
            assert_eq!(err.bytes, bytes);
            assert!(err.to_string().contains(&format!("{bytes} bytes")), "{err}");
        }
    }

    /// f32 values as ordered integers, so that their difference counts ulps.
    fn ordered(v: f32) -> i64 {
        let b = v.to_bits() as i32;
        (if b < 0 { i32::MIN - b } else { b }) as i64
    }

    /// A batch of pseudo-random pixels with boxes at the corners, the full image, a single pixel and
    /// none, against the data crate's CPU reference.
    #[test]
    fn device_path_on_cpu_equals_the_data_crates_reference() {
        let (s, images, erase) = crate::numerics::erase_batch();
        let n = erase.len();
        let mut want = vec![0f32; images.len()];
        normalize_and_erase(&images, &erase, &mut want);
        let batch = Batch {
            len: n,
            image_size: s,
            context_length: 2,
            images: PooledBuf::from_bytes(&images),
            erase: erase.clone(),
            tokens: PooledBuf::from_i64(&(0..2 * n as i64).collect::<Vec<_>>()),
            ..Default::default()
        };
        // The reference through the batch, as the old to_device used it.
        assert_eq!(batch.normalized_images(), want);

        let mut input = DeviceInput::new(Device::Cpu).unwrap();
        let (got_images, tokens) = input.upload(batch.clone()).unwrap();
        assert_eq!(got_images.size(), vec![n as i64, 3, s as i64, s as i64]);
        assert_eq!(got_images.kind(), Kind::Float);
        assert_eq!(Vec::<i64>::try_from(&tokens.view([-1])).unwrap(), (0..2 * n as i64).collect::<Vec<_>>());
        let got: Vec<f32> = Vec::<f32>::try_from(&got_images.view([-1])).unwrap();
        let mut in_box = vec![false; images.len()];
        for (i, e) in erase.iter().enumerate() {
            if let Some(e) = e {
                for c in 0..3 {
                    for y in e.top..e.top + e.height {
                        for x in e.left..e.left + e.width {
                            in_box[((i * 3 + c) * s + y as usize) * s + x as usize] = true;
                        }
                    }
                }
            }
        }
        let (mut erased, mut off_by_one) = (0, 0);
        for (k, (&g, &w)) in got.iter().zip(&want).enumerate() {
            if in_box[k] {
                erased += 1;
                let ulps = (ordered(g) - ordered(w)).abs();
                assert!(ulps <= 1, "erased value {k}: {g} vs the reference {w} ({ulps} ulps)");
                off_by_one += (ulps == 1) as usize;
            } else {
                assert_eq!(g.to_bits(), w.to_bits(), "value {k} outside the boxes: {g} vs the reference {w}");
            }
        }
        assert_eq!(erased, 3 * (5 * 7 + 24 * 24 + 1 + 14 * 21 + 20 * 7));
        assert!(off_by_one * 100 < erased, "{off_by_one} of {erased} erased values are one ulp off");
        // The synchronous path (evaluation) is the same code.
        assert!(to_device(&batch, Device::Cpu).0.equal(&got_images));
    }

    /// The tensor generator against the data crate's scalar one, over many seeds and indices.
    #[test]
    fn erase_noise_matches_the_spec_bits() {
        let seeds = [0u64, 1, 0xffff_ffff, 1 << 32, u64::MAX, 0xdead_beef_cafe_f00d];
        let idx: Vec<i64> = (0..4000).map(|i| i * 7919 % 200_000).collect();
        for seed in seeds {
            let index = Tensor::from_slice(&idx);
            let lo = Tensor::full([idx.len() as i64], (seed & 0xffff_ffff) as i64, (Kind::Int64, Device::Cpu));
            let hi = Tensor::full([idx.len() as i64], (seed >> 32) as i64, (Kind::Int64, Device::Cpu));
            let got: Vec<f32> = Vec::<f32>::try_from(&erase_noise(&index, &lo, &hi)).unwrap();
            for (&i, g) in idx.iter().zip(got) {
                let want = ferroclip_data::erase::noise(seed, i as u32);
                assert!((ordered(g) - ordered(want)).abs() <= 1, "seed {seed:#x}, index {i}: {g} vs {want}");
            }
        }
    }
}
