//! Caption cleaning exactly as OpenCLIP's tokenizers apply it before tokenizing.
//!
//! Follows `open_clip/tokenizer.py`: `basic_clean` (= `ftfy.fix_text`, then `html.unescape`
//! twice, then `str.strip`), `whitespace_clean` (`" ".join(text.split())`) and the `'lower'`
//! clean function (`whitespace_clean(basic_clean(x)).lower()`) used by `SimpleTokenizer`;
//! `HFTokenizer` uses the `'whitespace'` variant (no lower-casing).
//!
//! # ftfy 6.3 `fix_text` defaults replicated
//! Per line (ftfy splits after each `\n`), repeated until nothing changes, in ftfy's order:
//! `unescape_html` (ftfy's own entity table, including its upper-cased entities such as
//! `&NTILDE;`; switched off for the line and all later lines once a line contains `<`),
//! `fix_c1_controls` (C1 controls read as Windows-1252), `fix_latin_ligatures`,
//! `fix_character_width` (full-width → half-width, ideographic space → space),
//! `uncurl_quotes`, `fix_line_breaks`, `remove_terminal_escapes` (ANSI `ESC[…X`),
//! `remove_control_chars`, and NFC normalization.
//!
//! # Not replicated: ftfy's mojibake repair (`fix_encoding`)
//! ftfy re-decodes text that its "badness" heuristic flags as UTF-8 read through a single-byte
//! code page (`cafÃ©` → `café`), including its `restore_byte_a0`, `replace_lossy_sequences`
//! and `decode_inconsistent_utf8` sub-steps. That heuristic is a large, version-specific table
//! of character classes; captions it would change are tokenized here as they are (the
//! mojibake stays), so their ids can differ from open_clip's. Such captions are rare in
//! curated data; the parity fixtures exclude exactly the captions where `fix_encoding` acts.
//!
//! # Unicode versions
//! Case mapping and NFC here come from Rust's tables (`std`, `unicode-normalization`), letter
//! and number classes from the `regex` crate; open_clip gets them from its Python (3.11:
//! Unicode 14) and the `regex` package (Unicode 17). Ids agree on every character whose
//! properties are the same in both versions; they can differ on characters assigned after
//! Unicode 14 (e.g. `U+A7DA` has no lower-case in Python 3.11) or whose properties changed
//! (`ʕ` stopped being lower-case in Unicode 17, which changes the final-sigma rule next to it).

use std::collections::HashMap;
use std::sync::OnceLock;

use regex::{Captures, Regex};
use unicode_normalization::UnicodeNormalization;

/// The HTML5 named character references (`html.entities.html5`: name, with or without the
/// trailing `;`, → replacement text).
static HTML5_JSON: &str = include_str!("../../assets/html5_entities.json");

fn html5() -> &'static HashMap<String, String> {
    static TABLE: OnceLock<HashMap<String, String>> = OnceLock::new();
    TABLE.get_or_init(|| serde_json::from_str(HTML5_JSON).expect("embedded html5 entity table"))
}

/// Windows-1252 meaning of the bytes 0x80..=0x9F, with the five undefined bytes kept as the
/// C1 control (ftfy's "sloppy" codec). Python's `html.unescape` uses the same table for
/// `&#128;`..`&#159;`.
const CP1252_C1: [char; 32] = [
    '€', '\u{81}', '‚', 'ƒ', '„', '…', '†', '‡', 'ˆ', '‰', 'Š', '‹', 'Œ', '\u{8d}', 'Ž', '\u{8f}', '\u{90}', '‘', '’',
    '“', '”', '•', '–', '—', '˜', '™', 'š', '›', 'œ', '\u{9d}', 'ž', 'Ÿ',
];

/// `'lower'` cleaning of `SimpleTokenizer`: `whitespace_clean(basic_clean(x)).lower()`.
pub fn clean_lower(text: &str) -> String {
    whitespace_clean(&basic_clean(text)).to_lowercase()
}

/// `'whitespace'` cleaning of `HFTokenizer`: `whitespace_clean(basic_clean(x))`.
pub fn clean_whitespace(text: &str) -> String {
    whitespace_clean(&basic_clean(text))
}

/// `basic_clean`: `ftfy.fix_text`, `html.unescape` twice, `strip()`.
pub fn basic_clean(text: &str) -> String {
    let fixed = fix_text(text);
    let unescaped = html_unescape(&html_unescape(&fixed));
    unescaped.trim_matches(is_py_space).to_string()
}

/// `" ".join(text.split())`: runs of Python whitespace become one space, ends trimmed.
pub fn whitespace_clean(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for word in text.split(is_py_space).filter(|w| !w.is_empty()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push_str(word);
    }
    out
}

/// Python's `str.isspace` (what `split()` and `strip()` use). Unlike Rust's
/// `char::is_whitespace` it includes the separators U+001C..U+001F.
pub fn is_py_space(c: char) -> bool {
    matches!(
        c,
        '\t'..='\r'
            | '\u{1c}'..='\u{20}'
            | '\u{85}'
            | '\u{a0}'
            | '\u{1680}'
            | '\u{2000}'..='\u{200a}'
            | '\u{2028}'
            | '\u{2029}'
            | '\u{202f}'
            | '\u{205f}'
            | '\u{3000}'
    )
}

