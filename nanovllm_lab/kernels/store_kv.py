"""Triton kernel that scatters new K/V rows into the paged KV cache.

Cache layout: [num_blocks, block_size, num_kv_heads, head_dim]; token t goes to flat slot
`slot_mapping[t]` = block * block_size + offset. Slot -1 marks a padding token (e.g. a CUDA-graph batch
padded to a captured size) whose K/V must be dropped, so the store is masked rather than branched on the
host: no device->host sync, and the launch is capturable in a CUDA graph.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_cs, stride_ch,
    BLOCK_SIZE: tl.constexpr, NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    H_PAD: tl.constexpr, D_PAD: tl.constexpr,
):
    # One program per token: it moves all heads of that token (a few KB), which keeps the grid = N.
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)  # int64: block * stride can exceed 2**31 on large caches
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    # Padding masks let head counts / head dims that are not powers of two share the kernel; the
    # `slot >= 0` term drops padding tokens without a branch (their loads are masked too).
    # (The slot test is broadcast as a full tile: the interpreter rejects a scalar bool mixed into a mask.)
    keep = (tl.zeros([H_PAD, D_PAD], dtype=tl.int64) + slot) >= 0
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM) & keep
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    dst = blk * stride_cb + off * stride_cs + offs_h[:, None] * stride_ch + offs_d[None, :]
    k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_cache_ptr + dst, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


def store_kvcache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor) -> None:
    """Write k, v [N, Hkv, D] into k_cache, v_cache [num_blocks, block_size, Hkv, D] at `slot_mapping` [N].

    Slots < 0 are skipped. The innermost dims must be contiguous (a strided token/head layout is fine,
    e.g. k sliced out of a fused qkv projection).
    """
    n, num_heads, head_dim = k.shape
    assert v.shape == k.shape and slot_mapping.shape[0] == n
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_heads, head_dim)
    if n == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    assert k_cache.stride(-1) == 1 and k_cache.stride() == v_cache.stride()
    _store_kvcache_kernel[(n,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1], NUM_HEADS=num_heads, HEAD_DIM=head_dim,
        H_PAD=triton.next_power_of_2(num_heads), D_PAD=triton.next_power_of_2(head_dim),
    )
