#!/usr/bin/env python
"""Regenerate the tokenizer parity fixtures under data/tests/fixtures/tokenizer/.

Run with the repository's venv (open-clip-torch 3.3.0, ftfy, tokenizers, transformers):

    .venv/bin/python scripts/gen-tokenizer-fixtures.py

Writes
- clip_bpe.jsonl: {"text", "ids", "decoded"} per caption, ids from open_clip's default
  tokenizer (`open_clip.tokenize`, context length 77) and `SimpleTokenizer.decode` of them,
  plus a few rows with other context lengths ({"context_length": n}); the captions are
  hand-written edge cases, random caption-like strings and random "noise" strings of odd
  code points and HTML entities;
- xlmr_tiny_tokenizer.json: a small XLM-R-style tokenizer (Unigram vocabulary counted here
  from a few sentences, Metaspace pre-tokenizer, `<s> $A </s>` template, <s>=0 <pad>=1 </s>=2 <unk>=3),
  built without any download;
- hf_xlmr.jsonl: {"text", "context_length", "ids", "mask"} from open_clip's `HFTokenizer`
  loading that tokenizer (as `get_tokenizer` does for xlm-roberta-base-ViT-B-32), at context
  lengths 77 and 8.

Also rewrites data/assets/html5_entities.json, Python's `html.entities.html5` table that the
Rust `html.unescape` embeds.

Captions that ftfy's mojibake repair (`fix_encoding`) would change are left out: that step
is documented as not replicated in data/src/tokenize/clean.rs.
"""
import html
import html.entities
import json
import math
import random
import tempfile
import unicodedata
from pathlib import Path

import ftfy
import open_clip
from open_clip.tokenizer import HFTokenizer
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "data" / "tests" / "fixtures" / "tokenizer"

