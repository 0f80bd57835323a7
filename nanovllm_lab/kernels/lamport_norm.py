"""One-kernel all-reduce + residual add + RMSNorm with no barrier: each element carries its own arrival flag.

symm_norm (kernels/allreduce_norm.py) spends each decode reduction on two kernels: a symmetric-memory barrier,
then a kernel that reads every peer's row over NVLink. Both wait on NVLink round trips. Here each rank *pushes*
its partial-sum rows into every rank's receive buffer and polls its own buffer, which is local memory. A slot of
the receive buffer is kept filled with a sentinel value, the bit pattern of -0.0, so a rank knows a peer's
element has arrived when it no longer reads the sentinel. No flag, no fence, no second kernel: this is the
Lamport-clock style of TensorRT-LLM's and vLLM's custom all-reduces, written in Triton.

- A pushed element that is -0.0 is sent as +0.0 (otherwise it would read as "not arrived"). The float32 sum can
  then differ from the one-shot kernel's only in the sign of an exact zero.
- Each program handles rows pid, pid + grid, ...: it first pushes all of them, then waits for all of them. With
  a grid no larger than the programs the GPU holds at once, every program is resident, so no waiting program can
  keep a peer's pushing program from running (the one assumption of this scheme, as in TensorRT-LLM). The grid
  is min(rows, SMs x programs_per_sm), and programs_per_sm is capped by what one SM holds of the compiled kernel
  (registers, threads, shared memory: `_resident_per_sm`), read from each compiled variant before its first
  launch with more rows than SMs (`_programs_per_sm`; not needed below, where the grid is one program per row).
  If the Triton internals it reads are missing, it uses one program per SM and says so in the log.
- After reading a row from a peer, the program writes the sentinel back there. The caller alternates two slots
  (comm/lamport_norm.py): a peer cannot push into a slot again before this rank has finished the reduction after
  the one that read it, so the clear always lands first.
- A wait gives up after `spin_limit` polls of a row: it sets `err[0]` and uses what it read (the result is then
  wrong; the strategy's `check()` raises on the flag, and the engine calls it at the end of each generate() and
  the lab after each job). Once `err[0]` is set, later calls do not wait at all, so a dead peer costs one
  timeout, not one per reduction.

- `prefetch` (optional): between its pushes and its waits each program issues `prefetch.global.L2` for its
  share of the first `prefetch_bytes` of a tensor (the next GEMM's weight, comm/lamport_norm.py says why), with
  the grid raised to at least one program per SM. The instruction returns nothing, so no program waits for it.

The rounding is the one-shot kernel's (float32 sum over ranks 0..world-1, rounded, then `_add_norm_store`).
`PUSH` / `WAIT` split the kernel in two phases for the CPU tests, where the Triton interpreter runs one
simulated rank after another; on a GPU both are on.
"""
from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from nanovllm_lab.kernels.allreduce_norm import MAX_WORLD, _add_norm_store, _check_norm_args, row_meta

log = logging.getLogger(__name__)

# Bit patterns of -0.0 read as the same-width signed integer: the "not arrived" sentinel.
_INT_VIEW = {2: torch.int16, 4: torch.int32}
SENTINEL = {2: -(1 << 15), 4: -(1 << 31)}
DEFAULT_SPIN_LIMIT = 1 << 28  # polls of one row: minutes, so a peer still compiling its first step is waited for


@triton.jit
def _push(dst, off, bits, mask):
    tl.store(dst + off, bits, mask=mask)


@triton.jit
def _take(src, off, mask, err_ptr, spin_limit, x_ptr, SENT: tl.constexpr):
    """Poll one row of a peer's pushed elements until none reads the sentinel, clear it, return it in float32."""
    v = tl.load(src + off, mask=mask, other=0, volatile=True)
    missing = tl.sum(tl.where(mask & (v == SENT), 1, 0), axis=0)
    spins = tl.load(err_ptr) * spin_limit  # an earlier timeout: do not wait again
    while (missing > 0) & (spins < spin_limit):
        v = tl.load(src + off, mask=mask, other=0, volatile=True)
        missing = tl.sum(tl.where(mask & (v == SENT), 1, 0), axis=0)
        spins += 1
    tl.store(err_ptr, 1, mask=missing > 0)
    tl.store(src + off, tl.full(v.shape, SENT, v.dtype), mask=mask)  # ready for this slot's next use
    return v.to(x_ptr.dtype.element_ty, bitcast=True).to(tl.float32)  # x_ptr: the values' dtype


