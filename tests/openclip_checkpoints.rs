//! Checkpoints OpenCLIP itself wrote, read wherever the trainer takes a checkpoint: the hub's
//! `open_clip_pytorch_model.bin` (`torch.save(model.state_dict())`), a real open_clip_train
//! `epoch_1.pt` (written by `open_clip_train.main` under torch.distributed.run, so its keys carry
//! DDP's `module.` prefix) and a Hugging Face `pytorch_model.bin` for the XLM-R text tower. Features
//! after loading equal OpenCLIP's to 1e-6; every broken file is refused with status 2, naming the
//! file and the key, before step 1. The files come from `scripts/gen-openclip-checkpoints.py`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use ferroclip::model::{load_hf_text_encoder, load_state_dict, read_state_dict, Clip, ClipConfig, ContrastiveModel};
use tch::nn::VarStore;
use tch::{Device, Tensor};

mod support;

use support::{
    edited_arch, max_diff, python_script, read_tensors as read, repo, run, tensor_bytes, tensors, test_arch, Fixture,
};

const TOL: f64 = 1e-6;

fn generate(args: &[&str]) {
    python_script("gen-openclip-checkpoints.py", args);
}

/// Loads `file` into `cfg`'s model and compares its features on `expected`'s inputs with OpenCLIP's.
fn assert_features_match(file: &Path, expected: &Path, cfg: &ClipConfig) {
    let mut vs = VarStore::new(Device::Cpu);
    let model = Clip::new(&vs.root(), cfg);
    let report = load_state_dict(&mut vs, file, cfg).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(report.loaded, vs.variables().len());
    let exp = read(expected);
    let (img, txt) =
        tch::no_grad(|| (model.encode_image(&exp["images"], false), model.encode_text(&exp["tokens"], false)));
    for (name, ours) in [("image_features", &img), ("text_features", &txt)] {
        let d = max_diff(ours, &exp[name]);
        eprintln!("{}: {name} max |diff| {d:e}", file.display());
        assert!(d <= TOL, "{}: {name} max |diff| {d:e} > {TOL:e}", file.display());
    }
}

/// The test architecture with a 512-token vocabulary (small files), as a model-config file in `dir`.
fn small_vocab_arch(dir: &Path) -> PathBuf {
    edited_arch("convnext_test", &dir.join("convnext_test.json"), |cfg| cfg["text_cfg"]["vocab_size"] = 512.into())
}