HAND_WRITTEN = [
    "",
    " ",
    "a photo of a dog",
    "A Photo Of A Dog.",
    "a diagram",
    "Hello, World!!!",
    "It's a cat's toy; they're here, we've seen it, I'm sure, you'll see, he'd go.",
    "IT'S THE DOG'S BALL",
    "3.14159 is pi, 2023-01-05, $1,299.99, 50% off, #1, 10x20cm, 4K UHD 3840x2160",
    "phone: +1 (555) 123-4567; e-mail: someone@example.com",
    "https://www.example.com/path/to/image_01.jpg?size=large&v=2#frag",
    "www.shop.co.uk/product?id=12345",
    "Tom &amp; Jerry &lt;3 &quot;classic&quot; &#39;cartoon&#39; &#x2764; &copy; 2020 &nbsp;x",
    "&amp;amp;lt;b&amp;amp;gt; double escaped",
    "Caf&eacute; cr&egrave;me br&ucirc;l&eacute;e &NTILDE; &AMP; &ampx &notit; &#150; &#0; &#128512;",
    "<b>bold</b> &amp; <i>italic</i>",
    "first line &amp; more\nsecond <line> &amp; text\nthird &amp; line",
    "café naïve résumé façade coöperate Ångström São Paulo Zürich Kraków Dvořák",
    "cafe\u0301 composed vs decomposed e\u0301",
    "Straße GROSSE Maße İstanbul ΣΊΣΥΦΟΣ ΟΔΥΣΣΕΥΣ",
    "东京塔的夜景 美丽的风景",
    "日本の桜と富士山、２０２３年",
    "한국어 캡션 서울의 밤",
    "Привет, мир! Красная площадь в Москве",
    "مرحبا بالعالم صورة جميلة",
    "שלום עולם",
    "हिन्दी में एक वाक्य",
    "ภาษาไทย ทดสอบ",
    "emoji 😀😃😄 🐶🐱 👍🏽 👨‍👩‍👧‍👦 🇫🇷 ❤️ ✨",
    "I ❤ NY ☕ ♥ ★ → ← © ® ™ ° ± × ÷ µ ¶ § …",
    "“curly quotes” and ‘single’ quotes ʼn „low“ ‚low‘",
    "ﬁne ﬂour ﬀ ﬃ ﬄ ﬅ ﬆ Ĳssel ǅ ǈ ǋ",
    "ＦＵＬＬＷＩＤＴＨ　ｔｅｘｔ！？　１２３",
    "tabs\tand\nnewlines\r\nand\rreturns\u2028line\u2029para\u0085nel",
    "   leading and trailing spaces   ",
    "multiple     spaces\t\t\tand  \n\n  blank lines",
    "nbsp\u00a0here\u2003em\u3000ideo\u202fnarrow",
    "zero\u200bwidth\u200cjoiner\u200dthing\ufeffbom",
    "control\x01\x02\x07\x1b[31mred\x1b[0m\x7fchars\x1c\x1dsep",
    "c1 \x80 \x85 \x91quoted\x92 \x96 dash \x9d",
    "soft\u00adhyphen and\u2060word joiner \u206a\u206f",
    "math: a+b=c, x^2, √2 ≈ 1.414, ∑, ∞, π",
    "superscripts x² H₂O ½ ¼ ⅓ ① ⑩ Ⅻ",
    "<start_of_text> literal special <end_of_text> tokens",
    "hashtags #sunset #travel @user_name",
    "snake_case_word and CamelCaseWord and kebab-case-word",
    "!!!???...,,,;;;:::---___***",
    "'s 't 're 've 'm 'll 'd",
    "don't won't can't shouldn't y'all o'clock rock'n'roll",
    "123456789012345678901234567890",
    "A" * 300,
    "a " * 100,
    "word " * 76,
    "word " * 75,
    "word " * 74,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "pneumonoultramicroscopicsilicovolcanoconiosis " * 10,
    "Ŧĥïŝ ĩŝ ŝţŗåñĝé ţéẋţ",
    "\U0001F600" * 40,
    "Mixed 中文 and English and 日本語 text 123",
    "Ὀδυσσεύς κάτω",
    "ſtraße ſ long s",
    "Kelvin sign K and Ångström sign Å",
    "file:///C:/Users/photo.JPG",
    "price: €100 £50 ¥1000 ₹500 ₿0.01",
    "quote \"double\" and 'single' and `back`",
    "[brackets] {braces} (parens) <angles>",
    "path/with\\backslash|pipe~tilde^caret",
    "new\n\n\nlines only\n",
    "\n",
    "&",
    "&amp",
    "&#",
    "&#;",
    "&#x;",
    "&unknown;",
    "&lt;script&gt;alert(1)&lt;/script&gt;",
    "a\u0300\u0301\u0302 stacked accents",
    "Ⓒ Ⓐ ⒜ circled",
    "ℌ𝔢𝔩𝔩𝔬 𝐛𝐨𝐥𝐝 𝘪𝘵𝘢𝘭𝘪𝘤 math letters",
    "Vietnamese: Tiếng Việt có dấu",
    "Turkish: ığüşöç İĞÜŞÖÇ",
    "Polish: zażółć gęślą jaźń",
    "Icelandic: Þórsmörk Ðð",
    "ypogegrammeni \u0345 ᾳ\u0345 and long-s contraction it'ſ",
]

# Fragments combined at random into caption-like strings.
FRAGMENTS = [
    "a photo of", "a close-up of", "an illustration of", "a painting of", "the", "a", "my",
    "dog", "cat", "red car", "mountain landscape", "city at night", "bowl of ramen",
    "wedding dress", "vintage poster", "logo", "t-shirt", "iPhone 12 Pro Max", "Nike Air",
    "in the snow", "on the beach", "by Van Gogh", "trending on artstation", "4k", "HD",
    "stock photo", "|", "-", "–", "—", ":", "&amp;", "&quot;", "&#39;", "&nbsp;", "'s",
    "(2019)", "[HQ]", "#1", "100%", "$9.99", "1/2\"", "3'", "x2", "No. 5", "v2.0",
    "café", "crème brûlée", "jalapeño", "smörgåsbord", "Ærøskøbing", "Øresund",
    "北京", "東京", "서울", "Москва", "القاهرة", "Αθήνα", "मुंबई",
    "😀", "🔥", "🐶", "❤️", "👍", "🇯🇵", "\u00a0", "\t", "\n", "  ", "“", "”", "’",
    "ﬁ", "ＡＢＣ", "１２", "https://example.org/a/b.jpg", "www.example.com", "user@mail.com",
    "<br>", "<p>", "&lt;", "&gt;", "...", "!!!", "???", "e\u0301", "\x85", "\x92",
]


