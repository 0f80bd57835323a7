"""The flash-attn backend: flash_attn_varlen_func for prefill, flash_attn_with_kvcache for decode.

Used where the flash-attn package is importable on cuda (it is not on the project's GPU machines, where the
Triton backend is the default). flash-attn's paged KV needs a block size that is a multiple of 256. K/V are
stored by the Triton kernel, which is the same operation in every backend.
"""
from __future__ import annotations

import torch

from nanovllm_lab.attention.base import AttentionBackend
from nanovllm_lab.attention.torch_backend import store_kvcache_torch
from nanovllm_lab.utils.context import AttentionContext


class FlashAttnBackend(AttentionBackend):
    name = "flash_attn"

    def __init__(self) -> None:
        from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache
        self._varlen, self._kvcache = flash_attn_varlen_func, flash_attn_with_kvcache
        try:
            from nanovllm_lab.kernels.store_kv import store_kvcache
            self._store = store_kvcache
        except ImportError:
            self._store = store_kvcache_torch

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        self._store(k, v, k_cache, v_cache, slot_mapping)

    def prefill(self, q, k, v, k_cache, v_cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
        if ctx.block_tables is not None:  # earlier context in the cache: attend over the paged cache
            k, v = k_cache, v_cache
        return self._varlen(q, k, v, cu_seqlens_q=ctx.cu_seqlens_q, cu_seqlens_k=ctx.cu_seqlens_k,
                            max_seqlen_q=ctx.max_seqlen_q, max_seqlen_k=ctx.max_seqlen_k, softmax_scale=scale,
                            causal=True, block_table=ctx.block_tables)

    def decode(self, q, k_cache, v_cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
        out = self._kvcache(q.unsqueeze(1), k_cache, v_cache, cache_seqlens=ctx.context_lens,
                            block_table=ctx.block_tables.clamp_min(0), softmax_scale=scale, causal=True)
        return out.squeeze(1)
