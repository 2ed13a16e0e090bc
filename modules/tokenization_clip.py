"""OpenAI CLIP's byte-level BPE tokenizer (text -> ids), with the API CLIP4Clip's datasets call.

Ids equal OpenAI CLIP's for any text: same byte table, same 48,894 merges, same cleaning and pre-tokenisation.
"""

from __future__ import annotations

import gzip
import html
import os
from collections.abc import Iterable
from functools import lru_cache

import ftfy
import regex as re

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
# The gz file holds a header line and then more merges than CLIP uses; CLIP keeps
# 49152 - 256 - 2 of them, so that bytes + words + merges + 2 specials = 49408.
_N_MERGES = 49152 - 256 - 2


@lru_cache
def default_bpe() -> str:
    """Path of the BPE merges file shipped next to this module."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "bpe_simple_vocab_16e6.txt.gz")


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable unicode character, printable bytes to themselves.

    The insertion order (printable bytes first, then the rest) is the order of the first 256 vocabulary entries.
    """
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in printable}
    shift = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shift)
            shift += 1
    return table


def get_pairs(word: Iterable[str]) -> set[tuple[str, str]]:
    """The set of adjacent symbol pairs of a word given as a sequence of symbols."""
    symbols = list(word)
    return set(zip(symbols, symbols[1:]))


def basic_clean(text: str) -> str:
    """Fix mojibake and unescape HTML twice (captions are sometimes double-escaped)."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse every run of whitespace to one space and strip the ends."""
    return re.sub(r"\s+", " ", text).strip()


class SimpleTokenizer:
    """CLIP's BPE tokenizer. ``tokenize`` gives BPE strings, ``encode`` ids; no special tokens are added."""

    def __init__(self, bpe_path: str = default_bpe()):
        try:
            with gzip.open(bpe_path) as f:
                lines = f.read().decode("utf-8").split("\n")
        except OSError as e:
            raise OSError(f"{bpe_path}: cannot read the gzip'd BPE merges file ({e})") from e
        merge_lines = lines[1 : _N_MERGES + 1]
        if len(merge_lines) != _N_MERGES:
            raise ValueError(
                f"{bpe_path}: expected at least {_N_MERGES} merges after the header line, found {len(merge_lines)}"
            )
        merges: list[tuple[str, str]] = []
        for lineno, line in enumerate(merge_lines, start=2):
            pair = tuple(line.split())
            if len(pair) != 2:
                raise ValueError(f"{bpe_path}: line {lineno}: expected two symbols separated by a space, got {line!r}")
            merges.append(pair)

        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        vocab = list(self.byte_encoder.values())
        vocab += [c + "</w>" for c in vocab]
        vocab += ["".join(pair) for pair in merges]
        vocab += [SOT_TOKEN, EOT_TOKEN]
        self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
        self.vocab = self.encoder
        self.decoder: dict[int, str] = {i: tok for tok, i in self.encoder.items()}
        self.bpe_ranks: dict[tuple[str, str], int] = {pair: i for i, pair in enumerate(merges)}
        self.cache: dict[str, str] = {SOT_TOKEN: SOT_TOKEN, EOT_TOKEN: EOT_TOKEN}
        self.pat = re.compile(
            r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
            re.IGNORECASE,
        )
        # Byte-encoded pre-token -> its BPE strings; saves the join/split round trip on repeated words.
        self._piece_cache: dict[str, list[str]] = {}

    def bpe(self, token: str) -> str:
        """BPE-merge one byte-encoded pre-token; returns its symbols joined by spaces, the last ending in ``</w>``."""
        cached = self.cache.get(token)
        if cached is not None:
            return cached
        if len(token) < 2:
            result = token + "</w>"
            self.cache[token] = result
            return result
        word = list(token[:-1]) + [token[-1] + "</w>"]
        ranks = self.bpe_ranks
        while len(word) > 1:
            best = min(zip(word, word[1:]), key=lambda p: ranks.get(p, float("inf")))
            if best not in ranks:
                break
            first, second = best
            merged: list[str] = []
            i = 0
            # Merge every occurrence, scanning left to right without overlap.
            while i < len(word):
                if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        result = " ".join(word)
        self.cache[token] = result
        return result

    def _clean(self, text: str) -> str:
        # Fast path, same result: on printable ASCII without '&' every ftfy fix and html.unescape is the
        # identity and the only whitespace is ' ', so cleaning reduces to collapsing spaces. Most captions
        # take it, and ftfy is most of the tokenizer's time otherwise.
        if text.isascii() and text.isprintable() and "&" not in text:
            return " ".join(text.split()).lower()
        return whitespace_clean(basic_clean(text)).lower()

    def tokenize(self, text: str) -> list[str]:
        """Clean, lower-case and split ``text`` into BPE strings (e.g. ``['a</w>', 'dog</w>']``)."""
        tokens: list[str] = []
        piece_cache = self._piece_cache
        byte_encoder = self.byte_encoder
        for piece in self.pat.findall(self._clean(text)):
            bpe_tokens = piece_cache.get(piece)
            if bpe_tokens is None:
                encoded = "".join(byte_encoder[b] for b in piece.encode("utf-8"))
                bpe_tokens = self.bpe(encoded).split(" ")
                piece_cache[piece] = bpe_tokens
            tokens.extend(bpe_tokens)
        return tokens

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        """Look up BPE strings (as ``tokenize`` returns, or the special tokens) in the vocabulary."""
        try:
            return [self.encoder[t] for t in tokens]
        except KeyError as e:
            raise ValueError(f"token {e.args[0]!r} is not in the CLIP vocabulary") from None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without start/end tokens."""
        return self.convert_tokens_to_ids(self.tokenize(text))

    def decode(self, tokens: Iterable[int]) -> str:
        """Ids back to text: ``</w>`` becomes a space; invalid UTF-8 becomes U+FFFD."""
        try:
            text = "".join(self.decoder[int(t)] for t in tokens)
        except KeyError as e:
            raise ValueError(f"id {e.args[0]!r} is outside the CLIP vocabulary (0..{len(self.decoder) - 1})") from None
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")
