"""Tokenizers: the checkpoint's own (transformers), or the built-in byte-level one of the `tiny` model."""
from __future__ import annotations

import os
from typing import Protocol

from nanovllm_lab.models.arch import ModelArch


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255 and id 256 as EOS, built with the `tokenizers` library."""

    def __init__(self) -> None:
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
        alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda ch: _byte_of(ch))
        vocab = {ch: i for i, ch in enumerate(alphabet)}
        vocab["<eos>"] = 256
        tok = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens(["<eos>"])
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode([i for i in ids if i < 257], skip_special_tokens=True)


def _byte_of(ch: str) -> int:
    # GPT-2's byte-to-unicode table: printable bytes map to themselves, the rest to U+0100 onwards.
    o = ord(ch)
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    if o in printable:
        return o
    rest = [b for b in range(256) if b not in printable]
    return rest[o - 256]


class HFTokenizer:
    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer
        self._tok = AutoTokenizer.from_pretrained(path)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(arch: ModelArch) -> Tokenizer | None:
    if arch.name == "tiny" and arch.builtin:
        return ByteTokenizer()
    if arch.path and any(os.path.isfile(os.path.join(arch.path, f)) for f in ("tokenizer.json", "tokenizer_config.json")):
        return HFTokenizer(arch.path)
    return None
