"""Tests for the CLIP tokenizer: OpenAI ids, Hugging Face parity, batching, speed."""

from __future__ import annotations

import json
import pickle
import random
import time
from pathlib import Path

import pytest
import torch

from clip_core.tokenizer import Tokenizer, clean_text, get_default_tokenizer, tokenize

SOT, EOT = 49406, 49407

# Texts for which the Hugging Face tokenizer (which skips ftfy/HTML unescaping)
# must agree with us on the raw input.
PLAIN_TEXTS = [
    "a photo of a cat.",
    "A PHOTO OF A CAT!!!",
    "It's a dog's life; we're sure they've said I'm fine, you'll see, he'd agree.",
    "DON'T SHOUT, it'S fine",
    "rock'n'roll o'clock 'quoted' ''",
    "3.14159 and 1,000,000 dollars in 2023-11-27T15:43:00Z",
    "café naïve résumé Zürich Ærøskøbing",
    "Ελληνικά γράμματα και Привет, мир",
    "日本語のテキストと中文句子测试",
    "한국어 문장입니다",
    "emoji 😀👍🏽 👨‍👩‍👧 ❤️ 🇫🇷",
    "tabs\tand\nnewlines\r\n  multiple     spaces",
    "   leading and trailing   ",
    "",
    "   ",
    "!!!???... --- ((()))",
    "under_score snake_case CamelCase camelCaseWord",
    "x" * 300,
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "<|startoftext|>hello<|endoftext|>world",
    "a very long caption about many things " * 30,
    "x²³ ½ Ⅳ ٣",
]

# Texts where ftfy and the double HTML unescape matter.
CLEANED_TEXTS = [
    "Tom &amp;amp; Jerry &lt;3 &gt;_&lt;",
    "&amp;amp;",
    "&#39;quoted&#39; and &quot;double&quot;",
    "curly ’quotes’ and “double” quotes…",
    "ﬁne ﬂour ligatures",
    "ｆｕｌｌｗｉｄｔｈ ｔｅｘｔ",
    "mojibake: cafÃ© and donâ€™t",
    "control\x00chars\x07 and \x1bescape",
    "nbsp\u00a0and\u2009thin\u200bspace",
    "e\u0301 combining accent",
    "user@example.com http://x.y/z?q=1&r=2",
    "<b>bold</b> &amp; <i>it</i>",
]


