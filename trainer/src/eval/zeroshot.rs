//! Zero-shot classification as OpenCLIP does it: a classifier built from class names × prompt
//! templates (`open_clip/zero_shot_classifier.py`, `build_zero_shot_classifier`) and top-k
//! accuracy of `100 · image_features @ classifier` (`open_clip_train/zero_shot.py`).

use ferroclip_data::tokenize::Tokenizer;
use tch::{Device, Kind, Tensor};

use super::fill_template;
use crate::loss::l2_normalize;
use crate::model::ContrastiveModel;

/// Zero-shot classifier weights `[embed_dim, num_classes]` (float32): for each class, every
/// template filled with its name is encoded, the text features are L2-normalized, averaged over
/// templates and normalized again. `batch` classes are encoded per forward (OpenCLIP's
/// `num_classes_per_batch`, 10 there), i.e. `batch × templates.len()` captions at once.
///
/// Runs under `no_grad` with the model in eval mode (`train = false`); any autocast is the
/// caller's. Panics if `classnames` or `templates` is empty.
pub fn build_classifier(
    model: &dyn ContrastiveModel,
    tokenizer: &dyn Tokenizer,
    classnames: &[String],
    templates: &[String],
    device: Device,
    batch: usize,
) -> Tensor {
    assert!(!classnames.is_empty(), "zero-shot classifier needs at least one class name");
    let columns: Vec<Tensor> = classnames
        .chunks(batch.max(1))
        .map(|chunk| class_embeddings(model, tokenizer, chunk, templates, device).tr())
        .collect();
    Tensor::cat(&columns, 1) // [d, classes]
}

/// The classifier rows of `classnames` (one forward over all their prompts): `[classes, embed_dim]`,
/// float32, each the normalized mean of its normalized prompt features. Panics if `templates` is empty.
pub fn class_embeddings(
    model: &dyn ContrastiveModel,
    tokenizer: &dyn Tokenizer,
    classnames: &[String],
    templates: &[String],
    device: Device,
) -> Tensor {
    assert!(!templates.is_empty(), "zero-shot classifier needs at least one template");
    let _guard = tch::no_grad_guard();
    let context = tokenizer.context_length();
    let mut ids = vec![0i64; classnames.len() * templates.len() * context];
    let rows = classnames.iter().flat_map(|c| templates.iter().map(move |t| fill_template(t, c)));
    for (text, out) in rows.zip(ids.chunks_mut(context)) {
        tokenizer.encode_into(&text, out);
    }
    let tokens = Tensor::from_slice(&ids).view([-1, context as i64]).to_device(device); // [c*t, ctx]
    let features = l2_normalize(&model.encode_text(&tokens, false).to_kind(Kind::Float)); // [c*t, d]
    let per_template = features.view([classnames.len() as i64, templates.len() as i64, -1]); // [c, t, d]
    let per_class = per_template.mean_dim(1, false, Kind::Float); // [c, d]
                                                                  // OpenCLIP divides by the norm here without an eps; a mean of unit vectors is never 0 in practice.
    &per_class / per_class.norm_scalaropt_dim(2.0, [1i64], true)
}

/// Classification logits `100 · l2_normalize(image_features) @ classifier` (`[b, classes]`, float32),
/// as `open_clip_train/zero_shot.py` computes them (the model there returns normalized features).
pub fn zero_shot_logits(image_features: &Tensor, classifier: &Tensor) -> Tensor {
    l2_normalize(&image_features.to_kind(Kind::Float)).matmul(&classifier.to_kind(Kind::Float)) * 100.0
}

