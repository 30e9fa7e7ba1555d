"""CLIP byte-level BPE tokenizer, producing the same ids as OpenAI's ``clip.tokenize``.

CLIP text towers were trained on ids from one specific tokenizer, so any drift
(a different cleaning step, a different regex, a different merge order) silently
degrades embeddings instead of failing. This module therefore reproduces the
reference pipeline step by step:

1. ``ftfy.fix_text``, then ``html.unescape`` twice, then ``strip`` -- OpenAI
   unescapes up to three levels of HTML entities (``&amp;amp;amp;`` -> ``&``).
2. Collapse every run of whitespace to one space, strip, lowercase.
3. Split with the CLIP regex (``regex`` module, IGNORECASE): special markers,
   English contractions, letter runs, single digits, punctuation runs.
4. Map each piece's UTF-8 bytes to printable unicode characters (the GPT-2
   byte table), append ``</w>`` to the last symbol and apply BPE merges in rank
   order.

The vocabulary is ``bytes + bytes</w> + merges + [<|startoftext|>, <|endoftext|>]``
(49408 entries; SOT = 49406, EOT = 49407) built from the gzipped merge list
shipped in ``assets``.

Speed matters because the ETL tokenizes millions of captions: BPE output is
memoised per word, whole texts are memoised in a bounded LRU, and ``ftfy`` (by
far the slowest step) is skipped for plain printable ASCII without ``&``, for
which it is provably the identity (see ``_needs_ftfy``).

Known, deliberate difference from Hugging Face ``transformers.CLIPTokenizer``:
the Hugging Face tokenizer does not run ftfy or HTML unescaping, so texts with
entities, curly quotes, full-width characters or mojibake can get different ids
there. The ids here follow OpenAI, which is what the released weights expect.
"""

from __future__ import annotations

import functools
import gzip
import html
import itertools
import json
import re
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path

import ftfy
import numpy as np
import regex
import torch

__all__ = [
    "DEFAULT_BPE_PATH",
    "TextTooLongError",
    "Tokenizer",
    "bytes_to_unicode",
    "clean_text",
    "get_default_tokenizer",
    "tokenize",
]

DEFAULT_BPE_PATH: Path = Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"

class TextTooLongError(ValueError):
    """A text with more tokens than the context holds, and ``truncate`` not set."""


SOT_TEXT = "<|startoftext|>"
EOT_TEXT = "<|endoftext|>"
END_OF_WORD = "</w>"

# OpenAI keeps the first 48894 merges of the 16e6 file: 49152 minus the 256 byte
# tokens minus the two special tokens (line 0 is the "#version" header).
_NUM_MERGES = 49152 - 256 - 2

_SPLIT_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
# The reference cleans whitespace with the `regex` module, whose \s is the Unicode
# White_Space property; Python's `re` would also match U+001C..U+001F.
_WHITESPACE = regex.compile(r"\s+")

# Characters for which ftfy.fix_text may change a text: anything outside
# printable ASCII / tab / LF / CR (mojibake, quotes, widths, ligatures, control
# and escape characters) plus '&' (HTML entity unescaping). For texts without
# them ftfy changes nothing except CR -> LF, which whitespace collapsing erases
# anyway, so calling it would only cost time.
_FTFY_TRIGGER = regex.compile(r"[^\t\n\r\x20-\x25\x27-\x7e]")

# The same split for texts that took the plain-ASCII path in `_clean_and_split`:
# there \p{L} is [a-z] (already lowercased), \p{N} is [0-9] and the only
# whitespace left is the single space, so the stdlib engine (about twice as fast
# as `regex` here) gives identical pieces.
_ASCII_SPLIT_PATTERN = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+",
    re.ASCII,
)

# Bounds on the memo tables so a long-running worker cannot grow without limit.
_WORD_CACHE_LIMIT = 1_000_000
_TEXT_CACHE_SIZE = 65_536
_TEXT_CACHE_MAX_CHARS = 512  # long documents are rarely repeated; keep them out of the LRU


