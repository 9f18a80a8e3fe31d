"""The unified model's text tokenizer: a small byte-level BPE trained on the dataset's captions and questions.

Bytes are the fallback, so any input text encodes; merges make a word of the closed vocabulary one token, so
captions are ~5x shorter than raw bytes (shorter sequences and fewer decoding steps). Its first ids are the
sequence format's special tokens (`unitok.mllm.sequence.SPECIALS`).

    >>> text = TextTokenizer.train(corpus)          # or TextTokenizer.from_json(json.load(...))
    >>> text.encode("a red star")                   # [..] ids, no specials
    >>> text.decode(ids), text.pad, text.eos        # "a red star", 0, 7
"""
from __future__ import annotations

import math
import re
from collections import Counter
from typing import Dict, List, Sequence

from .sequence import SPECIALS

_PIECE = re.compile(r" ?[a-z0-9]+| ?[^a-z0-9\s]+")


class TextTokenizer:
    """Byte-level BPE. ids: the specials (0..7, `<pad>` = 0), then the 256 bytes, then one id per merge.

    Text is lower-cased and whitespace-normalised, split into pieces (a word with its leading space, or a run of
    punctuation), and each piece is merged pair by pair in the order the merges were learned. Any string encodes
    (unknown words fall back to bytes); decoding is exact for normalised text.
    """

    def __init__(self, merges: Sequence[Sequence[int]]):
        self.merges = [tuple(int(x) for x in m) for m in merges]
        self.offset = len(SPECIALS)
        self.ranks = {m: i for i, m in enumerate(self.merges)}
        self.vocab: Dict[int, bytes] = {self.offset + b: bytes([b]) for b in range(256)}
        for i, (a, b) in enumerate(self.merges):
            self.vocab[self.offset + 256 + i] = self.vocab[a] + self.vocab[b]
        self.special = {s: i for i, s in enumerate(SPECIALS)}
        self._cache: Dict[str, List[int]] = {}

    def __len__(self) -> int:
        return self.offset + 256 + len(self.merges)

    def __getattr__(self, name):  # tok.pad, tok.eos, ... for the special ids
        special = self.__dict__.get("special", {})
        if f"<{name}>" in special:
            return special[f"<{name}>"]
        raise AttributeError(name)

    @staticmethod
    def normalize(text: str) -> str:
        return " ".join(str(text).lower().split())

    @classmethod
    def _pieces(cls, text: str) -> List[str]:
        return _PIECE.findall(cls.normalize(text))

    @classmethod
    def train(cls, corpus: Sequence[str], num_merges: int = 400, min_count: int = 2) -> "TextTokenizer":
        """Learn up to `num_merges` merges (each used at least `min_count` times) from `corpus`. Deterministic:
        ties are broken by the pair's ids."""
        offset = len(SPECIALS)
        words = Counter(p for text in corpus for p in cls._pieces(text))
        seqs = {w: [offset + b for b in w.encode()] for w in words}
        merges = []
        for _ in range(num_merges):
            pairs = Counter()
            for w, seq in seqs.items():
                for pair in zip(seq, seq[1:]):
                    pairs[pair] += words[w]
            if not pairs:
                break
            pair, count = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
            if count < min_count:
                break
            new = offset + 256 + len(merges)
            merges.append(pair)
            for w, seq in seqs.items():
                seqs[w] = cls._merge(seq, pair, new)
        return cls(merges)

    @staticmethod
    def _merge(seq: List[int], pair: tuple, new: int) -> List[int]:
        out, i = [], 0
        while i < len(seq):
            if i + 1 < len(seq) and (seq[i], seq[i + 1]) == pair:
                out.append(new)
                i += 2
            else:
                out.append(seq[i])
                i += 1
        return out

    def _encode_piece(self, piece: str) -> List[int]:
        if piece in self._cache:
            return self._cache[piece]
        seq = [self.offset + b for b in piece.encode()]
        while len(seq) > 1:
            ranked = [(self.ranks.get(p, math.inf), j) for j, p in enumerate(zip(seq, seq[1:]))]
            rank, j = min(ranked)
            if rank == math.inf:
                break
            seq = self._merge(seq, (seq[j], seq[j + 1]), self.offset + 256 + int(rank))
        self._cache[piece] = seq
        return seq

    def encode(self, text: str) -> List[int]:
        """text -> token ids (no specials)."""
        if not isinstance(text, str):
            raise ValueError(f"expected text (a str), got {type(text).__name__}")
        return [i for p in self._pieces(text) for i in self._encode_piece(p)]

    def decode(self, ids: Sequence[int]) -> str:
        """ids -> text; specials and ids outside the vocabulary are dropped."""
        data = b"".join(self.vocab.get(int(i), b"") for i in ids)
        return data.decode("utf-8", errors="replace").strip()

    def token_text(self, i: int) -> str:
        """One id as readable text (specials by name)."""
        i = int(i)
        return SPECIALS[i] if i < self.offset else self.vocab.get(i, b"?").decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"type": "byte-bpe", "specials": list(SPECIALS), "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_json(cls, data: dict) -> "TextTokenizer":
        if data.get("type") != "byte-bpe" or list(data.get("specials", [])) != list(SPECIALS):
            raise ValueError("text_tokenizer.json is not a byte-level BPE written by TextTokenizer.to_json")
        return cls(data["merges"])

