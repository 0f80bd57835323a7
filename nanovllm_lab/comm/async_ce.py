"""`async_ce`: `async`'s interleaved micro-batches, with every reduction moved by the GPU's copy engines over
symmetric memory instead of by an NCCL kernel.

Why. Beside a GEMM, an NCCL all-reduce kernel is not free: it needs SMs that the GEMM's blocks hold (its start
waits for them) and, once running, it takes SMs and bandwidth the GEMM wants (compute interference, research
guide). In the engine, `async` hid nothing in prefill on 2 x H200 and 4 x H200 (results/LOG.md, sessions 4-6).
A copy engine is a DMA unit: it moves bytes over NVLink with no SM at all. At tp=2 pulling the peer's partial
sum moves the same bytes per rank as NCCL's ring (1x the partial sum); only the add that follows uses SMs, for
one pass over the rows.

Reduction k (of any micro-batch) on rank r:
- compute stream: the row-parallel GEMM writes its partial sum into slot k % S of r's symmetric buffer;
- communication stream, after the GEMM: a barrier over the peers' signal pads (every rank's slot k is written),
  then one cudaMemcpyAsync per peer (`Tensor.copy_` of the peer's rows, which the copy engine reads over NVLink)
  into a scratch buffer, the sum of all ranks' rows in rank order (every rank adds the same numbers in the same
  order, so the replicated activations stay bit-identical across ranks) into `out`, and an event E_k.
- the micro-batch's next stage waits for E_k; `out` is what the stage returns.
Slot reuse: a rank passes barrier j only once every peer has finished everything before its own barrier j on
its communication stream, i.e. its copies for reductions < j. So before GEMM k overwrites slot k % S (last
used by reduction k - S), the compute stream waits for E_{k-S+1}. With S = micro_batches + 2 that event is
always already waited for (each micro-batch waits for its previous reduction before its next GEMM), so the
guard costs nothing and holds for any interleaving. The scratch buffer is only used on the communication
stream, whose FIFO order serialises its reuse. The reduction counter runs across steps.

Where it does not apply, reductions take `async`'s NCCL path on the same stream: steps larger than the buffer,
dtypes other than float32/bfloat16, and CUDA-graph capture (a captured graph would bake in one slot sequence;
decode is symm_norm's job anyway). `emulate=True` runs the slot logic on gloo, with the peers' rows fetched by an
all-gather, so that CPU tests check it against blocking; without it, asking for this strategy at tp>1 on gloo is
a clear error, as for `symm`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from nanovllm_lab.comm.async_overlap import AsyncConfig, AsyncOverlapStrategy
from nanovllm_lab.comm.base import PendingReduction, register_strategy
from nanovllm_lab.comm.symm import (_SUPPORTED_DTYPES, forget_group, linear_into, rendezvous_buffer,
                                   unavailable_reason)

_BARRIER_TIMEOUT_MS = 300_000  # a dead peer traps the barrier kernel (a named error), not a silent spin


@dataclass(frozen=True)
class AsyncCeConfig(AsyncConfig):
    name: str = "async_ce"
    emulate: bool = False  # tp>1 without peer access (gloo, CPU tests): fetch the peers' slots by an all-gather

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.emulate, bool):
            raise ValueError(f"strategy {self.name!r}: emulate must be true or false, got {self.emulate!r}")


@register_strategy("async_ce", AsyncCeConfig)
class AsyncCeStrategy(AsyncOverlapStrategy):
    def __init__(self, cfg: AsyncCeConfig, info) -> None:
        if not cfg.emulate:
            reason = unavailable_reason(info, "async_ce")
            if reason is not None:
                raise ValueError(reason)
        super().__init__(cfg, info)
        self.slots: list[torch.Tensor] = []   # every rank's [S, capacity, hidden] buffer (emulate: own one only)
        self.scratch: torch.Tensor | None = None  # [world - 1, capacity, hidden]: the peers' rows, copied in
        self.handle = None
        self.group_name = ""
        self._k = 0                            # reductions issued through the slots so far (all steps)
        self._events: dict[int, torch.cuda.Event] = {}  # E_k of the last S reductions (CUDA)
        self.copies = 0                         # reductions that went through the slots (tests, logs)

    @property
    def num_slots(self) -> int:
        return self.cfg.micro_batches + 2

    def prepare(self, max_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
        if self.world_size == 1 or dtype not in _SUPPORTED_DTYPES:
            return
        shape = (self.num_slots, max_tokens, hidden_size)
        if self.cfg.emulate:
            self.slots = [torch.empty(shape, dtype=dtype, device=self.device)]
        else:
            self.group_name = dist.group.WORLD.group_name
            _, self.handle = rendezvous_buffer(shape[0] * shape[1] * shape[2], dtype, self.device)
            self.slots = [self.handle.get_buffer(r, shape, dtype) for r in range(self.world_size)]
        self.scratch = torch.empty((self.world_size - 1, max_tokens, hidden_size), dtype=dtype, device=self.device)

    def _fits(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        if not self.slots or x.dim() != 2 or x.dtype != self.slots[0].dtype:
            return False
        _, capacity, hidden = self.slots[0].shape
        if weight.shape[0] != hidden or x.shape[0] > capacity:
            return False
        return self.reducer.stream is None or not torch.cuda.is_current_stream_capturing()

    def _issue(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> PendingReduction:
        if not self._fits(x, weight):
            return super()._issue(x, weight, bias)
        n, k, s = x.shape[0], self._k, self._k % self.num_slots
        stream = self.reducer.stream
        if stream is not None:  # the guard: every peer has finished copying slot s's last use (see the docstring)
            guard = self._events.pop(k - self.num_slots + 1, None)
            if guard is not None:
                torch.cuda.current_stream(self.device).wait_event(guard)
        own = linear_into(self.slots[0 if self.cfg.emulate else self.rank][s, :n], x, weight, bias)
        out = torch.empty_like(own)  # on the compute stream: its consumers wait for E_k, so its reuse does too
        self._k += 1
        self.copies += 1
        if stream is None:  # emulate (CPU, gloo): the same sum from an all-gather of the slots
            gathered = torch.empty((self.world_size * n, own.shape[1]), dtype=own.dtype, device=own.device)
            dist.all_gather_into_tensor(gathered, own)
            self._sum_in_rank_order(list(gathered.split(n)), out)
            return PendingReduction(out)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.handle.barrier(channel=0, timeout_ms=_BARRIER_TIMEOUT_MS)
            rows, i = [], 0
            for r in range(self.world_size):
                if r == self.rank:
                    rows.append(own)
                else:
                    rows.append(self.scratch[i, :n].copy_(self.slots[r][s, :n]))  # copy engine, over NVLink
                    i += 1
            self._sum_in_rank_order(rows, out)
            ev = torch.cuda.Event()
            ev.record(stream)
        self._events[k] = ev
        return PendingReduction(out, event=ev)

    @staticmethod
    def _sum_in_rank_order(rows: list[torch.Tensor], out: torch.Tensor) -> None:
        torch.add(rows[0], rows[1], out=out)
        for t in rows[2:]:
            out.add_(t)

    def close(self) -> None:
        self.slots, self.scratch, self.handle, self._events = [], None, None, {}
        forget_group(self.group_name)
        super().close()
