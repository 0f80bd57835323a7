"""The attention-backend interface and its registry.

Cache layout (all backends): per layer `k_cache`, `v_cache` of shape
[num_blocks, block_size, num_kv_heads, head_dim]; token t of a sequence lives in slot
`block_table[t // block_size] * block_size + t % block_size` of the flattened cache. The cache has one block
more than the block manager hands out: a scratch block that padding tokens (slot -1) may write to, so that
backends can drop them without a data-dependent branch.
"""
from __future__ import annotations

import importlib
import logging

import torch

from nanovllm_lab.utils.context import AttentionContext
from nanovllm_lab.utils.registry import Registry

log = logging.getLogger(__name__)


class AttentionBackend:
    """Stores new K/V by slot mapping and attends over the paged cache.

    q: [tokens, num_heads, head_dim]; k, v: [tokens, num_kv_heads, head_dim]; returns [tokens, num_heads, head_dim].
    """

    name = "base"
    # Whether store_kv is kernels/store_kv.py's (this cache layout, slot -1 skipped), so that a kernel that
    # computes K anyway may write the cache in its place (layers/attention.py fused_store_target).
    fused_store = False
    # Decode batches above this are not captured in CUDA graphs (the torch backend's gather grows with batch x
    # max_model_len inside the graph pool, which the KV-cache sizing does not see).
    max_graph_batch = 1 << 30

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        raise NotImplementedError

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, ctx: AttentionContext, scale: float) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: AttentionContext,
               scale: float) -> torch.Tensor:
        raise NotImplementedError


# name -> "module:Class"; modules import lazily so that triton / flash-attn are needed only when chosen.
BACKENDS: Registry[str] = Registry("attention backend")
BACKENDS.register("torch")("nanovllm_lab.attention.torch_backend:TorchAttentionBackend")
BACKENDS.register("triton")("nanovllm_lab.attention.triton_backend:TritonAttentionBackend")
BACKENDS.register("flash_attn")("nanovllm_lab.attention.flash_attn_backend:FlashAttnBackend")


def get_backend(name: str) -> AttentionBackend:
    target = BACKENDS.get(name)
    mod, cls = target.split(":")
    return getattr(importlib.import_module(mod), cls)()


def flash_attn_available() -> bool:
    try:
        importlib.import_module("flash_attn")
        return True
    except Exception:
        return False


def resolve_backend(name: str, device: str) -> str:
    """Resolve "auto" for a device and check that an explicit choice can run there."""
    if name == "auto":
        if device.startswith("cuda"):
            name = "flash_attn" if flash_attn_available() else "triton"
        else:
            name = "torch"
        log.info("attention_backend=auto resolved to %r on %s", name, device)
    BACKENDS.get(name)  # raises with the valid names
    if name == "flash_attn" and not flash_attn_available():
        raise ValueError("attention_backend='flash_attn' needs the flash-attn package, which is not importable")
    if name == "flash_attn" and not device.startswith("cuda"):
        raise ValueError("attention_backend='flash_attn' runs on cuda only")
    return name
