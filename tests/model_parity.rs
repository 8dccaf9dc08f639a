//! Parity of the Rust CLIP models with OpenCLIP: same state dict in, same features out
//! (max abs diff <= 1e-4, fp32, CPU), same parameter counts, and weights saved by Rust load
//! in `open_clip.create_model(ARCH, pretrained=PATH)`.
//!
//! Small archs use committed fixtures (`tests/fixtures/models/`, made by
//! `scripts/gen-model-fixtures.py --vocab-size 512 --half-weights`); full-size archs and the
//! round trips call that script with `$REPO/.venv/bin/python`, which must exist.
//! The XLM-RoBERTa text tower (`xlm-roberta-base-ViT-B-32`) uses `scripts/gen-xlmr-fixtures.py`
//! the same way (`tests/fixtures/models/xlmr_vit_test`: `--vocab-size 512 --half-weights`).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;

use ferroclip::model::{
    load_hf_text_encoder, load_state_dict, num_params, save_safetensors, Clip, ClipConfig, ContrastiveModel,
    WeightsError,
};
use tch::nn::VarStore;
use tch::{Device, Kind, Tensor};

const TOL: f64 = 1e-4;
const REL_TOL: f64 = 5e-6;
/// Vocabulary of the committed small fixtures (keeps them small; presets use 49408).
const FIXTURE_VOCAB: i64 = 512;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

fn python() -> PathBuf {
    let py = repo().join(".venv/bin/python");
    assert!(
        py.exists(),
        "{} is missing: the model parity tests need the repository's Python venv with torch, open_clip and timm",
        py.display()
    );
    py
}

fn script(args: &[&str]) -> std::process::Output {
    run_script("gen-model-fixtures.py", args)
}

