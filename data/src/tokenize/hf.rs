//! A Hugging Face `tokenizer.json` used the way OpenCLIP's `HFTokenizer` uses it.
//!
//! Follows `open_clip/tokenizer.py` (`HFTokenizer.__call__` in its default mode, as built by
//! `open_clip.get_tokenizer` for `xlm-roberta-base-ViT-B-32.json`): captions are cleaned with
//! the `'whitespace'` function (ftfy subset, HTML unescape, whitespace folding, no
//! lower-casing), then tokenized with special tokens, `truncation=True` (longest-first,
//! right side) and `padding='max_length'` (right side) to the context length, padding with
//! the tokenizer's pad id (1 for XLM-R). `strip_sep_token` is off for that config, so the
//! `</s>` id stays. The attention mask is 1 on real tokens and 0 on padding.

use std::path::Path;

use tokenizers::{
    PaddingDirection, PaddingParams, PaddingStrategy, PostProcessor, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use super::{clean, Tokenizer, TokenizerError};

/// A `tokenizer.json` with OpenCLIP's padding/truncation to a fixed context length.
pub struct HfTokenizer {
    inner: tokenizers::Tokenizer,
    context_length: usize,
    pad_id: u32,
}

impl std::fmt::Debug for HfTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HfTokenizer")
            .field("context_length", &self.context_length)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

impl HfTokenizer {
    /// Loads `path` (a `tokenizer.json`); rows are `context_length` ids. The pad id is the
    /// file's padding id when it sets one, else the id of `<pad>`.
    pub fn from_file(path: &Path, context_length: usize) -> Result<Self, TokenizerError> {
        let load_err = |message: String| TokenizerError::Load { path: path.to_path_buf(), message };
        if context_length == 0 {
            return Err(TokenizerError::ZeroContext);
        }
        let mut inner = tokenizers::Tokenizer::from_file(path).map_err(|e| load_err(e.to_string()))?;
        // The template's special tokens (`<s>`, `</s>`) must fit; a shorter row has no
        // room for text, and the tokenizers crate's truncation would underflow.
        let specials = inner.get_post_processor().map_or(0, |p| p.added_tokens(false));
        if context_length < specials {
            return Err(TokenizerError::ContextTooShort { context_length, specials });
        }
        let (pad_id, pad_token) = match inner.get_padding() {
            Some(p) => (p.pad_id, p.pad_token.clone()),
            None => match inner.token_to_id("<pad>") {
                Some(id) => (id, "<pad>".to_string()),
                None => return Err(TokenizerError::NoPadToken { path: path.to_path_buf() }),
            },
        };
        inner
            .with_truncation(Some(TruncationParams {
                direction: TruncationDirection::Right,
                max_length: context_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
            }))
            .map_err(|e| load_err(e.to_string()))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(context_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        Ok(Self { inner, context_length, pad_id })
    }

    /// The padding id (OpenCLIP's text encoder masks positions holding it).
    pub fn pad_id(&self) -> i64 {
        self.pad_id as i64
    }

    /// Ids and attention mask (1 = token, 0 = padding), each `context_length` long.
    pub fn encode_with_mask(&self, text: &str) -> (Vec<i64>, Vec<i64>) {
        let enc = self.encode_raw(text);
        let ids = enc.get_ids().iter().map(|&x| x as i64).collect();
        let mask = enc.get_attention_mask().iter().map(|&x| x as i64).collect();
        (ids, mask)
    }

    fn encode_raw(&self, text: &str) -> tokenizers::Encoding {
        self.inner
            .encode(clean::clean_whitespace(text), true)
            // Encoding a plain string fails only on a broken model (e.g. an id without a
            // token), which `from_file` would already have rejected.
            .expect("tokenizer.json encodes text")
    }
}

impl Tokenizer for HfTokenizer {
    fn context_length(&self) -> usize {
        self.context_length
    }

    fn encode_into(&self, text: &str, out: &mut [i64]) {
        assert_eq!(out.len(), self.context_length, "output row must hold context_length ids");
        let enc = self.encode_raw(text);
        for (o, &id) in out.iter_mut().zip(enc.get_ids()) {
            *o = id as i64;
        }
    }
}
