//! Head dropout (`model.head_dropout`, OpenCLIP's `timm_drop`) where OpenCLIP's TimmModel applies
//! it: before the linear projection, after the GELU of the MLP head. In training mode, with
//! libtorch's generator seeded as OpenCLIP's was (stochastic depth off, so dropout is the only
//! draw), the features equal OpenCLIP's. One test in its own binary: the generator is
//! process-wide, and a test running beside it would draw from it.

use ferroclip::model::{load_state_dict, Clip, ClipConfig, ContrastiveModel};
use tch::nn::VarStore;
use tch::Device;

mod support;

use support::{edited_arch, max_diff, python_script, read_tensors};

const TOL: f64 = 1e-4;

#[test]
fn head_dropout_in_training_matches_open_clip() {
    let dir = tempfile::tempdir().unwrap();
    let jobs: Vec<_> = ["convnext_test", "convnext_test_mlp"]
        .into_iter()
        .map(|name| {
            let arch = edited_arch(name, &dir.path().join(format!("{name}_drop.json")), |json| {
                json["vision_cfg"]["timm_drop"] = 0.3.into();
                json["vision_cfg"]["timm_drop_path"] = 0.0.into();
            });
            let out = dir.path().join(name);
            let (a, o) = (arch.to_str().unwrap().to_string(), out.to_str().unwrap().to_string());
            let job = std::thread::spawn(move || {
                python_script(
                    "gen-model-fixtures.py",
                    &["--arch", &a, "--out", &o, "--vocab-size", "512", "--train-seed", "11"],
                );
            });
            (arch, out, job)
        })
        .collect();
    for (arch, out, job) in jobs {
        job.join().unwrap();
        let mut cfg = ClipConfig::resolve(arch.to_str().unwrap()).unwrap();
        cfg.text.set_vocab_size(512);
        let mut vs = VarStore::new(Device::Cpu);
        let model = Clip::new(&vs.root(), &cfg);
        load_state_dict(&mut vs, &out.join("model.safetensors"), &cfg).unwrap();
        let exp = read_tensors(&out.join("expected.safetensors"));
        tch::manual_seed(11);
        let train = tch::no_grad(|| model.encode_image(&exp["images"], true));
        let d = max_diff(&train, &exp["image_features_train"]);
        eprintln!("{}: training-mode image features max |diff| {d:e}", cfg.arch);
        assert!(d <= TOL, "{}: training-mode image features max |diff| {d:e}", cfg.arch);
        // ... and dropout did something: the eval-mode features differ.
        let moved = max_diff(&exp["image_features_train"], &exp["image_features"]);
        assert!(moved > 100.0 * TOL, "{}: dropout changed nothing ({moved:e})", cfg.arch);
    }
}
