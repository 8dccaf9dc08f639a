//! `trainer check-numerics`: the numerics of the GPU path against their references, on the device
//! a GPU run uses (the CPU in a rehearsal), as the first GPU run of `scripts/gpu-check` needs them:
//!
//! 1. **activation checkpointing under bf16 autocast**: the parameter gradients of one contrastive
//!    backward with `train.grad_checkpointing` against those without it (same seed, same batch), for
//!    each architecture given (the tiny `tests/models/{convnext_test,vit_test}.json`). On the CPU
//!    (fp32) they are bit-identical (`tests/grad_checkpointing.rs`); under autocast the recomputed
//!    forward runs the same bf16 kernels, so they must agree to rounding: the relative L2 distance of
//!    all gradients together at most [`GRAD_TOLERANCE`], and no block weight with an all-zero
//!    gradient (a recomputation that dropped its graph would leave those at zero);
//! 2. **normalization + random erasing on the device**: a batch with erase boxes (corners, the
//!    whole image, one pixel, none) through both device paths, the synchronous
//!    [`input::images_to_device`] and the training loop's [`input::DeviceInput`] (pinned buffers, the
//!    side copy stream on CUDA), against the data crate's CPU reference
//!    [`ferroclip_data::normalize::normalize_and_erase`]: the largest absolute difference at most
//!    [`NORMALIZE_TOLERANCE`].
//!
//! Prints one JSON line per check (`{"kind":"numerics",...,"pass":bool}`); fails when any check does.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use tch::{nn::VarStore, Device, Kind, Tensor};

use ferroclip_data::{Batch, EraseBox, PooledBuf};

use crate::input;
use crate::model::{Clip, ClipConfig, ContrastiveModel};
use crate::precision::Precision;

/// Largest relative L2 distance between the gradients with and without checkpointing.
pub const GRAD_TOLERANCE: f64 = 2e-2;
/// Largest absolute difference between the device's normalized, erased pixels and the CPU reference.
pub const NORMALIZE_TOLERANCE: f64 = 1e-6;

/// What `trainer check-numerics` runs.
pub struct CheckNumerics {
    /// Model-config files (or names) whose gradients are compared.
    pub archs: Vec<PathBuf>,
    pub device: Device,
    pub precision: Precision,
}

/// Runs every check, prints its line, and fails naming those that did not pass.
pub fn run(c: &CheckNumerics) -> Result<()> {
    if c.device.is_cuda() {
        // As training and both sides of the benchmark run.
        crate::cuda::enable_tf32_and_cudnn_benchmark();
    }
    let mut failed = Vec::new();
    for arch in &c.archs {
        let r = checkpointing_gradients(arch, c.device, c.precision)?;
        println!("{}", r.json);
        if !r.pass {
            failed.push(format!("gradients with checkpointing ({})", arch.display()));
        }
    }
    let r = device_normalization(c.device)?;
    println!("{}", r.json);
    if !r.pass {
        failed.push("normalization + erasing on the device".to_string());
    }
    if !failed.is_empty() {
        bail!("check-numerics: {} failed", failed.join(", "));
    }
    Ok(())
}

struct Outcome {
    json: serde_json::Value,
    pass: bool,
}

/// Every parameter gradient, sorted by name, after one backward of the contrastive loss at 32 px.
fn gradients(arch: &str, checkpointing: bool, device: Device, precision: Precision) -> Result<Vec<(String, Tensor)>> {
    tch::manual_seed(7);
    let vs = VarStore::new(device);
    let cfg = ClipConfig::resolve(arch)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("--arch {arch}"))?
        .with_image_size(32)
        .with_grad_checkpointing(checkpointing);
    let model = Clip::new(&vs.root(), &cfg);
    let images = Tensor::randn([8, 3, 32, 32], (Kind::Float, device)); // [b, 3, s, s]
    let tokens = Tensor::randint_low(1, 400, [8, cfg.context_length()], (Kind::Int64, device)); // [b, ctx]
                                                                                                // Stochastic depth and dropout masks come from here: the recomputation must replay them.
    tch::manual_seed(11);
    let loss = {
        let _autocast = precision.autocast(device);
        let fi = model.encode_image(&images, true); // [b, d]
        let ft = model.encode_text(&tokens, true); // [b, d]
        let logits = fi.matmul(&ft.tr()) * model.logit_scale().exp(); // [b, b]
        logits.log_softmax(-1, Kind::Float).diagonal(0, 0, 1).mean(Kind::Float).neg()
    };
    loss.backward();
    let mut out: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, v)| (n, v.grad())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