def _write_hf_folder(tok: Tokenizer, folder: Path) -> Path:
    """Write our vocabulary in the Hugging Face CLIP layout (vocab.json + merges.txt)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "vocab.json", "w", encoding="utf-8") as fh:
        json.dump(tok.encoder, fh, ensure_ascii=False)
    merges = sorted(tok.bpe_ranks, key=tok.bpe_ranks.__getitem__)
    with open(folder / "merges.txt", "w", encoding="utf-8") as fh:
        fh.write("#version: 0.2\n")
        fh.write("".join(f"{a} {b}\n" for a, b in merges))
    return folder


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return get_default_tokenizer()


@pytest.fixture(scope="module")
def hf_folder(tok: Tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_hf_folder(tok, tmp_path_factory.mktemp("hf_clip"))


@pytest.fixture(scope="module")
def hf_tok(hf_folder: Path):
    import transformers
    hf = transformers.CLIPTokenizer(str(hf_folder / "vocab.json"), str(hf_folder / "merges.txt"))
    # Guard against a constructor that silently ignored the files.
    assert hf("a photo of a cat.")["input_ids"] == [SOT, 320, 1125, 539, 320, 2368, 269, EOT]
    return hf


# -- OpenAI reference ids --------------------------------------------------------


def test_known_ids():
    out = tokenize("a photo of a cat.")
    assert out.shape == (1, 77)
    assert out.dtype == torch.long
    assert out[0, :8].tolist() == [SOT, 320, 1125, 539, 320, 2368, 269, EOT]
    assert out[0, 8:].eq(0).all()


def test_vocabulary_shape(tok: Tokenizer):
    assert tok.vocab_size == 49408
    assert (tok.sot_token_id, tok.eot_token_id) == (SOT, EOT)
    assert tok.context_length == 77
    assert sorted(tok.encoder.values()) == list(range(49408))


def test_special_markers_in_text_map_to_special_ids(tok: Tokenizer):
    assert tok.encode("<|endoftext|>") == [EOT]
    assert tok.encode("<|StartOfText|>") == [SOT]  # lowercased first, as in the reference


def test_html_unescaped_up_to_three_levels(tok: Tokenizer):
    amp = tok.encode("&")
    assert tok.encode("&amp;") == amp
    assert tok.encode("&amp;amp;") == amp
    assert tok.encode("&amp;amp;amp;") == amp


def test_empty_and_whitespace_only():
    out = tokenize(["", "  \n\t "])
    for row in out:
        assert row[:2].tolist() == [SOT, EOT]
        assert row[2:].eq(0).all()


# -- Hugging Face parity -----------------------------------------------------------


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_matches_hf_on_plain_text(tok: Tokenizer, hf_tok, text: str):
    assert [SOT, *tok.encode(text), EOT] == hf_tok(text)["input_ids"]


@pytest.mark.parametrize("text", PLAIN_TEXTS + CLEANED_TEXTS)
def test_matches_hf_after_openai_cleaning(tok: Tokenizer, hf_tok, text: str):
    # The Hugging Face tokenizer has no ftfy/HTML step; feeding it the cleaned
    # text isolates the split + BPE, which must agree everywhere.
    assert [SOT, *tok.encode(text), EOT] == hf_tok(clean_text(text))["input_ids"]


def test_matches_hf_truncation(hf_tok):
    text = "a very long caption about many things " * 30
    ours = tokenize(text, truncate=True)[0].tolist()
    theirs = hf_tok(text, truncation=True, max_length=77)["input_ids"]
    assert ours == theirs


def test_matches_hf_on_random_text(tok: Tokenizer, hf_tok):
    rng = random.Random(1234)
    alphabet = (
        list("abcdefghijklmnopqrstuvwxyzABCXYZ0123456789 .,;:!?'\"()-_/#@+*%$")
        + list("éèüßøñçİıΣσς日本語한😀’…–—\t\n")
        + ["'s", "'ll", "'re", "n't", " the ", " and "]
    )
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert [SOT, *tok.encode(text), EOT] == hf_tok(clean_text(text))["input_ids"], text


def test_from_hf_folder_gives_same_ids(tok: Tokenizer, hf_folder: Path):
    other = Tokenizer.from_hf(hf_folder)
    assert (other.sot_token_id, other.eot_token_id, other.vocab_size) == (SOT, EOT, 49408)
    for text in PLAIN_TEXTS + CLEANED_TEXTS:
        assert other.encode(text) == tok.encode(text)
    assert torch.equal(other(PLAIN_TEXTS, truncate=True), tokenize(PLAIN_TEXTS, truncate=True))


# -- batching, padding, truncation ----------------------------------------------------


def test_batch_shape_and_padding():
    texts = ["a", "a photo of a dog", "", "two words"]
    out = tokenize(texts)
    assert out.shape == (4, 77)
    for row, text in zip(out, texts):
        n = len(get_default_tokenizer().encode(text)) + 2
        assert row[0] == SOT and row[n - 1] == EOT
        assert row[n:].eq(0).all()


def test_custom_context_length():
    out = tokenize(["a photo of a cat."], context_length=16)
    assert out.shape == (1, 16)
    assert Tokenizer()("hello", context_length=5).tolist() == [[SOT, 3306, EOT, 0, 0]]


def test_too_long_raises_with_text_and_length():
    text = "lorem ipsum " * 60
    with pytest.raises(ValueError) as info:
        tokenize(["ok", text])
    message = str(info.value)
    assert "lorem ipsum lorem" in message
    assert "..." in message  # the text is shortened
    n = len(get_default_tokenizer().encode(text)) + 2
    assert str(n) in message and "77" in message


def test_exact_fit_is_not_truncated(tok: Tokenizer):
    text = " ".join(["cat"] * 75)
    assert len(tok.encode(text)) == 75
    out = tokenize(text)  # 75 + SOT + EOT == 77: fits, no error
    assert out[0, -1] == EOT and out[0, -2] == tok.encode("cat")[0]
    with pytest.raises(ValueError):
        tokenize(text + " cat")


def test_truncate_keeps_eot_last(tok: Tokenizer):
    text = "lorem ipsum " * 60
    out = tokenize(text, truncate=True)
    ids = tok.encode(text)
    assert out.shape == (1, 77)
    assert out[0, 0] == SOT
    assert out[0, 1:76].tolist() == ids[:75]
    assert out[0, 76] == EOT


def test_rejects_non_strings():
    with pytest.raises(TypeError):
        tokenize([b"bytes"])  # type: ignore[list-item]


# -- decode, cleaning, pickling --------------------------------------------------------


def test_decode_matches_reference_format(tok: Tokenizer):
    assert tok.decode(tok.encode("A photo of a CAT.")) == "a photo of a cat . "
    assert tok.decode([SOT, 320, EOT]) == "<|startoftext|>a <|endoftext|>"


@pytest.mark.parametrize("text", PLAIN_TEXTS + CLEANED_TEXTS)
def test_decode_round_trips_normalised_text(tok: Tokenizer, text: str):
    # decode puts a space after every piece; the characters must all survive.
    decoded = tok.decode(tok.encode(text))
    assert decoded.replace(" ", "") == clean_text(text).replace(" ", "")


def test_clean_text_fast_path_matches_ftfy_path():
    import ftfy
    import html

    import regex

    def slow(text: str) -> str:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        return regex.sub(r"\s+", " ", text).strip().lower()

    rng = random.Random(7)
    pieces = ["It's", "HELLO", "a b", "\t", "\n", "\r\n", "  ", "x", "42", "<p>", "-", "~", "'"]
    for text in PLAIN_TEXTS + CLEANED_TEXTS:
        assert clean_text(text) == slow(text)
    for _ in range(500):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert clean_text(text) == slow(text)


def test_pickle_round_trip(tok: Tokenizer):
    clone = pickle.loads(pickle.dumps(tok))
    assert torch.equal(clone(PLAIN_TEXTS, truncate=True), tok(PLAIN_TEXTS, truncate=True))


def test_encode_is_cached_but_returns_fresh_lists(tok: Tokenizer):
    first = tok.encode("a photo of a cat.")
    first.append(-1)
    assert tok.encode("a photo of a cat.") == [320, 1125, 539, 320, 2368, 269]


# -- throughput ------------------------------------------------------------------------


def test_throughput_is_reasonable():
    """A loose bound that holds on a busy 2-core machine; BENCHMARKS.md has real numbers."""
    fresh = Tokenizer()
    words = [
        w[: -len("</w>")]
        for w in fresh.encoder
        if w.endswith("</w>") and w[:-4].isascii() and w[:-4].isalpha() and len(w) > 6
    ][:20_000]
    rng = random.Random(0)
    captions = [
        " ".join(rng.choice(words) for _ in range(rng.randint(5, 20))).capitalize() + "."
        for _ in range(50_000)
    ]
    start = time.perf_counter()
    out = fresh(captions, truncate=True)
    elapsed = time.perf_counter() - start
    assert out.shape == (50_000, 77)
    assert elapsed < 30.0, f"{len(captions) / elapsed:.0f} texts/s"