/// The deterministic part of `ftfy.fix_text` with default settings (see the module doc).
pub fn fix_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    // ftfy's `unescape_html="auto"` is switched off for good once a line contains '<'.
    let mut unescape = true;
    for segment in text.split_inclusive('\n') {
        if segment.contains('<') {
            unescape = false;
        }
        out.push_str(&fix_segment(segment, unescape));
    }
    out
}

fn fix_segment(segment: &str, unescape: bool) -> String {
    let mut text = segment.to_string();
    loop {
        let orig = text.clone();
        if unescape {
            text = ftfy_unescape_html(&text);
        }
        text = text
            .chars()
            .flat_map(|c| {
                // fix_c1_controls, fix_latin_ligatures, fix_character_width and uncurl_quotes
                // are char → string maps applied by ftfy as successive passes; chaining them
                // per char is the same since no later map's input appears in an earlier
                // map's output, except quotes (from C1, `ŉ` and full-width), which uncurl sees.
                let c = match c {
                    '\u{80}'..='\u{9f}' => CP1252_C1[c as usize - 0x80],
                    _ => c,
                };
                let mapped: Vec<char> = match ligature(c) {
                    Some(s) => s.chars().collect(),
                    None => match width(c) {
                        Some(s) => s,
                        None => vec![c],
                    },
                };
                mapped.into_iter().map(uncurl)
            })
            .collect();
        text = fix_line_breaks(&text);
        text = ansi_re().replace_all(&text, "").into_owned();
        text.retain(|c| !is_ftfy_control(c));
        text = text.nfc().collect();
        if text == orig {
            return text;
        }
    }
}

fn ligature(c: char) -> Option<&'static str> {
    Some(match c {
        'Ĳ' => "IJ",
        'ĳ' => "ij",
        'ŉ' => "ʼn",
        'Ǳ' => "DZ",
        'ǲ' => "Dz",
        'ǳ' => "dz",
        'Ǆ' => "DŽ",
        'ǅ' => "Dž",
        'ǆ' => "dž",
        'Ǉ' => "LJ",
        'ǈ' => "Lj",
        'ǉ' => "lj",
        'Ǌ' => "NJ",
        'ǋ' => "Nj",
        'ǌ' => "nj",
        'ﬀ' => "ff",
        'ﬁ' => "fi",
        'ﬂ' => "fl",
        'ﬃ' => "ffi",
        'ﬄ' => "ffl",
        'ﬅ' => "ſt",
        'ﬆ' => "st",
        _ => return None,
    })
}

/// ftfy's WIDTH_MAP: U+3000 → space, and U+FF01..U+FFEF → their NFKC form where it differs.
fn width(c: char) -> Option<Vec<char>> {
    match c {
        '\u{3000}' => Some(vec![' ']),
        '\u{ff01}'..='\u{ffef}' => {
            let n: Vec<char> = std::iter::once(c).nfkc().collect();
            (n.as_slice() != [c]).then_some(n)
        }
        _ => None,
    }
}

fn uncurl(c: char) -> char {
    match c {
        '\u{2bc}' | '\u{2018}'..='\u{201b}' => '\'',
        '\u{201c}'..='\u{201f}' => '"',
        _ => c,
    }
}

fn fix_line_breaks(text: &str) -> String {
    if !text.contains(['\r', '\u{2028}', '\u{2029}', '\u{85}']) {
        return text.to_string();
    }
    text.replace("\r\n", "\n").replace(['\r', '\u{2028}', '\u{2029}', '\u{85}'], "\n")
}

fn is_ftfy_control(c: char) -> bool {
    matches!(
        c,
        '\u{0}'..='\u{8}'
            | '\u{b}'
            | '\u{e}'..='\u{1f}'
            | '\u{7f}'
            | '\u{206a}'..='\u{206f}'
            | '\u{feff}'
            | '\u{fff9}'..='\u{fffc}'
    )
}

fn ansi_re() -> &'static Regex {
    static RE: OnceLock<Regex> = OnceLock::new();
    // Python's `\d` on str is any Unicode decimal digit, as is Rust's.
    RE.get_or_init(|| Regex::new(r"\x1b\[((?:\d|;)*)([a-zA-Z])").unwrap())
}

/// ftfy's entity table: `&name;` for every HTML5 entity ending in `;`, plus the upper-cased
/// form of lower-case names that `html.unescape` would leave alone (`&NTILDE;` → `Ñ`).
fn ftfy_entities() -> &'static HashMap<String, String> {
    static TABLE: OnceLock<HashMap<String, String>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut out = HashMap::new();
        for (name, value) in html5() {
            if !name.ends_with(';') {
                continue;
            }
            out.insert(format!("&{name}"), value.clone());
            if *name == name.to_lowercase() {
                let upper = format!("&{}", name.to_uppercase());
                if html_unescape(&upper) == upper {
                    out.insert(upper, value.to_uppercase());
                }
            }
        }
        out
    })
}

