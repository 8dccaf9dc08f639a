//! Freezing ("locking") a tower for fine-tunes, as OpenCLIP's `--lock-image`/`--lock-text`:
//! parameters are split into layer groups in forward order and all but the last N are frozen.
//!
//! Groups follow OpenCLIP: text tower and ViT (`transformer.py` `lock_text_tower`,
//! `VisionTransformer.lock`): `[embeddings]`, each block but the last, `[last block + final LN]`,
//! `[projection]`. timm trunks (`timm_model.py` `TimmModel.lock`): only `visual.trunk.*` is frozen,
//! in the groups of timm's `group_parameters(trunk, trunk.group_matcher())`: for a ConvNeXt the
//! stem, then every block (a stage's downsample layer joins its first block), then the head norm;
//! the projection head stays trainable. Hugging Face text towers (`HFTextEncoder.lock`):
//! `[embeddings]`, then each encoder layer; with `lock_text_freeze_layer_norm = false` (OpenCLIP's
//! default) the LayerNorms of the frozen layers stay trainable.

use tch::{nn::VarStore, Tensor};

use crate::model::{ClipConfig, TextTower, VisionConfig};

/// The parameters the optimizer updates, sorted by name: the frozen ones (`spec`) are set to
/// `requires_grad(false)` and left out. The one place that decides what trains.
pub fn trainable_parameters(vs: &VarStore, spec: &LockSpec, arch: &ClipConfig) -> Vec<(String, Tensor)> {
    let depths = TowerDepths::of(arch);
    let mut out: Vec<(String, Tensor)> = Vec::new();
    for (name, t) in vs.variables() {
        if is_trainable(&name, spec, &depths) {
            out.push((name, t));
        } else {
            let _ = t.set_requires_grad(false);
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Whether `spec` can be applied to `arch` as OpenCLIP applies it: its built-in text tower treats
/// LayerNorm like the other weights and refuses to leave it trainable (`lock_text_tower`: "Unfreezing
/// LayerNorm is not supported").
pub fn check(spec: &LockSpec, arch: &ClipConfig) -> Result<(), String> {
    if spec.lock_text && !spec.text_freeze_layer_norm && matches!(arch.text, TextTower::Clip(_)) {
        return Err(format!(
            "key `train.lock_text_freeze_layer_norm`: {}'s text tower freezes its LayerNorms with the other \
             weights (as OpenCLIP, which refuses otherwise): set it to true with lock_text",
            arch.arch
        ));
    }
    Ok(())
}

/// Which tower and layer group a parameter belongs to, with the tower's group count.
fn group_of(name: &str, d: &TowerDepths) -> Option<(Tower, usize, usize)> {
    let index = |rest: &str| rest.split('.').next().and_then(|s| s.parse::<usize>().ok());
    if let Some(rest) = name.strip_prefix("visual.trunk.") {
        let blocks: usize = d.trunk_depths.iter().sum();
        let groups = blocks + 2;
        if rest.starts_with("stem") {
            return Some((Tower::Image, 0, groups));
        }
        if let Some(after) = rest.strip_prefix("stages.") {
            let stage = index(after)?;
            let first_block = 1 + d.trunk_depths[..stage.min(d.trunk_depths.len())].iter().sum::<usize>();
            let in_stage = after.split_once('.').map(|(_, r)| r).unwrap_or("");
            if let Some(b) = in_stage.strip_prefix("blocks.").and_then(index) {
                return Some((Tower::Image, first_block + b, groups));
            }
            // `stages.S.downsample`: timm's matcher gives it the ordinal of block 0 of its stage.
            return Some((Tower::Image, first_block, groups));
        }
        // The head norm and anything after the stages: timm's unmatched, last group.
        return Some((Tower::Image, groups - 1, groups));
    }
    if name.starts_with("visual.head.") {
        return None;
    }
    if let Some(rest) = name.strip_prefix("visual.") {
        return Some((
            Tower::Image,
            transformer_group(rest, "transformer.resblocks.", &["ln_post"], &["proj"], d.vit_layers)?,
            d.vit_layers + 2,
        ));
    }
    if name == "logit_scale" || name == "logit_bias" {
        return None;
    }
    // Hugging Face text encoder (OpenCLIP `HFTextEncoder.lock`): groups are the embeddings, then
    // each encoder layer; the projection `text.proj` always stays trainable.
    if let Some(rest) = name.strip_prefix("text.transformer.") {
        let group = match rest.strip_prefix("encoder.layer.") {
            Some(b) => index(b)? + 1,
            None => 0,
        };
        return Some((Tower::Text, group, d.text_layers + 1));
    }
    if name.starts_with("text.proj.") {
        return None;
    }
    let rest = name.strip_prefix("text.").unwrap_or(name);
    Some((
        Tower::Text,
        transformer_group(rest, "transformer.resblocks.", &["ln_final"], &["text_projection"], d.text_layers)?,
        d.text_layers + 2,
    ))
}

/// OpenCLIP's grouping of a pre-LN transformer tower with `layers` blocks.
fn transformer_group(rest: &str, blocks: &str, final_ln: &[&str], proj: &[&str], layers: usize) -> Option<usize> {
    if let Some(b) = rest.strip_prefix(blocks) {
        let i: usize = b.split('.').next()?.parse().ok()?;
        // group 0 = embeddings; block i → i + 1, the last block shares its group with the final LN.
        return Some(i + 1);
    }
    if final_ln.iter().any(|p| rest.starts_with(p)) {
        return Some(layers);
    }
    if proj.iter().any(|p| rest == *p || rest.starts_with(&format!("{p}."))) {
        return Some(layers + 1);
    }
    Some(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tower {
    Image,
    Text,
}

/// What to freeze.
#[derive(Debug, Clone, Copy, Default)]
pub struct LockSpec {
    pub lock_image: bool,
    pub image_unlocked_groups: usize,
    pub lock_text: bool,
    pub text_unlocked_layers: usize,
    /// Hugging Face text towers: freeze the LayerNorms of the frozen layers too.
    pub text_freeze_layer_norm: bool,
}

/// Tower depths needed to number the groups.
#[derive(Debug, Clone, Default)]
pub struct TowerDepths {
    pub text_layers: usize,
    pub vit_layers: usize,
    /// Blocks per stage of a timm ConvNeXt trunk (empty for a ViT).
    pub trunk_depths: Vec<usize>,
}

impl TowerDepths {
    pub fn of(arch: &ClipConfig) -> TowerDepths {
        TowerDepths {
            text_layers: arch.text_layers() as usize,
            vit_layers: match &arch.vision {
                VisionConfig::Vit(v) => v.layers as usize,
                VisionConfig::ConvNext(_) => 0,
            },
            trunk_depths: match &arch.vision {
                VisionConfig::ConvNext(c) => c.depths.iter().map(|&d| d as usize).collect(),
                VisionConfig::Vit(_) => Vec::new(),
            },
        }
    }
}

/// Whether parameter `name` stays trainable under `spec`.
pub fn is_trainable(name: &str, spec: &LockSpec, depths: &TowerDepths) -> bool {
    let Some((tower, group, groups)) = group_of(name, depths) else {
        return true;
    };
    let (locked, unlocked) = match tower {
        Tower::Image => (spec.lock_image, spec.image_unlocked_groups),
        Tower::Text => (spec.lock_text, spec.text_unlocked_layers),
    };
    if !locked || group + unlocked >= groups {
        return true;
    }
    // HFTextEncoder.lock: `requires_grad = not freeze_layer_norm` for "LayerNorm" modules.
    let hf_layer_norm = name.starts_with("text.transformer.") && name.split('.').any(|part| part == "LayerNorm");
    hf_layer_norm && !spec.text_freeze_layer_norm
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d() -> TowerDepths {
        TowerDepths { text_layers: 3, vit_layers: 2, trunk_depths: vec![1, 1, 2, 1] }
    }

    #[test]
    fn lock_text_freezes_all_text_but_the_last_groups() {
        let spec = LockSpec { lock_text: true, text_unlocked_layers: 0, ..Default::default() };
        for n in [
            "token_embedding.weight",
            "positional_embedding",
            "transformer.resblocks.2.mlp.c_fc.weight",
            "ln_final.weight",
            "text_projection",
        ] {
            assert!(!is_trainable(n, &spec, &d()), "{n}");
        }
        assert!(is_trainable("logit_scale", &spec, &d()));
        assert!(is_trainable("visual.trunk.stem.0.weight", &spec, &d()));
        let spec = LockSpec { lock_text: true, text_unlocked_layers: 2, ..Default::default() };
        assert!(is_trainable("text_projection", &spec, &d()));
        assert!(is_trainable("ln_final.bias", &spec, &d()));
        assert!(is_trainable("transformer.resblocks.2.attn.in_proj_weight", &spec, &d()));
        assert!(!is_trainable("transformer.resblocks.1.attn.in_proj_weight", &spec, &d()));
        assert!(!is_trainable("token_embedding.weight", &spec, &d()));
    }

    #[test]
    fn lock_image_on_a_timm_trunk_keeps_the_head_trainable() {
        let spec = LockSpec { lock_image: true, ..Default::default() };
        assert!(!is_trainable("visual.trunk.stages.3.blocks.0.conv_dw.weight", &spec, &d()));
        assert!(!is_trainable("visual.trunk.head.norm.weight", &spec, &d()));
        assert!(is_trainable("visual.head.proj.weight", &spec, &d()));
        // timm's groups for depths (1, 1, 2, 1): stem, five blocks, head norm; the downsample of a
        // stage goes with its first block.
        let spec = LockSpec { lock_image: true, image_unlocked_groups: 1, ..Default::default() };
        assert!(is_trainable("visual.trunk.head.norm.weight", &spec, &d()));
        assert!(!is_trainable("visual.trunk.stages.3.blocks.0.conv_dw.weight", &spec, &d()));
        let spec = LockSpec { lock_image: true, image_unlocked_groups: 3, ..Default::default() };
        assert!(is_trainable("visual.trunk.stages.3.blocks.0.conv_dw.weight", &spec, &d()));
        assert!(is_trainable("visual.trunk.stages.3.downsample.1.weight", &spec, &d()));
        assert!(is_trainable("visual.trunk.stages.2.blocks.1.conv_dw.weight", &spec, &d()));
        assert!(!is_trainable("visual.trunk.stages.2.blocks.0.conv_dw.weight", &spec, &d()));
        assert!(!is_trainable("visual.trunk.stages.2.downsample.1.weight", &spec, &d()));
    }

    #[test]
    fn lock_text_on_a_hugging_face_encoder_keeps_the_last_layers_and_the_projection() {
        let spec = LockSpec { lock_text: true, text_unlocked_layers: 1, ..Default::default() };
        assert!(!is_trainable("text.transformer.embeddings.word_embeddings.weight", &spec, &d()));
        assert!(!is_trainable("text.transformer.encoder.layer.1.output.dense.weight", &spec, &d()));
        assert!(is_trainable("text.transformer.encoder.layer.2.output.dense.weight", &spec, &d()));
        assert!(is_trainable("text.proj.0.weight", &spec, &d()));
        let spec = LockSpec { lock_text: true, text_unlocked_layers: 0, ..Default::default() };
        assert!(!is_trainable("text.transformer.encoder.layer.2.output.dense.weight", &spec, &d()));
        assert!(is_trainable("text.proj.2.weight", &spec, &d()));
        // OpenCLIP's default `--lock-text-freeze-layer-norm` unset: frozen layers keep their LayerNorms trainable.
        assert!(is_trainable("text.transformer.encoder.layer.0.output.LayerNorm.weight", &spec, &d()));
        assert!(is_trainable("text.transformer.embeddings.LayerNorm.bias", &spec, &d()));
        let spec = LockSpec { text_freeze_layer_norm: true, ..spec };
        assert!(!is_trainable("text.transformer.encoder.layer.0.output.LayerNorm.weight", &spec, &d()));
    }

    #[test]
    fn lock_image_on_a_vit_uses_openclip_groups() {
        let spec = LockSpec { lock_image: true, image_unlocked_groups: 1, ..Default::default() };
        assert!(is_trainable("visual.proj", &spec, &d()));
        assert!(!is_trainable("visual.ln_post.weight", &spec, &d()));
        assert!(!is_trainable("visual.conv1.weight", &spec, &d()));
        let spec = LockSpec { lock_image: true, image_unlocked_groups: 2, ..Default::default() };
        assert!(is_trainable("visual.ln_post.weight", &spec, &d()));
        assert!(is_trainable("visual.transformer.resblocks.1.ln_1.weight", &spec, &d()));
        assert!(!is_trainable("visual.transformer.resblocks.0.ln_1.weight", &spec, &d()));
    }

    #[test]
    fn trainable_parameters_leaves_out_and_freezes_the_locked_ones() {
        let arch =
            ClipConfig::resolve(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/models/convnext_test.json")).unwrap();
        let vs = VarStore::new(tch::Device::Cpu);
        let _model = crate::model::Clip::new(&vs.root(), &arch);
        let spec = LockSpec { lock_image: true, ..Default::default() };
        let trainable = trainable_parameters(&vs, &spec, &arch);
        let names: Vec<&str> = trainable.iter().map(|(n, _)| n.as_str()).collect();
        assert!(names.windows(2).all(|w| w[0] < w[1]), "sorted by name");
        assert!(names.iter().any(|n| n.starts_with("visual.head.")), "{names:?}");
        assert!(names.contains(&"logit_scale"), "{names:?}");
        for (name, t) in vs.variables() {
            let locked = name.starts_with("visual.trunk.");
            assert_eq!(names.contains(&name.as_str()), !locked, "{name}");
            assert_eq!(t.requires_grad(), !locked, "{name}");
        }
    }
}
