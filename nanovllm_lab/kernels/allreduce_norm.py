"""All-reduce fused with the residual add and RMSNorm, over buffers that peers map through PyTorch symmetric
memory (NVLink). This is TokenWeave's fused AllReduce-RMSNorm without its multicast (multimem) instructions,
which are off on the project's machines. Two modes (comm/symm_norm.py's `shots`):

- One-shot (`sum_add_norm`): each program reads one token row from every rank's partial-sum buffer and sums it
  in float32. It then writes `residual + sum` (the new residual stream) and `RMSNorm(residual + sum) * weight`
  (the next block's input). Every rank reads every peer's whole partial sum: (world - 1) x its bytes per rank.
- Two-shot (`two_shot_reduce_rows`, then `two_shot_add_norm`): rank r owns rows [r * shard, (r + 1) * shard)
  with shard = ceil(n / world) (`row_shard`). The first kernel ("reduce-scatter") sums only the owned rows, from
  every rank, into this rank's sum buffer. The second ("all-gather") reads each row's sum from its owner and
  adds + normalises it as the one-shot does. Each rank reads (world - 1) / world of the partials and of the sums:
  2 (world - 1) / world x the bytes, as a ring does (1.5x instead of 3x at tp=4, 1.75x instead of 7x at tp=8).
  The price is a second barrier and a second kernel launch, so it can only pay off on large batches.

Rounding follows the unfused path exactly, in both modes: the float32 sum over ranks 0..world-1, in that order,
is rounded to the activation dtype (what an all-reduce returns), the residual add is done in float32 and rounded,
and the norm is computed in float32, rounded, and then scaled by the weight (layers/layernorm.py). Both modes
share the summing and the add + norm code, so two-shot results are bit-identical to one-shot ones.
`comm.symm_norm.sum_add_norm_reference` is the unfused path (the rounded sum through the RMSNorm layer itself):
the CPU implementation and the tests' oracle.

The kernels do no synchronisation. Before a one-shot kernel or a reduce-scatter kernel, every rank's partial
sum must be visible (a symmetric-memory barrier); before an all-gather kernel, every owner's sums must be (a
second barrier). The caller must also keep a buffer unwritten until every peer has read it (comm/symm_norm.py
says how its slots guarantee that).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_WORLD = 8
_REDUCE_BLOCK = 1024  # columns per reduce-scatter program: it has no row-wide reduction, so rows are split too


@triton.jit
def _sum_ranks(b0, b1, b2, b3, b4, b5, b6, b7, off, mask, WORLD: tl.constexpr):
    """The float32 sum of one block of elements over the ranks' buffers, in rank order."""
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
    return acc


@triton.jit
def _add_norm_store(s, res_ptr, w_ptr, out_ptr, res_out_ptr, off, cols, mask, n_cols, eps, NORM: tl.constexpr):
    """One whole row: with NORM, store residual + s and RMSNorm(residual + s) * weight; else store s."""
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


