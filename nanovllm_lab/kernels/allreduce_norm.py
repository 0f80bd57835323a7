"""One-shot all-reduce fused with the residual add and RMSNorm: each program reads one token row from every
rank's buffer (peer memory over NVLink, mapped by PyTorch symmetric memory) and sums it in float32. It then
writes `residual + sum` (the new residual stream) and `RMSNorm(residual + sum) * weight` (the next block's
input). This is TokenWeave's fused AllReduce-RMSNorm without its multicast (multimem) instructions, which are off
on the project's machines.

Rounding follows the unfused path exactly: the sum is rounded to the activation dtype (what an all-reduce
returns), the residual add is done in float32 and rounded, and the norm is computed in float32, rounded, and
then scaled by the weight (layers/layernorm.py). `comm.symm_norm.sum_add_norm_reference` is that unfused path:
the rounded sum through the RMSNorm layer itself. It is the CPU implementation and the tests' oracle.

The kernel does no synchronisation. The caller must make every rank's partial sum visible before the launch (a
symmetric-memory barrier), and must keep a buffer unwritten until every peer has read it (comm/symm_norm.py
alternates two buffers).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_WORLD = 8


@triton.jit
def _sum_add_norm_kernel(b0, b1, b2, b3, b4, b5, b6, b7, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, eps,
                         WORLD: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    off = row * n_cols + cols
    acc = tl.load(b0 + off, mask=mask, other=0.0).to(tl.float32)
    # WORLD is a compile-time constant: the unused pointer arguments (aliases of b0) are never read.
    if WORLD > 1:
        acc += tl.load(b1 + off, mask=mask, other=0.0).to(tl.float32)
    if WORLD > 2:
        acc += tl.load(b2 + off, mask=mask, other=0.0).to(tl.float32)
    if WORLD > 3:
        acc += tl.load(b3 + off, mask=mask, other=0.0).to(tl.float32)
    if WORLD > 4:
        acc += tl.load(b4 + off, mask=mask, other=0.0).to(tl.float32)
    if WORLD > 5:
        acc += tl.load(b5 + off, mask=mask, other=0.0).to(tl.float32)
    if WORLD > 6:
        acc += tl.load(b6 + off, mask=mask, other=0.0).to(tl.float32)
    if WORLD > 7:
        acc += tl.load(b7 + off, mask=mask, other=0.0).to(tl.float32)
    # Round to nearest even, as torch does (spelled out: the interpreter's default downcast differs).
    s = acc.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # what an all-reduce would have returned
    if NORM:
        res = tl.load(res_ptr + off, mask=mask, other=0.0).to(tl.float32)
        x = (s.to(tl.float32) + res).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(res_out_ptr + off, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        y = (xf * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        out = (w.to(tl.float32) * y.to(tl.float32)).to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(out_ptr + off, out, mask=mask)
    else:
        tl.store(out_ptr + off, s, mask=mask)


def sum_add_norm(bufs: list[torch.Tensor], residual: torch.Tensor | None, weight: torch.Tensor | None,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(norm(residual + sum(bufs)) * weight, residual + sum(bufs)); without a weight: (sum(bufs), residual).
    `bufs` are [n, hidden] row-major views, one per rank, in one dtype."""
    world = len(bufs)
    if not 1 <= world <= MAX_WORLD:
        raise ValueError(f"sum_add_norm takes 1 to {MAX_WORLD} buffers, got {world}")
    n, hidden = bufs[0].shape
    if any(b.shape != (n, hidden) or b.dtype != bufs[0].dtype or not b.is_contiguous() for b in bufs):
        raise ValueError("sum_add_norm needs contiguous buffers of one shape and dtype")
    norm = weight is not None
    out = torch.empty_like(bufs[0])
    res_out = torch.empty_like(bufs[0]) if norm else None
    if n:
        ptrs = list(bufs) + [bufs[0]] * (MAX_WORLD - world)
        _sum_add_norm_kernel[(n,)](*ptrs, residual.contiguous() if norm else out, weight if norm else out,
                                   out, res_out if norm else out, hidden, eps, WORLD=world, NORM=norm,
                                   BLOCK=triton.next_power_of_2(hidden), num_warps=8 if hidden >= 4096 else 4)
    return (out, res_out) if norm else (out, residual)

