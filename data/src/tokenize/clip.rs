//! OpenAI CLIP's byte-level BPE tokenizer, as OpenCLIP 3.3's default `SimpleTokenizer`.
//!
//! Follows `open_clip/tokenizer.py` (`SimpleTokenizer` with `clean='lower'`, no reduction
//! mask) and its vocabulary `bpe_simple_vocab_16e6.txt.gz`, embedded here:
//! 1. clean: `ftfy.fix_text` subset, `html.unescape` ×2, strip, whitespace folding, lower
//!    (see [`super::clean`] for what of ftfy is replicated);
//! 2. split with `<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+`
//!    (case-insensitive in Python's `regex`; the equivalent on lower-cased text is spelled out);
//! 3. map each piece's UTF-8 bytes through `bytes_to_unicode`, mark the last symbol with
//!    `</w>`, and apply the 48 894 merges lowest rank first, all non-overlapping occurrences
//!    left to right per step;
//! 4. `[49406] + ids + [49407]`, zero padded to the context length; a longer row is cut to
//!    the context length and its last id replaced by 49407.
//!
//! Merges run on vocabulary ids rather than strings; results are memoized per piece in a
//! sharded, bounded cache that the loader's threads share. The vocabulary is parsed once per
//! process, so tokenizers for several context lengths cost no more than one.

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::io::Read;
use std::sync::{OnceLock, RwLock};

use regex::Regex;

use super::{clean, Tokenizer};

/// OpenAI CLIP's context length.
pub const DEFAULT_CONTEXT_LENGTH: usize = 77;
/// Id of `<start_of_text>`.
pub const SOT_TOKEN_ID: i64 = 49406;
/// Id of `<end_of_text>`.
pub const EOT_TOKEN_ID: i64 = 49407;
/// Vocabulary size: 256 byte symbols, 256 end-of-word byte symbols, 48 894 merges, 2 specials.
pub const VOCAB_SIZE: usize = 49408;

const SPECIAL_TOKENS: [&str; 2] = ["<start_of_text>", "<end_of_text>"];
/// `merges = merges[1:49152-256-2+1]` in `SimpleTokenizer.__init__`.
const NUM_MERGES: usize = 49152 - 256 - 2;
static BPE_VOCAB_GZ: &[u8] = include_bytes!("../../assets/bpe_simple_vocab_16e6.txt.gz");

const CACHE_SHARDS: usize = 32;
/// Entries per shard before it is emptied; keeps memory flat on endless caption streams.
const CACHE_SHARD_CAPACITY: usize = 1 << 14;

/// CLIP BPE tokenizer with OpenCLIP's ids, cleaning, padding and truncation.
pub struct ClipTokenizer {
    context_length: usize,
    vocab: &'static Vocab,
    cache: Vec<RwLock<HashMap<String, Vec<u32>>>>,
}

/// The parsed vocabulary, built once per process and shared by every [`ClipTokenizer`].
struct Vocab {
    /// `byte_decoder`: stand-in character → byte.
    byte_decoder: HashMap<char, u8>,
    /// Vocabulary id of each byte's symbol; `+ 256` is its `</w>` form.
    byte_id: [u32; 256],
    /// `(left id, right id)` → `(rank, merged id)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    /// Id → vocabulary string (byte stand-in characters, `</w>` suffixes).
    decoder: Vec<String>,
    pattern: Regex,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("context_length", &self.context_length).finish_non_exhaustive()
    }
}

impl Default for ClipTokenizer {
    fn default() -> Self {
        Self::new()
    }
}

/// `bytes_to_unicode`: printable Latin-1 bytes stand for themselves, the other 68 bytes map
/// to U+0100 upwards. Returned in the order of the original dict (the vocabulary order).
fn bytes_to_unicode() -> Vec<(u8, char)> {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xa1..=0xac).chain(0xae..=0xff).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    bs.into_iter().zip(cs).map(|(b, c)| (b as u8, char::from_u32(c).unwrap())).collect()
}