fn checkpointing_gradients(arch: &std::path::Path, device: Device, precision: Precision) -> Result<Outcome> {
    let name = arch.to_string_lossy();
    let plain = gradients(&name, false, device, precision)?;
    let ckpt = gradients(&name, true, device, precision)?;
    let (mut diff2, mut norm2) = (0f64, 0f64);
    let mut zero_block_weights = Vec::new();
    let mut missing = Vec::new();
    for ((n, a), (_, b)) in plain.iter().zip(&ckpt) {
        if !a.defined() || !b.defined() {
            missing.push(n.clone());
            continue;
        }
        let (a, b) = (a.to_kind(Kind::Double), b.to_kind(Kind::Double));
        diff2 += (&a - &b).square().sum(Kind::Double).double_value(&[]);
        norm2 += a.square().sum(Kind::Double).double_value(&[]);
        let in_block = n.contains(".blocks.") || n.contains(".resblocks.");
        if in_block && n.ends_with("weight") && b.abs().max().double_value(&[]) == 0.0 {
            zero_block_weights.push(n.clone());
        }
    }
    let relative = diff2.sqrt() / norm2.sqrt().max(f64::MIN_POSITIVE);
    let pass = relative <= GRAD_TOLERANCE && zero_block_weights.is_empty() && missing.is_empty() && norm2 > 0.0;
    let json = serde_json::json!({
        "kind": "numerics", "check": "grad_checkpointing", "arch": name, "device": format!("{device:?}"),
        "precision": precision, "parameters": plain.len(), "relative_l2_difference": relative,
        "tolerance": GRAD_TOLERANCE, "zero_block_weight_gradients": zero_block_weights,
        "without_gradient": missing, "pass": pass,
    });
    Ok(Outcome { json, pass })
}

/// `(size, pixels, boxes)`: six 24 px images of pseudo-random pixels with erase boxes at the corners,
/// over the whole image, of one pixel and none (also the fixture of `input`'s unit test).
pub fn erase_batch() -> (usize, Vec<u8>, Vec<Option<EraseBox>>) {
    let (n, s) = (6usize, 24usize);
    let mut state = 0x9e37_79b9_u32;
    let images: Vec<u8> = (0..n * 3 * s * s)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            (state >> 24) as u8
        })
        .collect();
    let b = |top, left, height, width, noise_seed| Some(EraseBox { top, left, height, width, noise_seed });
    let erase = vec![
        b(0, 0, 5, 7, 1),
        None,
        b(0, 0, 24, 24, u64::MAX),
        b(23, 23, 1, 1, 0x1234_5678_9abc_def0),
        b(10, 3, 14, 21, 0xffff_ffff),
        b(4, 17, 20, 7, 1 << 40),
    ];
    (s, images, erase)
}

fn device_normalization(device: Device) -> Result<Outcome> {
    let (s, images, erase) = erase_batch();
    let mut want = vec![0f32; images.len()];
    ferroclip_data::normalize::normalize_and_erase(&images, &erase, &mut want);
    let want = Tensor::from_slice(&want);
    let max_diff = |t: &Tensor| (t.to_device(Device::Cpu).view([-1]) - &want).abs().max().double_value(&[]);

    let sync_path = max_diff(&input::images_to_device(&images, &erase, s, device));
    // The training loop's path: the loader's buffers (pinned on CUDA) through DeviceInput.
    let pixels = match input::host_alloc(device) {
        Some(alloc) => PooledBuf::from_bytes_in(alloc.as_ref(), &images)?,
        None => PooledBuf::from_bytes(&images),
    };
    let n = erase.len();
    let batch = Batch {
        len: n,
        image_size: s,
        context_length: 2,
        images: pixels,
        erase: erase.clone(),
        tokens: PooledBuf::from_i64(&(0..2 * n as i64).collect::<Vec<_>>()),
        ..Default::default()
    };
    let mut upload = input::DeviceInput::new(device)?;
    let (got, tokens) = upload.upload(batch)?;
    let training_path = max_diff(&got);
    let tokens_ok =
        Vec::<i64>::try_from(&tokens.to_device(Device::Cpu).view([-1]))? == (0..2 * n as i64).collect::<Vec<_>>();
    let erased: usize = erase.iter().flatten().map(|b| 3 * (b.height * b.width) as usize).sum();
    let pass = sync_path <= NORMALIZE_TOLERANCE && training_path <= NORMALIZE_TOLERANCE && tokens_ok;
    let json = serde_json::json!({
        "kind": "numerics", "check": "normalize_erase", "device": format!("{device:?}"),
        "images": n, "image_size": s, "erased_values": erased,
        "max_abs_difference_images_to_device": sync_path, "max_abs_difference_device_input": training_path,
        "tokens_equal": tokens_ok, "tolerance": NORMALIZE_TOLERANCE, "pass": pass,
    });
    Ok(Outcome { json, pass })
}
