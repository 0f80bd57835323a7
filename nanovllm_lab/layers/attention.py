"""The attention layer: stores this step's K/V into the paged cache and attends through the chosen backend.

A caller that already wrote the K/V (the fused q/k norm + RoPE kernel, kernels/qk_norm_rope.py) asks
`fused_store_target()` where to, and passes `stored=True`."""
from __future__ import annotations

import torch
from torch import nn

from nanovllm_lab.attention.base import AttentionBackend
from nanovllm_lab.utils.context import get_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, head_dim: int, scale: float, num_kv_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale, self.num_kv_heads = num_heads, head_dim, scale, num_kv_heads
        self.k_cache = self.v_cache = torch.tensor([])  # bound by the model runner
        self.backend: AttentionBackend | None = None    # bound by the model runner

    def fused_store_target(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """(k_cache, v_cache, slot_mapping) for a kernel that writes this step's K/V itself, where the backend's
        store is kernels/store_kv.py's (`AttentionBackend.fused_store`: the triton backend); else None."""
        if self.backend is None or not self.backend.fused_store or not self.k_cache.numel():
            return None
        return self.k_cache, self.v_cache, get_context().slot_mapping

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, stored: bool = False) -> torch.Tensor:
        ctx = get_context()
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.k_cache.numel() and not stored:
            self.backend.store_kv(k, v, self.k_cache, self.v_cache, ctx.slot_mapping)
        if ctx.is_prefill:
            o = self.backend.prefill(q, k, v, self.k_cache, self.v_cache, ctx, self.scale)
        else:
            o = self.backend.decode(q, self.k_cache, self.v_cache, ctx, self.scale)
        return o.reshape(-1, self.num_heads * self.head_dim)