def captions(rng: random.Random) -> list[str]:
    out = list(HAND_WRITTEN)
    for _ in range(420):
        n = rng.choice([1, 2, 3, 5, 8, 13, 21, 40, 90])
        parts = [rng.choice(FRAGMENTS) for _ in range(n)]
        seps = [rng.choice([" ", " ", " ", "", ", ", "  "]) for _ in range(n)]
        text = "".join(p + s for p, s in zip(parts, seps))
        if rng.random() < 0.3:
            text = text.upper()
        elif rng.random() < 0.3:
            text = text.title()
        out.append(text)
    return out


# Code point ranges for adversarial "noise" captions: odd scripts, combining marks, symbols,
# presentation forms, controls, entities (named, upper-cased, numeric, unterminated).
NOISE_RANGES = [
    (0x00, 0x20), (0x21, 0x7E), (0x7F, 0x2FF), (0x300, 0x36F), (0x370, 0x52F), (0x590, 0x6FF),
    (0x2000, 0x206F), (0x2100, 0x2BFF), (0x3000, 0x30FF), (0x4E00, 0x4EFF), (0xAC00, 0xACFF),
    (0xFB00, 0xFB4F), (0xFE00, 0xFFFD), (0x1D400, 0x1D7FF), (0x1F300, 0x1FAFF),
]


def noise_captions(rng: random.Random, count: int) -> list[str]:
    names = sorted(html.entities.html5)
    def piece() -> str:
        r = rng.random()
        if r < 0.08:
            name = rng.choice(names)
            return "&" + (name.upper() if rng.random() < 0.3 else name)
        if r < 0.12:
            n = rng.choice([0, 9, 10, 13, 28, 39, 128, 150, 159, 0xD800, 0x10FFFF, 0x110000, rng.randint(0, 0x2FFFF)])
            return rng.choice(["&#%d" % n, "&#x%x" % n, "&#X%X" % n]) + rng.choice([";", "", " "])
        if r < 0.2:
            return rng.choice(["'s", "'S", "'ll", "'ſ", "<end_of_text>", "\u0345", "\r\n", "\x1b[1m", "<", "  "])
        lo, hi = rng.choice(NOISE_RANGES)
        return chr(rng.randint(lo, hi))
    out = []
    while len(out) < count:
        text = "".join(piece() for _ in range(rng.choice([1, 3, 10, 30, 100])))
        # Characters unassigned in this Python's Unicode tables get their case and letter
        # classes from newer tables in Rust; keep to characters both sides agree on.
        if any(unicodedata.category(c) in ("Cn", "Cs") for c in html.unescape(text)):
            continue
        out.append(text)
    return out


def mojibake_repaired(text: str) -> bool:
    return ftfy.fix_text(text) != ftfy.fix_text(text, fix_encoding=False)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def clip_fixture(texts: list[str]) -> int:
    rows = []
    ids = open_clip.tokenize(texts).tolist()
    bpe = open_clip.tokenizer._tokenizer
    for t, i in zip(texts, ids):
        # `decode` of the text ids (between <start_of_text> and <end_of_text>); rows cut
        # mid-character exercise its replacement of invalid UTF-8.
        rows.append({"text": t, "ids": i, "decoded": bpe.decode(i[1:i.index(bpe.eot_token_id)])})
    for n in (5, 16, 32):
        sample = texts[:40]
        ids = open_clip.tokenize(sample, context_length=n).tolist()
        rows += [{"text": t, "context_length": n, "ids": i} for t, i in zip(sample, ids)]
    write_jsonl(OUT / "clip_bpe.jsonl", rows)
    return len(rows)


