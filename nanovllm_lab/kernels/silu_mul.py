"""Triton kernel for Qwen3's gated MLP activation: out = SiLU(gate) * up, with gate and up the two halves of
the fused gate/up projection's output.

Why a kernel of its own: the torch.compile'd version (layers/activation.py's fallback) is compiled with dynamic
shapes, so inductor emits a flat kernel over all n x I outputs that recovers row and column with a division by
the symbolic width for every element. In traced qwen3-8b tp=2 prefill steps it moved 1.3-1.5 TB/s, where the
RMSNorm beside it moved 3.9 TB/s (results/LOG.md, session 12). Here the grid is 2-D: a program owns a block of
columns of a few rows, so the only index arithmetic is one multiply per row.

Rounding: SiLU and the product are computed in float32 and rounded once to the output dtype, as inductor's
version does (eager PyTorch rounds SiLU's result before the multiply; the difference is one rounding step).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# n_rows is not specialised on: it changes with every step's token count, and a new variant compiled inside a
# step costs far more than the kernel (the same choice as the fused sum + norm kernel's).
@triton.jit(do_not_specialize=["n_rows"])
def _silu_and_mul_kernel(x_ptr, out_ptr, n_rows, n_cols, stride_x, stride_out,
                         BLOCK: tl.constexpr, ROWS: tl.constexpr):
    row0 = tl.program_id(0) * ROWS
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    for r in tl.static_range(ROWS):
        row = row0 + r
        # (the row test is broadcast over the columns: the interpreter rejects a scalar bool mixed into a mask)
        mask = col_ok & ((cols * 0 + row) < n_rows)
        base = row.to(tl.int64) * stride_x  # int64: 16384 rows x 2 x 12800 columns passes 2**31 elements
        gate = tl.load(x_ptr + base + cols, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + base + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        y = gate * tl.sigmoid(gate) * up
        tl.store(out_ptr + row.to(tl.int64) * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _launch_shape(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK, ROWS, num_warps): 16-byte accesses per thread, and a few rows per program on large inputs so
    that a program moves enough bytes to hide its start-up; small (decode) inputs keep one row per program so
    the grid still spreads over the SMs."""
    block = min(triton.next_power_of_2(n_cols), 2048)
    rows = 4 if n_rows >= 1024 else 1
    return block, rows, max(1, min(8, block // 256))


def silu_and_mul(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """SiLU(x[:, :I]) * x[:, I:] for x [n, 2I] (rows may be strided, columns must be contiguous) -> [n, I]."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"silu_and_mul needs x of shape [n, 2I], got {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    n, width = x.shape
    cols = width // 2
    if out is None:
        out = torch.empty((n, cols), dtype=x.dtype, device=x.device)
    elif out.shape != (n, cols) or out.stride(1) != 1:
        raise ValueError(f"silu_and_mul: out must be [{n}, {cols}] with contiguous columns, got "
                         f"{tuple(out.shape)} strides {out.stride()}")
    if n == 0:
        return out
    block, rows, warps = _launch_shape(n, cols)
    grid = (triton.cdiv(n, rows), triton.cdiv(cols, block))
    _silu_and_mul_kernel[grid](x, out, n, cols, x.stride(0), out.stride(0), BLOCK=block, ROWS=rows,
                               num_warps=warps)
    return out