fn run_script(name: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(python())
        .arg(repo().join("scripts").join(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ferroclip-parity-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn read(path: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).into_iter().collect()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size());
    (a - b).abs().max().double_value(&[])
}

/// A test architecture, as `model.arch` and the fixture generators take it: the path of
/// `tests/models/{name}.json`.
fn test_arch(name: &str) -> String {
    repo().join("tests/models").join(format!("{name}.json")).display().to_string()
}

/// `arch` (a built-in name or a model-config path) at `image_size`, with the text vocabulary `vocab`.
fn config(arch: &str, image_size: i64, vocab: i64) -> ClipConfig {
    let mut cfg = ClipConfig::resolve(arch).unwrap().with_image_size(image_size);
    cfg.text.set_vocab_size(vocab);
    cfg
}

fn build(cfg: &ClipConfig) -> (VarStore, Clip) {
    let vs = VarStore::new(Device::Cpu);
    let model = Clip::new(&vs.root(), cfg);
    (vs, model)
}

/// Loads `dir/model.safetensors`, runs the inputs of `dir/expected.safetensors` and compares
/// every output with OpenCLIP's.
fn check_fixture(dir: &Path, cfg: &ClipConfig) {
    let (mut vs, model) = build(cfg);
    let report = load_state_dict(&mut vs, &dir.join("model.safetensors"), cfg).unwrap();
    assert_eq!(report.loaded, vs.variables().len());
    let exp = read(&dir.join("expected.safetensors"));
    assert_eq!(num_params(&vs), exp["num_params"].int64_value(&[]), "{} parameter count", cfg.arch);
    let (img, txt) =
        tch::no_grad(|| (model.encode_image(&exp["images"], false), model.encode_text(&exp["tokens"], false)));
    let img_n = &img / img.norm_scalaropt_dim(2, [-1], true);
    let txt_n = &txt / txt.norm_scalaropt_dim(2, [-1], true);
    let logits = model.logit_scale().exp() * img_n.matmul(&txt_n.tr());
    for (name, ours) in [
        ("image_features", &img),
        ("text_features", &txt),
        ("image_features_normalized", &img_n),
        ("text_features_normalized", &txt_n),
        ("logits_per_image", &logits),
    ] {
        let d = max_diff(ours, &exp[name]);
        // Logits are scaled by exp(logit_scale) = 1/0.07; compare them relative to that scale.
        let tol = if name == "logits_per_image" { TOL * 100.0 } else { TOL };
        // Relative to the output's scale too, so small outputs cannot hide a wrong op
        // (e.g. tanh-approximated GELU) under the absolute bound.
        let scale = exp[name].abs().max().double_value(&[]);
        eprintln!("{}: {name} max |diff| {d:e} (max |expected| {scale:e})", cfg.arch);
        assert!(d <= tol, "{}: {name} max |diff| {d:e} > {tol:e}", cfg.arch);
        assert!(d <= REL_TOL * scale, "{}: {name} max |diff| {d:e} > {REL_TOL:e} x {scale:e}", cfg.arch);
    }
}

fn fixture(arch: &str) -> PathBuf {
    repo().join("tests/fixtures/models").join(arch)
}

#[test]
fn convnext_test_matches_open_clip() {
    check_fixture(&fixture("convnext_test"), &config(&test_arch("convnext_test"), 64, FIXTURE_VOCAB));
}

#[test]
fn convnext_mlp_head_matches_open_clip() {
    check_fixture(&fixture("convnext_test_mlp"), &config(&test_arch("convnext_test_mlp"), 64, FIXTURE_VOCAB));
}

#[test]
fn vit_test_matches_open_clip() {
    check_fixture(&fixture("vit_test"), &config(&test_arch("vit_test"), 32, FIXTURE_VOCAB));
}

#[test]
fn load_reports_missing_unexpected_and_misshaped_keys() {
    let cfg = config(&test_arch("convnext_test_mlp"), 64, FIXTURE_VOCAB);
    let (mut vs, _model) = build(&cfg);
    let err = load_state_dict(&mut vs, &fixture("convnext_test").join("model.safetensors"), &cfg).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("visual.head.mlp.fc1.weight"), "{msg}");
    assert!(msg.contains("visual.head.proj.weight"), "{msg}");
    let cfg = config(&test_arch("convnext_test"), 64, 1000);
    let (mut vs, _model) = build(&cfg);
    let msg =
        load_state_dict(&mut vs, &fixture("convnext_test").join("model.safetensors"), &cfg).unwrap_err().to_string();
    assert!(msg.contains("token_embedding.weight: [512, 32] vs [1000, 32]"), "{msg}");
}

/// One model-config file, both sides: OpenCLIP registers the file itself
/// (`open_clip.add_model_config`) and builds it with no override; ferroclip resolves the same path.
/// Same parameter names and counts, same features. A ConvNeXt (timm trunk name, mlp head) and a
/// ViT (`head_width`, `patch_size`).
#[test]
fn model_config_file_builds_the_same_model_in_open_clip() {
    for name in ["convnext_test_mlp", "vit_test"] {
        let arch = test_arch(name);
        let dir = temp_dir(&format!("json-{name}"));
        script(&["--arch", &arch, "--out", dir.to_str().unwrap()]);
        let cfg = ClipConfig::resolve(&arch).unwrap();
        assert_eq!(cfg.arch, name);
        check_fixture(&dir, &cfg);
        std::fs::remove_dir_all(&dir).ok();
    }
}

/// A freshly initialised Rust model, saved, loads in OpenCLIP and gives the same features.
fn round_trip(arch: &str, image_size: i64, vocab: i64) {
    round_trip_with("gen-model-fixtures.py", arch, image_size, vocab)
}