/// For each k in `topk`, how many rows of `logits` `[n, classes]` have their label (`labels`, `[n]`,
/// int64) among the k highest logits: counts, not fractions, so batches can be summed (as
/// OpenCLIP's `accuracy`). A k above the number of classes counts every row.
pub fn accuracy(logits: &Tensor, labels: &Tensor, topk: &[i64]) -> Vec<f64> {
    let _guard = tch::no_grad_guard();
    let num_classes = logits.size()[1];
    let max_k = topk.iter().copied().max().unwrap_or(1).clamp(1, num_classes);
    let (_, pred) = logits.topk(max_k, 1, true, true); // [n, max_k]
    let pred = pred.tr(); // [max_k, n]
    let correct = pred.eq_tensor(&labels.to_device(pred.device()).view([1, -1]).expand_as(&pred));
    topk.iter().map(|&k| correct.narrow(0, 0, k.clamp(1, max_k)).sum(Kind::Float).double_value(&[])).collect()
}

/// Running top-1/top-5 accuracy over batches of image features.
#[derive(Debug, Default, Clone)]
pub struct ZeroShotMeter {
    top1: f64,
    top5: f64,
    count: usize,
}

impl ZeroShotMeter {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add a batch: image features `[b, d]` (unnormalized is fine), labels `[b]`.
    pub fn update(&mut self, image_features: &Tensor, labels: &Tensor, classifier: &Tensor) {
        let logits = zero_shot_logits(image_features, classifier);
        let hits = accuracy(&logits, labels, &[1, 5]);
        self.top1 += hits[0];
        self.top5 += hits[1];
        self.count += image_features.size()[0] as usize;
    }

    /// Images seen so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// `[top-1 hits, top-5 hits, images]`, to be summed over meters (e.g. over ranks).
    pub fn counts(&self) -> [f64; 3] {
        [self.top1, self.top5, self.count as f64]
    }

    /// A meter that has seen what [`counts`](Self::counts) says.
    pub fn from_counts([top1, top5, count]: [f64; 3]) -> Self {
        Self { top1, top5, count: count as usize }
    }