impl Vocab {
    /// Parses the embedded `bpe_simple_vocab_16e6.txt.gz` as `SimpleTokenizer.__init__` does.
    fn load() -> Self {
        let mut text = String::new();
        flate2::read::GzDecoder::new(BPE_VOCAB_GZ)
            .read_to_string(&mut text)
            .expect("embedded CLIP BPE vocabulary is valid gzip/UTF-8");
        let merge_lines: Vec<(&str, &str)> = text
            .split('\n')
            .skip(1)
            .take(NUM_MERGES)
            .map(|line| {
                let mut parts = line.split_whitespace();
                (parts.next().unwrap(), parts.next().unwrap())
            })
            .collect();

        let b2u = bytes_to_unicode();
        let mut byte_encoder = ['\0'; 256];
        let mut vocab: Vec<String> = Vec::with_capacity(VOCAB_SIZE);
        for &(b, c) in &b2u {
            byte_encoder[b as usize] = c;
            vocab.push(c.to_string());
        }
        for &(_, c) in &b2u {
            vocab.push(format!("{c}</w>"));
        }
        vocab.extend(merge_lines.iter().map(|(a, b)| format!("{a}{b}")));
        vocab.extend(SPECIAL_TOKENS.iter().map(|s| s.to_string()));
        // dict(zip(vocab, range)): a repeated string keeps its last id.
        let encoder: HashMap<&str, u32> = vocab.iter().enumerate().map(|(i, s)| (s.as_str(), i as u32)).collect();

        let mut byte_id = [0u32; 256];
        for (b, c) in byte_encoder.iter().enumerate() {
            byte_id[b] = encoder[c.to_string().as_str()];
        }
        let mut merges = HashMap::with_capacity(merge_lines.len());
        for (rank, (a, b)) in merge_lines.iter().enumerate() {
            let key = (encoder[a], encoder[b]);
            merges.insert(key, (rank as u32, encoder[format!("{a}{b}").as_str()]));
        }

        // OpenCLIP compiles the pattern with IGNORECASE, but it only ever sees lower-cased
        // text, where case-insensitivity changes exactly two things in Python's `regex`: `'s`
        // also matches `'ſ` (simple case folding), and U+0345 (which folds to `ι`) matches
        // no branch at all, so it is dropped. Rust's `(?i)` would instead make U+0345 a
        // letter, so the folding is spelled out here.
        let specials = SPECIAL_TOKENS.join("|");
        let pattern = Regex::new(&format!(
            r"{specials}|'[sſ]|'t|'re|'ve|'m|'ll|'d|[\p{{L}}]+|[\p{{N}}]|[^\s\p{{L}}\p{{N}}\x{{345}}]+"
        ))
        .expect("CLIP pre-tokenizer pattern");

        Self { byte_decoder: b2u.iter().map(|&(b, c)| (c, b)).collect(), byte_id, merges, decoder: vocab, pattern }
    }
}

impl ClipTokenizer {
    /// The OpenAI vocabulary with context length 77.
    pub fn new() -> Self {
        Self::with_context_length(DEFAULT_CONTEXT_LENGTH)
    }

    /// The OpenAI vocabulary with another context length (at least 1).
    pub fn with_context_length(context_length: usize) -> Self {
        assert!(context_length >= 1, "context length must be at least 1");
        static VOCAB: OnceLock<Vocab> = OnceLock::new();
        Self {
            context_length,
            vocab: VOCAB.get_or_init(Vocab::load),
            cache: (0..CACHE_SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
        }
    }

    /// Token ids of `text` without start/end tokens, padding or truncation
    /// (`SimpleTokenizer.encode`).
    pub fn encode_text(&self, text: &str) -> Vec<i64> {
        let mut ids = Vec::new();
        self.encode_pieces(&clean::clean_lower(text), usize::MAX, &mut ids);
        ids
    }

    /// Appends the ids of the pieces of already cleaned `text` until `ids` holds `limit`.
    fn encode_pieces(&self, text: &str, limit: usize, ids: &mut Vec<i64>) {
        for piece in self.vocab.pattern.find_iter(text) {
            if ids.len() >= limit {
                return;
            }
            let piece = piece.as_str();
            if let Some(pos) = SPECIAL_TOKENS.iter().position(|s| *s == piece) {
                ids.push(SOT_TOKEN_ID + pos as i64);
                continue;
            }
            self.with_bpe(piece, |word| ids.extend(word.iter().map(|&id| id as i64)));
        }
    }

    fn with_bpe(&self, piece: &str, f: impl FnOnce(&[u32])) {
        let mut hasher = DefaultHasher::new();
        piece.hash(&mut hasher);
        let shard = &self.cache[hasher.finish() as usize % CACHE_SHARDS];
        if let Some(word) = shard.read().unwrap().get(piece) {
            return f(word);
        }
        let word = self.bpe(piece.as_bytes());
        f(&word);
        let mut map = shard.write().unwrap();
        if map.len() >= CACHE_SHARD_CAPACITY {
            map.clear();
        }
        map.insert(piece.to_string(), word);
    }

    /// `SimpleTokenizer.bpe` on one piece's bytes, in vocabulary ids.
    fn bpe(&self, bytes: &[u8]) -> Vec<u32> {
        let mut word: Vec<u32> = bytes.iter().map(|&b| self.vocab.byte_id[b as usize]).collect();
        if let Some(last) = word.last_mut() {
            *last += 256; // the `</w>` form of the final symbol
        }
        while word.len() > 1 {
            let best = word
                .windows(2)
                .filter_map(|p| self.vocab.merges.get(&(p[0], p[1])).map(|&(rank, id)| (rank, p[0], p[1], id)))
                .min();
            let Some((_, first, second, merged)) = best else {
                break;
            };
            let mut next = Vec::with_capacity(word.len());
            let mut i = 0;
            while i < word.len() {
                if i + 1 < word.len() && word[i] == first && word[i + 1] == second {
                    next.push(merged);
                    i += 2;
                } else {
                    next.push(word[i]);
                    i += 1;
                }
            }
            word = next;
        }
        word
    }

    /// `SimpleTokenizer.decode`: ids back to text, `</w>` as a space; invalid UTF-8 becomes
    /// U+FFFD. Ids outside the vocabulary are skipped.
    pub fn decode(&self, ids: &[i64]) -> String {
        let mut bytes = Vec::new();
        for &id in ids {
            let Some(token) = usize::try_from(id).ok().and_then(|i| self.vocab.decoder.get(i)) else {
                continue;
            };
            for c in token.chars() {
                match self.vocab.byte_decoder.get(&c) {
                    Some(&b) => bytes.push(b),
                    // Unreachable for vocabulary strings, which are all byte stand-ins.
                    None => bytes.extend(c.to_string().as_bytes()),
                }
            }
        }
        String::from_utf8_lossy(&bytes).replace("</w>", " ")
    }
}

impl Tokenizer for ClipTokenizer {
    fn context_length(&self) -> usize {
        self.context_length
    }

