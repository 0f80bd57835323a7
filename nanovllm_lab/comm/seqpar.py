"""`rsag`: every row-parallel reduction split into a reduce-scatter and an all-gather, with the residual add
and RMSNorm run in between on each rank's shard of the tokens (Megatron-style sequence parallelism).

The same bytes cross the links as with one ring all-reduce, but the norms and the residual stream shrink by
tp x, and the two halves are the form that tile-pipelined GEMM+communication builds on (Flux's GEMM+RS /
AG+GEMM, PyTorch async TP, TokenWeave's RS + norm + AG). Per decoder layer:

    x = AG(norm(residual shard))  ->  attention (o_proj unreduced)  ->  RS  ->  add + norm on the shard
    x = AG(...)                   ->  MLP (down_proj unreduced)     ->  RS  ->  next layer

Token counts not divisible by tp are padded for the collectives only. Below `min_tokens` tokens (or at tp=1)
the blocking path runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanovllm_lab.comm.base import CommStrategy, StrategyConfig, check_int, has_layer_parts, register_strategy
from nanovllm_lab.utils.context import AttentionContext

def shard_rows(n: int, world: int) -> int:
    """Rows of each rank's token shard: n padded up to a multiple of `world`, divided by it."""
    return -(-n // world)


def token_shard(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """This rank's rows of x once its token count is padded to a multiple of `world`."""
    rows = shard_rows(x.shape[0], world)
    pad = rows * world - x.shape[0]
    return (F.pad(x, (0, 0, 0, pad)) if pad else x)[rank * rows:(rank + 1) * rows]


def reduce_scatter_rows(partial: torch.Tensor, world: int) -> torch.Tensor:
    """Sum a [tokens, hidden] partial over the ranks; each rank keeps its token shard (padded rows)."""
    rows = shard_rows(partial.shape[0], world)
    pad = rows * world - partial.shape[0]
    if pad:
        partial = F.pad(partial, (0, 0, 0, pad))
    out = partial.new_empty(rows, partial.shape[1])
    dist.reduce_scatter_tensor(out, partial.contiguous())
    return out


def all_gather_rows(shard: torch.Tensor, n: int, world: int, out: torch.Tensor | None = None) -> torch.Tensor:
    """The first n rows of every rank's shard, concatenated (into `out`, [rows * world, hidden], if given)."""
    full = shard.new_empty(shard.shape[0] * world, shard.shape[1]) if out is None else out
    dist.all_gather_into_tensor(full, shard.contiguous())
    return full[:n]


def sharded_layers(layers, positions: torch.Tensor, hidden: torch.Tensor, rank: int, world: int,
                   gather: Callable, scatter: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder stack with the residual stream and the norms on this rank's token shard: `gather` turns a
    shard into the full rows an attention or MLP block takes, `scatter` its output into the reduced shard (rsag:
    collectives; async_tp: identities, the GEMMs inside the blocks gather and scatter). Returns the full
    (hidden, residual) for the model's final norm."""
    n = hidden.shape[0]
    residual = token_shard(hidden, rank, world)  # the embedding is replicated: no collective
    summed = None  # this rank's shard of the last reduction, not yet added to the residual
    for layer in layers:
        if summed is None:
            h = layer.input_layernorm(residual)
        else:
            h, residual = layer.input_layernorm(summed, residual)
        h, residual = layer.post_attention_layernorm(scatter(layer.self_attn(positions, gather(h))), residual)
        summed = scatter(layer.mlp(gather(h)))
    return all_gather_rows(summed, n, world), all_gather_rows(residual, n, world)


@dataclass(frozen=True)
class RsAgConfig(StrategyConfig):
    name: str = "rsag"
    min_tokens: int = 1  # below this many tokens in a step: blocking (two collectives cost two launches)

    def __post_init__(self) -> None:
        check_int(self, "min_tokens", lo=1)


@register_strategy("rsag", RsAgConfig)
class ReduceScatterAllGatherStrategy(CommStrategy):
    def __init__(self, cfg: RsAgConfig, info) -> None:
        super().__init__(cfg, info)
        self._unreduced = False  # inside run_layers: row-parallel GEMMs return their partial sums

    def applicable(self, ctx: AttentionContext, num_tokens: int) -> bool:
        return self.world_size > 1 and num_tokens >= self.cfg.min_tokens

    def row_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x, weight, bias)
        return y if self._unreduced else self.all_reduce(y)

    def run_layers(self, layers, positions: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        if not self.applicable(None, n) or not has_layer_parts(*layers):
            return super().run_layers(layers, positions, hidden)
        world = self.world_size
        self._unreduced = True
        try:
            return sharded_layers(layers, positions, hidden, self.rank, world,
                                  gather=lambda shard: all_gather_rows(shard, n, world),
                                  scatter=lambda partial: reduce_scatter_rows(partial, world))
        finally:
            self._unreduced = False
