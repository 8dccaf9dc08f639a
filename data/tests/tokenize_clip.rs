//! Parity of `ClipTokenizer` with open_clip 3.3's default tokenizer on the captions of
//! `fixtures/tokenizer/clip_bpe.jsonl` (written by `scripts/gen-tokenizer-fixtures.py`).

use std::collections::HashMap;
use std::path::Path;

use ferroclip_data::tokenize::{ClipTokenizer, Tokenizer};
use serde::Deserialize;

#[derive(Deserialize)]
struct Row {
    text: String,
    #[serde(default)]
    context_length: Option<usize>,
    ids: Vec<i64>,
    /// `SimpleTokenizer.decode` of the ids between start and end token (77-long rows).
    #[serde(default)]
    decoded: Option<String>,
}

fn rows() -> Vec<Row> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer/clip_bpe.jsonl");
    let text = std::fs::read_to_string(&path).expect("clip_bpe.jsonl fixture");
    text.lines().map(|l| serde_json::from_str(l).expect("fixture row")).collect()
}

#[test]
fn matches_open_clip_ids() {
    let rows = rows();
    assert!(rows.len() >= 500, "fixture unexpectedly small: {}", rows.len());
    let mut tokenizers: HashMap<usize, ClipTokenizer> = HashMap::new();
    let mut failures = Vec::new();
    for row in &rows {
        let n = row.context_length.unwrap_or(77);
        assert_eq!(row.ids.len(), n);
        let tok = tokenizers.entry(n).or_insert_with(|| ClipTokenizer::with_context_length(n));
        let got = tok.encode(&row.text);
        if got != row.ids {
            failures.push(format!("{:?} (context {n})\n  want {:?}\n  got  {:?}", row.text, row.ids, got));
        }
    }
    assert!(failures.is_empty(), "{} of {} rows differ:\n{}", failures.len(), rows.len(), failures.join("\n"));
    // The fixture exercises truncation and every context length it was written for.
    assert!(rows.iter().any(|r| r.ids.len() == 77 && r.ids[76] == 49407));
    assert_eq!(tokenizers.len(), 4);
}

#[test]
fn decode_matches_open_clip() {
    let tok = ClipTokenizer::new();
    let mut checked = 0;
    for row in rows() {
        let Some(want) = row.decoded else { continue };
        let end = row.ids.iter().position(|&id| id == 49407).unwrap();
        assert_eq!(tok.decode(&row.ids[1..end]), want, "decode of {:?}", row.text);
        checked += 1;
    }
    assert!(checked >= 500, "only {checked} rows carry a decoded text");
}

#[test]
fn rows_are_identical_across_threads() {
    let rows = rows();
    let tok = ClipTokenizer::new();
    let texts: Vec<&str> = rows.iter().filter(|r| r.context_length.is_none()).map(|r| r.text.as_str()).collect();
    let expected: Vec<Vec<i64>> = rows.iter().filter(|r| r.context_length.is_none()).map(|r| r.ids.clone()).collect();
    std::thread::scope(|s| {
        for t in 0..4 {
            let (tok, texts, expected) = (&tok, &texts, &expected);
            s.spawn(move || {
                // Each thread walks the captions from a different offset so cache fills race.
                for i in 0..texts.len() {
                    let j = (i + t * texts.len() / 4) % texts.len();
                    assert_eq!(tok.encode(texts[j]), expected[j], "{:?}", texts[j]);
                }
            });
        }
    });
}
