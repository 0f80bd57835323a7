"""`async_rsag_ce`: async_rsag's schedule (micro-batches; each reduction a reduce-scatter, the residual add and
the next RMSNorm on this rank's token shard, an all-gather, all on the communication stream) with async_ce's
transport: the copy engines move the rows out of symmetric memory, so no NCCL kernel takes SMs beside the other
micro-batch's GEMMs, and the norm runs on 1/tp of the rows, off the compute stream.

Why. In traces of 16384-token prefill steps (2 x H200, qwen3-8b tp=2, results/LOG.md, session 11) async_ce's
compute stream ran 2.9 ms more norm work than none_mb's (its fused kernel reads two partial sums) and lost 5 ms
of GEMM time beside its copies; async_rsag (NCCL) leaves the norms off the compute stream but its NCCL kernels
take SMs. This moves the same bytes as async_ce (n/tp rows in, n/tp rows out per peer) with half the norm rows.
On 2 x H200 (session 12, results/LOG.md; prefill replayed from CUDA graphs, qwen3-8b tp=2) it equalled blocking
in float32, eager and in graphs, and hid 0.67-0.75 / 0.84 / 0.72-0.76 of the communication at 2048 / 8192 /
16384 tokens (async_ce: 0.37-0.59 / 0.61-0.63 / 0.63-0.72 in the same calls); writing the norm's output straight
into G (no copy after it) then gave 0.72 / 0.85 / 0.86, and the embedding per micro-batch 0.68 / 0.84 / 0.80 on
another lease. The last reduction through the slots (below) came after those runs: CPU-tested only so far.

Reduction k (any micro-batch) on rank r, n rows in token shards of `rows` = ceil(n / tp):
- compute stream: the row-parallel GEMM writes its partial sum into slot k % S of r's symmetric buffer P;
- communication stream: a barrier (every rank's P slot written); one copy per peer of the peer's P rows of r's
  shard into scratch; symm_norm's fused kernel sums them with r's own rows in rank order (float32), adds the
  residual shard and normalises, writing the normed shard straight into r's rows of slot k % S of the
  symmetric gather buffer G (`norm_programs` caps that kernel's grid); a barrier (every shard written); one
  copy per peer of the peer's rows of G; event E_k. The micro-batch's next half waits for E_k and reads G's slot.
- the stack's last reduction (no norm after it) gathers residual + sum instead of the normed shard, and hands
  the model's final norm no residual (None: it normalises the gathered rows alone, the same bits).
- each micro-batch's first reduction is the embedding's (async_rsag.py says why): the compute stream copies the
  micro-batch's rows of the masked lookup into the P slot, and the reduced shard, with no residual to add,
  becomes the residual stream (the fused kernel makes the sum alone, the first layer's input norm follows it).
Buffer reuse (S = 2 micro_batches + 1 slots). With M micro-batches, a step issues its reductions stage by stage
(the embedding, then each half-layer), micro-batch by micro-batch: reduction k = M * stage + m, and its
consumer is the same micro-batch's next GEMM, which makes partial k + M. So M - 1 reductions lie between a
reduction and its consumer, the embedding's included:
- P slot: peers copy from it before their second barrier of reduction k, so GEMM k + S waits for E_k (the
  embedding's copies, k < M < S, find their slots unused this step: the opening barrier covers them).
- G slot: r's compute stream reads it before partial k + M <= k + S is produced, and peers copy r's rows of it
  before their first barrier of k + 1.
- scratch: written and read on the communication stream only.
- across steps: as async_ce, each step numbers its reductions from 0 behind an opening barrier (ce_slots.py);
  the embedding's copies into the slots come after it.
S = 2M + 1 is the mixin's count, sized for async_ce (whose stages="layer" has 2 (M - 1) reductions in between);
this schedule needs S >= M, so the spare slots leave GEMM k + S's wait on E_k long satisfied.
Where it does not apply (steps above the buffer, other dtypes) reductions, the embedding's included, take
async_rsag's NCCL path. `emulate=True` runs the slot and shard logic on gloo (the peers' rows by all-gathers)
for the CPU tests.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanovllm_lab.comm.async_rsag import AsyncRsAgConfig, AsyncRsAgStrategy
from nanovllm_lab.comm.base import check_bool, check_int, register_strategy
from nanovllm_lab.comm.ce_slots import CopyEngineSlots
from nanovllm_lab.comm.seqpar import all_gather_rows, shard_rows
from nanovllm_lab.comm.symm import _SUPPORTED_DTYPES, linear_into, rendezvous_buffer, require_peer_access
from nanovllm_lab.utils.context import get_context


@dataclass(frozen=True)
class AsyncRsAgCeConfig(AsyncRsAgConfig):
    name: str = "async_rsag_ce"
    emulate: bool = False  # tp>1 without peer access (gloo, CPU tests): the peers' rows by all-gathers
    # Programs of the fused sum + norm kernel on the communication stream (0: one per row). It runs beside the
    # other micro-batch's GEMMs; a capped grid takes a few SMs for longer instead of a slice of every SM.
    norm_programs: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool(self, "emulate")
        check_int(self, "norm_programs", lo=0)


@register_strategy("async_rsag_ce", AsyncRsAgCeConfig)
class AsyncRsAgCeStrategy(CopyEngineSlots, AsyncRsAgStrategy):
    def __init__(self, cfg: AsyncRsAgCeConfig, info) -> None:
        if not cfg.emulate:
            require_peer_access(info, "async_rsag_ce")
        super().__init__(cfg, info)
        self.partials: list[torch.Tensor] = []  # every rank's P: [S, capacity, hidden] (emulate: own one only)
        self.gathers: list[torch.Tensor] = []   # every rank's G, the same shape (cuda only)
        self.scratch: torch.Tensor | None = None  # [S, tp - 1, rows, hidden]: the peers' rows of this shard
        self._slot_k: int | None = None  # the slot the last row-parallel GEMM wrote (None: a plain tensor)
        self.init_slots()

    def prepare(self, max_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
        if self.world_size == 1 or dtype not in _SUPPORTED_DTYPES:
            return
        world, rows = self.world_size, shard_rows(max_tokens, self.world_size)
        shape = (self.num_slots, rows * world, hidden_size)
        if self.cfg.emulate:
            self.partials = [torch.zeros(shape, dtype=dtype, device=self.device)]
            return
        self.group_name = dist.group.WORLD.group_name
        numel = 2 * shape[0] * shape[1] * shape[2]
        own, self.handle = rendezvous_buffer(numel, dtype, self.device)
        # Padded rows of a shard are read (and dropped): zeros, never uninitialised bits. A peer's first read
        # follows the opening barrier of its first step, which this rank's stream reaches after the zeroing.
        own.zero_()
        both = [self.handle.get_buffer(r, (2, *shape), dtype) for r in range(world)]
        self.partials, self.gathers = [b[0] for b in both], [b[1] for b in both]
        self.scratch = torch.zeros((self.num_slots, world - 1, rows, hidden_size), dtype=dtype, device=self.device)

    def _fits(self, n: int, hidden: int, dtype: torch.dtype) -> bool:
        """Whether an [n, hidden] partial sum of this dtype fits a slot, its padded shards included."""
        if not self.partials or dtype != self.partials[0].dtype:
            return False
        _, capacity, width = self.partials[0].shape
        return hidden == width and shard_rows(n, self.world_size) * self.world_size <= capacity

    def _claim_slot(self) -> torch.Tensor:
        """The next reduction's slot of this rank's P, once the peers have copied its last use."""
        k = self._k
        self.wait_slot_free(self.stream, k - self.num_slots)
        self._k, self._slot_k = k + 1, k
        return self.partials[0 if self.cfg.emulate else self.rank][k % self.num_slots]

    # -- the GEMM into a slot, and its reduction -------------------------------------------------------
    def row_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        self._slot_k = None
        if not (self._unreduced and x.dim() == 2 and self._fits(x.shape[0], weight.shape[0], x.dtype)):
            return super().row_parallel(x, weight, bias)
        return linear_into(self._claim_slot()[:x.shape[0]], x, weight, bias)

    def _reduce_embedding(self, mb, partial: torch.Tensor, norm) -> None:
        self._slot_k = None
        if self._fits(*partial.shape, partial.dtype):  # else async_rsag's NCCL path reads the rows where they are
            partial = self._claim_slot()[:partial.shape[0]].copy_(partial)
        super()._reduce_embedding(mb, partial, norm)

    def _reduce(self, mb, partial: torch.Tensor, norm) -> torch.Tensor | None:
        """As async_rsag's: norm=None is the stack's last reduction. Through the slots it gathers residual + sum
        (rounded as RMSNorm's own add rounds it) and returns None: the residual is in the rows already, so the
        model's final norm normalises them alone (comm/base.py run_layers); one gather instead of async_rsag's
        two, and no zero residual to allocate, gather and add."""
        k, self._slot_k = self._slot_k, None
        if k is None:  # a plain tensor (no slot): async_rsag's NCCL path
            return super()._reduce(mb, partial, norm)
        self.copies += 1
        world, r, s = self.world_size, self.rank, k % self.num_slots
        rows = shard_rows(mb.n, world)
        lo, hi = r * rows, (r + 1) * rows
        if self.stream is None:  # emulate: every rank's slot rows by an all-gather
            mine = self.partials[0][s, :rows * world]
            full = mine.new_empty(world * mine.shape[0], mine.shape[1])
            dist.all_gather_into_tensor(full, mine)
            full = full.view(world, *mine.shape)
            shard, mb.residual = self._sum_add_norm([full[q, lo:hi] for q in range(world)], mb.residual, norm)
            if norm is None:
                shard = shard + mb.residual
            mb.inp = all_gather_rows(shard, mb.n, world)
            return None
        stream = self.stream
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.barrier()
            parts, i = [], 0
            for q in range(world):
                if q == r:
                    parts.append(self.partials[r][s, lo:hi])
                else:  # the copy engine reads the peer's rows of this shard over NVLink
                    parts.append(self.scratch[s, i, :rows].copy_(self.partials[q][s, lo:hi]))
                    i += 1
            # The normed shard is written straight into r's rows of the gather slot (no copy after the kernel).
            mine = self.gathers[r][s, lo:hi]
            _, mb.residual = self._sum_add_norm(parts, mb.residual, norm, out=mine, programs=self.cfg.norm_programs)
            if norm is None:  # the last reduction: residual + sum, one rounding (as RMSNorm's add does)
                mine.add_(mb.residual)
            self.barrier()
            for q in range(world):
                if q != r:
                    self.gathers[r][s, q * rows:(q + 1) * rows].copy_(self.gathers[q][s, q * rows:(q + 1) * rows])
            ev = torch.cuda.Event()
            ev.record(stream)
        self._events[k] = mb.ready = ev
        mb.keep = None
        mb.inp = self.gathers[r][s, :mb.n]
        return None

    # -- the stack -----------------------------------------------------------------------------------------
    def run_layers(self, layers, positions: torch.Tensor, hidden: torch.Tensor):
        if self.partials and self.plan(get_context(), hidden.shape[0]) is not None:
            self.open_step(self.stream)
        return super().run_layers(layers, positions, hidden)

    def close(self) -> None:
        self.partials, self.gathers, self.scratch = [], [], None
        self.close_slots()
        super().close()
