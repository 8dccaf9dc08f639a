//! Architectures as OpenCLIP model-config files (`open_clip/model_configs/*.json`: `embed_dim`,
//! `vision_cfg`, `text_cfg`, read by `open_clip/model.py`: `CLIPVisionCfg`, `CLIPTextCfg`).
//!
//! `model.arch` is a built-in name (the files of `configs/models/`, embedded in the binary so that
//! it runs anywhere) or the path of a `.json` file in the same format, which trains without a code
//! change. Every key is either built, accepted because it does not change the model (each list below
//! says why), or accepted only at OpenCLIP's default value; anything else is an error naming the
//! file, the key and the value, never silently dropped.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::Value;

use super::clip::{ClipConfig, TextTower, VisionConfig};
use super::convnext::{timm_convnext, ConvNextConfig, ConvNextProj, TIMM_CONVNEXTS};
use super::hf_text::XlmrConfig;
use super::text::TextConfig;
use super::vit::VitConfig;

/// The built-in architectures: `configs/models/NAME.json`, byte-identical to OpenCLIP 3.3.0's own
/// files where OpenCLIP has the architecture.
const BUILTIN: &[(&str, &str)] = &[
    ("convnext_base_w", include_str!("../../../configs/models/convnext_base_w.json")),
    ("convnext_base_w_320", include_str!("../../../configs/models/convnext_base_w_320.json")),
    ("convnext_large_d", include_str!("../../../configs/models/convnext_large_d.json")),
    ("convnext_large_d_320", include_str!("../../../configs/models/convnext_large_d_320.json")),
    ("ViT-B-32", include_str!("../../../configs/models/ViT-B-32.json")),
    ("xlm-roberta-base-ViT-B-32", include_str!("../../../configs/models/xlm-roberta-base-ViT-B-32.json")),
    ("convnext_demo", include_str!("../../../configs/models/convnext_demo.json")),
];

/// Names `model.arch` resolves without a path.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(name, _)| *name).collect()
}

impl ClipConfig {
    /// `model.arch`: a built-in architecture name or the path of an OpenCLIP model-config `.json`
    /// (see [`resolve`]); the error names the file, key and value, or lists the built-in names.
    pub fn resolve(arch: &str) -> Result<ClipConfig, String> {
        resolve(arch)
    }
}

/// `model.arch`: a built-in name, or a path (a value ending in `.json` or containing `/`) to an
/// OpenCLIP model-config file. The architecture is named after the file's stem, as
/// `open_clip.add_model_config` names it.
pub fn resolve(arch: &str) -> Result<ClipConfig, String> {
    if arch.ends_with(".json") || arch.contains('/') {
        let path = Path::new(arch);
        let text = std::fs::read_to_string(path).map_err(|e| format!("{arch}: cannot read the model config: {e}"))?;
        let name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| arch.to_string());
        return parse(&name, &text, &Source::File(path));
    }
    match BUILTIN.iter().find(|(name, _)| *name == arch) {
        Some((name, text)) => parse(name, text, &Source::Builtin(name)),
        None => Err(format!(
            "unknown architecture `{arch}` (built-in: {}; or the path of an OpenCLIP model-config `.json`)",
            builtin_names().join(", ")
        )),
    }
}

/// Where a model config came from, for error messages and for paths inside it.
pub enum Source<'a> {
    /// `configs/models/NAME.json`, embedded.
    Builtin(&'a str),
    /// A file given by path.
    File(&'a Path),
}

impl Source<'_> {
    fn describe(&self) -> String {
        match self {
            Source::Builtin(name) => format!("configs/models/{name}.json"),
            Source::File(path) => path.display().to_string(),
        }
    }
}

