"""Shared fixtures: a tiny Qwen3 checkpoint written by transformers itself, with a small tokenizer.

The checkpoint is the independent reference: our engine loads it from safetensors and must match
transformers' own Qwen3ForCausalLM on it.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

VOCAB = 320


def make_tokenizer(path: str) -> None:
    """A byte-level BPE tokenizer with a few merges, made with the `tokenizers` library."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 2, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = ["the quick brown fox jumps over the lazy dog", "tensor parallel inference overlaps communication",
              "hello world, hello engine", "paged attention with prefix caching"] * 20
    tok.train_from_iterator(corpus, trainer)
    tok.save(os.path.join(path, "tokenizer.json"))
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
                   "model_max_length": 512}, f)


def make_checkpoint(path: str, tie: bool = False, seed: int = 0, **overrides) -> str:
    from transformers import Qwen3Config, Qwen3ForCausalLM
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
               rope_theta=10000.0, tie_word_embeddings=tie, eos_token_id=1, bos_token_id=0)
    cfg.update(overrides)
    model = Qwen3ForCausalLM(Qwen3Config(**cfg)).to(torch.float32)
    # Random init of transformers is small; widen it so logits are well separated (fewer ties).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0, 0.15)
    model.save_pretrained(path, safe_serialization=True)
    make_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp("qwen3_tiny")))


@pytest.fixture(scope="session")
def qwen3_tied_dir(tmp_path_factory) -> str:
    return make_checkpoint(str(tmp_path_factory.mktemp("qwen3_tied")), tie=True, seed=1)


@pytest.fixture(scope="session")
def hf_model(qwen3_dir):
    from transformers import Qwen3ForCausalLM
    return Qwen3ForCausalLM.from_pretrained(qwen3_dir, torch_dtype=torch.float32).eval()
