"""A character-level tokenizer: no files, no downloads.

Ids 0, 1, 2 are the special tokens ``<pad>``, ``<bos>``, ``<eos>``; the alphabet's
characters follow in order. Characters outside the alphabet are an error when encoding;
ids past the alphabet (a model's vocabulary may be larger) decode as ``?``.

Example::

    >>> tok = CharTokenizer("0123456789")
    >>> tok.encode("42")
    [7, 5]
    >>> ids, mask = tok.batch(["42", "7"], side="left")
    >>> ids.tolist(), mask.tolist()
    ([[7, 5], [0, 10]], [[1, 1], [0, 1]])
    >>> tok.decode([7, 5, 2, 9])  # stops at <eos>
    '42'
    >>> print(tok)
    CharTokenizer(13 tokens: <pad> <bos> <eos> + '0123456789')
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

DIGITS = "0123456789"


def pad_batch(encoded: Sequence[Sequence[int]], pad_id: int, side: str = "left"):
    """``(input_ids, attention_mask)`` of token lists, padded with ``pad_id`` on ``side``."""
    if side not in ("left", "right"):
        raise ValueError(f"padding side must be 'left' or 'right', got {side!r}")
    width = max((len(e) for e in encoded), default=0)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, tokens in enumerate(encoded):
        start = width - len(tokens) if side == "left" else 0
        ids[row, start : start + len(tokens)] = torch.tensor(list(tokens), dtype=torch.long)
        mask[row, start : start + len(tokens)] = 1
    return ids, mask


class CharTokenizer:
    """One token per character of ``alphabet``, after three special tokens."""

    pad_id, bos_id, eos_id = 0, 1, 2
    SPECIALS = ("<pad>", "<bos>", "<eos>")

    def __init__(self, alphabet: str = DIGITS) -> None:
        if len(set(alphabet)) != len(alphabet):
            raise ValueError(f"tokenizer alphabet {alphabet!r} repeats a character")
        self.alphabet = alphabet
        self._ids = {ch: i + len(self.SPECIALS) for i, ch in enumerate(alphabet)}

    @property
    def vocab_size(self) -> int:
        return len(self.SPECIALS) + len(self.alphabet)

    def encode(self, text: str) -> list[int]:
        unknown = sorted({ch for ch in text if ch not in self._ids})
        if unknown:
            raise ValueError(
                f"characters {unknown} of {text!r} are not in the tokenizer's alphabet "
                f"{self.alphabet!r}; add them to the alphabet (models.<name>.args.alphabet)"
            )
        return [self._ids[ch] for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids`` up to the first ``<eos>``, without padding."""
        chars = []
        for i in (int(i) for i in ids):
            if i == self.eos_id:
                break
            if i >= len(self.SPECIALS):
                index = i - len(self.SPECIALS)
                chars.append(self.alphabet[index] if index < len(self.alphabet) else "?")
        return "".join(chars)

    def is_digit(self, ids: torch.Tensor) -> torch.Tensor:
        """Boolean mask of the ids that are the digits 0-9."""
        digits = torch.tensor([self._ids[d] for d in DIGITS if d in self._ids], device=ids.device)
        return torch.isin(ids, digits)

    def batch(self, texts: Sequence[str], side: str = "left"):
        """``(input_ids, attention_mask)`` of ``texts``, padded on ``side`` to equal length."""
        return pad_batch([self.encode(t) for t in texts], self.pad_id, side)

    def __str__(self) -> str:
        specials = " ".join(self.SPECIALS)
        return f"CharTokenizer({self.vocab_size} tokens: {specials} + {self.alphabet!r})"
