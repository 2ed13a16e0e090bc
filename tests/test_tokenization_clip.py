"""CLIP tokenizer: vocabulary layout, hand-checked vectors, and id-for-id agreement with open_clip's copy of OpenAI's."""

from __future__ import annotations

import csv
import gzip
import json
import random

import pytest

from modules.tokenization_clip import (
    SimpleTokenizer,
    basic_clean,
    bytes_to_unicode,
    default_bpe,
    get_pairs,
    whitespace_clean,
)


@pytest.fixture(scope="module")
def tok() -> SimpleTokenizer:
    return SimpleTokenizer()


@pytest.fixture(scope="module")
def ref():
    """open_clip's SimpleTokenizer (a copy of OpenAI's), the independent reference."""
    open_clip_tokenizer = pytest.importorskip("open_clip.tokenizer")
    return open_clip_tokenizer.SimpleTokenizer()


def test_byte_table():
    table = bytes_to_unicode()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord("!")] == "!" and table[ord("~")] == "~" and table[0xA1] == "¡" and table[0xFF] == "ÿ"
    # The 68 non-printable bytes, in increasing order, map to chr(256), chr(257), ...
    assert table[0] == chr(256) and table[ord(" ")] == chr(256 + 32) and table[0xAD] == chr(256 + 67)
    # Insertion order = vocabulary order: printable bytes first.
    values = list(table.values())
    assert values[0] == "!" and values[187] == "ÿ" and values[188] == chr(256)


def test_get_pairs():
    assert get_pairs(("l", "o", "o", "k</w>")) == {("l", "o"), ("o", "o"), ("o", "k</w>")}
    assert get_pairs(("a</w>",)) == set()


def test_vocabulary_layout(tok):
    assert len(tok.encoder) == 49408 and len(tok.decoder) == 49408
    assert tok.vocab is tok.encoder
    assert len(tok.bpe_ranks) == 48894
    assert tok.encoder["!"] == 0 and tok.encoder["!</w>"] == 256
    assert tok.encoder["<|startoftext|>"] == 49406 and tok.encoder["<|endoftext|>"] == 49407
    # The first merge of the file (line 1) is id 512.
    with gzip.open(default_bpe()) as f:
        first_merge = f.read().decode("utf-8").split("\n")[1]
    assert tok.encoder["".join(first_merge.split())] == 512
    assert tok.decoder[512] == "".join(first_merge.split())


def test_special_tokens_tokenize_to_themselves(tok):
    assert tok.tokenize("<|startoftext|>") == ["<|startoftext|>"]
    assert tok.tokenize("<|endoftext|>") == ["<|endoftext|>"]
    # The datasets' pattern: specials added around the caption's tokens, then converted.
    words = ["<|startoftext|>"] + tok.tokenize("a dog") + ["<|endoftext|>"]
    assert tok.convert_tokens_to_ids(words) == [49406, 320, 1929, 49407]


@pytest.mark.parametrize(
    "text, ids",
    [
        ("a person is connecting something to system", [49406, 320, 2533, 533, 41429, 2006, 531, 2422, 49407]),
        ("A little girl does gymnastics!", [49406, 320, 1274, 1611, 1897, 20116, 256, 49407]),
        ("it's a DOG's life &amp; more", [49406, 585, 568, 320, 1929, 568, 970, 261, 750, 49407]),
    ],
)
def test_spec_vectors(tok, text, ids):
    assert [49406] + tok.encode(text) + [49407] == ids


def test_spec_vector_tokens(tok):
    toks = tok.tokenize("it's a DOG's life &amp; more")
    assert [t.replace("</w>", "") for t in toks] == ["it", "'s", "a", "dog", "'s", "life", "&", "more"]


def test_cleaning():
    assert basic_clean("  &amp;amp; x ") == "& x"  # unescaped twice, then stripped
    assert whitespace_clean(" a \t\n b  c ") == "a b c"


def test_bpe_is_memoised(tok):
    assert tok.bpe("gymnastics") == "gymnastics</w>"
    assert tok.cache["gymnastics"] == "gymnastics</w>"
    assert tok.bpe("x") == "x</w>"


