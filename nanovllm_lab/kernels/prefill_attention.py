"""Variable-length causal prefill attention in Triton (FlashAttention-2 style), optionally over the paged cache.

Sequence i owns query rows cu_seqlens_q[i]:cu_seqlens_q[i+1] (q_len new tokens) and k_len =
cu_seqlens_k[i+1] - cu_seqlens_k[i] >= q_len keys; the new tokens are the last q_len keys, so query j sits
at absolute position k_len - q_len + j and sees keys 0..that position. With `block_tables`, every key
(cached prefix, earlier chunks, and the new tokens, already stored) is gathered from the paged cache;
without, keys come straight from k/v (k_len == q_len).

One program computes a BLOCK_M x head_dim output tile for one (query tile, sequence, query head): it
streams BLOCK_N-key tiles with an online softmax held in float32 registers. Key tiles past the causal
frontier of the tile's last query are never visited, and tiles wholly below the frontier of its first
query skip the causal mask (the FA-2 split into an unmasked and a masked loop).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from nanovllm_lab.kernels.decode_attention import _dot, _online_softmax_update


@triton.jit
def _prefill_inner(
    acc, l_i, m_i, q, q_pos, lo, hi, k_len, b, kvh, scale_log2,
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, k_start,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch, stride_btb,
    offs_n, offs_d, d_mask,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, MASKED: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        pos = start_n + offs_n
        if MASKED:
            valid = pos < k_len
        else:
            valid = offs_n < BLOCK_N  # all true; the unmasked loop only sees whole, in-range tiles
        kv_mask = valid[:, None] & d_mask[None, :]
        if PAGED:
            page = tl.load(bt_ptr + b * stride_btb + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
            page = tl.maximum(page, 0)  # a -1 entry must never turn into a negative address
            row = page * stride_cb + (pos % BLOCK_SIZE) * stride_cs + kvh * stride_ch
            k = tl.load(k_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + row[:, None] + offs_d[None, :], mask=kv_mask, other=0.0)
        else:
            tok = (k_start + pos).to(tl.int64)
            k = tl.load(k_ptr + tok[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=kv_mask,
                        other=0.0)
            v = tl.load(v_ptr + tok[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=kv_mask,
                        other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        # Scale in fp32 on the scores (not on a bf16 q, which would round q a second time); log2 units.
        qk = _dot(q, tl.trans(k), IEEE) * scale_log2
        if MASKED:
            qk = tl.where(valid[None, :] & (q_pos[:, None] >= pos[None, :]), qk, float("-inf"))
        # Key 0 is visible to every query row, so after the first tile m_i is finite: no NaN from -inf - -inf.
        m_i, l_i, acc = _online_softmax_update(qk, v, m_i, l_i, acc, IEEE)
    return acc, l_i, m_i


# The block-table stride (the widest table of the step) changes from step to step: not specialised, so that a new
# width does not compile a new variant mid-run (decode_attention.py).
@triton.jit(do_not_specialize=["stride_btb"])
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, cu_q_ptr, cu_k_ptr, out_ptr, scale_log2,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch, stride_btb, stride_ot, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, UPCAST: tl.constexpr,
    IEEE: tl.constexpr,
):
    # Grid (query tiles of the longest sequence, sequences, query heads); shorter sequences exit early.
    mb = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + b)
    q_len = tl.load(cu_q_ptr + b + 1) - q_start
    start_m = mb * BLOCK_M
    if start_m >= q_len:
        return
    k_start = tl.load(cu_k_ptr + b)
    k_len = tl.load(cu_k_ptr + b + 1) - k_start
    kvh = h // GROUP

    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    m_valid = offs_m < q_len
    d_mask = offs_d < HEAD_DIM
    q_pos = k_len - q_len + offs_m  # absolute position of each query row
    q_rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_valid[:, None] & d_mask[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)  # the CPU interpreter mishandles bf16 arithmetic
    else:
        q = q.to(k_cache_ptr.dtype.element_ty)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)

    first_pos = k_len - q_len + start_m
    # Keys [0, full_hi): visible to every row of the tile -> no mask. [full_hi, hi): diagonal band + tail.
    full_hi = ((first_pos + 1) // BLOCK_N) * BLOCK_N
    hi = tl.minimum(k_len, first_pos + BLOCK_M)
    acc, l_i, m_i = _prefill_inner(
        acc, l_i, m_i, q, q_pos, 0, full_hi, k_len, b, kvh, scale_log2,
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, k_start,
        stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch, stride_btb,
        offs_n, offs_d, d_mask, BLOCK_SIZE, BLOCK_N, PAGED, False, UPCAST, IEEE)
    acc, l_i, m_i = _prefill_inner(
        acc, l_i, m_i, q, q_pos, full_hi, hi, k_len, b, kvh, scale_log2,
        k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, bt_ptr, k_start,
        stride_kt, stride_kh, stride_vt, stride_vh, stride_cb, stride_cs, stride_ch, stride_btb,
        offs_n, offs_d, d_mask, BLOCK_SIZE, BLOCK_N, PAGED, True, UPCAST, IEEE)

    o = acc / l_i[:, None]
    tl.store(out_ptr + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=m_valid[:, None] & d_mask[None, :])


def _tile_config(head_dim: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages).

    GPU values from a sweep on an H200 (8k tokens, bf16, causal): D<=64 -> 128x64, 8 warps (~350 TFLOP/s);
    D=128 -> 128x128, 8 warps (~420 TFLOP/s; ~330 when K/V are gathered through 16-token blocks).
    """
    if device.type != "cuda":
        return 32, 32, 4, 1  # interpreter: larger tiles cost little, programs and loop trips cost a lot
    if head_dim <= 64:
        return 128, 64, 8, 3
    return 128, 128, 8, 3


def paged_prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
                            max_seqlen_q: int, max_seqlen_k: int, block_tables: torch.Tensor | None,
                            scale: float) -> torch.Tensor:
    """Causal varlen attention -> [Nq, Hq, D]; see the module docstring for the conventions."""
    nq, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1] if block_tables is None else k_cache.shape[2]
    assert num_q_heads % num_kv_heads == 0
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    out = torch.empty_like(q)
    bsz = cu_seqlens_q.shape[0] - 1
    if nq == 0 or bsz == 0:
        return out
    paged = block_tables is not None
    if paged:
        assert k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
        cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
        block_size, bt, stride_bt = k_cache.shape[1], block_tables, block_tables.stride(0)
    else:
        cache_strides, block_size, bt, stride_bt = (0, 0, 0), 1, cu_seqlens_q, 0  # placeholders, unused
        k_cache, v_cache = k, v
    block_m, block_n, warps, stages = _tile_config(head_dim, q.device)
    grid = (triton.cdiv(max_seqlen_q, block_m), bsz, num_q_heads)
    _prefill_kernel[grid](
        q, k, v, k_cache, v_cache, bt, cu_seqlens_q, cu_seqlens_k, out, scale * math.log2(math.e),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        *cache_strides, stride_bt, out.stride(0), out.stride(1),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, D_PAD=max(16, triton.next_power_of_2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_M=block_m, BLOCK_N=block_n, PAGED=paged,
        UPCAST=q.device.type != "cuda", IEEE=q.dtype == torch.float32,
        num_warps=warps, num_stages=stages,
    )
    return out
