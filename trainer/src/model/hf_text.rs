//! XLM-RoBERTa text tower as OpenCLIP's `HFTextEncoder` wraps it (`open_clip/hf_model.py`,
//! `open_clip/hf_configs.py`, `open_clip/model_configs/xlm-roberta-base-ViT-B-32.json`), with the
//! encoder of Hugging Face `XLMRobertaModel` (`transformers/models/xlm_roberta/modeling_xlm_roberta.py`).
//!
//! State-dict layout (exactly OpenCLIP's `CustomTextCLIP`): the encoder under `text.transformer.`
//! (`embeddings.{word,position,token_type}_embeddings.weight`, `embeddings.LayerNorm.*`,
//! `encoder.layer.N.{attention.self.{query,key,value},attention.output.{dense,LayerNorm},
//! intermediate.dense,output.{dense,LayerNorm}}.*`) and the `mlp` projection as `text.proj.0.weight`,
//! `text.proj.2.weight`. OpenCLIP builds the HF model with `add_pooling_layer=False` for the
//! `mean_pooler`, so there is no `pooler.*`.

use tch::nn::{self, Init};
use tch::{Kind, Tensor};

/// XLM-RoBERTa encoder hyper-parameters, as Hugging Face's `XLMRobertaConfig` for `xlm-roberta-base`.
#[derive(Debug, Clone, PartialEq)]
pub struct XlmrConfig {
    /// Token sequence length the tokenizer pads/truncates to (77, OpenCLIP's default for this model).
    pub context_length: i64,
    /// Vocabulary size (250002).
    pub vocab_size: i64,
    /// Hidden size `d_model` (768).
    pub hidden_size: i64,
    /// Encoder layers (12).
    pub layers: i64,
    /// Attention heads (12).
    pub heads: i64,
    /// Feed-forward width (3072).
    pub intermediate_size: i64,
    /// Rows of the position table (514 = 512 positions + the padding offset of 2).
    pub max_position_embeddings: i64,
    /// Token-type rows (1; every token uses type 0).
    pub type_vocab_size: i64,
    /// Padding id (1): the attention mask is `tokens != pad_token_id`, and positions count from it.
    pub pad_token_id: i64,
    /// LayerNorm epsilon (1e-5).
    pub layer_norm_eps: f64,
    /// Dropout on embeddings and sub-layer outputs in training (`hidden_dropout_prob`, 0.1).
    pub hidden_dropout: f64,
    /// Dropout on attention probabilities in training (`attention_probs_dropout_prob`, 0.1).
    pub attention_dropout: f64,
}

impl XlmrConfig {
    /// `xlm-roberta-base`.
    pub fn base() -> Self {
        Self {
            context_length: 77,
            vocab_size: 250002,
            hidden_size: 768,
            layers: 12,
            heads: 12,
            intermediate_size: 3072,
            max_position_embeddings: 514,
            type_vocab_size: 1,
            pad_token_id: 1,
            layer_norm_eps: 1e-5,
            hidden_dropout: 0.1,
            attention_dropout: 0.1,
        }
    }

    /// `xlm-roberta-large` (its hub `config.json`).
    pub fn large() -> Self {
        Self { hidden_size: 1024, layers: 24, heads: 16, intermediate_size: 4096, ..Self::base() }
    }

    /// Hidden width of OpenCLIP's `mlp` projection: `(d_model + embed_dim) // 2`.
    pub fn proj_hidden(&self, embed_dim: i64) -> i64 {
        (self.hidden_size + embed_dim) / 2
    }
}

/// HF `_init_weights`: normal(0, `initializer_range` = 0.02) weights, zero biases.
fn hf_linear(p: nn::Path, i: i64, o: i64) -> nn::Linear {
    nn::linear(
        p,
        i,
        o,
        nn::LinearConfig {
            ws_init: Init::Randn { mean: 0.0, stdev: 0.02 },
            bs_init: Some(Init::Const(0.0)),
            bias: true,
        },
    )
}

fn hf_layer_norm(p: nn::Path, dim: i64, eps: f64) -> nn::LayerNorm {
    nn::layer_norm(p, vec![dim], nn::LayerNormConfig { eps, ..Default::default() })
}

/// HF embedding init (normal 0.02) with the `padding_idx` row zeroed, as `nn.Embedding(padding_idx=..)`.
fn hf_embedding(p: nn::Path, n: i64, dim: i64, padding_idx: Option<i64>) -> nn::Embedding {
    let emb = nn::embedding(
        p,
        n,
        dim,
        nn::EmbeddingConfig { ws_init: Init::Randn { mean: 0.0, stdev: 0.02 }, ..Default::default() },
    );
    if let Some(i) = padding_idx.filter(|&i| i < n) {
        tch::no_grad(|| {
            let _ = emb.ws.get(i).zero_();
        });
    }
    emb
}

