"""Architecture descriptions: read from a checkpoint's config.json, or built in by name.

Built-in names carry the real Qwen3 architecture numbers with no weights (load format `dummy`: seeded random
weights), so benchmarks can run big architectures with no download. `tiny` is the embedded default.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelArch:
    name: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 40960
    torch_dtype: str = "bfloat16"
    eos_token_ids: tuple[int, ...] = ()
    attention_bias: bool = False
    path: str | None = None        # checkpoint directory, None for built-ins
    builtin: bool = False

    @property
    def num_params(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q, kv = self.num_attention_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        layer = h * (q + 2 * kv) + q * h + 3 * h * i + 2 * h + 2 * self.head_dim
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return L * layer + emb + h


def _qwen3(name: str, hidden: int, inter: int, layers: int, heads: int, tie: bool) -> ModelArch:
    return ModelArch(name=name, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                     num_attention_heads=heads, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     tie_word_embeddings=tie, eos_token_ids=(151645, 151643), builtin=True)


BUILTIN_ARCHS: dict[str, ModelArch] = {
    # A few M parameters; byte-level tokenizer (ids 0-255 are bytes, 256 is EOS); runs anywhere in seconds.
    "tiny": ModelArch(name="tiny", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, head_dim=32, vocab_size=512,
                      tie_word_embeddings=True, rope_theta=10000.0, max_position_embeddings=4096,
                      torch_dtype="float32", eos_token_ids=(256,), builtin=True),
    "qwen3-0.6b": _qwen3("qwen3-0.6b", 1024, 3072, 28, 16, True),
    "qwen3-1.7b": _qwen3("qwen3-1.7b", 2048, 6144, 28, 16, True),
    "qwen3-4b": _qwen3("qwen3-4b", 2560, 9728, 36, 32, True),
    "qwen3-8b": _qwen3("qwen3-8b", 4096, 12288, 36, 32, False),
    "qwen3-14b": _qwen3("qwen3-14b", 5120, 17408, 40, 40, False),
    "qwen3-32b": _qwen3("qwen3-32b", 5120, 25600, 64, 64, False),
}


def _as_tuple(x) -> tuple[int, ...]:
    if x is None:
        return ()
    return tuple(int(t) for t in (x if isinstance(x, (list, tuple)) else [x]))


def arch_from_dir(path: str) -> ModelArch:
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"model directory {path!r} has no config.json")
    with open(cfg_path) as f:
        c = json.load(f)
    rope = c.get("rope_parameters") or c.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ValueError(f"{cfg_path}: rope type {rope.get('rope_type')!r} is not supported (only default RoPE)")
    theta = c.get("rope_theta", rope.get("rope_theta", 10000.0))
    eos = _as_tuple(c.get("eos_token_id"))
    gen_path = os.path.join(path, "generation_config.json")
    if os.path.isfile(gen_path):
        with open(gen_path) as f:
            eos = _as_tuple(json.load(f).get("eos_token_id")) or eos
    heads = c["num_attention_heads"]
    try:
        return ModelArch(
            name=os.path.basename(os.path.normpath(path)), hidden_size=c["hidden_size"],
            intermediate_size=c["intermediate_size"], num_hidden_layers=c["num_hidden_layers"],
            num_attention_heads=heads, num_key_value_heads=c.get("num_key_value_heads", heads),
            head_dim=c.get("head_dim") or c["hidden_size"] // heads, vocab_size=c["vocab_size"],
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)), rope_theta=float(theta),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(c.get("max_position_embeddings", 4096)),
            torch_dtype=str(c.get("dtype") or c.get("torch_dtype") or "bfloat16"), eos_token_ids=eos,
            attention_bias=bool(c.get("attention_bias", False)), path=os.path.abspath(path))
    except KeyError as e:
        raise ValueError(f"{cfg_path} lacks the field {e.args[0]!r}") from None


def load_arch(model: str) -> ModelArch:
    """A built-in name or a local Hugging Face-format directory."""
    if model in BUILTIN_ARCHS:
        return BUILTIN_ARCHS[model]
    if os.path.isdir(model):
        return arch_from_dir(model)
    raise FileNotFoundError(
        f"model {model!r} is neither a local directory nor a built-in architecture "
        f"({', '.join(BUILTIN_ARCHS)})")
