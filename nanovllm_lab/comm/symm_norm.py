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
- One kernel (kernels/allreduce_norm.py) reads the row from every peer over NVLink, sums it, adds the
  residual, and writes the new residual and the RMSNorm output for the next block.

Against `symm` that is one barrier instead of two per reduction, and one kernel fewer: no separate add + norm.

Two buffers alternate: the barrier before reduction k+1 orders every peer's read of reduction k's buffer
before anyone's GEMM k+2 overwrites it. Each step makes two reductions per layer, so each step starts on
buffer 0. Steps of more than `max_tokens` tokens, and tp=1, run the blocking loop. Per rank, a one-shot read
moves (world - 1) x the partial sum where a ring moves 2 (world - 1) / world x: the same at tp=2, 4x at tp=8.
So the default bound keeps it to small steps; at tp=2 larger ones are worth measuring (gpu_run.sh symm_large).

`local=True` runs the fused loop at tp=1 on the rank's own buffer, with no barrier and with PyTorch's add + norm
on CPU. It exists so that CPU tests check the loop and its arithmetic against blocking. At tp>1 on gloo, asking
for this strategy is a clear error, as for `symm`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanovllm_lab.comm.base import CommStrategy, StrategyConfig, has_layer_parts, register_strategy
from nanovllm_lab.comm.symm import (_SUPPORTED_DTYPES, forget_group, linear_into, rendezvous_buffer,
                                   unavailable_reason)

_BARRIER_TIMEOUT_MS = 300_000  # a dead peer traps the kernel (a named error from the watchdog), not a silent spin


@dataclass(frozen=True)
class SymmNormConfig(StrategyConfig):
    name: str = "symm_norm"
    max_tokens: int = 2048  # fused path up to this many tokens per step (the buffers hold 2 x this many rows)
    local: bool = False     # tp=1: run the fused loop anyway (tests)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise ValueError(f"strategy {self.name!r}: max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not isinstance(self.local, bool):
            raise ValueError(f"strategy {self.name!r}: local must be true or false, got {self.local!r}")


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
        reason = unavailable_reason(info, "symm_norm")
        if reason is not None:
            raise ValueError(reason)
        self.peers: list[torch.Tensor] = []  # every rank's [2, capacity, hidden] buffers (own one included)
        self.handle = None
        self.group_name = ""
        self._slot = -1  # >= 0 inside the fused loop: row-parallel GEMMs write their partial sums there
        self._fused = None  # the Triton kernel's wrapper on cuda (imported once: triton exists there)
        if self.device.type == "cuda":
            from nanovllm_lab.kernels.allreduce_norm import sum_add_norm
            self._fused = sum_add_norm

    def prepare(self, max_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
        capacity = min(self.cfg.max_tokens, max_tokens)
        shape = (2, capacity, hidden_size)
        if self.world_size == 1:
            if self.cfg.local:
                self.peers = [torch.empty(shape, dtype=dtype, device=self.device)]
            return
        if dtype not in _SUPPORTED_DTYPES:  # kept to symm's dtypes: the ones its GPU runs have covered
            return
        import torch.distributed as dist
        self.group_name = dist.group.WORLD.group_name
        _, self.handle = rendezvous_buffer(2 * capacity * hidden_size, dtype, self.device)
        self.peers = [self.handle.get_buffer(r, shape, dtype) for r in range(self.world_size)]

    def applicable(self, ctx, num_tokens: int) -> bool:
        return bool(self.peers) and num_tokens <= self.peers[0].shape[1]

    def row_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._slot < 0:
            return self.all_reduce(F.linear(x, weight, bias))
        return linear_into(self.peers[self.rank][self._slot, : x.shape[0]], x, weight, bias)

    def _reduce(self, n: int, residual: torch.Tensor, norm) -> tuple[torch.Tensor, torch.Tensor]:
        """The partial sums in the current slot -> (norm(residual + sum), residual + sum), or with norm=None
        (after the last layer) (sum, residual) for the model's final norm. Then the next slot."""
        bufs = [p[self._slot, :n] for p in self.peers]
        if self._fused is not None:
            if self.handle is not None:
                self.handle.barrier(channel=0, timeout_ms=_BARRIER_TIMEOUT_MS)
            weight, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
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
                h, residual = self._reduce(n, residual, layer.post_attention_layernorm)
                layer.mlp(h)
                h, residual = self._reduce(n, residual, layers[i + 1].input_layernorm if i + 1 < len(layers) else None)
        finally:
            self._slot = -1
        return h, residual

    def close(self) -> None:
        self.peers, self.handle = [], None
        forget_group(self.group_name)
