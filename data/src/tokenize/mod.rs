//! Text → token ids, with OpenCLIP's semantics.
//!
//! [`ClipTokenizer`] is OpenAI CLIP's BPE (`open_clip.tokenizer.SimpleTokenizer`);
//! [`HfTokenizer`] runs a Hugging Face `tokenizer.json` the way `open_clip.tokenizer.HFTokenizer`
//! calls it (XLM-RoBERTa text tower). Both clean captions as OpenCLIP does ([`clean`]).
//! [`TokenizerConfig`] (`model.tokenizer`) names one and builds it.

pub mod clean;
pub mod clip;
pub mod hf;

use std::path::PathBuf;
use std::sync::Arc;

pub use clip::{ClipTokenizer, EOT_TOKEN_ID, SOT_TOKEN_ID};
pub use hf::HfTokenizer;

/// Encodes captions into fixed-length id rows.
pub trait Tokenizer: Send + Sync {
    /// Ids per caption (77 for CLIP).
    fn context_length(&self) -> usize;
    /// Write exactly `context_length()` ids for `text` into `out` (padded, truncated).
    fn encode_into(&self, text: &str, out: &mut [i64]);
    fn encode(&self, text: &str) -> Vec<i64> {
        let mut out = vec![0; self.context_length()];
        self.encode_into(text, &mut out);
        out
    }
}

/// Why a tokenizer could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("context length must be at least 1")]
    ZeroContext,
    #[error("context length {context_length} cannot hold the {specials} special tokens the tokenizer adds")]
    ContextTooShort { context_length: usize, specials: usize },
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenizer {path} defines no padding id and has no \"<pad>\" token")]
    NoPadToken { path: PathBuf },
}

/// `model.tokenizer`: `"clip"` (OpenAI CLIP's BPE, vocabulary embedded) or the path of a Hugging
/// Face `tokenizer.json` (the XLM-RoBERTa text tower). Written in a config as that one string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenizerConfig {
    Clip,
    HuggingFace(PathBuf),
}

impl TokenizerConfig {
    /// The tokenizer, writing `context_length` ids per caption (the text tower's).
    pub fn init(&self, context_length: usize) -> Result<Arc<dyn Tokenizer>, TokenizerError> {
        if context_length == 0 {
            return Err(TokenizerError::ZeroContext);
        }
        Ok(match self {
            TokenizerConfig::Clip => Arc::new(ClipTokenizer::with_context_length(context_length)),
            TokenizerConfig::HuggingFace(path) => Arc::new(HfTokenizer::from_file(path, context_length)?),
        })
    }
}

impl std::fmt::Display for TokenizerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TokenizerConfig::Clip => f.write_str("\"clip\""),
            TokenizerConfig::HuggingFace(path) => write!(f, "{:?}", path.display().to_string()),
        }
    }
}

impl serde::Serialize for TokenizerConfig {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TokenizerConfig::Clip => s.serialize_str("clip"),
            TokenizerConfig::HuggingFace(path) => s.serialize_str(&path.to_string_lossy()),
        }
    }
}

impl<'de> serde::Deserialize<'de> for TokenizerConfig {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        match s.trim() {
            "clip" => Ok(TokenizerConfig::Clip),
            "" => Err(serde::de::Error::custom("expected \"clip\" or the path of a Hugging Face tokenizer.json")),
            _ => Ok(TokenizerConfig::HuggingFace(PathBuf::from(s))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_config_builds_its_kind() {
        let t = TokenizerConfig::Clip.init(16).unwrap();
        assert_eq!(t.context_length(), 16);
        assert_eq!(t.encode("a dog")[..4], [SOT_TOKEN_ID, 320, 1929, EOT_TOKEN_ID]);
        assert!(matches!(TokenizerConfig::Clip.init(0), Err(TokenizerError::ZeroContext)));
        let missing = TokenizerConfig::HuggingFace("no/such/tokenizer.json".into()).init(77);
        assert!(matches!(missing, Err(TokenizerError::Load { .. })));
    }

    #[test]
    fn tokenizer_config_reads_and_writes_one_string() {
        let parse = |s: &str| serde_json::from_value::<TokenizerConfig>(serde_json::json!(s));
        assert_eq!(parse("clip").unwrap(), TokenizerConfig::Clip);
        assert_eq!(parse("tok/tokenizer.json").unwrap(), TokenizerConfig::HuggingFace("tok/tokenizer.json".into()));
        assert!(parse("").unwrap_err().to_string().contains("tokenizer.json"));
        let path = TokenizerConfig::HuggingFace("a/tokenizer.json".into());
        assert_eq!(serde_json::to_value(&path).unwrap(), serde_json::json!("a/tokenizer.json"));
        assert_eq!(serde_json::to_value(TokenizerConfig::Clip).unwrap(), serde_json::json!("clip"));
    }
}
