//! Image–text retrieval recall@k with several captions per image, as clip_benchmark's
//! `zeroshot_retrieval.py` scores it: image→text, an image is a hit when any of its captions is
//! among its k most similar texts; text→image, a caption is a hit when its own image is among its
//! k most similar images. Similarity is the cosine of the L2-normalized features.

use std::collections::BTreeMap;

use tch::{Kind, Tensor};

use crate::loss::l2_normalize;

/// Score rows in chunks so a 5k × 25k (COCO) similarity matrix never sits in memory at once.
const MAX_CHUNK_ELEMENTS: i64 = 1 << 24;

/// Fraction of `queries` rows whose top-k (by `queries @ candidates.T`) holds a positive, for
/// each k. `candidate_id` and `query_id` give each row an id; a candidate is positive for a query
/// when their ids match. Queries are scored `max_chunk_elements / candidates` rows at a time.
fn recall(
    queries: &Tensor,
    candidates: &Tensor,
    query_id: &Tensor,
    candidate_id: &Tensor,
    ks: &[i64],
    max_chunk_elements: i64,
) -> Vec<f64> {
    let (num_queries, num_candidates) = (queries.size()[0], candidates.size()[0]);
    let max_k = ks.iter().copied().max().unwrap_or(1).clamp(1, num_candidates);
    let chunk = (max_chunk_elements / num_candidates.max(1)).max(1);
    let mut hits = vec![0.0; ks.len()];
    let mut start = 0;
    while start < num_queries {
        let len = chunk.min(num_queries - start);
        let scores = queries.narrow(0, start, len).matmul(&candidates.tr()); // [len, candidates]
        let (_, top) = scores.topk(max_k, 1, true, true); // [len, max_k]
        let top_ids = candidate_id.index_select(0, &top.flatten(0, -1)).view([len, max_k]);
        let positive = top_ids.eq_tensor(&query_id.narrow(0, start, len).unsqueeze(1)); // [len, max_k]
        for (h, &k) in hits.iter_mut().zip(ks) {
            *h += positive.narrow(1, 0, k.clamp(1, max_k)).any_dim(1, false).sum(Kind::Float).double_value(&[]);
        }
        start += len;
    }
    hits.into_iter().map(|h| h / num_queries as f64).collect()
}