    fn encode_into(&self, text: &str, out: &mut [i64]) {
        let n = self.context_length;
        assert_eq!(out.len(), n, "output row must hold context_length ids");
        let mut ids = Vec::with_capacity(n + 1);
        ids.push(SOT_TOKEN_ID);
        // Pieces past the context are cut anyway; stop once the row is known to overflow.
        self.encode_pieces(&clean::clean_lower(text), n, &mut ids);
        ids.push(EOT_TOKEN_ID);
        if ids.len() > n {
            ids.truncate(n);
            ids[n - 1] = EOT_TOKEN_ID;
        }
        out[..ids.len()].copy_from_slice(&ids);
        out[ids.len()..].fill(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tok() -> &'static ClipTokenizer {
        static T: std::sync::OnceLock<ClipTokenizer> = std::sync::OnceLock::new();
        T.get_or_init(ClipTokenizer::new)
    }

    #[test]
    fn byte_table_matches_openai() {
        let b2u = bytes_to_unicode();
        assert_eq!(b2u.len(), 256);
        assert_eq!(b2u[0], (b'!', '!'));
        assert_eq!(tok().vocab.byte_decoder[&'Ġ'], b' ');
        assert_eq!(tok().vocab.byte_decoder[&'Ċ'], b'\n');
        assert_eq!(tok().vocab.decoder.len(), VOCAB_SIZE);
        assert_eq!(tok().vocab.decoder[SOT_TOKEN_ID as usize], "<start_of_text>");
    }

    #[test]
    fn encodes_known_words() {
        // open_clip.tokenize("a photo of a dog")[0][:7]
        assert_eq!(tok().encode_text("a photo of a dog"), vec![320, 1125, 539, 320, 1929]);
        // "hello" and "!!" are single tokens (open_clip: [3306, 748]).
        assert_eq!(tok().encode_text("Hello!!"), vec![3306, 748]);
    }

    #[test]
    fn pads_and_truncates_keeping_eot() {
        let row = tok().encode("a dog");
        assert_eq!(row.len(), 77);
        assert_eq!(&row[..4], &[SOT_TOKEN_ID, 320, 1929, EOT_TOKEN_ID]);
        assert!(row[4..].iter().all(|&x| x == 0));

        let long = "dog ".repeat(200);
        let row = tok().encode(&long);
        assert_eq!(row[0], SOT_TOKEN_ID);
        assert!(row[1..76].iter().all(|&x| x == 1929));
        assert_eq!(row[76], EOT_TOKEN_ID);

        let short = ClipTokenizer::with_context_length(3);
        assert_eq!(short.encode("a dog barks"), vec![SOT_TOKEN_ID, 320, EOT_TOKEN_ID]);
        assert_eq!(short.encode("a"), vec![SOT_TOKEN_ID, 320, EOT_TOKEN_ID]);
    }

    #[test]
    fn special_token_text_maps_to_special_id() {
        assert_eq!(tok().encode_text("<END_of_text>"), vec![EOT_TOKEN_ID]);
    }

    #[test]
    fn decode_roundtrips_cleaned_text() {
        // open_clip: _tokenizer.decode(_tokenizer.encode("A café, 12 dogs & 3 cats!"))
        let ids = tok().encode_text("A café, 12 dogs & 3 cats!");
        assert_eq!(tok().decode(&ids), "a café , 1 2 dogs & 3 cats ! ");
    }

    #[test]
    fn shared_across_threads() {
        let rows: Vec<Vec<i64>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4).map(|_| s.spawn(|| tok().encode("threads share one cache"))).collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(rows.windows(2).all(|w| w[0] == w[1]));
    }
}
