"""`lamport_norm`: symm_norm's fused reduction + residual add + RMSNorm in one kernel, with no barrier.

symm_norm leaves about 7 us per decode reduction exposed on 2 x H200 (qwen3-8b, bench decode steps of 7.20 ms
against none's 6.65, 72 reductions a step; results/LOG.md, session 7). Each of its reductions is a barrier
kernel (a signal round trip over NVLink) and then a kernel that reads every peer's row over NVLink: two
dependent NVLink latencies and two launches. Here one kernel (kernels/lamport_norm.py) pushes this rank's rows
into every rank's receive buffer and polls its own receive buffer, local memory, until the peers' rows have
replaced the sentinel that marks "not arrived". The data is its own flag, so there is no barrier.

Per half-layer: the row-parallel GEMM writes its partial sum into a local buffer; then the kernel pushes,
waits, sums in rank order, adds the residual and normalises, and writes the sentinel back over what it read.

Slots. Each rank's symmetric buffer is [2 slots, world, capacity, hidden]: slot s, block p takes rank p's rows
of a reduction that uses slot s. Reductions alternate slots, and each step starts on slot 0 (two reductions per
layer). Why two suffice: rank q can push into slot s for reduction k + 2 only after it has finished reduction
k + 1, which needs this rank's rows of k + 1, which this rank pushes only after its kernel for k, the one that
read and cleared slot s, has completed. One slot would not do: a peer one reduction ahead would push into the
rows this rank is still reading. The partial-sum buffer is local and single: the next GEMM that overwrites it
runs after this rank's kernel on the same stream.

The kernel's one assumption: its programs are all resident at once, so none waits on a peer whose pushing
program cannot be scheduled. That holds whenever nothing else runs beside the kernel, as inside this engine's
decode steps, and the grid is no larger than what the SMs hold. Above one row per SM (132 on an H200) a program
handles several rows in turn, which is where lamport_norm lost to symm_norm on 2 x H200 (batch 512, session 8).
`programs_per_sm` > 1 spreads the rows over more programs, capped by the compiled kernel's occupancy (the
kernel module reads it before the first launch of each variant with more rows than SMs). Measured on 2 x H200,
qwen3-8b tp=2 decode (session 9, before the cap existed; the GPU stress test asserts the cap is read): 2 and 4
took 0.06-0.14 ms off a step at batch 192-256 and 0.4 ms at 512 (at 128, one row per program already, nothing
changes). If programs starve anyway, a wait times out (the error flag below) instead of hanging forever.

Prefetch (`prefetch_mib` > 0; PRESERVE, arXiv 2501.08192, does this around all-reduces on other accelerators).
What a decode step still exposes here is the transfer itself: its HBM and NVLink sit idle-ish while the kernel
waits for the peers' rows, and the GEMM that follows (qkv_proj or gate_up_proj) is bound by reading its weight
from HBM. So between its pushes and its waits the kernel issues `prefetch.global.L2` for the first
`prefetch_mib` MiB of that weight (the next block's first 2-D weight, `prefetch_target`), with at least one
program per SM. If the lines are still in L2 when the GEMM starts, it reads that part from L2 instead of HBM:
the wait is spent on the next GEMM's memory traffic. Prefetches change no value, only timing; an H200's L2
holds 50 MB, so more than that (or than what survives the kernel's own traffic) buys nothing.
Measured on 2 x H200, qwen3-8b tp=2 decode, 4 programs per SM (session 10, results/gpu/2026-11-28j_h200x2/call2):
it does not pay. 16 and 32 MiB cost 0.09 / 0.17 ms a step at batch 1 (from 3.76 ms; the grid grows from 1 to
132 programs), 0.04 / 0.11 ms at 32 and 0.10 / 0.13 ms at 512, and are within the spread at 128-256. So the
default is 0 (off); the knob stays for other cards and models.

A wait that times out (`spin_limit` polls of a row; minutes, so a peer still compiling its first step is waited
for) sets an error flag on the device instead of hanging; the result is then wrong. `check()` raises with the
reason: the engine calls it at the end of each generate() and the lab after each job, so such a run fails
instead of being recorded. It reads this rank's flag only: a worker rank's timeout is logged by its `close()`
(an error there must not keep the engine from releasing its process group). After a timeout a rank no longer
waits but still pushes, so it can run ahead of its peers and their results are wrong too.

Steps of more than `max_tokens` tokens, and tp=1, run the blocking loop; `local=True` runs the fused loop at
tp=1 with PyTorch's arithmetic on CPU, as symm_norm's does, for the CPU tests. The kernel's own CPU tests run
it under the Triton interpreter with simulated ranks. On gloo, asking for this strategy is a clear error.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from nanovllm_lab.comm.base import StrategyConfig, check_bool, check_int, register_strategy
from nanovllm_lab.comm.symm import _SUPPORTED_DTYPES, rendezvous_buffer
from nanovllm_lab.comm.symm_norm import SymmNormStrategy, sum_add_norm_reference

log = logging.getLogger(__name__)

_DEFAULT_SPIN_LIMIT = 1 << 28  # kernels/lamport_norm.py's DEFAULT_SPIN_LIMIT (not imported: it needs triton)


@dataclass(frozen=True)
class LamportNormConfig(StrategyConfig):
    name: str = "lamport_norm"
    max_tokens: int = 2048  # fused path up to this many tokens per step (receive buffer: 2 x tp x this many rows)
    local: bool = False     # tp=1: run the fused loop anyway (tests)
    spin_limit: int = _DEFAULT_SPIN_LIMIT  # polls of one row before a wait gives up and flags an error
    programs_per_sm: int = 1  # kernel programs per SM (1 is measured; more: see the module docstring)
    prefetch_mib: int = 0     # MiB of the next block's first weight the kernel asks L2 for while it waits (0: off)

    def __post_init__(self) -> None:
        for key, hi in (("max_tokens", 1 << 31), ("spin_limit", 1 << 31), ("programs_per_sm", 9)):
            check_int(self, key, lo=1, hi=hi)
        check_int(self, "prefetch_mib", lo=0, hi=1024)
        check_bool(self, "local")


@register_strategy("lamport_norm", LamportNormConfig)
class LamportNormStrategy(SymmNormStrategy):
    """symm_norm's layer loop (`run_layers`, slot alternation, `row_parallel`); its own buffers, `_partial_out`
    and `_reduce`."""

    def __init__(self, cfg: LamportNormConfig, info) -> None:
        super().__init__(cfg, info)  # availability check, buffers' bookkeeping
        self._partial: torch.Tensor | None = None  # this rank's partial sums (local: peers never read it)
        self.err: torch.Tensor | None = None       # the kernel's timeout flag
        self._kernel = None
        self.reductions = 0  # fused reductions issued (host count; a captured graph's are counted once)
        self._prefetch: dict[int, torch.Tensor | None] = {}  # id(block) -> its first GEMM weight
        if self.device.type == "cuda":
            from nanovllm_lab.kernels import lamport_norm as k
            self._kernel = k.lamport_add_norm

    def prepare(self, max_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
        capacity = min(self.cfg.max_tokens, max_tokens)
        if capacity * hidden_size >= 1 << 31:  # the kernel indexes a slot with int32
            raise ValueError(f"strategy {self.name!r}: max_tokens={capacity} x hidden {hidden_size} elements is "
                             f"too many for one slot (the kernel indexes with int32); lower max_tokens")
        if self.world_size == 1 and not self.cfg.local:
            return
        if self.world_size > 1 and dtype not in _SUPPORTED_DTYPES:
            log.warning("strategy %r: %s is not among the symmetric-memory dtypes %s; every step runs the blocking "
                        "loop", self.name, dtype, _SUPPORTED_DTYPES)
            return
        self._partial = torch.empty((capacity, hidden_size), dtype=dtype, device=self.device)
        self.err = torch.zeros(1, dtype=torch.int32, device=self.device)
        shape = (2, self.world_size, capacity, hidden_size)
        if self.world_size == 1:
            self.peers = [torch.empty(shape, dtype=dtype, device=self.device)]
        else:
            import torch.distributed as dist
            self.group_name = dist.group.WORLD.group_name
            _, self.handle = rendezvous_buffer(2 * self.world_size * capacity * hidden_size, dtype, self.device)
            self.peers = [self.handle.get_buffer(r, shape, dtype) for r in range(self.world_size)]
        if self._kernel is not None:
            from nanovllm_lab.kernels.lamport_norm import clear_
            clear_(self.peers[self.rank])
            if self.handle is not None:  # no peer may push before every buffer holds the sentinel
                torch.cuda.synchronize(self.device)
                self.handle.barrier(channel=0)
                torch.cuda.synchronize(self.device)

    def _partial_out(self, n: int) -> torch.Tensor:
        return self._partial[:n]  # local: the kernel pushes the rows to the peers itself

    def _reduce(self, n: int, residual: torch.Tensor, norm, nxt=None) -> tuple[torch.Tensor, torch.Tensor]:
        partial = self._partial[:n]
        if self._kernel is not None:
            s, me = self._slot, self.rank
            dst = [p[s, me, :n] for p in self.peers]                         # my rows, in every rank's buffer
            src = [self.peers[me][s, r, :n] for r in range(self.world_size)]  # every rank's rows, in mine
            weight, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
            pf = self.prefetch_target(nxt)
            out = self._kernel(partial, dst, src, residual, weight, eps, self.err, self.cfg.spin_limit,
                               programs_per_sm=self.cfg.programs_per_sm, prefetch=pf,
                               prefetch_bytes=self.cfg.prefetch_mib << 20 if pf is not None else 0)
        else:
            out = sum_add_norm_reference([partial], residual, norm)
        self._slot ^= 1
        self.reductions += 1
        return out

    def prefetch_target(self, block) -> torch.Tensor | None:
        """The weight whose start the kernel prefetches: `block`'s first GEMM weight (the first 2-D `weight`
        among its modules, in registration order: Qwen3's qkv_proj, gate_up_proj), the GEMM that runs right
        after this reduction's norm. None with prefetch off or no block (after the last layer)."""
        if not self.cfg.prefetch_mib or block is None:
            return None
        key = id(block)
        if key not in self._prefetch:
            self._prefetch[key] = next((m.weight for m in block.modules()
                                        if isinstance(getattr(m, "weight", None), torch.Tensor) and m.weight.dim() == 2),
                                       None)
        return self._prefetch[key]

    def check(self) -> None:
        """Raise if one of this rank's waits timed out since the buffers were made (a host sync)."""
        if self.err is not None and int(self.err.item()):
            raise RuntimeError("lamport_norm: a peer's rows never arrived within spin_limit polls; the results "
                               "since then are wrong (was a peer stalled or dead?)")

    def applicable(self, ctx, num_tokens: int) -> bool:
        return self._partial is not None and num_tokens <= self._partial.shape[0]

    def close(self) -> None:
        try:
            self.check()
        except RuntimeError as e:  # logged, not raised: the engine's shutdown must still release the group
            log.error("%s", e)
        self._partial = self.err = None
        super().close()
