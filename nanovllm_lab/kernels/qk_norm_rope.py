"""Triton kernel for Qwen3's attention prologue: per-head RMSNorm of q and k, then RoPE (neox layout), read
straight out of the fused qkv projection's output in one pass.

Why a kernel of its own: the torch.compile'd region (models/qwen3.py `_qk_norm_rope`) became four inductor
kernels per layer, two of them reductions that read q or k a second time. In a traced qwen3-8b tp=1 prefill
(results/gpu/2026-11-28m_h200/call3: two steps of 2048 and two of 16384 tokens) they took about 34 ms, where
reading q and k once and writing them once at the card's copy bandwidth takes about 6.5 ms. Here one program
owns one token and a block of its q and k heads: it loads each head's two halves once, sums their squares for
the norm, and writes the rotated halves.

Rounding follows the eager path exactly (layers/layernorm.py RMSNorm.norm, layers/rotary_embedding.py): the
normalised head is rounded to the activation dtype, multiplied by the weight and rounded again (bf16 x bf16
products are exact in float32, so this is torch's multiply), and rotated in float32 with one final rounding.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# The token count is not specialised on: it changes with every step (a mid-step compile costs far more).
@triton.jit(do_not_specialize=["n_tokens"])
def _qk_norm_rope_kernel(qkv_ptr, pos_ptr, cos_sin_ptr, qw_ptr, kw_ptr, q_ptr, k_ptr, n_tokens, stride_qkv,
                         eps, slot_ptr, k_cache_ptr, v_cache_ptr, stride_cb, stride_cs, stride_ch,
                         NUM_Q: tl.constexpr, NUM_K: tl.constexpr, HALF: tl.constexpr, HEADS: tl.constexpr,
                         STORE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    # Heads of a qkv row in order: q heads 0..NUM_Q-1, k heads, then (with STORE) the v heads, copied as they are.
    heads = tl.program_id(1) * HEADS + tl.arange(0, HEADS)
    cols = tl.arange(0, HALF)
    is_q = heads < NUM_Q
    is_k = (heads >= NUM_Q) & (heads < NUM_Q + NUM_K)
    if STORE:
        is_v = (heads >= NUM_Q + NUM_K) & (heads < NUM_Q + 2 * NUM_K)
    else:  # without the cache write the v columns are not read (qkv may end after k)
        is_v = heads < 0
    full = cols[None, :] < HALF  # all true: broadcasts a per-head test over the columns
    mask = (is_q | is_k | is_v)[:, None] & full
    # head h's halves start at h * 2 * HALF and h * 2 * HALF + HALF of the row.
    src = qkv_ptr + t * stride_qkv + heads[:, None] * (2 * HALF) + cols[None, :]
    x1 = tl.load(src, mask=mask, other=0.0)
    x2 = tl.load(src + HALF, mask=mask, other=0.0)
    dtype = x1.dtype
    x1, x2 = x1.to(tl.float32), x2.to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / (2 * HALF) + eps)
    wq1 = tl.load(qw_ptr + cols).to(tl.float32)
    wq2 = tl.load(qw_ptr + HALF + cols).to(tl.float32)
    wk1 = tl.load(kw_ptr + cols).to(tl.float32)
    wk2 = tl.load(kw_ptr + HALF + cols).to(tl.float32)
    w1 = tl.where(is_q[:, None], wq1[None, :], wk1[None, :])
    w2 = tl.where(is_q[:, None], wq2[None, :], wk2[None, :])
    n1 = (w1 * (x1 * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    n2 = (w2 * (x2 * rstd[:, None]).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos = tl.load(cos_sin_ptr + pos * (2 * HALF) + cols)[None, :]
    sin = tl.load(cos_sin_ptr + pos * (2 * HALF) + HALF + cols)[None, :]
    o1 = (n1 * cos - n2 * sin).to(dtype)
    o2 = (n2 * cos + n1 * sin).to(dtype)
    q_off = q_ptr + t * (NUM_Q * 2 * HALF) + heads[:, None] * (2 * HALF) + cols[None, :]
    k_off = k_ptr + t * (NUM_K * 2 * HALF) + (heads[:, None] - NUM_Q) * (2 * HALF) + cols[None, :]
    q_mask = is_q[:, None] & full
    k_mask = is_k[:, None] & full
    tl.store(q_off, o1, mask=q_mask)
    tl.store(q_off + HALF, o2, mask=q_mask)
    tl.store(k_off, o1, mask=k_mask)
    tl.store(k_off + HALF, o2, mask=k_mask)
    if STORE:  # the K/V cache write of kernels/store_kv.py, fused: slot -1 (a padding token) writes nothing
        slot = tl.load(slot_ptr + t).to(tl.int64)
        keep = (cols[None, :] * 0 + slot) >= 0  # broadcast: the interpreter rejects a scalar bool in a mask
        kv_head = tl.where(is_k, heads - NUM_Q, heads - NUM_Q - NUM_K)
        dst = ((slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_cs + kv_head[:, None] * stride_ch
               + cols[None, :])
        kc_mask = k_mask & keep
        tl.store(k_cache_ptr + dst, o1.to(k_cache_ptr.dtype.element_ty), mask=kc_mask)
        tl.store(k_cache_ptr + dst + HALF, o2.to(k_cache_ptr.dtype.element_ty), mask=kc_mask)
        vc_mask = is_v[:, None] & keep
        tl.store(v_cache_ptr + dst, x1.to(v_cache_ptr.dtype.element_ty), mask=vc_mask)
        tl.store(v_cache_ptr + dst + HALF, x2.to(v_cache_ptr.dtype.element_ty), mask=vc_mask)


def qk_norm_rope(qkv: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, q_weight: torch.Tensor,
                 k_weight: torch.Tensor, eps: float, num_q: int, num_k: int, head_dim: int,
                 cache: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, num_q, head_dim] and k [T, num_k, head_dim], normalised and rotated, from qkv [T, >= (num_q +
    num_k) * head_dim] (rows may be strided). cos_sin: [max_pos, head_dim] float32, the cos half then the sin
    half (layers/rotary_embedding.py's table). `cache` = (k_cache, v_cache, slot_mapping): also write k and the
    v columns (qkv's next num_k heads) into the paged cache [num_blocks, block_size, num_k, head_dim] at each
    token's slot, skipping slot -1, as kernels/store_kv.py does; one launch and one read of v fewer."""
    heads_read = num_q + num_k + (num_k if cache is not None else 0)
    if qkv.dim() != 2 or qkv.stride(1) != 1 or qkv.shape[1] < heads_read * head_dim:
        raise ValueError(f"qk_norm_rope needs qkv [T, >= {heads_read * head_dim}] with contiguous columns, "
                         f"got {tuple(qkv.shape)} strides {qkv.stride()}")
    if head_dim % 2 or head_dim & (head_dim - 1):
        raise ValueError(f"qk_norm_rope needs a power-of-two head_dim, got {head_dim}")
    if cos_sin.shape[1] != head_dim or cos_sin.dtype != torch.float32 or not cos_sin.is_contiguous():
        raise ValueError(f"qk_norm_rope needs a contiguous float32 cos_sin [max_pos, {head_dim}], got "
                         f"{tuple(cos_sin.shape)} {cos_sin.dtype}")
    n = qkv.shape[0]
    if positions.shape != (n,) or positions.stride(0) != 1:  # one per row; out-of-range values are not checked
        raise ValueError(f"qk_norm_rope needs contiguous positions of shape ({n},), got {tuple(positions.shape)} "
                         f"strides {positions.stride()}")
    if cache is not None:
        k_cache, v_cache, slots = cache
        if (k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.dim() != 4
                or k_cache.shape[2:] != (num_k, head_dim) or k_cache.stride(3) != 1 or slots.shape != (n,)
                or slots.stride(0) != 1 or slots.device != qkv.device or k_cache.device != qkv.device):
            raise ValueError(f"qk_norm_rope: the cache must be two [blocks, block_size, {num_k}, {head_dim}] tensors "
                             f"of one layout and the slots one per token, contiguous, all on qkv's device; got "
                             f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}, slots {tuple(slots.shape)} strides "
                             f"{slots.stride()}")
        cache_args = (slots, k_cache, v_cache, k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
        block_size = k_cache.shape[1]
    else:
        cache_args, block_size = (positions, qkv, qkv, 0, 0, 0), 1  # placeholders, never read
    q = torch.empty((n, num_q, head_dim), dtype=qkv.dtype, device=qkv.device)
    k = torch.empty((n, num_k, head_dim), dtype=qkv.dtype, device=qkv.device)
    if n == 0:
        return q, k
    heads = min(triton.next_power_of_2(heads_read), 8)  # 8 heads of 128: 4 KB of bf16 per program
    grid = (n, triton.cdiv(heads_read, heads))
    _qk_norm_rope_kernel[grid](qkv, positions, cos_sin, q_weight, k_weight, q, k, n, qkv.stride(0), eps,
                               *cache_args, NUM_Q=num_q, NUM_K=num_k, HALF=head_dim // 2, HEADS=heads,
                               STORE=cache is not None, BLOCK_SIZE=block_size, num_warps=4)
    return q, k