def unigram_vocab(corpus: list[str], specials: list[str]) -> list[tuple[str, float]]:
    """A deterministic Unigram vocabulary: every corpus character, plus each word's
    `▁`-prefixed form and its substrings that occur at least twice, scored by log frequency.
    (Training with `UnigramTrainer` breaks ties differently from run to run.)"""
    counts: dict[str, int] = {}
    for line in corpus:
        for word in line.split():
            piece = "\u2581" + word
            for i in range(len(piece)):
                for j in range(i + 1, min(len(piece), i + 8) + 1):
                    counts[piece[i:j]] = counts.get(piece[i:j], 0) + 1
    keep = {p: c for p, c in counts.items() if len(p) == 1 or c >= 2}
    total = sum(keep.values())
    ranked = sorted(keep.items(), key=lambda pc: (-pc[1], pc[0]))
    return [(s, 0.0) for s in specials] + [(p, math.log(c / total)) for p, c in ranked]


def build_xlmr_tiny(corpus: list[str]) -> Tokenizer:
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.Unigram(unigram_vocab(corpus, specials), unk_id=3, byte_fallback=False))
    tok.add_special_tokens(specials)
    # xlm-roberta-base: Precompiled(charsmap) + Replace(" {2,}", " "); NFKC stands in for
    # the sentencepiece charsmap, which cannot be built without the original model.
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    for i, s in enumerate(specials):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>",
        pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)],
    )
    return tok


def hf_fixture(texts: list[str]) -> int:
    corpus = [
        "a photo of a dog on the beach", "the quick brown fox jumps over the lazy dog",
        "una foto di un gatto sul divano", "ein Hund spielt im Schnee", "le chat noir dort",
        "東京の夜景", "猫の写真", "una casa roja en la montaña", "красная машина",
        "vintage poster of a city at night", "a bowl of ramen with eggs",
        "a red car in the snow", "Hello world, a photo of the city", "Café & bar in Paris",
        "ein Foto von einem Hund", "foto di una città di notte", "東京タワーの写真",
    ]
    tok = build_xlmr_tiny(corpus)
    tok_path = OUT / "xlmr_tiny_tokenizer.json"
    tok.save(str(tok_path))
    with tempfile.TemporaryDirectory() as d:
        fast = PreTrainedTokenizerFast(
            tokenizer_file=str(tok_path), bos_token="<s>", eos_token="</s>", sep_token="</s>",
            cls_token="<s>", unk_token="<unk>", pad_token="<pad>", mask_token="<mask>",
        )
        fast.save_pretrained(d)
        # The same class and call path as open_clip.get_tokenizer('xlm-roberta-base-ViT-B-32').
        hf = HFTokenizer(d, context_length=77)
        assert hf.tokenizer.pad_token_id == 1
        rows = []
        for n, sample in ((77, texts), (8, texts[:30])):
            ids = hf(sample, context_length=n).tolist()
            cleaned = [hf.clean_fn(t) for t in sample]
            masks = hf.tokenizer(cleaned, max_length=n, padding="max_length", truncation=True).attention_mask
            rows += [{"text": t, "context_length": n, "ids": i, "mask": m} for t, i, m in zip(sample, ids, masks)]
    write_jsonl(OUT / "hf_xlmr.jsonl", rows)
    return len(rows)


def write_html5_entities() -> None:
    table = json.dumps(html.entities.html5, ensure_ascii=False, indent=0, sort_keys=True)
    (REPO / "data" / "assets" / "html5_entities.json").write_text(table, encoding="utf-8")


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    write_html5_entities()
    rng = random.Random(20240613)
    texts = captions(rng) + noise_captions(random.Random(7), 300)
    kept = [t for t in texts if not mojibake_repaired(t)]
    dropped = len(texts) - len(kept)
    n_clip = clip_fixture(kept)
    hf_texts = kept[:60] + [
        "Una foto di un gatto", "Ein Hund im Schnee", "東京の夜景 と 猫", "  spaces   inside  ",
        "Caf&eacute; &amp; bar", ("a photo of a dog " * 30).strip(),
        "special tokens in text: <s> a <mask>  dog </s><pad> <unk>", "ＦＵＬＬ　ｗｉｄｔｈ ﬁ ①",
    ]
    n_hf = hf_fixture(hf_texts)
    print(f"clip_bpe.jsonl: {n_clip} rows ({dropped} captions dropped for ftfy mojibake repair)")
    print(f"hf_xlmr.jsonl: {n_hf} rows")


if __name__ == "__main__":
    main()