/// One post-LN `XLMRobertaLayer`.
#[derive(Debug)]
struct Layer {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    attn_out: nn::Linear,
    attn_ln: nn::LayerNorm,
    intermediate: nn::Linear,
    out: nn::Linear,
    out_ln: nn::LayerNorm,
}

impl Layer {
    fn new(p: &nn::Path, c: &XlmrConfig) -> Self {
        let (h, f) = (c.hidden_size, c.intermediate_size);
        let att = p / "attention";
        let s = &att / "self";
        let ao = &att / "output";
        let o = p / "output";
        Self {
            query: hf_linear(&s / "query", h, h),
            key: hf_linear(&s / "key", h, h),
            value: hf_linear(&s / "value", h, h),
            attn_out: hf_linear(&ao / "dense", h, h),
            attn_ln: hf_layer_norm(&ao / "LayerNorm", h, c.layer_norm_eps),
            intermediate: hf_linear(p / "intermediate" / "dense", h, f),
            out: hf_linear(&o / "dense", f, h),
            out_ln: hf_layer_norm(&o / "LayerNorm", h, c.layer_norm_eps),
        }
    }

    /// `x`: `[b, n, h]`; `keep`: `[b, 1, 1, n]` bool, true where the key is a real token.
    fn forward(&self, x: &Tensor, keep: &Tensor, heads: i64, c: &XlmrConfig, train: bool) -> Tensor {
        let (b, n, h) = x.size3().expect("encoder input must be [b, n, h]");
        let d = h / heads;
        let split = |t: Tensor| t.view([b, n, heads, d]).transpose(1, 2); // [b, heads, n, d]
        let q = split(x.apply(&self.query));
        let k = split(x.apply(&self.key));
        let v = split(x.apply(&self.value));
        let p_drop = if train { c.attention_dropout } else { 0.0 };
        // softmax(q k^T / sqrt(d) + mask) v, the pad keys masked out as HF's extended attention mask does.
        let ctx =
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(keep.shallow_clone()), p_drop, false, None, false) // [b, heads, n, d]
                .transpose(1, 2)
                .reshape([b, n, h]);
        let a = ctx.apply(&self.attn_out).dropout(c.hidden_dropout, train);
        let a = (a + x).apply(&self.attn_ln); // post-LN
        let f = a.apply(&self.intermediate).gelu("none").apply(&self.out).dropout(c.hidden_dropout, train);
        (f + a).apply(&self.out_ln)
    }
}

/// OpenCLIP `HFTextEncoder` over `XLMRobertaModel`: mean pooling over non-pad tokens, then the
/// bias-free `mlp` projection `d_model -> (d_model + embed)//2 -> GELU -> embed`.
#[derive(Debug)]
pub struct XlmRobertaText {
    word_embeddings: nn::Embedding,
    position_embeddings: nn::Embedding,
    token_type_embeddings: nn::Embedding,
    embeddings_ln: nn::LayerNorm,
    layers: Vec<Layer>,
    proj_0: Tensor,
    proj_2: Tensor,
    cfg: XlmrConfig,
}

impl XlmRobertaText {
    /// `p` is the text tower's path (`text` under the state-dict root).
    pub fn new(p: &nn::Path, cfg: &XlmrConfig, embed_dim: i64) -> Self {
        let t = p / "transformer";
        let e = &t / "embeddings";
        let h = cfg.hidden_size;
        let pad = Some(cfg.pad_token_id);
        let word_embeddings = hf_embedding(&e / "word_embeddings", cfg.vocab_size, h, pad);
        let position_embeddings = hf_embedding(&e / "position_embeddings", cfg.max_position_embeddings, h, pad);
        let token_type_embeddings = hf_embedding(&e / "token_type_embeddings", cfg.type_vocab_size, h, None);
        let embeddings_ln = hf_layer_norm(&e / "LayerNorm", h, cfg.layer_norm_eps);
        let lp = &t / "encoder" / "layer";
        let layers = (0..cfg.layers).map(|i| Layer::new(&(&lp / i), cfg)).collect();
        // OpenCLIP leaves the projection at nn.Linear's default init (kaiming-uniform, ±1/sqrt(fan_in)).
        let proj = p / "proj";
        let hidden = cfg.proj_hidden(embed_dim);
        let uniform = |fan_in: i64| {
            let bound = 1.0 / (fan_in as f64).sqrt();
            Init::Uniform { lo: -bound, up: bound }
        };
        let proj_0 = (&proj / 0).var("weight", &[hidden, h], uniform(h));
        let proj_2 = (&proj / 2).var("weight", &[embed_dim, hidden], uniform(hidden));
        Self {
            word_embeddings,
            position_embeddings,
            token_type_embeddings,
            embeddings_ln,
            layers,
            proj_0,
            proj_2,
            cfg: cfg.clone(),
        }
    }