@triton.jit
def _prefetch_l2(pf_ptr, pf_lines, pid, grid, LINES: tl.constexpr):
    """Ask L2 for this program's share of `pf_lines` 128-byte lines from `pf_ptr` (bytes). `prefetch` returns
    nothing, so no register waits for it: the program goes on to its waits while the lines come in."""
    for start in range(pid * LINES, pf_lines, grid * LINES):
        line = tl.minimum(start + tl.arange(0, LINES), pf_lines - 1)  # past the end: the last line again
        tl.inline_asm_elementwise("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                  [pf_ptr + line.to(tl.int64) * 128], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _lamport_allreduce_norm_kernel(x_ptr, d0, d1, d2, d3, d4, d5, d6, d7, s0, s1, s2, s3, s4, s5, s6, s7,
                                   res_ptr, w_ptr, out_ptr, res_out_ptr, err_ptr, n_rows, n_cols, eps,
                                   spin_limit, pf_ptr, pf_lines, WORLD: tl.constexpr, SENT: tl.constexpr,
                                   NORM: tl.constexpr, PUSH: tl.constexpr, WAIT: tl.constexpr,
                                   PREFETCH: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    if PUSH:
        for row in range(pid, n_rows, grid):
            off = row * n_cols + cols  # int32: the host checks n * hidden < 2**31
            bits = tl.load(x_ptr + off, mask=mask, other=0.0).to(d0.dtype.element_ty, bitcast=True)
            bits = tl.where(bits == SENT, tl.zeros_like(bits), bits)  # -0.0 travels as +0.0
            # WORLD is a compile-time constant: the unused pointer arguments (aliases of d0 / s0) are never touched.
            _push(d0, off, bits, mask)
            if WORLD > 1:
                _push(d1, off, bits, mask)
            if WORLD > 2:
                _push(d2, off, bits, mask)
            if WORLD > 3:
                _push(d3, off, bits, mask)
            if WORLD > 4:
                _push(d4, off, bits, mask)
            if WORLD > 5:
                _push(d5, off, bits, mask)
            if WORLD > 6:
                _push(d6, off, bits, mask)
            if WORLD > 7:
                _push(d7, off, bits, mask)
    if PREFETCH:  # between push and wait: the next GEMM's weight streams into L2 while the peers' rows travel
        _prefetch_l2(pf_ptr, pf_lines, pid, grid, 256)
    if WAIT:
        for row in range(pid, n_rows, grid):
            off = row * n_cols + cols  # int32: the host checks n * hidden < 2**31
            acc = _take(s0, off, mask, err_ptr, spin_limit, x_ptr, SENT)  # rank order, as the one-shot kernel
            if WORLD > 1:
                acc += _take(s1, off, mask, err_ptr, spin_limit, x_ptr, SENT)
            if WORLD > 2:
                acc += _take(s2, off, mask, err_ptr, spin_limit, x_ptr, SENT)
            if WORLD > 3:
                acc += _take(s3, off, mask, err_ptr, spin_limit, x_ptr, SENT)
            if WORLD > 4:
                acc += _take(s4, off, mask, err_ptr, spin_limit, x_ptr, SENT)
            if WORLD > 5:
                acc += _take(s5, off, mask, err_ptr, spin_limit, x_ptr, SENT)
            if WORLD > 6:
                acc += _take(s6, off, mask, err_ptr, spin_limit, x_ptr, SENT)
            if WORLD > 7:
                acc += _take(s7, off, mask, err_ptr, spin_limit, x_ptr, SENT)
            s = acc.to(x_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # what an all-reduce would have returned
            _add_norm_store(s, res_ptr, w_ptr, out_ptr, res_out_ptr, off, cols, mask, n_cols, eps, NORM)


# compiled variant -> programs of it one SM holds at once (0: unknown, so one). A variant is what Triton compiles
# separately: the constexprs, plus its specialisations of integer arguments (== 1, multiple of 16) and of pointer
# alignment (16 bytes); the key holds all of them, so a cap is only ever used for the binary it was read from.
_RESIDENT: dict[tuple, int] = {}
_RESERVED_SMEM = 1024  # shared memory the driver reserves per resident block (sm_80 and later)


def _resident_per_sm(compiled, device: torch.device) -> int | None:
    """Programs of a compiled Triton kernel that one SM runs at once (None: unknown, e.g. the interpreter)."""
    n_regs, meta = getattr(compiled, "n_regs", None), getattr(compiled, "metadata", None)
    if not n_regs or meta is None:
        return None
    p = torch.cuda.get_device_properties(device)
    threads = meta.num_warps * 32
    regs = -(-n_regs * 32 // 256) * 256 * meta.num_warps  # registers are allocated per warp, 256 at a time
    fits = [getattr(p, "regs_per_multiprocessor", 65536) // regs,
            getattr(p, "max_threads_per_multi_processor", 2048) // threads, 32]
    fits.append(getattr(p, "shared_memory_per_multiprocessor", 233472) // (getattr(meta, "shared", 0) + _RESERVED_SMEM))
    return max(1, min(fits))


def _programs_per_sm(args: tuple, meta: dict, asked: int) -> int:
    """`asked`, capped by what one SM holds of the kernel these arguments compile to (compiled now, not run)."""
    p = args[0]
    spec = tuple(a.data_ptr() % 16 == 0 if isinstance(a, torch.Tensor) else (a == 1, a % 16 == 0)
                 for a in args if isinstance(a, (torch.Tensor, int)))
    key = (p.device, p.dtype, *sorted(meta.items()), spec)
    if key not in _RESIDENT:
        per_sm = None
        try:
            compiled = _lamport_allreduce_norm_kernel.warmup(*args, grid=(1,), **meta)
            compiled._init_handles()  # loads the binary: its register count
            per_sm = _resident_per_sm(compiled, p.device)
        except Exception as e:  # a Triton without these internals: one program per SM is always safe
            log.warning("lamport_add_norm: could not read the kernel's occupancy (%s); one program per SM", e)
        _RESIDENT[key] = per_sm or 0
        if per_sm is not None:
            log.log(logging.WARNING if per_sm < asked else logging.INFO,
                    "lamport_add_norm: one SM holds %d programs of this kernel (%d registers per thread, %d warps); "
                    "%d asked, using %d", per_sm, compiled.n_regs, meta["num_warps"], asked, min(asked, per_sm))
    return min(asked, _RESIDENT[key] or 1)


def int_view(t: torch.Tensor) -> torch.Tensor:
    """A receive buffer as the signed integers the kernel compares with the sentinel."""
    if t.element_size() not in _INT_VIEW:
        raise ValueError(f"lamport all-reduce supports 2- and 4-byte dtypes, got {t.dtype}")
    return t.view(_INT_VIEW[t.element_size()])


def clear_(t: torch.Tensor) -> torch.Tensor:
    """Fill a receive buffer with the sentinel (every element "not arrived")."""
    int_view(t).fill_(SENTINEL[t.element_size()])
    return t


def lamport_add_norm(partial: torch.Tensor, dst: list[torch.Tensor], src: list[torch.Tensor],
                     residual: torch.Tensor | None, weight: torch.Tensor | None, eps: float, err: torch.Tensor,
                     spin_limit: int = DEFAULT_SPIN_LIMIT, grid: int | None = None, push: bool = True,
                     wait: bool = True, programs_per_sm: int = 1, prefetch: torch.Tensor | None = None,
                     prefetch_bytes: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`sum_add_norm`'s contract over pushed rows. `partial`: this rank's [n, hidden] partial sum. `dst[p]`: the
    [n, hidden] block of rank p's receive buffer where this rank's rows go; `src[p]`: the block of this rank's
    receive buffer where rank p's rows arrive (all filled with the sentinel beforehand; left so afterwards).
    `err`: one int32 on the device, set to 1 if a wait timed out. `grid`: programs to launch (tests; default
    min(n, SMs x programs_per_sm, capped by residency, see the module docstring)). `prefetch`: a tensor (the next
    GEMM's weight) whose first `prefetch_bytes` the kernel asks L2 for between its pushes and its waits, with at
    least one program per SM (on CUDA only: the interpreter has no prefetch). Returns (norm(residual + sum) * weight,
    residual + sum), or without a weight (sum, residual)."""
    world = len(dst)
    if not 1 <= world <= MAX_WORLD or len(src) != world:
        raise ValueError(f"lamport_add_norm takes 1 to {MAX_WORLD} destination and as many source buffers, "
                         f"got {len(dst)} and {len(src)}")
    if not partial.is_floating_point() or partial.element_size() not in _INT_VIEW:
        raise ValueError(f"lamport_add_norm sums 2- or 4-byte floating-point partial sums, got {partial.dtype}")
    if partial.dim() != 2 or not partial.is_contiguous():
        raise ValueError(f"lamport_add_norm needs a contiguous [n, hidden] partial sum, got {tuple(partial.shape)}")
    n, hidden = partial.shape
    for b in dst + src:
        if b.shape != (n, hidden) or b.dtype != partial.dtype or not b.is_contiguous():
            raise ValueError(f"lamport_add_norm needs contiguous [{n}, {hidden}] {partial.dtype} buffers, got "
                             f"{tuple(b.shape)} {b.dtype}")
    if err.dtype != torch.int32 or err.numel() < 1 or err.device != partial.device:
        raise ValueError(f"lamport_add_norm needs an int32 error flag on {partial.device}, got {err.dtype} on "
                         f"{err.device}")
    if spin_limit < 1 or (grid is not None and grid < 1) or programs_per_sm < 1:
        raise ValueError(f"lamport_add_norm needs spin_limit, grid and programs_per_sm >= 1, got {spin_limit}, "
                         f"{grid} and {programs_per_sm}")
    _check_norm_args("lamport_add_norm", n, hidden, residual, weight)
    if n * hidden >= 1 << 31:
        raise ValueError(f"lamport_add_norm indexes with int32: {n} x {hidden} elements is too many")
    if prefetch_bytes < 0 or (prefetch is not None and not prefetch.is_contiguous()):
        raise ValueError(f"lamport_add_norm prefetches the start of a contiguous tensor, got prefetch_bytes="
                         f"{prefetch_bytes} and a {'non-' if prefetch is not None else ''}contiguous tensor")
    pf_lines = 0
    if prefetch is not None and partial.device.type == "cuda":
        pf_lines = min(prefetch_bytes, prefetch.numel() * prefetch.element_size()) // 128
    norm = weight is not None
    out = torch.empty_like(partial)
    res_out = torch.empty_like(partial) if norm else None
    if n:
        d = [int_view(b) for b in dst] + [int_view(dst[0])] * (MAX_WORLD - world)
        s = [int_view(b) for b in src] + [int_view(src[0])] * (MAX_WORLD - world)
        args = (partial, *d, *s, residual.contiguous() if norm else out, weight if norm else out, out,
                res_out if norm else out, err, n, hidden, eps, spin_limit,
                prefetch.reshape(-1).view(torch.uint8) if pf_lines else partial, pf_lines)
        meta = dict(WORLD=world, SENT=SENTINEL[partial.element_size()], NORM=norm, PUSH=push, WAIT=wait,
                    PREFETCH=pf_lines > 0, **row_meta(hidden))
        if grid is None:  # every program resident (see the module docstring)
            if partial.device.type != "cuda":
                grid = n
            else:
                sms = torch.cuda.get_device_properties(partial.device).multi_processor_count
                # up to one row per SM the grid is n whatever the cap: no need to read it
                per_sm = 1 if programs_per_sm == 1 or n <= sms else _programs_per_sm(args, meta, programs_per_sm)
                grid = min(n, sms * per_sm)
                if pf_lines:  # every SM issues prefetches, also where there are fewer rows than SMs
                    grid = max(grid, sms)
        _lamport_allreduce_norm_kernel[(grid,)](*args, **meta)
    return (out, res_out) if norm else (out, residual)
