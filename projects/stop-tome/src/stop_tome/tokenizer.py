"""CLIP's byte-level BPE tokenizer, reading the vocabulary file that open_clip ships.

Why our own: the PyPI ``clip`` packages no longer import (setuptools >= 81) and importing
``open_clip`` pulls in torchvision/timm (~15 s); only its ``bpe_simple_vocab_16e6.txt.gz`` is needed.
CLIP4Clip/STOP dataloaders also need ``tokenize`` + ``convert_tokens_to_ids``, which we provide.
"""

from __future__ import annotations

import functools
import gzip
import html
import importlib.util
from pathlib import Path

import ftfy
import regex as re

SOT = "<|startoftext|>"
EOT = "<|endoftext|>"
_PATTERN = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    re.IGNORECASE,
)


def default_vocab_path() -> Path:
    """Locate open_clip's BPE merges file without importing open_clip."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("open_clip_torch is not installed; pass bpe_path= to the tokenizer")
    path = Path(list(spec.submodule_search_locations)[0]) / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise FileNotFoundError(f"BPE vocabulary not found at {path}")
    return path


@functools.lru_cache
def _byte_table() -> dict[int, str]:
    """Map every byte to a printable unicode character (GPT-2/CLIP convention), so BPE never sees spaces."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _clean(text: str) -> str:
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return " ".join(text.split()).lower()


class ClipTokenizer:
    """Encode text to CLIP ids (vocabulary 49408, SOT 49406, EOT 49407)."""

    def __init__(self, bpe_path: str | Path | None = None) -> None:
        path = Path(bpe_path) if bpe_path is not None else default_vocab_path()
        with gzip.open(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
        symbols = list(_byte_table().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {tok: i for i, tok in enumerate(vocab)}
        self.decoder = {i: tok for tok, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.byte_encoder = _byte_table()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        self.cache = {SOT: SOT, EOT: EOT}
        self.vocab = self.encoder

    def bpe(self, word: str) -> str:
        """Apply merges to one pre-tokenised word; returns space-separated sub-words."""
        if word in self.cache:
            return self.cache[word]
        parts = list(word[:-1]) + [word[-1] + "</w>"]
        while len(parts) > 1:
            pairs = {(parts[i], parts[i + 1]) for i in range(len(parts) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        out = " ".join(parts)
        self.cache[word] = out
        return out

    def tokenize(self, text: str) -> list[str]:
        """Sub-word strings (CLIP4Clip's ``tokenize``)."""
        tokens: list[str] = []
        for word in _PATTERN.findall(_clean(text)):
            word = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
            tokens.extend(self.bpe(word).split(" "))
        return tokens

    def convert_tokens_to_ids(self, tokens: list[str]) -> list[int]:
        return [self.encoder[t] for t in tokens]

    def encode(self, text: str) -> list[int]:
        return self.convert_tokens_to_ids(self.tokenize(text))

    def decode(self, ids: list[int]) -> str:
        text = "".join(self.decoder[i] for i in ids)
        raw = bytearray(self.byte_decoder[c] for c in text)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

    def encode_padded(self, text: str, max_words: int) -> tuple[list[int], list[int]]:
        """SOT + ids + EOT, truncated to ``max_words`` (EOT kept) and zero-padded; returns (ids, mask)."""
        if max_words < 2:
            raise ValueError(f"max_words must be >= 2, got {max_words}")
        ids = [self.encoder[SOT]] + self.encode(text)[: max_words - 2] + [self.encoder[EOT]]
        mask = [1] * len(ids) + [0] * (max_words - len(ids))
        return ids + [0] * (max_words - len(ids)), mask