/// Parses one model config (`text` is the JSON) into the architecture `name`.
pub fn parse(name: &str, text: &str, source: &Source) -> Result<ClipConfig, String> {
    let file = source.describe();
    let cfg: ModelCfg = from_json(text, &file)?;
    let at = |key: &str, value: &dyn std::fmt::Display, why: &str| format!("{file}: key `{key}` = {value}: {why}");
    check_rest(&file, "", &cfg.other, TOP_DEFAULTS, TOP_ACCEPTED)?;
    if cfg.other.get("quick_gelu").is_some_and(|v| v != &Value::Bool(false)) {
        return Err(at("quick_gelu", &cfg.other["quick_gelu"], "not built (the towers use nn.GELU)"));
    }
    let text_tower = text_tower(&cfg.text_cfg, &file, source)?;
    if cfg.other.get("custom_text") == Some(&Value::Bool(true)) && !matches!(text_tower, TextTower::XlmRoberta(_)) {
        // OpenCLIP's CustomTextCLIP moves its own text tower under `text.`: a layout we do not build.
        return Err(at("custom_text", &true, "built only with a `text_cfg.hf_model_name` text tower"));
    }
    positive(&file, "embed_dim", cfg.embed_dim)?;
    let clip = ClipConfig {
        arch: name.to_string(),
        embed_dim: cfg.embed_dim,
        vision: vision_tower(&cfg.vision_cfg, &file)?,
        text: text_tower,
        grad_checkpointing: false,
    };
    let size = clip.image_size();
    clip.check_image_size(size).map_err(|why| at("vision_cfg.image_size", &size, &why))?;
    Ok(clip)
}

/// serde with the key path of any type error (`vision_cfg.image_size`).
fn from_json<T: DeserializeOwned>(text: &str, file: &str) -> Result<T, String> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        format!("{file}: key `{key}`: {}", e.into_inner())
    })
}