/// Recall@k both ways for `image_features` `[num_images, d]` and `text_features` `[num_texts, d]`
/// where caption `i` belongs to image `text_to_image[i]` (int64 `[num_texts]`, any number of
/// captions per image). Returns `i2t_recall@{k}` and `t2i_recall@{k}` as fractions in [0, 1]; an
/// image without captions counts as a miss (as in clip_benchmark).
pub fn recall_at_k(
    image_features: &Tensor,
    text_features: &Tensor,
    text_to_image: &Tensor,
    ks: &[i64],
) -> BTreeMap<String, f64> {
    let _guard = tch::no_grad_guard();
    let device = image_features.device();
    let images = l2_normalize(image_features);
    let texts = l2_normalize(&text_features.to_device(device));
    let text_to_image = text_to_image.to_device(device).to_kind(Kind::Int64);
    let image_ids = Tensor::arange(images.size()[0], (Kind::Int64, device));
    let i2t = recall(&images, &texts, &image_ids, &text_to_image, ks, MAX_CHUNK_ELEMENTS);
    let t2i = recall(&texts, &images, &text_to_image, &image_ids, ks, MAX_CHUNK_ELEMENTS);
    let mut out = BTreeMap::new();
    for ((&k, a), b) in ks.iter().zip(i2t).zip(t2i) {
        out.insert(format!("i2t_recall@{k}"), a);
        out.insert(format!("t2i_recall@{k}"), b);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn cosine(a: &[f64], b: &[f64]) -> f64 {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let na: f64 = a.iter().map(|x| x * x).sum::<f64>().sqrt();
        let nb: f64 = b.iter().map(|x| x * x).sum::<f64>().sqrt();
        dot / (na * nb)
    }

    /// Direct reference: for each query, the rank of its best positive = number of candidates
    /// scoring strictly higher than it.
    fn reference(images: &[Vec<f64>], texts: &[Vec<f64>], owner: &[i64], k: usize) -> (f64, f64) {
        let i2t = images
            .iter()
            .enumerate()
            .filter(|(i, img)| {
                let scores: Vec<f64> = texts.iter().map(|t| cosine(img, t)).collect();
                let best = (0..texts.len())
                    .filter(|&t| owner[t] == *i as i64)
                    .map(|t| scores[t])
                    .fold(f64::NEG_INFINITY, f64::max);
                best.is_finite() && scores.iter().filter(|&&s| s > best).count() < k
            })
            .count();
        let t2i = texts
            .iter()
            .enumerate()
            .filter(|(t, txt)| {
                let scores: Vec<f64> = images.iter().map(|img| cosine(img, txt)).collect();
                let own = scores[owner[*t] as usize];
                scores.iter().filter(|&&s| s > own).count() < k
            })
            .count();
        (i2t as f64 / images.len() as f64, t2i as f64 / texts.len() as f64)
    }

    #[test]
    fn recall_matches_direct_reference_with_several_captions_per_image() {
        tch::manual_seed(7);
        let (num_images, d) = (40i64, 8i64);
        let images = Tensor::randn([num_images, d], (Kind::Float, Device::Cpu));
        // 1 to 5 captions per image, noisy copies of the image (scaled, to check normalization),
        // and image 39 without any caption.
        let mut owner = Vec::new();
        for i in 0..num_images - 1 {
            for _ in 0..(1 + i % 5) {
                owner.push(i);
            }
        }
        let owner_t = Tensor::from_slice(&owner);
        let texts = (images.index_select(0, &owner_t)
            + Tensor::randn([owner.len() as i64, d], (Kind::Float, Device::Cpu)) * 1.2)
            * (Tensor::rand([owner.len() as i64, 1], (Kind::Float, Device::Cpu)) * 5.0 + 0.1);
        let img_rows: Vec<Vec<f64>> =
            (0..num_images).map(|i| Vec::try_from(images.get(i).to_kind(Kind::Double)).unwrap()).collect();
        let txt_rows: Vec<Vec<f64>> =
            (0..owner.len() as i64).map(|i| Vec::try_from(texts.get(i).to_kind(Kind::Double)).unwrap()).collect();

        let got = recall_at_k(&images, &texts, &owner_t, &[1, 5, 10]);
        assert_eq!(got.len(), 6);
        for k in [1usize, 5, 10] {
            let (i2t, t2i) = reference(&img_rows, &txt_rows, &owner, k);
            assert!((got[&format!("i2t_recall@{k}")] - i2t).abs() < 1e-12, "i2t@{k}: {got:?} vs {i2t}");
            assert!((got[&format!("t2i_recall@{k}")] - t2i).abs() < 1e-12, "t2i@{k}: {got:?} vs {t2i}");
        }
        // The data must discriminate, or the comparison proves little.
        assert!(got["i2t_recall@1"] < got["i2t_recall@10"] && got["i2t_recall@10"] < 1.0);
        assert!(got["t2i_recall@1"] < got["t2i_recall@10"] && got["t2i_recall@1"] > 0.0);
    }

    #[test]
    fn chunking_does_not_change_results() {
        tch::manual_seed(3);
        let images = l2_normalize(&Tensor::randn([30, 4], (Kind::Float, Device::Cpu)));
        let owner = Tensor::arange(60, (Kind::Int64, Device::Cpu)).remainder(30);
        let texts =
            l2_normalize(&(images.index_select(0, &owner) + Tensor::randn([60, 4], (Kind::Float, Device::Cpu))));
        let ids = Tensor::arange(30, (Kind::Int64, Device::Cpu));
        let whole = recall(&images, &texts, &ids, &owner, &[1, 5], 1 << 20);
        // 7 rows of 60 candidates per chunk: 4 full chunks and a ragged one.
        let chunked = recall(&images, &texts, &ids, &owner, &[1, 5], 7 * 60);
        assert_eq!(whole, chunked);
        let whole = recall(&texts, &images, &owner, &ids, &[1, 5], 1 << 20);
        let one_row = recall(&texts, &images, &owner, &ids, &[1, 5], 1);
        assert_eq!(whole, one_row);
        assert!(whole[0] > 0.0 && whole[0] < whole[1]);
    }
}
