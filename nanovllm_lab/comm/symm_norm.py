"""`symm_norm`: each reduction is fused with the residual add and RMSNorm that follow it, over symmetric memory.

Decode is where overlap finds nothing to hide behind. A decode step's reductions are latency-bound
(1 MiB at batch 128), and splitting the batch re-reads every weight (session 2: `async` lost at decode). So
this strategy makes each reduction cheaper instead. Measured on 2 x H200, qwen3-8b, decode at batch 128: a
step with NCCL all-reduces spends 17.8 us per reduction more than one without reductions, and `symm`'s one-shot
spends 14.4 us (results/LOG.md, session 4). With this strategy, decode steps at batch 1-512 hide 0.56-0.59 of
the communication penalty, and it gives blocking's tokens over NCCL in float32 and with CUDA graphs (session 5).

Per half-layer:
- The row-parallel GEMM writes its partial sum straight into this rank's symmetric buffer.
- A barrier then makes every rank's partial visible.
- `shots=1` (one-shot, the default): one kernel (kernels/allreduce_norm.py) reads the row from every peer over
  NVLink, sums it, adds the residual, and writes the new residual and the RMSNorm output for the next block.
- `shots=2` (two-shot): a first kernel sums the rows this rank owns (a 1/world share of them) from every peer
  into this rank's symmetric sum buffer; a second barrier; a second kernel reads each row's sum from its owner
  and adds + normalises it. Its results are bit-identical to one-shot's.

Against `symm` one-shot is one barrier instead of two per reduction, and one kernel fewer: no separate add + norm.
Per rank, a one-shot read moves (world - 1) x the partial sum where two-shot (like a ring) moves
2 (world - 1) / world x: the same at tp=2, 3x against 1.5x at tp=4, 7x against 1.75x at tp=8. On 4 x H200
(qwen3-32b, tp=4 decode) one-shot was best at batch 1-32 and lost its edge at 128 and 512 (slower than NCCL at
512); two-shot pays a second barrier and launch for half the bytes, so it is meant for those batches. shots=2 is
built and tested on CPU (kernels under the Triton interpreter, ranks simulated) but has not yet run on a GPU:
the default stays 1 until it is measured (tests/test_strategies_gpu.py has its case).

Buffers: slots [0, 1] of each rank's buffer take the partial sums of alternate reductions; with shots=2 slots
[2, 3] take the owners' sums, alternating with them (reduction k uses slots k % 2 and 2 + k % 2). Each step
makes two reductions per layer, so each step starts on slot 0. On rank r's stream, reduction k is: GEMM k
(writes r's partial slot), barrier 1, one-shot kernel (reads every rank's partial) or kernel A (reads every
rank's partial at r's rows, writes r's sum slot there), then for two-shot barrier 2 and kernel B (reads every
owner's sum slot). A rank passes a barrier only once every peer has reached it, i.e. has finished everything
before it on its stream. Hence no buffer is overwritten while a peer still reads it:
- one-shot, partial slot k % 2: peers read it in reduction k's kernel, before their barrier 1 of reduction k+1.
  Rank r writes that slot next in GEMM k+2, after passing that barrier (GEMM k+1 writes the other slot: with
  one slot, a fast rank's GEMM k+1 could overwrite rows a slow peer is still reading).
- two-shot, partial slot: peers read it in kernel A of reduction k, before their barrier 2 of reduction k.
  Rank r writes any partial slot next in GEMM k+1, after passing that barrier.
- two-shot, sum slot 2 + k % 2: peers read it in kernel B of reduction k, before their barrier 1 of reduction
  k+1. Rank r writes any sum slot next in kernel A of reduction k+1, after passing that barrier.
So with two barriers a single partial slot and a single sum slot would already be safe; they alternate anyway,
because the GEMMs and the one-shot path share the slot logic and the spare slots cost only memory. Steps of more
than `max_tokens` tokens, and tp=1, run the blocking loop (they touch no slot). The default bound keeps the
fused path to small steps; at tp=2 larger ones are worth measuring (gpu_run.sh symm_large).

`local=True` runs the fused loop at tp=1 on the rank's own buffer, with no barrier and with PyTorch's add + norm
on CPU; shots=2 changes nothing at tp=1 (there is nothing to scatter). It exists so that CPU tests check the loop
and its arithmetic against blocking. At tp>1 on gloo, asking for this strategy is a clear error, as for `symm`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanovllm_lab.comm.base import (CommStrategy, StrategyConfig, check_bool, check_int, has_layer_parts,
                                    register_strategy)
from nanovllm_lab.comm.symm import (_SUPPORTED_DTYPES, forget_group, linear_into, rendezvous_buffer,
                                   require_peer_access)

_BARRIER_TIMEOUT_MS = 300_000  # a dead peer traps the kernel (a named error from the watchdog), not a silent spin


@dataclass(frozen=True)
class SymmNormConfig(StrategyConfig):
    name: str = "symm_norm"
    max_tokens: int = 2048  # fused path up to this many tokens per step (buffers: 2, shots=2: 4 x this many rows)
    local: bool = False     # tp=1: run the fused loop anyway (tests)
    shots: int = 1          # 1: one kernel reads every peer's rows; 2: reduce-scatter + all-gather (large batches)

    def __post_init__(self) -> None:
        check_int(self, "max_tokens", lo=1)
        check_bool(self, "local")
        if not isinstance(self.shots, int) or isinstance(self.shots, bool) or self.shots not in (1, 2):
            raise ValueError(f"strategy {self.name!r}: shots must be 1 (one-shot) or 2 (two-shot), "
                             f"got {self.shots!r}")


def sum_add_norm_reference(bufs: list[torch.Tensor], residual: torch.Tensor | None,
                           norm) -> tuple[torch.Tensor, torch.Tensor | None]:
    """kernels/allreduce_norm.py's `sum_add_norm` as the unfused path: the all-reduce's result (the float32 sum
    rounded to the activation dtype), then the RMSNorm layer itself adds and normalises (norm=None: the sum)."""
    s = torch.stack([b.float() for b in bufs]).sum(0).to(bufs[0].dtype)
    return (s, residual) if norm is None else norm(s, residual)


@register_strategy("symm_norm", SymmNormConfig)
class SymmNormStrategy(CommStrategy):
    def __init__(self, cfg: SymmNormConfig, info) -> None:
        super().__init__(cfg, info)
        require_peer_access(info, self.name)
        self.peers: list[torch.Tensor] = []  # every rank's [slots, capacity, hidden] buffers (own one included)
        self.handle = None
        self.group_name = ""
        self._slot = -1  # >= 0 inside the fused loop: row-parallel GEMMs write their partial sums there
        self._fused = None  # the Triton kernel's wrapper on cuda (imported once: triton exists there)
        # Two-shot only where there is something to scatter: at tp=1 (`local`) one-shot is the add + norm alone.
        self._two_shot = getattr(cfg, "shots", 1) == 2 and self.world_size > 1
        if self.device.type == "cuda":
            from nanovllm_lab.kernels import allreduce_norm as k
            self._fused = k.sum_add_norm
            self._reduce_rows, self._add_norm = k.two_shot_reduce_rows, k.two_shot_add_norm

    def prepare(self, max_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
        capacity = min(self.cfg.max_tokens, max_tokens)
        slots = 4 if self._two_shot else 2  # [0, 1] partial sums; two-shot: [2, 3] the owners' sums
        shape = (slots, capacity, hidden_size)
        if self.world_size == 1:
            if self.cfg.local:
                self.peers = [torch.empty(shape, dtype=dtype, device=self.device)]
            return
        if dtype not in _SUPPORTED_DTYPES:  # kept to symm's dtypes: the ones its GPU runs have covered
            return
        import torch.distributed as dist
        self.group_name = dist.group.WORLD.group_name
        _, self.handle = rendezvous_buffer(slots * capacity * hidden_size, dtype, self.device)
        self.peers = [self.handle.get_buffer(r, shape, dtype) for r in range(self.world_size)]

    def applicable(self, ctx, num_tokens: int) -> bool:
        return bool(self.peers) and num_tokens <= self.peers[0].shape[1]

    def row_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._slot < 0:
            return self.all_reduce(F.linear(x, weight, bias))
        return linear_into(self._partial_out(x.shape[0]), x, weight, bias)

    def _partial_out(self, n: int) -> torch.Tensor:
        """Where the fused loop's GEMM writes its [n, hidden] partial sum: this rank's current symmetric slot."""
        return self.peers[self.rank][self._slot, :n]

    def _reduce(self, n: int, residual: torch.Tensor, norm, nxt=None) -> tuple[torch.Tensor, torch.Tensor]:
        """The partial sums in the current slot -> (norm(residual + sum), residual + sum), or with norm=None
        (after the last layer) (sum, residual) for the model's final norm. Then the next slot. `nxt`: the block
        that runs next (None after the last layer), for subclasses that prefetch its weights (lamport_norm)."""
        bufs = [p[self._slot, :n] for p in self.peers]
        if self._fused is not None:
            if self.handle is not None:
                self.handle.barrier(channel=0, timeout_ms=_BARRIER_TIMEOUT_MS)
            weight, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
            if self._two_shot:
                sums = [p[2 + self._slot, :n] for p in self.peers]
                self._reduce_rows(bufs, sums[self.rank], self.rank)  # this rank's rows, from every rank
                self.handle.barrier(channel=0, timeout_ms=_BARRIER_TIMEOUT_MS)  # every owner's sums visible
                out = self._add_norm(sums, residual, weight, eps)  # every row, from its owner
            else:
                out = self._fused(bufs, residual, weight, eps)
        else:
            out = sum_add_norm_reference(bufs, residual, norm)
        self._slot ^= 1
        return out

    def run_layers(self, layers, positions: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        if not self.applicable(None, n) or not has_layer_parts(*layers):
            return super().run_layers(layers, positions, hidden)
        residual, h = hidden, layers[0].input_layernorm(hidden)
        self._slot = 0
        try:
            for i, layer in enumerate(layers):
                layer.self_attn(positions, h)  # o_proj's partial sum lands in the current slot
                h, residual = self._reduce(n, residual, layer.post_attention_layernorm, layer.mlp)
                layer.mlp(h)
                last = i + 1 == len(layers)
                h, residual = self._reduce(n, residual, None if last else layers[i + 1].input_layernorm,
                                           None if last else layers[i + 1].self_attn)
        finally:
            self._slot = -1
        return h, residual

    def close(self) -> None:
        self.peers, self.handle = [], None
        forget_group(self.group_name)