    /// `tokens`: `[b, n]` int64 (pad id 1 after the text, `n + 1 < max_position_embeddings`) ->
    /// `[b, embed_dim]` (not normalized). `train` enables HF's dropouts.
    pub fn forward(&self, tokens: &Tensor, train: bool) -> Tensor {
        let c = &self.cfg;
        let mask = tokens.ne(c.pad_token_id); // [b, n] bool
        let mask_i = mask.to_kind(Kind::Int64);
        // create_position_ids_from_input_ids: real tokens count up from pad_id + 1, pads stay at pad_id.
        let positions = mask_i.cumsum(1, Kind::Int64) * &mask_i + c.pad_token_id; // [b, n]
        let x = tokens.apply(&self.word_embeddings)
            + self.token_type_embeddings.ws.get(0) // every token has type 0
            + positions.apply(&self.position_embeddings); // [b, n, h]
        let mut x = x.apply(&self.embeddings_ln).dropout(c.hidden_dropout, train);
        let keep = mask.unsqueeze(1).unsqueeze(1); // [b, 1, 1, n]
        for layer in &self.layers {
            x = layer.forward(&x, &keep, c.heads, c, train);
        }
        // MeanPooler: sum over real tokens / their count.
        let m = mask.to_kind(x.kind()).unsqueeze(-1); // [b, n, 1]
        let pooled = (&x * &m).sum_dim_intlist(1, false, None) / m.sum_dim_intlist(1, false, None); // [b, h]
        pooled.linear::<Tensor>(&self.proj_0, None).gelu("none").linear::<Tensor>(&self.proj_2, None)
        // [b, embed]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn tiny() -> XlmrConfig {
        XlmrConfig {
            vocab_size: 50,
            hidden_size: 16,
            layers: 2,
            heads: 2,
            intermediate_size: 32,
            max_position_embeddings: 40,
            ..XlmrConfig::base()
        }
    }

    #[test]
    fn padding_changes_nothing_and_dropout_only_in_training() {
        tch::manual_seed(3);
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = tiny();
        let m = XlmRobertaText::new(&(vs.root() / "text"), &cfg, 8);
        // <s> ids </s> then pads: more padding must give the same features (masked attention,
        // pad-offset positions, masked mean).
        let ids = Tensor::from_slice(&[0i64, 7, 9, 30, 2]).unsqueeze(0);
        let short = Tensor::cat(&[&ids, &Tensor::ones([1, 3], (Kind::Int64, Device::Cpu))], 1);
        let long = Tensor::cat(&[&ids, &Tensor::ones([1, 30], (Kind::Int64, Device::Cpu))], 1);
        let (a, b) = tch::no_grad(|| (m.forward(&short, false), m.forward(&long, false)));
        assert_eq!(a.size(), [1, 8]);
        assert!((&a - &b).abs().max().double_value(&[]) < 1e-5);
        // A pad id anywhere is ignored: masked as a key, skipped by the position count and the mean.
        let mid = Tensor::from_slice(&[0i64, 7, 1, 9, 30, 2, 1, 1]).unsqueeze(0);
        let c = tch::no_grad(|| m.forward(&mid, false));
        assert!((&a - &c).abs().max().double_value(&[]) < 1e-5);
        // ... while a real token changes the features.
        let other = Tensor::from_slice(&[0i64, 7, 9, 31, 2, 1, 1, 1]).unsqueeze(0);
        let d = tch::no_grad(|| m.forward(&other, false));
        assert!((&a - &d).abs().max().double_value(&[]) > 1e-4);
        let t = tch::no_grad(|| m.forward(&short, true));
        assert!((&a - &t).abs().max().double_value(&[]) > 1e-4);
    }

    #[test]
    fn init_follows_hugging_face() {
        let vs = nn::VarStore::new(Device::Cpu);
        let cfg = tiny();
        let _m = XlmRobertaText::new(&(vs.root() / "text"), &cfg, 8);
        let v = vs.variables();
        let pad_row = v["text.transformer.embeddings.word_embeddings.weight"].get(1);
        assert_eq!(pad_row.abs().sum(Kind::Float).double_value(&[]), 0.0);
        assert_eq!(v["text.proj.0.weight"].size(), [12, 16]);
        assert_eq!(v["text.proj.2.weight"].size(), [8, 12]);
        assert!(v.keys().all(|k| !k.contains("pooler")));
        let std = v["text.transformer.encoder.layer.1.attention.self.query.weight"].std(true).double_value(&[]);
        assert!((std - 0.02).abs() < 0.004, "{std}");
    }
}