def test_errors(tok, tmp_path):
    with pytest.raises(ValueError, match="not in the CLIP vocabulary"):
        tok.convert_tokens_to_ids(["not-a-token"])
    with pytest.raises(ValueError, match="outside the CLIP vocabulary"):
        tok.decode([49408])
    bad = tmp_path / "bad.txt.gz"
    with gzip.open(bad, "wt") as f:
        f.write("header\na b\n")
    with pytest.raises(ValueError, match="bad.txt.gz"):
        SimpleTokenizer(str(bad))


EDGE_CASES = [
    "",
    "   ",
    " \t\n\r  \u3000 ",
    "Café naïve résumé Ångström ÉCOLE",
    "東京タワーで猫が寝ている",
    "한국어 문장입니다",
    "مرحبا بالعالم",
    "emoji 🎉🎉 👨‍👩‍👧 🇫🇷 ❤️ done",
    "fish &amp; chips, it&#39;s &quot;good&quot; &lt;b&gt; &amp;amp; &amp;#39;",
    "he's they're we've I'm you'll she'd don't IT'S",
    "curly ‘quotes’ and “double” it’s",
    "1234567 and 3.14 and 2nd 10,000",
    "ﬁne ﬂubber Ｆｕｌｌｗｉｄｔｈ",
    "mojibake: sÃ³ âœ” voilÃ\xa0 le travail",
    "tabs\tand\nnew\r\nlines\x0bvt\x1c\x1dsep \x07bell \x1b[31mred\x1b[0m",
    "<b>html-ish</b> &amp; a < b > c",
    "____ ---- !!!! ??? ... ,,, ;;",
    "a" * 300,
]


@pytest.mark.parametrize("text", EDGE_CASES)
def test_matches_reference_on_edge_cases(tok, ref, text):
    assert tok.encode(text) == ref.encode(text)


def test_matches_reference_on_long_text(tok, ref):
    rng = random.Random(1)
    words = ["the", "man", "is", "cooking", "pasta", "naïve", "東京", "🎉", "&amp;", "it's", "42", "—", "x"]
    text = " ".join(rng.choice(words) for _ in range(2500))[:10000]
    assert len(text) == 10000
    assert tok.encode(text) == ref.encode(text)


def test_matches_reference_on_random_unicode(tok, ref):
    rng = random.Random(0)
    pools = [
        [chr(i) for i in range(0x20, 0x7F)],
        [chr(i) for i in range(0x00, 0x20)] + ["\x85", "\xa0", "\u2028", "\u3000", "&", "&amp;", "&#39;", ";"],
        [chr(i) for i in range(0xA0, 0x250)],
        [chr(i) for i in range(0x4E00, 0x4E80)] + [chr(i) for i in range(0x0600, 0x0650)],
        ["🎉", "👍🏽", "\u200d", "\u0301", "’", "“", "ﬁ"],
    ]
    for _ in range(300):
        text = "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 30)))
        assert tok.encode(text) == ref.encode(text), repr(text)


def _real_captions(root):
    with open(root / "msrvtt" / "MSRVTT_JSFUSION_test.csv", newline="", encoding="utf-8") as f:
        msrvtt = [row["sentence"] for row in csv.DictReader(f)]
    with open(root / "msvd" / "captions_msvd.json", encoding="utf-8") as f:
        msvd = [c for caps in json.load(f).values() for c in caps]
    return msrvtt, msvd[::20]


def test_matches_reference_on_real_captions(tok, ref, real_annotations):
    msrvtt, msvd = _real_captions(real_annotations)
    assert len(msrvtt) == 1000 and len(msvd) == 4042
    for text in msrvtt + msvd:
        assert tok.encode(text) == ref.encode(text), text


def test_round_trip(tok, real_annotations):
    msrvtt, msvd = _real_captions(real_annotations)
    for text in msrvtt + msvd[:1000]:
        cleaned = whitespace_clean(basic_clean(text)).lower()
        assert tok.decode(tok.encode(text)).replace(" ", "") == cleaned.replace(" ", ""), text
    assert tok.decode(tok.encode("Café 東京 🎉")) == "café 東京 🎉 "