/// `ftfy.fixes.unescape_html`.
fn ftfy_unescape_html(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"&#?[0-9A-Za-z]{1,24};").unwrap());
    re.replace_all(text, |caps: &Captures| {
        let m = &caps[0];
        if let Some(v) = ftfy_entities().get(m) {
            v.clone()
        } else if m.starts_with("&#") {
            // Only accept a numeric reference that `html.unescape` consumes whole.
            let un = html_unescape(m);
            if un.contains(';') {
                m.to_string()
            } else {
                un
            }
        } else {
            m.to_string()
        }
    })
    .into_owned()
}

/// Python's `html.unescape`: numeric and named character references, HTML5 rules
/// (longest-prefix match for names without `;`, Windows-1252 for `&#128;`..`&#159;`).
pub fn html_unescape(text: &str) -> String {
    if !text.contains('&') {
        return text.to_string();
    }
    static RE: OnceLock<Regex> = OnceLock::new();
    let re = RE.get_or_init(|| Regex::new(r"&(#[0-9]+;?|#[xX][0-9a-fA-F]+;?|[^\t\n\x0c <&#;]{1,32};?)").unwrap());
    re.replace_all(text, |caps: &Captures| replace_charref(&caps[1])).into_owned()
}

fn replace_charref(s: &str) -> String {
    if let Some(num) = s.strip_prefix('#') {
        let (digits, radix) = match num.strip_prefix(['x', 'X']) {
            Some(hex) => (hex, 16),
            None => (num, 10),
        };
        let digits = digits.trim_end_matches(';');
        // Saturate: anything past U+10FFFF is replaced the same way.
        let n = u32::from_str_radix(digits, radix).unwrap_or(u32::MAX);
        return match n {
            0 => "\u{fffd}".into(),
            13 => "\r".into(),
            0x80..=0x9f => CP1252_C1[n as usize - 0x80].to_string(),
            0xd800..=0xdfff => "\u{fffd}".into(),
            n if n > 0x10ffff => "\u{fffd}".into(),
            0x1..=0x8 | 0xb | 0xe..=0x1f | 0x7f | 0xfdd0..=0xfdef => String::new(),
            n if n & 0xfffe == 0xfffe => String::new(),
            n => char::from_u32(n).map(String::from).unwrap_or_default(),
        };
    }
    let table = html5();
    if let Some(v) = table.get(s) {
        return v.clone();
    }
    // Longest prefix of at least two characters that is a known name.
    let ends: Vec<usize> = s.char_indices().map(|(i, _)| i).skip(2).collect();
    for &end in ends.iter().rev() {
        if let Some(v) = table.get(&s[..end]) {
            return format!("{v}{}", &s[end..]);
        }
    }
    format!("&{s}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_unescape_follows_python() {
        assert_eq!(html_unescape("a &amp; b"), "a & b");
        assert_eq!(html_unescape("&amp;amp;"), "&amp;");
        assert_eq!(html_unescape("&ampfoo"), "&foo");
        assert_eq!(html_unescape("&notit;"), "¬it;");
        assert_eq!(html_unescape("&#39;&#x27;&#X41"), "''A");
        assert_eq!(html_unescape("&#150;&#0;&#1;"), "–\u{fffd}");
        assert_eq!(html_unescape("&#99999999999;"), "\u{fffd}");
        assert_eq!(html_unescape("&bogus; & &#;"), "&bogus; & &#;");
    }

    #[test]
    fn ftfy_subset() {
        assert_eq!(fix_text("“curly” ‘quotes’"), "\"curly\" 'quotes'");
        assert_eq!(fix_text("ﬁne ﬂower"), "fine flower");
        assert_eq!(fix_text("ＦＵＬＬ　ｗｉｄｔｈ！"), "FULL width!");
        assert_eq!(fix_text("a\r\nb\rc\u{2028}d"), "a\nb\nc\nd");
        assert_eq!(fix_text("bell\u{7}\u{feff}x"), "bellx");
        assert_eq!(fix_text("\u{1b}[31mred\u{1b}[0m"), "red");
        assert_eq!(fix_text("e\u{301}"), "é");
        assert_eq!(fix_text("\u{80}5"), "€5");
        assert_eq!(fix_text("&NTILDE;o &amp;amp; x"), "Ño & x");
        // A line with '<' keeps its entities (and so does every later line).
        assert_eq!(fix_text("a &amp; b\n<b> &amp;\n&amp;"), "a & b\n<b> &amp;\n&amp;");
    }

    #[test]
    fn lower_clean() {
        assert_eq!(clean_lower("  A  Photo\tof\n\na  DOG &amp;amp; cat  "), "a photo of a dog & cat");
        // ftfy drops the U+001C control before `split()` could treat it as a separator.
        assert_eq!(clean_whitespace(" Ein  Hund\u{1c}X\u{2003}\u{a0}Y "), "Ein HundX Y");
        assert_eq!(clean_lower(""), "");
    }
}