def bytes_to_unicode() -> dict[int, str]:
    """Return the GPT-2/CLIP table mapping each byte 0..255 to a printable character.

    BPE works on strings, so every byte needs a visible, non-whitespace stand-in.
    Printable Latin-1 bytes map to themselves; the remaining 68 bytes map, in
    increasing byte order, to U+0100 onwards. Dict order (printable bytes first,
    then the rest) defines the first 256 vocabulary ids.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\u00a1"), ord("\u00ac") + 1))
        + list(range(ord("\u00ae"), ord("\u00ff") + 1))
    )
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _needs_ftfy(text: str) -> bool:
    return _FTFY_TRIGGER.search(text) is not None


def clean_text(text: str) -> str:
    """Normalise a text exactly as CLIP does before splitting it into words.

    Exposed so callers and tests can see what the ids actually encode
    (``decode`` returns this text, re-spaced by token).
    """
    if _needs_ftfy(text):
        text = ftfy.fix_text(text)
        text = html.unescape(html.unescape(text))
    text = text.strip()
    text = _WHITESPACE.sub(" ", text).strip()
    return text.lower()


def _check_str(text: object) -> str:
    if not isinstance(text, str):
        raise TypeError(f"expected a str to tokenize, got {type(text).__name__}")
    return text


def _clean_and_split(text: str) -> list[str]:
    """``clean_text`` followed by the CLIP regex split, with a fast path for plain ASCII."""
    if _needs_ftfy(text):
        return _SPLIT_PATTERN.findall(clean_text(text))
    # Only printable ASCII, tab, LF, CR here: str.split() collapses exactly the
    # characters the `regex` \s would (it differs only on U+001C..U+001F, excluded).
    return _ASCII_SPLIT_PATTERN.findall(" ".join(text.split()).lower())


def _load_openai_merges(path: Path) -> list[tuple[str, str]]:
    with gzip.open(path, "rb") as fh:
        lines = fh.read().decode("utf-8").split("\n")
    return [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]  # type: ignore[misc]


class Tokenizer:
    """OpenAI-compatible CLIP tokenizer.

    Instances are picklable (caches are dropped and rebuilt), so they can be
    shipped to worker processes.
    """

    def __init__(self, bpe_path: str | Path | None = None, *, context_length: int = 77) -> None:
        """Build the vocabulary from an OpenAI-format gzipped merge list.

        ``bpe_path`` defaults to the copy shipped with this package.
        """
        merges = _load_openai_merges(Path(bpe_path) if bpe_path is not None else DEFAULT_BPE_PATH)
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + END_OF_WORD for c in byte_chars]
        vocab += ["".join(pair) for pair in merges]
        vocab += [SOT_TEXT, EOT_TEXT]
        self._setup({tok: i for i, tok in enumerate(vocab)}, merges, context_length)

    @classmethod
    def from_hf(cls, folder: str | Path, *, context_length: int = 77) -> "Tokenizer":
        """Build from a Hugging Face CLIP folder (``vocab.json`` + ``merges.txt``).

        Ids come straight from ``vocab.json``; merge ranks are the order of the
        lines after the ``#version`` header, which is the same BPE as OpenAI's.
        """
        folder = Path(folder)
        with open(folder / "vocab.json", encoding="utf-8") as fh:
            encoder: dict[str, int] = json.load(fh)
        with open(folder / "merges.txt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        merges = [
            tuple(line.split())
            for line in lines
            if line.strip() and not line.startswith("#version")
        ]
        bad = [m for m in merges if len(m) != 2]
        if bad:
            raise ValueError(f"malformed merges.txt line in {folder}: {' '.join(bad[0])!r}")
        obj = cls.__new__(cls)
        obj._setup(encoder, merges, context_length)  # type: ignore[arg-type]
        return obj

    # -- construction / pickling -------------------------------------------------

    def _setup(
        self, encoder: dict[str, int], merges: list[tuple[str, str]], context_length: int
    ) -> None:
        for special in (SOT_TEXT, EOT_TEXT):
            if special not in encoder:
                raise ValueError(f"vocabulary lacks the special token {special}")
        self.encoder: dict[str, int] = encoder
        self.decoder: dict[int, str] = {i: tok for tok, i in encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {pair: r for r, pair in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.sot_token_id: int = encoder[SOT_TEXT]
        self.eot_token_id: int = encoder[EOT_TEXT]
        self.vocab_size: int = len(encoder)
        self.context_length: int = context_length
        self._init_caches()

    def _init_caches(self) -> None:
        # Raw regex piece -> ids. The special markers bypass BPE, as in the reference.
        self._word_cache: dict[str, tuple[int, ...]] = {
            SOT_TEXT: (self.sot_token_id,),
            EOT_TEXT: (self.eot_token_id,),
        }
        self._word_cache_lock = threading.Lock()
        self._encode_cached = functools.lru_cache(maxsize=_TEXT_CACHE_SIZE)(self._encode_uncached)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("_word_cache", "_word_cache_lock", "_encode_cached"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_caches()

    # -- BPE -----------------------------------------------------------------------

    def _bpe(self, symbols: list[str]) -> list[str]:
        """Greedily apply the lowest-ranked merge present until none applies.

        Each round merges every non-overlapping occurrence of the winning pair
        from left to right, which is what the reference implementation does.
        """
        ranks = self.bpe_ranks
        while len(symbols) > 1:
            best: tuple[str, str] | None = None
            best_rank = len(ranks)
            for pair in zip(symbols, symbols[1:]):
                rank = ranks.get(pair)
                if rank is not None and rank < best_rank:
                    best, best_rank = pair, rank
            if best is None:
                break
            first, second = best
            merged: list[str] = []
            i, n = 0, len(symbols)
            while i < n:
                if i + 1 < n and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return symbols

    def _word_ids(self, piece: str) -> tuple[int, ...]:
        chars = [self.byte_encoder[b] for b in piece.encode("utf-8")]
        chars[-1] += END_OF_WORD
        ids = tuple(self.encoder[sym] for sym in self._bpe(chars))
        cache = self._word_cache
        if len(cache) >= _WORD_CACHE_LIMIT:
            with self._word_cache_lock:
                cache.clear()
                cache[SOT_TEXT] = (self.sot_token_id,)
                cache[EOT_TEXT] = (self.eot_token_id,)
        cache[piece] = ids
        return ids

    def _encode_uncached(self, text: str) -> tuple[int, ...]:
        pieces = _clean_and_split(text)
        parts = list(map(self._word_cache.get, pieces))
        if None in parts:
            parts = [ids if ids is not None else self._word_ids(piece) for ids, piece in zip(parts, pieces)]
        return tuple(itertools.chain.from_iterable(parts))

    def _ids(self, text: str) -> tuple[int, ...]:
        if len(text) <= _TEXT_CACHE_MAX_CHARS:
            return self._encode_cached(text)
        return self._encode_uncached(text)

    # -- public API ----------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without the start/end markers."""
        return list(self._ids(_check_str(text)))

    def decode(self, ids: Iterable[int]) -> str:
        """Turn ids back into text the way OpenAI does.

        Each ``</w>`` becomes a space, so the result is the cleaned text with a
        space after every word/punctuation piece (``"a cat ."``-style plus a
        trailing space). Invalid UTF-8 byte runs become U+FFFD. Ids such as the
        markers or padding zeros are decoded literally, as in the reference;
        strip them first if they are not wanted.
        """
        text = "".join(self.decoder[int(i)] for i in ids)
        data = bytearray(self.byte_decoder[c] for c in text)
        return data.decode("utf-8", errors="replace").replace(END_OF_WORD, " ")

    def __call__(
        self,
        texts: str | Sequence[str],
        context_length: int | None = None,
        truncate: bool = False,
    ) -> torch.LongTensor:
        """Encode a text or a batch into a zero-padded ``[N, context_length]`` id tensor.

        Every row is ``SOT, ids..., EOT, 0...``. If a row does not fit, raise
        :class:`TextTooLongError` (a ``ValueError``) unless ``truncate`` is set, in which case it is cut to
        ``context_length`` and its last position is overwritten with EOT.
        """
        if context_length is None:
            context_length = self.context_length
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        if isinstance(texts, str):
            texts = [texts]
        sot, eot = self.sot_token_id, self.eot_token_id
        room = context_length - 2
        flat: list[int] = []
        lengths: list[int] = []
        for text in texts:
            ids = self._ids(_check_str(text))
            if len(ids) > room:
                if not truncate:
                    shown = text if len(text) <= 60 else text[:57] + "..."
                    raise TextTooLongError(
                        f"text {shown!r} has {len(ids) + 2} tokens (with start/end markers), "
                        f"more than context_length={context_length}; pass truncate=True to cut it"
                    )
                # Same as the reference's tokens[:context_length] then tokens[-1] = EOT.
                ids = ids[:room]
            flat.append(sot)
            flat.extend(ids)
            flat.append(eot)
            lengths.append(len(ids) + 2)
        # Scatter all ids at once: a boolean mask in row-major order marks each
        # row's first `length` slots. Much cheaper than building padded rows.
        result = np.zeros((len(lengths), context_length), dtype=np.int64)
        mask = np.arange(context_length) < np.asarray(lengths, dtype=np.int64)[:, None]
        result[mask] = np.asarray(flat, dtype=np.int64)
        return torch.from_numpy(result)  # type: ignore[return-value]


_default_lock = threading.Lock()
_default_tokenizer: Tokenizer | None = None


def get_default_tokenizer() -> Tokenizer:
    """Return the shared tokenizer for the bundled vocabulary, building it on first use."""
    global _default_tokenizer
    if _default_tokenizer is None:
        with _default_lock:
            if _default_tokenizer is None:
                _default_tokenizer = Tokenizer()
    return _default_tokenizer


def tokenize(
    texts: str | Sequence[str], context_length: int = 77, truncate: bool = False
) -> torch.LongTensor:
    """Drop-in equivalent of OpenAI's ``clip.tokenize`` (returns int64 ids)."""
    return get_default_tokenizer()(texts, context_length=context_length, truncate=truncate)