# n_rows is not specialised: Triton would otherwise compile a variant for row counts divisible by 16 and another
# for the rest, and a prefill step whose shard has a new kind of row count would pay that compile inside it.
@triton.jit(do_not_specialize=["n_rows"])
def _sum_add_norm_kernel(b0, b1, b2, b3, b4, b5, b6, b7, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols, n_rows,
                         eps, WORLD: tl.constexpr, NORM: tl.constexpr, BLOCK: tl.constexpr):
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    # Rows in a grid stride: one pass per program when the grid has a program per row (the default); a capped
    # grid (`programs`) walks several rows per program and leaves the other SMs to a concurrent GEMM.
    for row in tl.range(tl.program_id(0), n_rows, tl.num_programs(0)):
        off = tl.cast(row, tl.int64) * n_cols + cols  # int64: n_rows * n_cols may pass 2**31
        acc = _sum_ranks(b0, b1, b2, b3, b4, b5, b6, b7, off, mask, WORLD)
        # Round to nearest even, as torch does (spelled out: the interpreter's default downcast differs).
        s = acc.to(out_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # what an all-reduce would have returned
        _add_norm_store(s, res_ptr, w_ptr, out_ptr, res_out_ptr, off, cols, mask, n_cols, eps, NORM)


@triton.jit
def _two_shot_reduce_rows_kernel(b0, b1, b2, b3, b4, b5, b6, b7, sum_ptr, row0, n_cols,
                                 WORLD: tl.constexpr, BLOCK: tl.constexpr):
    # The name says two_shot: comm/interference.py counts kernels as communication by name.
    row = row0 + tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    off = row * n_cols + cols
    acc = _sum_ranks(b0, b1, b2, b3, b4, b5, b6, b7, off, mask, WORLD)
    tl.store(sum_ptr + off, acc.to(sum_ptr.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)


@triton.jit
def _two_shot_add_norm_kernel(s0, s1, s2, s3, s4, s5, s6, s7, res_ptr, w_ptr, out_ptr, res_out_ptr, n_cols,
                              shard, eps, NORM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    owner = row // shard
    # Pick the owner's buffer with scalar branches (one load, not one per rank). owner < world, and the
    # unused pointer arguments alias s0, so no branch can select a buffer that does not exist.
    src = s0
    if owner == 1:
        src = s1
    if owner == 2:
        src = s2
    if owner == 3:
        src = s3
    if owner == 4:
        src = s4
    if owner == 5:
        src = s5
    if owner == 6:
        src = s6
    if owner == 7:
        src = s7
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    off = row * n_cols + cols
    s = tl.load(src + off, mask=mask, other=0.0)  # already rounded by the reduce-scatter kernel
    _add_norm_store(s, res_ptr, w_ptr, out_ptr, res_out_ptr, off, cols, mask, n_cols, eps, NORM)


def row_shard(n: int, world: int) -> int:
    """Rows per owner in the two-shot mode: rank r owns rows [r * shard, min(n, (r + 1) * shard)), maybe none."""
    return -(-n // world)


def _check_bufs(fn: str, bufs: list[torch.Tensor]) -> tuple[int, int, int]:
    """(world, n, hidden) of one [n, hidden] row-major buffer per rank, all of one dtype."""
    world = len(bufs)
    if not 1 <= world <= MAX_WORLD:
        raise ValueError(f"{fn} takes 1 to {MAX_WORLD} buffers, got {world}")
    if bufs[0].dim() != 2:
        raise ValueError(f"{fn} needs [n, hidden] buffers, got shape {tuple(bufs[0].shape)}")
    n, hidden = bufs[0].shape
    if any(b.shape != (n, hidden) or b.dtype != bufs[0].dtype or not b.is_contiguous() for b in bufs):
        raise ValueError(f"{fn} needs contiguous buffers of one shape and dtype")
    return world, n, hidden


def _check_norm_args(fn: str, n: int, hidden: int, residual: torch.Tensor | None,
                     weight: torch.Tensor | None) -> None:
    if weight is None:
        return
    if residual is None or residual.shape != (n, hidden):
        raise ValueError(f"{fn}: the residual must be [{n}, {hidden}] like the buffers, got "
                         f"{None if residual is None else tuple(residual.shape)}")
    if weight.shape != (hidden,):
        raise ValueError(f"{fn}: the norm weight must be [{hidden}], got {tuple(weight.shape)}")


def row_meta(hidden: int) -> dict:
    """Launch parameters of a kernel with one program per whole row (the add + norm needs the row at once)."""
    return dict(BLOCK=triton.next_power_of_2(hidden), num_warps=8 if hidden >= 4096 else 4)


def _launch_add_norm(kernel, ptrs, scalars: tuple, residual, weight, eps: float, n: int, hidden: int,
                     programs: int | None = None, out: torch.Tensor | None = None, **constexprs):
    """The add + norm tail that both modes share; returns sum_add_norm's pair. `scalars` are the kernel's own
    runtime arguments between n_cols and eps; `programs` the grid (default: one program per row); `out` where
    the first result goes (default: a new tensor)."""
    norm = weight is not None
    if out is None:
        out = torch.empty_like(ptrs[0])
    res_out = torch.empty_like(ptrs[0]) if norm else None
    if n:
        ptrs = list(ptrs) + [ptrs[0]] * (MAX_WORLD - len(ptrs))
        kernel[(programs or n,)](*ptrs, residual.contiguous() if norm else out, weight if norm else out, out,
                                 res_out if norm else out, hidden, *scalars, eps, NORM=norm,
                                 **row_meta(hidden), **constexprs)
    return (out, res_out) if norm else (out, residual)


def sum_add_norm(bufs: list[torch.Tensor], residual: torch.Tensor | None, weight: torch.Tensor | None,
                 eps: float, out: torch.Tensor | None = None,
                 programs: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One-shot: (norm(residual + sum(bufs)) * weight, residual + sum(bufs)); without a weight:
    (sum(bufs), residual). `bufs` are [n, hidden] row-major views, one per rank, in one dtype.
    `out`: a contiguous [n, hidden] tensor for the first result (e.g. a symmetric buffer's rows, which saves a
    copy). `programs` > 0 caps the grid (each program then walks rows in a stride): the kernel then takes that
    many SMs' share beside a concurrent GEMM instead of spreading over all of them; 0: one program per row."""
    world, n, hidden = _check_bufs("sum_add_norm", bufs)
    _check_norm_args("sum_add_norm", n, hidden, residual, weight)
    if not isinstance(programs, int) or isinstance(programs, bool) or programs < 0:
        raise ValueError(f"sum_add_norm: programs must be an int >= 0 (0: one per row), got {programs!r}")
    if out is not None and (out.shape != (n, hidden) or out.dtype != bufs[0].dtype or not out.is_contiguous()):
        raise ValueError(f"sum_add_norm: the output must be a contiguous {(n, hidden)} {bufs[0].dtype} tensor, got "
                         f"{tuple(out.shape)} {out.dtype}{'' if out.is_contiguous() else ' (not contiguous)'}")
    return _launch_add_norm(_sum_add_norm_kernel, bufs, (n,), residual, weight, eps, n, hidden,
                            programs=min(n, programs) if programs else n, out=out, WORLD=world)


def two_shot_reduce_rows(bufs: list[torch.Tensor], sums: torch.Tensor, rank: int) -> None:
    """Two-shot, first kernel: the rows that `rank` owns (`row_shard`) of sum(bufs), rounded to the dtype, into
    the same rows of `sums` (this rank's [n, hidden] sum buffer). Other rows of `sums` are left as they were;
    a rank that owns no rows launches nothing."""
    world, n, hidden = _check_bufs("two_shot_reduce_rows", bufs)
    if sums.shape != (n, hidden) or sums.dtype != bufs[0].dtype or not sums.is_contiguous():
        raise ValueError(f"two_shot_reduce_rows: the sum buffer must be a contiguous [{n}, {hidden}] "
                         f"{bufs[0].dtype} tensor, got {tuple(sums.shape)} {sums.dtype}")
    if not isinstance(rank, int) or not 0 <= rank < world:
        raise ValueError(f"two_shot_reduce_rows: rank must be in [0, {world}), got {rank!r}")
    shard = row_shard(n, world)
    start, stop = rank * shard, min(n, (rank + 1) * shard)
    if stop > start:
        block = min(triton.next_power_of_2(hidden), _REDUCE_BLOCK)
        ptrs = list(bufs) + [bufs[0]] * (MAX_WORLD - world)
        _two_shot_reduce_rows_kernel[(stop - start, triton.cdiv(hidden, block))](
            *ptrs, sums, start, hidden, WORLD=world, BLOCK=block, num_warps=4)


def two_shot_add_norm(sums: list[torch.Tensor], residual: torch.Tensor | None, weight: torch.Tensor | None,
                      eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Two-shot, second kernel: every row's sum from its owner's buffer in `sums` (one [n, hidden] buffer per
    rank, each filled at its owned rows by `two_shot_reduce_rows`), then `sum_add_norm`'s add + norm and
    contract: (out, residual + sum), or without a weight (sum, residual)."""
    world, n, hidden = _check_bufs("two_shot_add_norm", sums)
    _check_norm_args("two_shot_add_norm", n, hidden, residual, weight)
    return _launch_add_norm(_two_shot_add_norm_kernel, sums, (row_shard(n, world),), residual, weight, eps, n,
                            hidden)