#[test]
fn hub_bin_loads_as_open_clip_and_every_broken_file_is_refused_naming_file_and_key() {
    let f = Fixture::new();
    let dir = f.path().join("hub");
    let arch = small_vocab_arch(f.path());
    generate(&["--arch", arch.to_str().unwrap(), "--out", dir.to_str().unwrap()]);
    let mut cfg = ClipConfig::resolve(arch.to_str().unwrap()).unwrap();
    cfg.text.set_vocab_size(512);
    let hub = dir.join("open_clip_pytorch_model.bin");
    assert_features_match(&hub, &dir.join("expected.safetensors"), &cfg);

    // A soup of the hub file, twice its weights and zeros (safetensors) is the hub model again:
    // it loads and gives OpenCLIP's features. Another architecture is refused naming the key.
    let a = read_state_dict(&hub).unwrap();
    let write = |name: &str, g: &dyn Fn(&Tensor) -> Tensor| {
        let path = f.path().join(name);
        let named: Vec<(String, Tensor)> = a.iter().map(|(k, t)| (k.clone(), g(t))).collect();
        Tensor::write_safetensors(&named, &path).unwrap();
        path
    };
    let twice = write("twice.safetensors", &|t| t * 2.0);
    let zeros = write("zeros.safetensors", &|t| t.zeros_like());
    let soup = f.path().join("soup.safetensors");
    let paths = [&hub, &twice, &zeros].map(|p| p.to_str().unwrap().to_string());
    let out = run(&["soup", "--out", soup.to_str().unwrap(), &paths[0], &paths[1], &paths[2]]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_features_match(&soup, &dir.join("expected.safetensors"), &cfg);
    let misshaped = dir.join("bad/misshaped.bin");
    let out = run(&["soup", "--out", soup.to_str().unwrap(), &paths[0], misshaped.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("misshaped.bin") && err.contains("has shape"), "{err}");

    // `embed --checkpoint` and `eval --checkpoint` share the loader; each bad file ends it with
    // status 2 and a message naming the file and what is wrong in it.
    let config = f.config("embed", "");
    let texts = f.path().join("texts.txt");
    std::fs::write(&texts, "a red square\n").unwrap();
    let cases: HashMap<String, Vec<String>> =
        serde_json::from_str(&std::fs::read_to_string(dir.join("bad/cases.json")).unwrap()).unwrap();
    assert_eq!(cases.len(), 8, "{cases:?}");
    for (name, must) in &cases {
        let bad = dir.join("bad").join(name);
        let out = run(&[
            "embed",
            "--config",
            config.to_str().unwrap(),
            "--set",
            &format!("model.arch={}", arch.display()),
            "--set",
            "model.image_size=64",
            "--checkpoint",
            bad.to_str().unwrap(),
            "--texts",
            texts.to_str().unwrap(),
            "--out",
            f.path().join("features.safetensors").to_str().unwrap(),
        ]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        assert!(err.contains(bad.to_str().unwrap()), "{name}: the file is not named: {err}");
        for m in must {
            assert!(err.contains(m.as_str()), "{name}: `{m}` is not named: {err}");
        }
    }
    assert!(!f.path().join("features.safetensors").exists());

    // As `model.init`: refused before step 1.
    let missing = dir.join("bad/missing_key.bin");
    let out = run(&[
        "--config",
        config.to_str().unwrap(),
        "--set",
        &format!("model.arch={}", arch.display()),
        "--set",
        &format!("model.init={}", missing.display()),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("model.init") && err.contains(cases["missing_key.bin"][0].as_str()), "{err}");
    assert!(!f.run_dir("embed").join("metrics.jsonl").exists(), "a step ran: {err}");
}

/// A checkpoint open_clip_train wrote under DDP (`module.` keys, `optimizer`, `epoch`, `name`
/// beside `state_dict`): features equal OpenCLIP's after its own loader read it, and a fine-tune
/// started from it (`model.init`) starts from exactly its weights.
#[test]
fn open_clip_train_epoch_checkpoint_loads_and_initializes_a_run() {
    let f = Fixture::new();
    let dir = f.path().join("trained");
    let arch = test_arch("convnext_test");
    generate(&["--train", "--arch", arch.to_str().unwrap(), "--out", dir.to_str().unwrap()]);
    let ckpt = dir.join("epoch_1.pt");
    let file = read_state_dict(&ckpt).unwrap();
    assert!(file.iter().all(|(k, _)| k.starts_with("module.")), "no DDP prefix in the checkpoint");
    assert_features_match(
        &ckpt,
        &dir.join("expected.safetensors"),
        &ClipConfig::resolve(arch.to_str().unwrap()).unwrap(),
    );

    // lr 0: AdamW changes nothing, so the saved weights are the checkpoint's, key for key.
    let cfg = f.config("ft", "");
    let out = run(&[
        "--config",
        cfg.to_str().unwrap(),
        "--set",
        &format!("model.init={}", ckpt.display()),
        "--set",
        "optim.lr=0",
        "--set",
        "train.max_steps=1",
        "--set",
        "checkpoint.every_steps=1",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let mut saved = tensors(&f.run_dir("ft").join("checkpoints").join("step_00000001.safetensors"));
    saved.sort();
    let mut want: Vec<(String, Vec<u8>)> =
        file.iter().map(|(k, t)| (k.strip_prefix("module.").unwrap().to_string(), tensor_bytes(t))).collect();
    want.sort();
    assert_eq!(saved, want);
}

/// A Hugging Face folder as transformers 5 writes it (`config.json` by `save_pretrained`, keys such
/// as `add_cross_attention` and `transformers_version` included) builds the same tower as the
/// hub-style config it was made from, and its `pytorch_model.bin` (torch.save of
/// `XLMRobertaForMaskedLM`'s tensors) initializes the XLM-R tower exactly as the same tensors in
/// safetensors do.
#[test]
fn hugging_face_folder_with_pytorch_model_bin_initializes_the_text_tower() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let st = repo().join("tests/fixtures/models/xlmr_vit_test/hf_text.safetensors");
    let hub_config = repo().join("tests/models/xlmr_tiny/config.json");
    generate(&[
        "--hf-text",
        st.to_str().unwrap(),
        "--hf-config",
        hub_config.to_str().unwrap(),
        "--out",
        hf.to_str().unwrap(),
    ]);
    let written = std::fs::read_to_string(hf.join("config.json")).unwrap();
    assert!(written.contains("\"add_cross_attention\"") && written.contains("\"transformers_version\""), "{written}");
    let arch_file = edited_arch("xlmr_vit_test", &dir.path().join("xlmr_saved.json"), |arch| {
        arch["text_cfg"]["hf_model_name"] = "./hf".into()
    });

    let resolve = |path: &Path| {
        let mut cfg = ClipConfig::resolve(path.to_str().unwrap()).unwrap_or_else(|e| panic!("{e}")).with_image_size(32);
        cfg.text.set_vocab_size(512);
        cfg
    };
    let saved = resolve(&arch_file);
    let hub = resolve(&test_arch("xlmr_vit_test"));
    assert_eq!(saved.text, hub.text);
    let load = |file: &Path| {
        let mut vs = VarStore::new(Device::Cpu);
        let _model = Clip::new(&vs.root(), &saved);
        tch::manual_seed(0);
        let report = load_hf_text_encoder(&mut vs, file, &saved).unwrap_or_else(|e| panic!("{e}"));
        (report, vs.variables())
    };
    let (from_bin, bin_vars) = load(&hf.join("pytorch_model.bin"));
    let (from_st, st_vars) = load(&st);
    assert_eq!(from_bin, from_st);
    assert!(from_bin.loaded > 0);
    for (k, v) in &st_vars {
        if k.starts_with("text.transformer.") {
            assert!(v.equal(&bin_vars[k]), "{k} differs");
        }
    }
}
