//! Activation checkpointing (`train.grad_checkpointing`): the gradients are those without it, with
//! stochastic depth on (the recomputation replays the forward's masks), and the forward keeps far
//! less memory for backward. One test in a binary of its own: the comparison needs torch's global
//! RNG, and the memory measurement the process's resident memory, to themselves.

use ferroclip::model::{Clip, ClipConfig, ContrastiveModel};
use tch::{nn, Device, Kind, Tensor};

/// Every parameter gradient, by name, after one backward of a contrastive loss of the test
/// architecture `arch` (`tests/models/{arch}.json`) at 32 px;
/// `mask_seed` seeds the stochastic-depth masks.
fn grads(arch: &str, checkpointing: bool, drop_path: f64, mask_seed: i64) -> Vec<(String, Tensor)> {
    tch::manual_seed(7);
    let vs = nn::VarStore::new(Device::Cpu);
    let path = format!("{}/../tests/models/{arch}.json", env!("CARGO_MANIFEST_DIR"));
    let cfg = ClipConfig::resolve(&path)
        .unwrap()
        .with_image_size(32)
        .with_drop_path(drop_path)
        .with_grad_checkpointing(checkpointing);
    let model = Clip::new(&vs.root(), &cfg);
    let images = Tensor::randn([4, 3, 32, 32], (Kind::Float, Device::Cpu));
    let tokens = Tensor::randint_low(1, 400, [4, cfg.context_length()], (Kind::Int64, Device::Cpu));
    tch::manual_seed(mask_seed);
    let fi = model.encode_image(&images, true);
    let ft = model.encode_text(&tokens, true);
    let logits = fi.matmul(&ft.tr()) * model.logit_scale().exp();
    logits.log_softmax(-1, Kind::Float).diagonal(0, 0, 1).mean(Kind::Float).neg().backward();
    let mut out: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, v)| (n, v.grad())).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn differing(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> Vec<String> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .filter(|((na, ga), (nb, gb))| {
            assert_eq!(na, nb);
            assert!(ga.defined() && gb.defined(), "`{na}` has no gradient");
            !ga.equal(gb)
        })
        .map(|((n, _), _)| n.clone())
        .collect()
}

#[test]
fn same_gradients_and_far_less_memory_kept_for_backward_with_checkpointing() {
    // ConvNeXt with stochastic depth 0.5 over its 5 blocks, and the CLIP text transformer.
    let plain = grads("convnext_test", false, 0.5, 11);
    let nonzero = plain.iter().filter(|(_, g)| g.abs().sum(Kind::Float).double_value(&[]) > 0.0).count();
    assert!(nonzero > plain.len() / 2, "most gradients are zero: the comparison proves nothing");
    assert_eq!(differing(&plain, &grads("convnext_test", true, 0.5, 11)), Vec::<String>::new());
    // The masks matter: other masks give other image-tower gradients, so an unreplayed RNG would show.
    let other = differing(&plain, &grads("convnext_test", false, 0.5, 12));
    assert!(other.iter().any(|n| n.starts_with("visual.trunk.stages")), "{other:?}");

    // The ViT image tower and its text tower.
    assert_eq!(differing(&grads("vit_test", false, 0.0, 11), &grads("vit_test", true, 0.0, 11)), Vec::<String>::new());

    // Memory kept for backward: bytes allocated (glibc's mallinfo2: in use, whether or not freed
    // pages stay resident) after the forward, graph alive, minus before it, for convnext_base_w at
    // 64 px (36 ConvNeXt blocks, 12 text blocks of width 640): roughly 60 MB of fp32 activations
    // per sample without checkpointing, only the block inputs with it.
    let ckpt = forward_keeps_mb(true);
    let plain = forward_keeps_mb(false);
    eprintln!("kept after the forward (batch 4): {plain:.0} MiB without, {ckpt:.0} MiB with grad checkpointing");
    assert!(plain > 100.0 && ckpt < plain / 3.0, "kept {ckpt:.0} MiB with checkpointing vs {plain:.0} MiB without");
}

/// MiB currently allocated through malloc (heap and mmapped chunks), which libtorch's CPU
/// allocator uses.
fn allocated_mb() -> f64 {
    // SAFETY: mallinfo2 only reads the allocator's counters.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as f64 / (1024.0 * 1024.0)
}

/// MiB allocated by a forward of both towers whose graph is still held.
fn forward_keeps_mb(checkpointing: bool) -> f64 {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let cfg =
        ClipConfig::resolve("convnext_base_w").unwrap().with_image_size(64).with_grad_checkpointing(checkpointing);
    let model = Clip::new(&vs.root(), &cfg);
    let images = Tensor::randn([4, 3, 64, 64], (Kind::Float, Device::Cpu));
    let tokens = Tensor::randint_low(1, 400, [4, cfg.context_length()], (Kind::Int64, Device::Cpu));
    let before = allocated_mb();
    let features = (model.encode_image(&images, true), model.encode_text(&tokens, true));
    let kept = allocated_mb() - before;
    drop(features);
    kept
}
