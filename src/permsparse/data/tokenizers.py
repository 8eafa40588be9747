"""A byte-level tokenizer for tiny test models: real text, no vocabulary file, no network."""

from __future__ import annotations

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """Maps each character to ``min(ord(c), vocab_size - 1)``; enough for tiny random LMs on real text."""

    name_or_path = "byte"

    def __init__(self, vocab_size: int = 128) -> None:
        if vocab_size < 2:
            raise ValueError(f"ByteTokenizer needs vocab_size >= 2, got {vocab_size}")
        self.vocab_size = vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        top = self.vocab_size - 1
        return [min(ord(c), top) for c in text]

    def __call__(self, text: str, add_special_tokens: bool = False, **_: object) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}

    def __len__(self) -> int:
        return self.vocab_size