fn round_trip_with(script_name: &str, arch: &str, image_size: i64, vocab: i64) {
    let cfg = config(arch, image_size, vocab);
    let dir = temp_dir(&format!("roundtrip-{}", cfg.arch));
    tch::manual_seed(7);
    let (vs, model) = build(&cfg);
    let images = Tensor::randn([2, 3, image_size, image_size], (Kind::Float, Device::Cpu));
    let tokens = Tensor::randint_low(1, vocab - 2, [2, 77], (Kind::Int64, Device::Cpu));
    let _ = tokens.narrow(1, 10, 1).fill_(vocab - 1);
    if cfg.text.pad_token_id() != 0 {
        // XLM-R: pad the first row after its 11 tokens.
        let _ = tokens.get(0).narrow(0, 11, 66).fill_(cfg.text.pad_token_id());
    }
    let (img, txt) = tch::no_grad(|| (model.encode_image(&images, false), model.encode_text(&tokens, false)));
    let weights = dir.join("rust.safetensors");
    let meta = BTreeMap::from([("arch".to_string(), cfg.arch.clone())]);
    save_safetensors(&vs, &weights, &meta).unwrap();
    let inputs = dir.join("inputs.safetensors");
    Tensor::write_safetensors(
        &[("images", &images), ("tokens", &tokens), ("image_features", &img), ("text_features", &txt)],
        &inputs,
    )
    .unwrap();
    let size = image_size.to_string();
    let vocab = vocab.to_string();
    let mut args = vec!["--arch", arch];
    if script_name == "gen-model-fixtures.py" {
        args.extend(["--image-size", &size]);
    }
    let (w, i) = (weights.to_str().unwrap(), inputs.to_str().unwrap());
    args.extend(["--check-load", w, "--inputs", i]);
    if vocab != "49408" && vocab != "250002" {
        args.extend(["--vocab-size", &vocab]);
    }
    run_script(script_name, &args);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn convnext_saved_by_rust_loads_in_open_clip() {
    round_trip(&test_arch("convnext_test_mlp"), 64, FIXTURE_VOCAB);
}

#[test]
fn vit_saved_by_rust_loads_in_open_clip() {
    round_trip(&test_arch("vit_test"), 32, FIXTURE_VOCAB);
}

/// A ViT checkpoint trained at 32 px loads into a 48 px model with the positional grid resized
/// exactly as OpenCLIP resizes it when it loads the same checkpoint at 48 px.
#[test]
fn vit_pos_embed_resized_like_open_clip() {
    let dir = temp_dir("resize");
    // fp32 copy of the fixture (the fixture stores fp16).
    let cfg32 = config(&test_arch("vit_test"), 32, FIXTURE_VOCAB);
    let (mut vs32, _m) = build(&cfg32);
    load_state_dict(&mut vs32, &fixture("vit_test").join("model.safetensors"), &cfg32).unwrap();
    let weights = dir.join("vit32.safetensors");
    save_safetensors(&vs32, &weights, &BTreeMap::new()).unwrap();

    let cfg48 = config(&test_arch("vit_test"), 48, FIXTURE_VOCAB);
    let (mut vs48, model) = build(&cfg48);
    let report = load_state_dict(&mut vs48, &weights, &cfg48).unwrap();
    assert_eq!(report.resized, vec!["visual.positional_embedding".to_string()]);
    let images = Tensor::randn([2, 3, 48, 48], (Kind::Float, Device::Cpu));
    let tokens = read(&fixture("vit_test").join("expected.safetensors"))["tokens"].shallow_clone();
    let (img, txt) = tch::no_grad(|| (model.encode_image(&images, false), model.encode_text(&tokens, false)));
    let inputs = dir.join("inputs.safetensors");
    Tensor::write_safetensors(
        &[("images", &images), ("tokens", &tokens), ("image_features", &img), ("text_features", &txt)],
        &inputs,
    )
    .unwrap();
    script(&[
        "--arch",
        &test_arch("vit_test"),
        "--image-size",
        "48",
        "--vocab-size",
        "512",
        "--check-load",
        weights.to_str().unwrap(),
        "--inputs",
        inputs.to_str().unwrap(),
    ]);
    std::fs::remove_dir_all(&dir).ok();
}

/// Full-size archs: fixtures generated on the fly (too large to commit).
fn full_size(arch: &str, image_size: i64, expected_params: f64) {
    let dir = temp_dir(arch);
    let size = image_size.to_string();
    script(&["--arch", arch, "--image-size", &size, "--out", dir.to_str().unwrap()]);
    let cfg = config(arch, image_size, 49408);
    check_fixture(&dir, &cfg);
    let (vs, _m) = build(&cfg);
    let millions = num_params(&vs) as f64 / 1e6;
    assert!((millions - expected_params).abs() < 0.05, "{arch}: {millions:.2} M parameters");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn convnext_base_w_matches_open_clip() {
    full_size("convnext_base_w", 64, 179.4);
}

#[test]
fn convnext_large_d_matches_open_clip() {
    full_size("convnext_large_d", 64, 351.8);
}

#[test]
fn vit_b_32_matches_open_clip() {
    full_size("ViT-B-32", 224, 151.3);
}

#[test]
fn xlmr_vit_test_matches_open_clip() {
    check_fixture(&fixture("xlmr_vit_test"), &config(&test_arch("xlmr_vit_test"), 32, FIXTURE_VOCAB));
}

#[test]
fn xlmr_saved_by_rust_loads_in_open_clip() {
    round_trip_with("gen-xlmr-fixtures.py", &test_arch("xlmr_vit_test"), 32, FIXTURE_VOCAB);
}

/// A Hugging Face `XLMRobertaForMaskedLM`-style checkpoint (`roberta.` keys, an `lm_head`)
/// initializes exactly the `text.transformer.` variables, and nothing else.
#[test]
fn xlmr_text_tower_initializes_from_hugging_face_checkpoint() {
    let cfg = config(&test_arch("xlmr_vit_test"), 32, FIXTURE_VOCAB);
    let (mut reference, _m) = build(&cfg);
    load_state_dict(&mut reference, &fixture("xlmr_vit_test").join("model.safetensors"), &cfg).unwrap();
    let reference = reference.variables();
    let (mut vs, _model) = build(&cfg);
    let before = vs.variables();
    let before: HashMap<String, Tensor> = before.iter().map(|(k, v)| (k.clone(), v.copy())).collect();
    let report = load_hf_text_encoder(&mut vs, &fixture("xlmr_vit_test").join("hf_text.safetensors"), &cfg).unwrap();
    assert_eq!(report.skipped, vec!["lm_head.bias".to_string()]);
    let mut in_tower = 0;
    for (k, v) in vs.variables() {
        if k.starts_with("text.transformer.") {
            in_tower += 1;
            assert!(v.equal(&reference[&k]), "{k} not loaded");
        } else {
            assert!(v.equal(&before[&k]), "{k} changed");
        }
    }
    assert_eq!(report.loaded, in_tower);
    assert!(in_tower > 0 && in_tower < before.len());

    // A vocabulary mismatch is named; a model without an HF text tower is refused.
    let (mut vs, _m) = build(&config(&test_arch("xlmr_vit_test"), 32, 1000));
    let msg = load_hf_text_encoder(
        &mut vs,
        &fixture("xlmr_vit_test").join("hf_text.safetensors"),
        &config(&test_arch("xlmr_vit_test"), 32, 1000),
    )
    .unwrap_err()
    .to_string();
    assert!(msg.contains("text.transformer.embeddings.word_embeddings.weight: [512, 32] vs [1000, 32]"), "{msg}");
    let vit = config(&test_arch("vit_test"), 32, FIXTURE_VOCAB);
    let (mut vs, _m) = build(&vit);
    let err = load_hf_text_encoder(&mut vs, &fixture("xlmr_vit_test").join("hf_text.safetensors"), &vit).unwrap_err();
    assert!(matches!(err, WeightsError::NoHfTextTower { .. }), "{err}");
}

/// OpenCLIP checkpoints written with transformers < 4.31 carry the `position_ids` buffer;
/// OpenCLIP drops it on load, and so do we.
#[test]
fn xlmr_checkpoint_with_stale_position_ids_loads() {
    let dir = temp_dir("xlmr-position-ids");
    let mut file = read(&fixture("xlmr_vit_test").join("model.safetensors"));
    file.insert(
        "text.transformer.embeddings.position_ids".into(),
        Tensor::arange(80, (Kind::Int64, Device::Cpu)).unsqueeze(0),
    );
    let path = dir.join("old.safetensors");
    let named: Vec<(&str, &Tensor)> = file.iter().map(|(k, v)| (k.as_str(), v)).collect();
    Tensor::write_safetensors(&named, &path).unwrap();
    let cfg = config(&test_arch("xlmr_vit_test"), 32, FIXTURE_VOCAB);
    let (mut vs, _m) = build(&cfg);
    let report = load_state_dict(&mut vs, &path, &cfg).unwrap();
    assert_eq!(report.skipped, vec!["text.transformer.embeddings.position_ids".to_string()]);
    std::fs::remove_dir_all(&dir).ok();
}

/// Full size, generated on the fly: ViT-B/32 + XLM-RoBERTa-base (vocab 250002), 366.12 M parameters.
#[test]
fn xlm_roberta_base_vit_b_32_matches_open_clip() {
    let arch = "xlm-roberta-base-ViT-B-32";
    let dir = temp_dir(arch);
    run_script("gen-xlmr-fixtures.py", &["--arch", arch, "--out", dir.to_str().unwrap()]);
    let cfg = ClipConfig::resolve(arch).unwrap();
    check_fixture(&dir, &cfg);
    let (vs, _m) = build(&cfg);
    let millions = num_params(&vs) as f64 / 1e6;
    assert!((millions - 366.12).abs() < 0.01, "{arch}: {millions:.2} M parameters");
    std::fs::remove_dir_all(&dir).ok();
}

/// `train.lock_image` / `train.lock_text` leave exactly the parameters trainable that OpenCLIP's
/// `lock_image_tower(unlocked_groups)` / `lock_text_tower(unlocked_layers, freeze_layer_norm)` do
/// (timm's group_matcher groups for ConvNeXt, OpenCLIP's for ViT and its text transformer,
/// HFTextEncoder's for XLM-R), and refuse what OpenCLIP refuses.
#[test]
fn lock_groups_leave_trainable_what_open_clip_does() {
    use ferroclip::lock::{check, trainable_parameters, LockSpec};
    let dir = temp_dir("lock");
    let out = dir.join("lock.json");
    let archs = ["convnext_test", "vit_test", "xlmr_vit_test"].map(test_arch);
    let mut args = vec![];
    for a in &archs {
        args.extend(["--arch", a.as_str()]);
    }
    args.extend(["--out", out.to_str().unwrap()]);
    run_script("gen-lock-fixtures.py", &args);
    let cases: BTreeMap<String, Vec<serde_json::Value>> =
        serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    for arch in &archs {
        let cfg = ClipConfig::resolve(arch).unwrap();
        for case in &cases[arch.as_str()] {
            let spec = LockSpec {
                lock_image: case["lock_image"].as_bool().unwrap(),
                image_unlocked_groups: case["groups"].as_u64().unwrap() as usize,
                lock_text: case["lock_text"].as_bool().unwrap(),
                text_unlocked_layers: case["layers"].as_u64().unwrap() as usize,
                text_freeze_layer_norm: case["freeze_layer_norm"].as_bool().unwrap(),
            };
            if case.get("refused").is_some() {
                assert!(check(&spec, &cfg).is_err(), "{}: OpenCLIP refuses {spec:?}, we do not", cfg.arch);
                continue;
            }
            check(&spec, &cfg).unwrap_or_else(|e| panic!("{}: {spec:?} refused: {e}", cfg.arch));
            let (vs, _model) = build(&cfg);
            let ours: Vec<String> = trainable_parameters(&vs, &spec, &cfg).into_iter().map(|(n, _)| n).collect();
            let theirs: Vec<String> =
                case["trainable"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
            let only_ours: Vec<&String> = ours.iter().filter(|n| !theirs.contains(n)).collect();
            let only_theirs: Vec<&String> = theirs.iter().filter(|n| !ours.contains(n)).collect();
            assert!(
                only_ours.is_empty() && only_theirs.is_empty(),
                "{} {spec:?}: trainable only here {only_ours:?}, only in OpenCLIP {only_theirs:?}",
                cfg.arch
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
