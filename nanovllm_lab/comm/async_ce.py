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
  into scratch slot k % S, and an event E_k. No SM work at all on that stream but the barrier's one block.
- the micro-batch's next stage waits for E_k and starts with its RMSNorm, which takes the sum from there: one
  Triton kernel (kernels/allreduce_norm.py, symm_norm's) sums the ranks' rows in rank order (float32, so every
  rank computes the same bits), adds the residual and normalises. A separate add would cost a pass over the
  rows: in a trace of 16384-token prefill steps (2 x H200, qwen3-8b) the adds took 12 ms of a 221 ms step.
  Where the consumer is not a norm (stages="layer": o_proj's reduction; the stack's last one) the same kernel
  makes the sum alone, on the compute stream.
Buffer reuse:
- peers read slot k % S of r's buffer until their copies of reduction k finish. A rank passes barrier j only
  once every peer has finished everything before its own barrier j on its communication stream, i.e. its
  copies for reductions < j. So before GEMM k overwrites its slot (last used by reduction k - S), the compute
  stream waits for E_{k-S+1}.
- across steps: each step numbers its reductions from 0 behind an opening barrier (comm/ce_slots.py), so the
  first S - 1 GEMMs of a step need no guard and a CUDA graph can capture the step (`Config.prefill_graphs`,
  decode graphs), at the cost of one barrier per step.
- r's own slot and scratch slot k % S are read on the compute stream by reduction k's consumer. The GEMM that
  reuses them (k + S) and the copy into the scratch slot (which waits for the compute stream up to that GEMM)
  are enqueued after that consumer as long as fewer than S reductions are issued between a reduction and its
  consumer: at most 2 (micro_batches - 1) (stages="layer" issues two per stage), so S = 2 micro_batches + 1.
Where it does not apply, reductions take `async`'s NCCL path on the same stream: steps larger than the buffer
and dtypes other than float32/bfloat16. `emulate=True` runs the slot logic on gloo, with the peers' rows fetched by an
all-gather, so that CPU tests check it against blocking; without it, asking for this strategy at tp>1 on gloo is
a clear error, as for `symm`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from nanovllm_lab.comm.async_overlap import AsyncConfig, AsyncOverlapStrategy, _attn_half, _mlp_half
from nanovllm_lab.comm.base import PendingReduction, check_bool, register_strategy
from nanovllm_lab.comm.ce_slots import CopyEngineSlots
from nanovllm_lab.comm.symm import _SUPPORTED_DTYPES, linear_into, rendezvous_buffer, require_peer_access
from nanovllm_lab.utils.context import get_context


class CePending(PendingReduction):
    """A copy-engine reduction in flight: `parts` are the ranks' partial sums in rank order (this rank's in its
    slot, the peers' in scratch) once the event has passed. `wait()` makes their sum with `sum_parts` (on the
    current stream); `wait_parts()` hands them over for a fused consumer instead."""

    __slots__ = ("parts", "_sum_parts", "_sum")

    def __init__(self, parts: list[torch.Tensor], sum_parts: Callable, event: Any = None) -> None:
        super().__init__(parts[0], event=event)
        self.parts, self._sum_parts, self._sum = parts, sum_parts, None

    def wait_parts(self) -> list[torch.Tensor]:
        super().wait()
        return self.parts

    def wait(self) -> torch.Tensor:
        if self._sum is None:
            self._sum = self._sum_parts(self.wait_parts())
        return self._sum


@dataclass(frozen=True)
class AsyncCeConfig(AsyncConfig):
    name: str = "async_ce"
    emulate: bool = False  # tp>1 without peer access (gloo, CPU tests): fetch the peers' slots by an all-gather

    def __post_init__(self) -> None:
        super().__post_init__()
        check_bool(self, "emulate")


def _attn_body(layer, mb):  # _attn_half after its input norm (done by the fused kernel)
    return layer.self_attn(mb.positions, mb.hidden), mb.residual


def _mlp_body(layer, mb):  # _mlp_half after its norm
    return layer.mlp(mb.hidden), mb.residual


# stage -> (the norm it starts with, the rest of it)
_FUSABLE = {_attn_half: (lambda layer: layer.input_layernorm, _attn_body),
            _mlp_half: (lambda layer: layer.post_attention_layernorm, _mlp_body)}


@register_strategy("async_ce", AsyncCeConfig)
class AsyncCeStrategy(CopyEngineSlots, AsyncOverlapStrategy):
    def __init__(self, cfg: AsyncCeConfig, info) -> None:
        if not cfg.emulate:
            require_peer_access(info, "async_ce")
        super().__init__(cfg, info)
        self.slots: list[torch.Tensor] = []   # every rank's [S, capacity, hidden] buffer (emulate: own one only)
        self.scratch: torch.Tensor | None = None  # [S, world - 1, capacity, hidden]: the peers' rows, copied in
        self.fused = 0                          # consumers that summed inside their RMSNorm (tests, logs)
        self.init_slots()

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
        self.scratch = torch.empty((self.num_slots, self.world_size - 1, max_tokens, hidden_size), dtype=dtype,
                                   device=self.device)

    def _fits(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        if not self.slots or x.dim() != 2 or x.dtype != self.slots[0].dtype:
            return False
        _, capacity, hidden = self.slots[0].shape
        return weight.shape[0] == hidden and x.shape[0] <= capacity

    def _issue(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> PendingReduction:
        if not self._fits(x, weight):
            return super()._issue(x, weight, bias)
        n, k, s = x.shape[0], self._k, self._k % self.num_slots
        stream = self.reducer.stream
        self.wait_slot_free(stream, k - self.num_slots + 1)  # every peer has copied this slot's last use
        own = linear_into(self.slots[0 if self.cfg.emulate else self.rank][s, :n], x, weight, bias)
        self._k += 1
        self.copies += 1
        if stream is None:  # emulate (CPU, gloo): the peers' rows from an all-gather of the slots
            gathered = torch.empty((self.world_size * n, own.shape[1]), dtype=own.dtype, device=own.device)
            dist.all_gather_into_tensor(gathered, own)
            return CePending(list(gathered.split(n)), self._sum_of)
        parts, i = [], 0
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.barrier()
            for r in range(self.world_size):
                if r == self.rank:
                    parts.append(own)
                else:  # the copy engine reads the peer's rows over NVLink
                    parts.append(self.scratch[s, i, :n].copy_(self.slots[r][s, :n]))
                    i += 1
            ev = torch.cuda.Event()
            ev.record(stream)
        self._events[k] = ev
        return CePending(parts, self._sum_of, event=ev)

    def run_layers(self, layers, positions: torch.Tensor, hidden: torch.Tensor):
        if self.slots and self.plan(get_context(), hidden.shape[0]) is not None:
            self.open_step(self.reducer.stream)
        return super().run_layers(layers, positions, hidden)

    def _run_stage(self, fn, final_weight: int, layer, mb) -> None:
        """A stage that starts with an RMSNorm of a pending copy-engine reduction: the sum, the residual add
        and the norm in one kernel, then the rest of the stage."""
        if isinstance(mb.pending, CePending) and fn in _FUSABLE and mb.residual is not None:
            norm_of, body = _FUSABLE[fn]
            norm = norm_of(layer)
            parts, mb.pending = mb.pending.wait_parts(), None
            mb.hidden, mb.residual = self._sum_add_norm(parts, mb.residual, norm)
            self.fused += 1
            fn = body
        super()._run_stage(fn, final_weight, layer, mb)

    def _sum_of(self, parts: list[torch.Tensor]) -> torch.Tensor:
        return self._sum_add_norm(parts, None, None)[0]

    def close(self) -> None:
        self.slots, self.scratch = [], None
        self.close_slots()
        super().close()
