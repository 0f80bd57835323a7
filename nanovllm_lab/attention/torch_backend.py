"""Plain-PyTorch attention over the paged KV cache: the numerical reference for the GPU kernels.

Runs on CPU and GPU. Prefill loops over sequences (clear, not fast); decode gathers every slot of each
block table and masks past `context_lens`, so its shapes are static and it can be captured in a CUDA graph.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from nanovllm_lab.attention.base import AttentionBackend
from nanovllm_lab.utils.context import AttentionContext


def store_kvcache_torch(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                        slot_mapping: torch.Tensor) -> None:
    """Write each token's K/V to its slot. Padding tokens (slot -1) go to the cache's last slot, which lies in
    the scratch block that the block manager never hands out; no host sync, so this is graph-capturable."""
    scratch = k_cache.shape[0] * k_cache.shape[1] - 1
    slots = torch.where(slot_mapping >= 0, slot_mapping, scratch).long()
    k_cache.view(-1, *k_cache.shape[2:]).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(-1, *v_cache.shape[2:]).index_copy_(0, slots, v.to(v_cache.dtype))


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, n: int) -> torch.Tensor:
    """The first n tokens of one sequence from the paged cache: [n, kv_heads, head_dim]."""
    bs = cache.shape[1]
    pos = torch.arange(n, device=cache.device)
    slots = block_table.long()[pos // bs] * bs + pos % bs
    return cache.view(-1, *cache.shape[2:])[slots]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, Lq, D], k/v [B, Hkv, Lk, D], boolean mask broadcastable to [B, Hq, Lq, Lk] (True = attend)."""
    return F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


class TorchAttentionBackend(AttentionBackend):
    name = "torch"
    max_graph_batch = 64

    def store_kv(self, k, v, k_cache, v_cache, slot_mapping):
        store_kvcache_torch(k, v, k_cache, v_cache, slot_mapping)

    def prefill(self, q, k, v, k_cache, v_cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
        out = torch.empty_like(q)
        cq, ck = ctx.cu_seqlens_q_host, ctx.cu_seqlens_k_host
        for i in range(len(cq) - 1):
            q0, q1 = cq[i], cq[i + 1]
            lq, lk = q1 - q0, ck[i + 1] - ck[i]
            if ctx.block_tables is not None:  # earlier context lives in the cache (already holds the new tokens)
                ki = gather_kv(k_cache, ctx.block_tables[i], lk)
                vi = gather_kv(v_cache, ctx.block_tables[i], lk)
            else:
                ki, vi = k[q0:q1], v[q0:q1]
            qpos = torch.arange(lk - lq, lk, device=q.device)
            mask = qpos[:, None] >= torch.arange(lk, device=q.device)[None, :]
            o = _attend(q[q0:q1].transpose(0, 1)[None], ki.transpose(0, 1)[None], vi.transpose(0, 1)[None],
                        scale, mask)
            out[q0:q1] = o[0].transpose(0, 1)
        return out

    def decode(self, q, k_cache, v_cache, ctx: AttentionContext, scale: float) -> torch.Tensor:
        bt = ctx.block_tables.long().clamp_min(0)  # padded entries (-1) read block 0 and are masked below
        bsz, nblk = bt.shape
        bs = k_cache.shape[1]
        pos = torch.arange(nblk * bs, device=q.device)
        slots = bt[:, pos // bs] * bs + pos % bs  # [B, L]
        kf = k_cache.view(-1, *k_cache.shape[2:])[slots]  # [B, L, Hkv, D]
        vf = v_cache.view(-1, *v_cache.shape[2:])[slots]
        mask = pos[None, :] < ctx.context_lens[:, None]  # [B, L]
        o = _attend(q[:, :, None, :], kf.transpose(1, 2), vf.transpose(1, 2), scale, mask[:, None, None, :])
        return o[:, :, 0, :]
