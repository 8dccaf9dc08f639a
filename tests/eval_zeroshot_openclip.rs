//! Zero-shot agreement with OpenCLIP's own code. `scripts/gen-eval-fixtures.py` runs OpenCLIP's
//! `build_zero_shot_classifier` on a tiny random model (class names × templates through OpenCLIP's
//! tokenizer) and classifies a few images; here our [`build_classifier`] sees exactly the token ids
//! and text features OpenCLIP's model produced (a replay model), so the classifier and the
//! predictions must agree. The same check with our own `Clip` model computing the features is in
//! `tests/after_model_merge/eval_zeroshot_clip.rs`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use ferroclip::eval::{accuracy, build_classifier, zero_shot_logits, ZeroShotMeter};
use ferroclip::model::ContrastiveModel;
use ferroclip_data::tokenize::Tokenizer;
use tch::{Device, Tensor};

struct Fixture {
    classnames: Vec<String>,
    templates: Vec<String>,
    texts: Vec<String>,
    tensors: HashMap<String, Tensor>,
}

impl Fixture {
    fn tensor(&self, name: &str) -> &Tensor {
        self.tensors.get(name).unwrap_or_else(|| panic!("fixture lacks {name}"))
    }
}

/// Run the fixture script into a fresh directory (the model weights are 7.5 MB, mostly the
/// 49408-token embedding, so they are generated rather than committed).
fn generate_fixture(name: &str) -> (PathBuf, Fixture) {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let python = root.join(".venv/bin/python");
    assert!(python.exists(), "{} missing: the OpenCLIP agreement test needs the venv with open_clip", python.display());
    let dir = std::env::temp_dir().join(format!("ferroclip-{name}-{}", std::process::id()));
    let out = Command::new(&python)
        .arg(root.join("scripts/gen-eval-fixtures.py"))
        .arg("--out")
        .arg(&dir)
        .output()
        .expect("run gen-eval-fixtures.py");
    assert!(out.status.success(), "gen-eval-fixtures.py failed: {}", String::from_utf8_lossy(&out.stderr));
    let fixture = load_fixture(&dir);
    (dir, fixture)
}

fn load_fixture(dir: &Path) -> Fixture {
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("eval.json")).unwrap()).unwrap();
    let strings = |key: &str| -> Vec<String> {
        meta[key].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
    };
    let tensors = Tensor::read_safetensors(dir.join("eval.safetensors")).unwrap().into_iter().collect();
    Fixture { classnames: strings("classnames"), templates: strings("templates"), texts: strings("texts"), tensors }
}

/// OpenCLIP's token ids for exactly the fixture's texts (an unknown text is a test failure: it
/// would mean templates were filled differently from `template.format(classname)`).
struct RecordedTokenizer {
    ids: HashMap<String, Vec<i64>>,
}

impl Tokenizer for RecordedTokenizer {
    fn context_length(&self) -> usize {
        77
    }
    fn encode_into(&self, text: &str, out: &mut [i64]) {
        let ids = self.ids.get(text).unwrap_or_else(|| panic!("text {text:?} was not tokenized by OpenCLIP"));
        out.copy_from_slice(ids);
    }
}

/// Returns OpenCLIP's text features for the token rows it recorded.
struct ReplayModel {
    features: HashMap<Vec<i64>, Tensor>,
}

impl ContrastiveModel for ReplayModel {
    fn encode_image(&self, images: &Tensor, _train: bool) -> Tensor {
        images.shallow_clone()
    }
    fn encode_text(&self, tokens: &Tensor, _train: bool) -> Tensor {
        let rows: Vec<Tensor> = (0..tokens.size()[0])
            .map(|i| {
                let ids: Vec<i64> = Vec::try_from(tokens.get(i)).unwrap();
                self.features.get(&ids).expect("token row OpenCLIP never saw").shallow_clone()
            })
            .collect();
        Tensor::stack(&rows, 0)
    }
    fn logit_scale(&self) -> Tensor {
        Tensor::from(0f32)
    }
}

fn recorded(fixture: &Fixture) -> (RecordedTokenizer, ReplayModel) {
    let tokens = fixture.tensor("text_tokens");
    let features = fixture.tensor("text_features");
    assert_eq!(tokens.size()[0] as usize, fixture.texts.len());
    let mut ids = HashMap::new();
    let mut by_tokens = HashMap::new();
    for (i, text) in fixture.texts.iter().enumerate() {
        let row: Vec<i64> = Vec::try_from(tokens.get(i as i64)).unwrap();
        by_tokens.insert(row.clone(), features.get(i as i64));
        ids.insert(text.clone(), row);
    }
    (RecordedTokenizer { ids }, ReplayModel { features: by_tokens })
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

#[test]
fn classifier_and_predictions_match_openclip() {
    let (dir, fixture) = generate_fixture("eval-zs-replay");
    let (tokenizer, model) = recorded(&fixture);

    // 3 classes per forward like the script, and all at once: both must equal OpenCLIP's.
    for batch in [3, 100] {
        let classifier =
            build_classifier(&model, &tokenizer, &fixture.classnames, &fixture.templates, Device::Cpu, batch);
        let expected = fixture.tensor("classifier");
        assert_eq!(classifier.size(), expected.size());
        let diff = max_abs_diff(&classifier, expected);
        assert!(diff < 1e-6, "classifier differs from OpenCLIP's by {diff} (batch {batch})");

        let logits = zero_shot_logits(fixture.tensor("image_features"), &classifier);
        let diff = max_abs_diff(&logits, fixture.tensor("logits"));
        assert!(diff < 1e-4, "logits differ from OpenCLIP's by {diff}");
        let (_, top5) = logits.topk(5, 1, true, true);
        assert!(
            top5.equal(fixture.tensor("top5")),
            "top-5 predictions differ:\n{top5}\nvs\n{}",
            fixture.tensor("top5")
        );

        // Labels = OpenCLIP's 2nd choice: top-1 misses every image, top-5 hits all.
        let labels = fixture.tensor("top5").select(1, 1);
        let n = labels.size()[0] as f64;
        assert_eq!(accuracy(&logits, &labels, &[1, 5]), vec![0.0, n]);
        let mut meter = ZeroShotMeter::new();
        meter.update(fixture.tensor("image_features"), &fixture.tensor("top5").select(1, 0), &classifier);
        assert_eq!(meter.accuracies(), (1.0, 1.0));
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
