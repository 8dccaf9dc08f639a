//! Text → token ids.

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
