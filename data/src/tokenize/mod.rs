//! Text → token ids, with OpenCLIP's semantics.
//!
//! [`ClipTokenizer`] is OpenAI CLIP's BPE (`open_clip.tokenizer.SimpleTokenizer`);
//! [`HfTokenizer`] runs a Hugging Face `tokenizer.json` the way `open_clip.tokenizer.HFTokenizer`
//! calls it (XLM-RoBERTa text tower). Both clean captions as OpenCLIP does ([`clean`]).
//! [`tokenizer_for`] picks one by the config's kind.

pub mod clean;
pub mod clip;
pub mod hf;

use std::path::{Path, PathBuf};
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
    #[error("unknown tokenizer kind {0:?} (expected \"clip\" or \"hf\")")]
    UnknownKind(String),
    #[error("tokenizer kind \"hf\" needs the path of a tokenizer.json")]
    MissingPath,
    #[error("context length must be at least 1")]
    ZeroContext,
    #[error("context length {context_length} cannot hold the {specials} special tokens the tokenizer adds")]
    ContextTooShort {
        context_length: usize,
        specials: usize,
    },
    #[error("cannot load tokenizer {path}: {message}")]
    Load { path: PathBuf, message: String },
    #[error("tokenizer {path} defines no padding id and has no \"<pad>\" token")]
    NoPadToken { path: PathBuf },
}

/// The tokenizer of a text tower: `"clip"` (OpenAI BPE, embedded vocabulary; `path` ignored)
/// or `"hf"` (the Hugging Face `tokenizer.json` at `path`).
pub fn tokenizer_for(
    kind: &str,
    path: Option<&Path>,
    context_length: usize,
) -> Result<Arc<dyn Tokenizer>, TokenizerError> {
    if context_length == 0 {
        return Err(TokenizerError::ZeroContext);
    }
    match kind {
        "clip" => Ok(Arc::new(ClipTokenizer::with_context_length(context_length))),
        "hf" => {
            let path = path.ok_or(TokenizerError::MissingPath)?;
            Ok(Arc::new(HfTokenizer::from_file(path, context_length)?))
        }
        other => Err(TokenizerError::UnknownKind(other.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokenizer_for_picks_kind() {
        let t = tokenizer_for("clip", None, 16).unwrap();
        assert_eq!(t.context_length(), 16);
        assert_eq!(
            t.encode("a dog")[..4],
            [SOT_TOKEN_ID, 320, 1929, EOT_TOKEN_ID]
        );
        assert!(matches!(
            tokenizer_for("hf", None, 77),
            Err(TokenizerError::MissingPath)
        ));
        assert!(matches!(
            tokenizer_for("bpe", None, 77),
            Err(TokenizerError::UnknownKind(_))
        ));
        assert!(matches!(
            tokenizer_for("clip", None, 0),
            Err(TokenizerError::ZeroContext)
        ));
        let missing = tokenizer_for("hf", Some(Path::new("no/such/tokenizer.json")), 77);
        assert!(matches!(missing, Err(TokenizerError::Load { .. })));
    }
}