    /// `(top1, top5)` as fractions in [0, 1] (NaN before any image).
    pub fn accuracies(&self) -> (f64, f64) {
        let n = self.count as f64;
        (self.top1 / n, self.top5 / n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct reference: rank of the true class by counting strictly larger logits.
    fn reference_hits(logits: &[Vec<f32>], labels: &[i64], k: usize) -> f64 {
        logits.iter().zip(labels).filter(|(row, &y)| row.iter().filter(|&&v| v > row[y as usize]).count() < k).count()
            as f64
    }

    #[test]
    fn accuracy_matches_direct_count() {
        tch::manual_seed(0);
        let (n, c) = (64, 12);
        let logits = Tensor::randn([n, c], (Kind::Float, Device::Cpu));
        let labels = Tensor::randint(c, [n], (Kind::Int64, Device::Cpu));
        let rows: Vec<Vec<f32>> = (0..n).map(|i| Vec::<f32>::try_from(logits.get(i)).unwrap()).collect();
        let ys: Vec<i64> = Vec::try_from(&labels).unwrap();
        let got = accuracy(&logits, &labels, &[1, 5, 12, 20]);
        assert_eq!(got[0], reference_hits(&rows, &ys, 1));
        assert_eq!(got[1], reference_hits(&rows, &ys, 5));
        assert_eq!(got[2], n as f64);
        assert_eq!(got[3], n as f64, "k beyond the class count counts every row");
        assert!(got[0] > 0.0 && got[0] < got[1] && got[1] < n as f64, "the test data must discriminate: {got:?}");
    }

    /// A text "model" whose features are a fixed embedding of the token ids (mean over the row), so
    /// the classifier can be recomputed by hand.
    struct TableModel {
        table: Tensor, // [vocab, d]
    }

    impl ContrastiveModel for TableModel {
        fn encode_image(&self, images: &Tensor, _train: bool) -> Tensor {
            images.shallow_clone()
        }
        fn encode_text(&self, tokens: &Tensor, _train: bool) -> Tensor {
            self.table.index_select(0, &tokens.flatten(0, -1)).view([tokens.size()[0], tokens.size()[1], -1]).mean_dim(
                1,
                false,
                Kind::Float,
            )
        }
        fn logit_scale(&self) -> Tensor {
            Tensor::from(0f32)
        }
    }

    /// Token ids = bytes of the text, zero padded.
    struct ByteTokenizer;

    impl Tokenizer for ByteTokenizer {
        fn context_length(&self) -> usize {
            24
        }
        fn encode_into(&self, text: &str, out: &mut [i64]) {
            out.fill(0);
            for (o, b) in out.iter_mut().zip(text.bytes()) {
                *o = b as i64;
            }
        }
    }

    fn unit(v: Vec<f64>) -> Vec<f64> {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        v.into_iter().map(|x| x / n).collect()
    }

    #[test]
    fn classifier_is_normalized_template_mean_per_class() {
        tch::manual_seed(1);
        let d = 6;
        let model = TableModel { table: Tensor::randn([256, d], (Kind::Float, Device::Cpu)) };
        let classes: Vec<String> = ["cat", "dog", "red car", "ship", "tree"].map(String::from).to_vec();
        let templates: Vec<String> = ["a photo of a {}.", "{}", "art of the {}!"].map(String::from).to_vec();
        // Batching classes (2 per forward, a ragged last batch) must not change the result.
        let w = build_classifier(&model, &ByteTokenizer, &classes, &templates, Device::Cpu, 2);
        assert_eq!(w.size(), [d, classes.len() as i64]);
        assert_eq!(w.kind(), Kind::Float);
        let w_all = build_classifier(&model, &ByteTokenizer, &classes, &templates, Device::Cpu, 100);
        assert!(w.allclose(&w_all, 1e-6, 1e-6, false));

        let table: Vec<Vec<f64>> =
            (0..256).map(|i| Vec::<f64>::try_from(model.table.get(i).to_kind(Kind::Double)).unwrap()).collect();
        for (j, class) in classes.iter().enumerate() {
            let mut mean = vec![0.0; d as usize];
            for t in &templates {
                let ids = ByteTokenizer.encode(&fill_template(t, class));
                let mut feat = vec![0.0; d as usize];
                for &id in &ids {
                    for (f, x) in feat.iter_mut().zip(&table[id as usize]) {
                        *f += x / ids.len() as f64;
                    }
                }
                for (m, x) in mean.iter_mut().zip(unit(feat)) {
                    *m += x / templates.len() as f64;
                }
            }
            let want = unit(mean);
            let got: Vec<f64> = Vec::try_from(w.select(1, j as i64).to_kind(Kind::Double)).unwrap();
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-5, "class {class}: {got:?} vs {want:?}");
            }
        }
    }

    #[test]
    fn meter_accumulates_fractions_over_batches() {
        // Classifier = identity over 3 classes in 3 dims; features point at classes 0,1,2,0 with the
        // second choice fixed, labels 0,2,2,1: top1 hits rows 0 and 2.
        let classifier = Tensor::eye(3, (Kind::Float, Device::Cpu));
        let features =
            Tensor::from_slice(&[1.0f32, 0.5, 0.0, 0.0, 1.0, 0.5, 0.0, 0.5, 1.0, 1.0, 0.0, 0.5]).view([4, 3]);
        let labels = Tensor::from_slice(&[0i64, 2, 2, 1]);
        let mut meter = ZeroShotMeter::new();
        meter.update(&features.narrow(0, 0, 2), &labels.narrow(0, 0, 2), &classifier);
        meter.update(&features.narrow(0, 2, 2), &labels.narrow(0, 2, 2), &classifier);
        assert_eq!(meter.count(), 4);
        assert_eq!(meter.counts(), [2.0, 4.0, 4.0]);
        assert_eq!(ZeroShotMeter::from_counts(meter.counts()).accuracies(), meter.accuracies());
        // 3 classes: top-5 covers them all.
        assert_eq!(meter.accuracies(), (0.5, 1.0));
        let logits = zero_shot_logits(&features, &classifier);
        assert_eq!(accuracy(&logits, &labels, &[2]), vec![3.0]);
    }
}
