"""`async_tp`: each reduction fused with the GEMM next to it, through PyTorch's async-TP operators.

`rsag` splits every all-reduce into a reduce-scatter and an all-gather, with the residual add and RMSNorm on
each rank's token shard in between. Here neither half runs alone: the reduce-scatter is fused with the
row-parallel GEMM that produces its input, and the all-gather with the column-parallel GEMM that consumes its
output (`torch.ops.symm_mem.fused_matmul_reduce_scatter` / `fused_all_gather_matmul`, the Flux / PyTorch async
TP decomposition). Each splits its GEMM by token rows, one block per rank, and moves the blocks between the
ranks' symmetric-memory workspaces with copy-engine copies while the other blocks' GEMMs run. Per decoder layer:

    qkv = AG+GEMM(norm(shard))  ->  attention  ->  o_proj GEMM+RS  ->  add + norm on the shard
    gate_up = AG+GEMM(...)      ->  SiLU-mul   ->  down GEMM+RS    ->  next layer

so each reduction leaves exposed only what the operators cannot pipeline: a local copy and a barrier per
gather, the last block's copy and the sum of the blocks per scatter. Why try it: prefill is where the issue's
0.8 target is missed; micro-batching (`async_ce`) hides the transfers but splits the whole layer, attention
included, while this splits only the GEMMs on either side of a reduction.

Measured (2 x H200, qwen3-8b tp=2, eager prefill steps, p50 of 5; results/LOG.md, session 9): overlap efficiency
0.36 at 8192 tokens and 0.42 at 16384, against async_ce's 0.54 / 0.58 in the same call; at 2048 tokens it was
slower than blocking (80 against 62 ms). The operators are Python (workspace lookup, two streams, barriers, a
separate sum) around 144 GEMMs a step; that 2048-token steps are paced by that host work is likely, not shown.

- Steps below `min_tokens` (decode), above `max_tokens` (the workspace's size), at tp=1, and inside CUDA-graph
  capture run the blocking loop: the operators' barriers cost more than they hide on small steps.
- A model whose row-parallel layers have a bias (none in Qwen3) runs the blocking loop: the fused operator has
  no bias, and only rank 0 passes it to `row_parallel` (layers/linear.py adds it once).
- The scatter sums the ranks' blocks with `torch.sum` over the stacked partials (float32 accumulation, rounded
  once: NCCL's result at tp=2). GEMMs over row blocks may round differently from one GEMM over all rows, so
  equality with blocking is within tolerance, not bitwise.
- The gather keeps the operator's default `return_A=True`, which copies the local shard once more: with
  `return_A=False` PyTorch may take a multimem (multicast) path, which must stay off on these machines.
- `emulate=True` calls, with the same arguments, PyTorch's own reference implementations of the two operators
  (`_fused_all_gather_matmul_fallback` / `_fused_matmul_reduce_scatter_fallback`: functional collectives, which
  run on gloo): CPU tests check the sharding, padding, slicing and hooks against blocking. Without it, asking for
  this strategy at tp>1 on gloo is a clear error.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from nanovllm_lab.comm.base import (CommStrategy, StrategyConfig, check_bool, check_int, has_layer_parts,
                                    register_strategy)
from nanovllm_lab.comm.seqpar import shard_rows, sharded_layers
from nanovllm_lab.comm.symm import forget_group, forget_workspace, rendezvous_workspace, require_peer_access


@dataclass(frozen=True)
class AsyncTpConfig(StrategyConfig):
    name: str = "async_tp"
    min_tokens: int = 1024   # below this many tokens in a step: blocking
    max_tokens: int = 16384  # the workspace holds steps up to this many tokens; above: blocking
    emulate: bool = False    # tp>1 without peer access (gloo, CPU tests): the two halves unfused

    def __post_init__(self) -> None:
        for key in ("min_tokens", "max_tokens"):
            check_int(self, key, lo=1)
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"strategy {self.name!r}: min_tokens ({self.min_tokens}) exceeds max_tokens "
                             f"({self.max_tokens})")
        check_bool(self, "emulate")


def _row_parallel_bias(layers) -> bool:
    return any(getattr(m, "bias", None) is not None for layer in layers
               for m in (getattr(layer.self_attn, "o_proj", None), getattr(layer.mlp, "down_proj", None)))


@register_strategy("async_tp", AsyncTpConfig)
class AsyncTpStrategy(CommStrategy):
    def __init__(self, cfg: AsyncTpConfig, info) -> None:
        if not cfg.emulate:
            require_peer_access(info, "async_tp", " (emulate=true runs PyTorch's reference decomposition of its "
                                "operators instead, for tests)")
        super().__init__(cfg, info)
        self.group_name = dist.group.WORLD.group_name if self.world_size > 1 else ""
        if cfg.emulate:  # the operators' reference implementations (see the module docstring)
            import torch.distributed._symmetric_memory as symm_mem
            self._gather_mm = getattr(symm_mem, "_fused_all_gather_matmul_fallback", None)
            self._mm_scatter = getattr(symm_mem, "_fused_matmul_reduce_scatter_fallback", None)
            if self._gather_mm is None or self._mm_scatter is None:
                raise ValueError(f"strategy 'async_tp': emulate needs torch's async-TP reference implementations, "
                                 f"which torch {torch.__version__} lacks")
        elif self.world_size > 1:
            self._gather_mm = torch.ops.symm_mem.fused_all_gather_matmul
            self._mm_scatter = torch.ops.symm_mem.fused_matmul_reduce_scatter
        self._n: int | None = None  # inside the fused loop: the step's token count
        self._max_tokens = cfg.max_tokens
        self.fused_gemms = 0        # GEMMs that ran fused with a gather or a scatter (tests, logs)

    def prepare(self, max_tokens: int, hidden_size: int, dtype: torch.dtype) -> None:
        """Allocate the operators' symmetric workspace for the largest step now: growing it is a collective
        rendezvous, which must not happen lazily on one step (or at all inside a capture)."""
        self._max_tokens = min(self.cfg.max_tokens, max_tokens)
        if self.group_name and not self.cfg.emulate:
            rows = shard_rows(self._max_tokens, self.world_size)
            # gather: one shard; scatter: two blocks of one shard each (double-buffered)
            rendezvous_workspace(2 * rows * hidden_size * dtype.itemsize, self.device)

    def close(self) -> None:
        forget_workspace(self.group_name)
        forget_group(self.group_name)

    def applicable(self, ctx, num_tokens: int) -> bool:
        if self.world_size == 1 or not self.cfg.min_tokens <= num_tokens <= self._max_tokens:
            return False
        return not (self.device.type == "cuda" and torch.cuda.is_current_stream_capturing())

    # -- the two fused halves ------------------------------------------------------------------------------
    def column_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Inside the loop x is this rank's token shard: gather every rank's shard and multiply, pipelined."""
        if self._n is None:
            return F.linear(x, weight, bias)
        self.fused_gemms += 1
        _, outs = self._gather_mm(x.contiguous(), [weight.t()], 0, self.group_name)
        y = outs[0][:self._n]
        return y if bias is None else y + bias

    def row_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Inside the loop: this rank's token shard of the reduced product (padded rows are zeros)."""
        if self._n is None:
            return self.all_reduce(F.linear(x, weight, bias))
        if bias is not None:  # run_layers keeps models with row-parallel biases out of this loop
            raise AssertionError("async_tp's fused loop got a row-parallel bias")
        self.fused_gemms += 1
        rows = shard_rows(x.shape[0], self.world_size)
        pad = rows * self.world_size - x.shape[0]
        x = F.pad(x, (0, 0, 0, pad)) if pad else x.contiguous()
        return self._mm_scatter(x, weight.t(), "sum", 0, self.group_name)

    # -- the decoder stack ---------------------------------------------------------------------------------
    def run_layers(self, layers, positions: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n = hidden.shape[0]
        if not self.applicable(None, n) or not has_layer_parts(*layers) or _row_parallel_bias(layers):
            return super().run_layers(layers, positions, hidden)
        self._n = n
        try:  # the GEMMs inside each block gather its input and scatter its output (column_parallel, row_parallel)
            return sharded_layers(layers, positions, hidden, self.rank, self.world_size,
                                  gather=lambda shard: shard, scatter=lambda shard: shard)
        finally:
            self._n = None