#[derive(Deserialize)]
struct ModelCfg {
    embed_dim: i64,
    vision_cfg: VisionCfg,
    text_cfg: TextCfg,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// Top-level keys accepted as they are: `quick_gelu` (checked above: only `false`), `custom_text`
/// (OpenCLIP's class choice; the layout follows `text_cfg.hf_model_name`, checked above).
const TOP_ACCEPTED: &[&str] = &["quick_gelu", "custom_text"];
/// Top-level keys built only at OpenCLIP's default.
const TOP_DEFAULTS: &[(&str, &str)] =
    &[("init_logit_scale", "2.659260036932778"), ("init_logit_bias", "null"), ("nonscalar_logit_scale", "false")];

/// `vision_cfg`: the keys that shape the towers we build; the rest stays in `other`.
#[derive(Deserialize)]
struct VisionCfg {
    image_size: Option<i64>,
    timm_model_name: Option<String>,
    timm_pool: Option<String>,
    timm_proj: Option<String>,
    timm_drop_path: Option<f64>,
    timm_drop: Option<f64>,
    layers: Option<i64>,
    width: Option<i64>,
    head_width: Option<i64>,
    patch_size: Option<i64>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// `vision_cfg` keys (either tower) built only at OpenCLIP's default: `timm_model_pretrained`
/// would fetch timm's ImageNet weights (start from `model.pretrained` instead).
const VISION_DEFAULTS: &[(&str, &str)] = &[
    ("patch_dropout", "0.0"),
    ("output_tokens", "false"),
    ("timm_model_pretrained", "false"),
    ("timm_proj_bias", "false"),
];
/// OpenCLIP `VisionTransformer` keys built only at their default.
/// The residual-block options both of OpenCLIP's transformers (vision and text) take, at their defaults.
const BLOCK_DEFAULTS: &[(&str, &str)] = &[
    ("act_kwargs", "null"),
    ("norm_kwargs", "null"),
    ("block_type", "null"),
    ("qk_norm", "false"),
    ("scaled_cosine_attn", "false"),
    ("scale_heads", "false"),
    ("scale_attn_inner", "false"),
    ("scale_attn", "false"),
    ("scale_fc", "false"),
];
const VIT_DEFAULTS: &[(&str, &str)] = &[
    ("mlp_ratio", "4.0"),
    ("ls_init_value", "null"),
    ("attentional_pool", "false"),
    ("no_ln_pre", "false"),
    ("pos_embed_type", "\"learnable\""),
    ("final_ln_after_pool", "false"),
    ("pool_type", "\"tok\""),
];
/// Read by OpenCLIP only with `attentional_pool: true` (which is refused), so without effect.
const VIT_ACCEPTED: &[&str] = &["attn_pooler_queries", "attn_pooler_heads"];

fn vision_tower(v: &VisionCfg, file: &str) -> Result<VisionConfig, String> {
    let image_size = v.image_size.unwrap_or(224);
    positive(file, "vision_cfg.image_size", image_size)?;
    let at = |key: &str, value: &dyn std::fmt::Display, why: &str| {
        format!("{file}: key `vision_cfg.{key}` = {value}: {why}")
    };
    let Some(timm) = &v.timm_model_name else {
        let defaults: Vec<_> = VISION_DEFAULTS.iter().chain(VIT_DEFAULTS).chain(BLOCK_DEFAULTS).copied().collect();
        check_rest(file, "vision_cfg.", &v.other, &defaults, VIT_ACCEPTED)?;
        for (key, value) in [("timm_pool", &v.timm_pool), ("timm_proj", &v.timm_proj)] {
            if let Some(value) = value {
                return Err(at(key, &format!("{value:?}"), "only read with `timm_model_name`"));
            }
        }
        if let Some(rate) = v.timm_drop_path {
            return Err(at("timm_drop_path", &rate, "only read with `timm_model_name`"));
        }
        if let Some(rate) = v.timm_drop.filter(|r| *r != 0.0) {
            return Err(at("timm_drop", &rate, "only read with `timm_model_name`"));
        }
        let width = v.width.unwrap_or(768);
        positive(file, "vision_cfg.width", width)?;
        let head_width = v.head_width.unwrap_or(64);
        if head_width <= 0 || width % head_width != 0 {
            return Err(at("head_width", &head_width, &format!("must divide `vision_cfg.width` ({width})")));
        }
        let patch_size = v.patch_size.unwrap_or(16);
        if patch_size <= 0 || image_size % patch_size != 0 {
            return Err(at("patch_size", &patch_size, &format!("must divide `vision_cfg.image_size` ({image_size})")));
        }
        let layers = v.layers.unwrap_or(12);
        positive(file, "vision_cfg.layers", layers)?;
        return Ok(VisionConfig::Vit(VitConfig { image_size, patch_size, width, layers, heads: width / head_width }));
    };
    check_rest(file, "vision_cfg.", &v.other, VISION_DEFAULTS, &[])?;
    // OpenCLIP ignores the ViT keys when a timm model is named; say so rather than drop them.
    let vit_keys =
        [("layers", v.layers), ("width", v.width), ("head_width", v.head_width), ("patch_size", v.patch_size)];
    for (key, value) in vit_keys {
        if let Some(value) = value {
            return Err(at(key, &value, "has no effect with `timm_model_name` (OpenCLIP ignores it)"));
        }
    }
    let Some((dims, depths)) = timm_convnext(timm) else {
        let known: Vec<_> = TIMM_CONVNEXTS.iter().map(|(name, _, _)| *name).collect();
        let why = format!("not a timm model ferroclip builds (known: {})", known.join(", "));
        return Err(at("timm_model_name", &format!("{timm:?}"), &why));
    };
    // OpenCLIP's defaults: `timm_pool: "avg"`, `timm_proj: "linear"`.
    let pool = v.timm_pool.as_deref().unwrap_or("avg");
    if !pool.is_empty() {
        let why = "only \"\" is built (timm's own head: average pool + LayerNorm)";
        return Err(at("timm_pool", &format!("{pool:?}"), why));
    }
    let proj = match v.timm_proj.as_deref().unwrap_or("linear") {
        "linear" => ConvNextProj::Linear,
        "mlp" => ConvNextProj::Mlp,
        other => return Err(at("timm_proj", &format!("{other:?}"), "expected \"linear\" or \"mlp\"")),
    };
    // `timm_drop_path: null` leaves timm's own default, 0.
    let drop_path_rate = v.timm_drop_path.unwrap_or(0.0);
    if !(0.0..1.0).contains(&drop_path_rate) {
        return Err(at("timm_drop_path", &drop_path_rate, "must be in [0, 1)"));
    }
    let head_drop = v.timm_drop.unwrap_or(0.0);
    if !(0.0..1.0).contains(&head_drop) {
        return Err(at("timm_drop", &head_drop, "must be in [0, 1)"));
    }
    Ok(VisionConfig::ConvNext(ConvNextConfig { dims, depths, drop_path_rate, proj, head_drop, image_size }))
}

/// `text_cfg`: OpenCLIP's `TextTransformer` keys, or a Hugging Face tower's.
#[derive(Deserialize)]
struct TextCfg {
    context_length: Option<i64>,
    vocab_size: Option<i64>,
    width: Option<i64>,
    heads: Option<i64>,
    layers: Option<i64>,
    hf_model_name: Option<String>,
    hf_pooler_type: Option<String>,
    hf_proj_type: Option<String>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

/// `text_cfg` keys that configure the tokenizer, not the model (ferroclip's is `model.tokenizer`);
/// `eos_id` is only read with `pool_type: "eos"` (refused).
const TEXT_ACCEPTED: &[&str] = &["hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "eos_id"];
/// OpenCLIP `TextTransformer` keys built only at their default.
const TEXT_DEFAULTS: &[(&str, &str)] = &[
    ("mlp_ratio", "4.0"),
    ("ls_init_value", "null"),
    ("embed_cls", "false"),
    ("pad_id", "0"),
    ("no_causal_mask", "false"),
    ("final_ln_after_pool", "false"),
    ("pool_type", "\"argmax\""),
    ("proj_bias", "false"),
    ("proj_type", "\"linear\""),
    ("output_tokens", "false"),
];
/// `hf_model_pretrained`: whether OpenCLIP downloads the hub weights when it creates the model;
/// ferroclip starts the tower from `model.hf_text` instead, so it does not change the architecture.
const HF_ACCEPTED: &[&str] = &["hf_tokenizer_name", "tokenizer_mode", "tokenizer_kwargs", "hf_model_pretrained"];
const HF_DEFAULTS: &[(&str, &str)] = &[("output_tokens", "false")];

fn text_tower(t: &TextCfg, file: &str, source: &Source) -> Result<TextTower, String> {
    let at =
        |key: &str, value: &dyn std::fmt::Display, why: &str| format!("{file}: key `text_cfg.{key}` = {value}: {why}");
    let context_length = t.context_length.unwrap_or(77);
    let Some(hf_name) = &t.hf_model_name else {
        let accepted: Vec<_> = TEXT_ACCEPTED.iter().chain(&["hf_model_pretrained"]).copied().collect();
        let defaults: Vec<_> = TEXT_DEFAULTS.iter().chain(BLOCK_DEFAULTS).copied().collect();
        check_rest(file, "text_cfg.", &t.other, &defaults, &accepted)?;
        for (key, value) in [("hf_pooler_type", &t.hf_pooler_type), ("hf_proj_type", &t.hf_proj_type)] {
            if let Some(value) = value {
                return Err(at(key, &format!("{value:?}"), "only read with `hf_model_name`"));
            }
        }
        let c = TextConfig {
            context_length,
            vocab_size: t.vocab_size.unwrap_or(49408),
            width: t.width.unwrap_or(512),
            heads: t.heads.unwrap_or(8),
            layers: t.layers.unwrap_or(12),
        };
        for (key, value) in [("context_length", c.context_length), ("vocab_size", c.vocab_size), ("layers", c.layers)] {
            positive(file, &format!("text_cfg.{key}"), value)?;
        }
        if c.heads <= 0 || c.width % c.heads != 0 {
            return Err(at("heads", &c.heads, &format!("must divide `text_cfg.width` ({})", c.width)));
        }
        return Ok(TextTower::Clip(c));
    };
    check_rest(file, "text_cfg.", &t.other, HF_DEFAULTS, HF_ACCEPTED)?;
    // The Hugging Face config decides these; OpenCLIP ignores them here.
    for (key, value) in [("vocab_size", t.vocab_size), ("width", t.width), ("heads", t.heads), ("layers", t.layers)] {
        if let Some(value) = value {
            return Err(at(key, &value, "has no effect with `hf_model_name` (the Hugging Face config sets it)"));
        }
    }
    let pooler = t.hf_pooler_type.as_deref().unwrap_or("mean_pooler");
    if pooler != "mean_pooler" {
        return Err(at("hf_pooler_type", &format!("{pooler:?}"), "only \"mean_pooler\" is built"));
    }
    let proj = t.hf_proj_type.as_deref().unwrap_or("mlp");
    if proj != "mlp" {
        return Err(at("hf_proj_type", &format!("{proj:?}"), "only \"mlp\" is built"));
    }
    let mut xlmr = hf_text_config(hf_name, source).map_err(|why| at("hf_model_name", &format!("{hf_name:?}"), &why))?;
    xlmr.context_length = context_length;
    Ok(TextTower::XlmRoberta(xlmr))
}

/// `hf_model_name`: a Hugging Face hub name we know the config of (nothing is downloaded), or a
/// folder holding a Hugging Face `config.json`. A relative folder is taken from the model config's
/// own folder, so a config works from any working directory (OpenCLIP reads it from the working
/// directory; the fixture generators hand it an absolute path).
fn hf_text_config(name: &str, source: &Source) -> Result<XlmrConfig, String> {
    match name {
        "xlm-roberta-base" => return Ok(XlmrConfig::base()),
        "xlm-roberta-large" => return Ok(XlmrConfig::large()),
        _ => {}
    }
    let known = "known: xlm-roberta-base, xlm-roberta-large, or a folder with a Hugging Face config.json";
    let dir = match source {
        Source::File(path) => path.parent().unwrap_or(Path::new("")).join(name),
        Source::Builtin(_) => PathBuf::from(name),
    };
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e} ({known})", path.display()))?;
    let hf: HfConfig = from_json(&text, &path.display().to_string())?;
    hf.xlmr(&path.display().to_string())
}

/// A Hugging Face `XLMRobertaConfig` (`config.json`).
#[derive(Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: i64,
    hidden_size: i64,
    num_hidden_layers: i64,
    num_attention_heads: i64,
    intermediate_size: i64,
    max_position_embeddings: i64,
    type_vocab_size: i64,
    pad_token_id: i64,
    layer_norm_eps: f64,
    #[serde(default = "dropout")]
    hidden_dropout_prob: f64,
    #[serde(default = "dropout")]
    attention_probs_dropout_prob: f64,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

fn dropout() -> f64 {
    0.1
}

/// `config.json` keys without effect on the encoder we build, as `transformers` writes them
/// (`save_pretrained` of 4.x and 5.x, and the hub's files): the head class and its labels,
/// special-token ids other than padding (the tokenizer's business), output switches, tying of the
/// LM head, the attention kernel choice and chunking (same values), bookkeeping.
const HF_CONFIG_ACCEPTED: &[&str] = &[
    "_name_or_path",
    "_attn_implementation",
    "architectures",
    "bos_token_id",
    "chunk_size_feed_forward",
    "classifier_dropout",
    "cls_token_id",
    "dtype",
    "eos_token_id",
    "finetuning_task",
    "gradient_checkpointing",
    "id2label",
    "label2id",
    "output_attentions",
    "output_hidden_states",
    "output_past",
    "prefix",
    "problem_type",
    "return_dict",
    "sep_token_id",
    "task_specific_params",
    "tie_word_embeddings",
    "tokenizer_class",
    "torch_dtype",
    "torchscript",
    "transformers_version",
    "use_cache",
];
/// Built only at `XLMRobertaConfig`'s default (`initializer_range`: our init is normal(0, 0.02));
/// `add_cross_attention` / `is_decoder` = true would make another model (decoder layers), and
/// `pruned_heads` other attention shapes.
const HF_CONFIG_DEFAULTS: &[(&str, &str)] = &[
    ("hidden_act", "\"gelu\""),
    ("position_embedding_type", "\"absolute\""),
    ("initializer_range", "0.02"),
    ("add_cross_attention", "false"),
    ("is_decoder", "false"),
    ("pruned_heads", "{}"),
];

impl HfConfig {
    fn xlmr(&self, file: &str) -> Result<XlmrConfig, String> {
        if self.model_type != "xlm-roberta" {
            return Err(format!("{file}: key `model_type` = {:?}: only \"xlm-roberta\" is built", self.model_type));
        }
        check_rest(file, "", &self.other, HF_CONFIG_DEFAULTS, HF_CONFIG_ACCEPTED)?;
        for (key, value) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("intermediate_size", self.intermediate_size),
            ("max_position_embeddings", self.max_position_embeddings),
            ("type_vocab_size", self.type_vocab_size),
        ] {
            positive(file, key, value)?;
        }
        let bad = |key: &str, value: &dyn std::fmt::Display, why: String| {
            Err(format!("{file}: key `{key}` = {value}: {why}"))
        };
        if self.hidden_size % self.num_attention_heads != 0 {
            return bad(
                "num_attention_heads",
                &self.num_attention_heads,
                format!("must divide `hidden_size` ({})", self.hidden_size),
            );
        }
        if !(0..self.vocab_size).contains(&self.pad_token_id) {
            return bad(
                "pad_token_id",
                &self.pad_token_id,
                format!("must be a token id below `vocab_size` ({})", self.vocab_size),
            );
        }
        // RoBERTa's positions start after the padding id: 77 tokens need pad_token_id + 1 + 77 rows.
        let needed = self.pad_token_id + 1 + 77;
        if self.max_position_embeddings < needed {
            return bad(
                "max_position_embeddings",
                &self.max_position_embeddings,
                format!("must be at least {needed} for 77 tokens"),
            );
        }
        if !(self.layer_norm_eps > 0.0 && self.layer_norm_eps.is_finite()) {
            return bad("layer_norm_eps", &self.layer_norm_eps, "must be a number > 0".into());
        }
        for (key, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            ("attention_probs_dropout_prob", self.attention_probs_dropout_prob),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(key, &p, "must be in [0, 1)".into());
            }
        }
        Ok(XlmrConfig {
            context_length: 77,
            vocab_size: self.vocab_size,
            hidden_size: self.hidden_size,
            layers: self.num_hidden_layers,
            heads: self.num_attention_heads,
            intermediate_size: self.intermediate_size,
            max_position_embeddings: self.max_position_embeddings,
            type_vocab_size: self.type_vocab_size,
            pad_token_id: self.pad_token_id,
            layer_norm_eps: self.layer_norm_eps,
            hidden_dropout: self.hidden_dropout_prob,
            attention_dropout: self.attention_probs_dropout_prob,
        })
    }
}

/// The keys serde left over: each must be `accepted` or equal its OpenCLIP default in `defaults`
/// (JSON text); anything else is an error naming the file, the key and the value.
fn check_rest(
    file: &str,
    section: &str,
    rest: &BTreeMap<String, Value>,
    defaults: &[(&str, &str)],
    accepted: &[&str],
) -> Result<(), String> {
    for (key, value) in rest {
        if accepted.contains(&key.as_str()) {
            continue;
        }
        match defaults.iter().find(|(k, _)| k == key) {
            Some((_, default)) => {
                let default: Value = serde_json::from_str(default).expect("defaults are JSON");
                if !same(value, &default) {
                    return Err(format!(
                        "{file}: key `{section}{key}` = {value}: not built (ferroclip builds only OpenCLIP's \
                         default, {default})"
                    ));
                }
            }
            None => {
                return Err(format!("{file}: key `{section}{key}` = {value}: not a model-config key ferroclip builds"))
            }
        }
    }
    Ok(())
}

fn positive(file: &str, key: &str, value: i64) -> Result<(), String> {
    match value > 0 {
        true => Ok(()),
        false => Err(format!("{file}: key `{key}` = {value}: must be at least 1")),
    }
}

/// JSON equality with `4` == `4.0`.
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => x == y,
        _ => a == b,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repo() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
    }

    #[test]
    fn builtins_are_the_files_of_configs_models() {
        let mut on_disk: Vec<String> = std::fs::read_dir(repo().join("configs/models"))
            .unwrap()
            .map(|e| e.unwrap().path().file_stem().unwrap().to_string_lossy().into_owned())
            .collect();
        on_disk.sort();
        let mut names: Vec<String> = builtin_names().iter().map(|s| s.to_string()).collect();
        names.sort();
        assert_eq!(names, on_disk);
        for name in builtin_names() {
            assert_eq!(resolve(name).unwrap().arch, name);
        }
    }

    #[test]
    fn seed_archs_have_open_clip_shapes() {
        let c = resolve("convnext_large_d_320").unwrap();
        assert_eq!(c.embed_dim, 768);
        assert_eq!(
            c.vision,
            VisionConfig::ConvNext(ConvNextConfig {
                dims: [192, 384, 768, 1536],
                depths: [3, 3, 27, 3],
                drop_path_rate: 0.1,
                proj: ConvNextProj::Mlp,
                head_drop: 0.0,
                image_size: 320,
            })
        );
        assert_eq!(
            c.text,
            TextTower::Clip(TextConfig { context_length: 77, vocab_size: 49408, width: 768, heads: 12, layers: 16 })
        );
        let v = resolve("ViT-B-32").unwrap();
        assert_eq!(
            v.vision,
            VisionConfig::Vit(VitConfig { image_size: 224, patch_size: 32, width: 768, layers: 12, heads: 12 })
        );
        assert_eq!(resolve("xlm-roberta-base-ViT-B-32").unwrap().text, TextTower::XlmRoberta(XlmrConfig::base()));
    }

    #[test]
    fn test_archs_resolve_by_path_with_their_hf_config() {
        let c = resolve(repo().join("tests/models/xlmr_vit_test.json").to_str().unwrap()).unwrap();
        assert_eq!(c.arch, "xlmr_vit_test");
        let TextTower::XlmRoberta(x) = &c.text else { panic!("{:?}", c.text) };
        assert_eq!((x.hidden_size, x.layers, x.heads, x.intermediate_size), (32, 2, 2, 64));
        assert_eq!((x.max_position_embeddings, x.vocab_size, x.pad_token_id), (80, 250002, 1));
    }

    fn err(json: &str) -> String {
        parse("x", json, &Source::File(Path::new("my/x.json"))).unwrap_err()
    }

    #[test]
    fn keys_not_built_are_errors_naming_file_key_and_value() {
        let vit = r#""vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8}"#;
        let text = r#""text_cfg": {"width": 32, "heads": 2, "layers": 2}"#;
        let ok = format!(r#"{{"embed_dim": 16, {vit}, {text}}}"#);
        let vit_shape = r#""layers": 2, "width": 64, "patch_size": 8"#;
        parse("x", &ok, &Source::File(Path::new("x.json"))).unwrap();
        let cases = [
            (format!(r#"{{"embed_dim": 16, {vit}, {text}, "quick_gelu": true}}"#), "key `quick_gelu` = true"),
            (
                ok.replace(r#""patch_size": 8"#, r#""patch_size": 8, "ls_init_value": 0.1"#),
                "`vision_cfg.ls_init_value` = 0.1",
            ),
            (ok.replace(r#""layers": 2}"#, r#""layers": 2, "pool_typ": "eos"}"#), "`text_cfg.pool_typ` = \"eos\""),
            (
                ok.replace(r#""layers": 2}"#, r#""layers": 2, "hf_pooler_type": "cls_pooler"}"#),
                "`text_cfg.hf_pooler_type`",
            ),
            (ok.replace(r#""image_size": 32"#, r#""image_size": "32""#), "key `vision_cfg.image_size`"),
            (ok.replace(vit_shape, r#""timm_model_name": "resnet50""#), "`vision_cfg.timm_model_name` = \"resnet50\""),
            (
                ok.replace(vit_shape, r#""timm_model_name": "convnext_base", "timm_pool": "avg""#),
                "`vision_cfg.timm_pool` = \"avg\"",
            ),
            (
                ok.replace(r#"{"width": 32, "heads": 2, "layers": 2}"#, r#"{"hf_model_name": "bert-base-uncased"}"#),
                "`text_cfg.hf_model_name` = \"bert-base-uncased\"",
            ),
        ];
        for (json, needle) in cases {
            let e = err(&json);
            assert!(e.starts_with("my/x.json: ") && e.contains(needle), "{needle}: {e}");
        }
        // Keys at OpenCLIP's default and those without effect on the model are accepted.
        let defaults = ok.replace(r#""patch_size": 8"#, r#""patch_size": 8, "mlp_ratio": 4, "pool_type": "tok""#);
        let accepted = defaults.replace(r#""layers": 2}"#, r#""layers": 2, "hf_tokenizer_name": "y"}"#);
        parse("x", &accepted, &Source::Builtin("x")).unwrap();
    }

    /// `XLMRobertaConfig(...).save_pretrained()` of transformers 5.23 (the version the fixtures pin)
    /// writes these keys; it loads, and a key that would change the model is refused by name.
    #[test]
    fn config_json_as_transformers_5_writes_it_loads() {
        let written = r#"{
          "add_cross_attention": false, "attention_probs_dropout_prob": 0.1, "bos_token_id": 0,
          "classifier_dropout": null, "eos_token_id": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
          "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": 37, "is_decoder": false,
          "layer_norm_eps": 1e-12, "max_position_embeddings": 80, "model_type": "xlm-roberta",
          "num_attention_heads": 2, "num_hidden_layers": 2, "pad_token_id": 1, "tie_word_embeddings": true,
          "transformers_version": "5.23.0", "type_vocab_size": 2, "use_cache": true, "vocab_size": 100
        }"#;
        let hf: HfConfig = from_json(written, "c.json").unwrap();
        assert_eq!(hf.xlmr("c.json").unwrap().intermediate_size, 37);
        for (key, value) in [("add_cross_attention", "true"), ("is_decoder", "true")] {
            let changed = written.replace(&format!("\"{key}\": false"), &format!("\"{key}\": {value}"));
            let hf: HfConfig = from_json(&changed, "c.json").unwrap();
            let e = hf.xlmr("c.json").unwrap_err();
            assert!(e.contains(&format!("key `{key}` = true")), "{e}");
        }
    }

    #[test]
    fn shapes_the_towers_cannot_build_are_errors_naming_the_key() {
        let convnext = std::fs::read_to_string(repo().join("tests/models/convnext_test.json")).unwrap();
        let e = err(&convnext.replace(r#""image_size": 64"#, r#""image_size": 20"#));
        assert!(e.contains("`vision_cfg.image_size` = 20") && e.contains("at least 32"), "{e}");

        // A Hugging Face config.json whose shapes would make the text tower panic in libtorch.
        let hf = std::fs::read_to_string(repo().join("tests/models/xlmr_tiny/config.json")).unwrap();
        let base: serde_json::Value = serde_json::from_str(&hf).unwrap();
        for (key, value, needle) in [
            ("num_attention_heads", serde_json::json!(3), "must divide `hidden_size`"),
            ("hidden_size", serde_json::json!(0), "must be at least 1"),
            ("pad_token_id", serde_json::json!(-1), "below `vocab_size`"),
            ("max_position_embeddings", serde_json::json!(40), "at least 79"),
            ("hidden_dropout_prob", serde_json::json!(1.5), "[0, 1)"),
        ] {
            let mut bad = base.clone();
            bad[key] = value;
            let cfg: HfConfig = serde_json::from_value(bad).unwrap();
            let e = cfg.xlmr("hf/config.json").unwrap_err();
            assert!(e.starts_with("hf/config.json: key `") && e.contains(key) && e.contains(needle), "{key}: {e}");
        }
    }

    /// The README's example of a new architecture is one we build.
    #[test]
    fn readme_example_builds() {
        let readme = std::fs::read_to_string(repo().join("README.md")).unwrap();
        let models = &readme[readme.find("## Models").unwrap()..];
        let json = models.split("```json\n").nth(1).unwrap().split("```").next().unwrap();
        let c = parse("my-ViT-B-16", json, &Source::File(Path::new("configs/my-ViT-B-16.json"))).unwrap();
        let vit_b_16 = VitConfig { image_size: 224, patch_size: 16, width: 768, layers: 12, heads: 12 };
        assert_eq!(c.vision, VisionConfig::Vit(vit_b_16));
    }

    #[test]
    fn unknown_names_list_the_builtins() {
        let e = resolve("convnext_nope").unwrap_err();
        assert!(e.contains("`convnext_nope`") && e.contains("convnext_base_w, convnext_base_w_320"), "{e}");
        let e = resolve("no/such.json").unwrap_err();
        assert!(e.starts_with("no/such.json: cannot read"), "{e}");
    }
}
