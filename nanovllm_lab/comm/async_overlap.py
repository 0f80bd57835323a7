"""`async`: micro-batches interleaved through the decoder stack, each one's reductions overlapping the
next one's compute (NanoFlow / vLLM DBO / TokenWeave style, without fused kernels).

The batch is split into `micro_batches` parts (SPLITS: by default equal token counts, a prompt cut where a bound
falls inside it; a decode sequence is one token), each with its own sliced `AttentionContext` and its rows of
positions/hidden. The stack runs stage by stage, micro-batch by micro-batch:

    stages="half":  L0.attn(mb0) L0.attn(mb1) L0.mlp(mb0) L0.mlp(mb1) L1.attn(mb0) ...
    stages="layer": L0(mb0) L0(mb1) L1(mb0) ...

A stage ends with a row-parallel GEMM whose all-reduce is issued on the communication stream and left
pending; the stage of the *next* micro-batch is enqueued on the compute stream at once, and the compute
stream waits for a micro-batch's reduction only right before that micro-batch's next stage reads it.
"half" splits each Qwen3 decoder layer into its attention and MLP halves by calling the layer's
submodules (so both o_proj's and down_proj's reductions are hidden); "layer" calls the layer whole, so
only its last reduction (down_proj) can be deferred and o_proj's is waited at once.

Below `min_tokens` tokens, with fewer than two sequences, or at tp=1 the plain blocking loop runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm_lab.comm.base import (CommStrategy, PendingReduction, SideReducer, StrategyConfig, check_int,
                                    has_layer_parts, register_strategy)
from nanovllm_lab.utils.context import AttentionContext, aligned, get_context, set_context


@dataclass(frozen=True)
class AsyncConfig(StrategyConfig):
    name: str = "async"
    micro_batches: int = 2
    split: str = "tokens"       # see SPLITS
    min_tokens: int = 128       # below this many tokens in the step: blocking (launch overhead dominates)
    comm_priority: int = -1     # CUDA priority of the communication stream (lower = higher priority)
    comm_max_ctas: int = 0      # >0: reductions on an NCCL communicator limited to this many CTAs (SMs)
    stages: str = "half"        # "half": attention and MLP halves; "layer": whole decoder layers

    def __post_init__(self) -> None:
        check_micro_batching(self, comm_max_ctas=0)
        if self.stages not in ("half", "layer"):
            raise ValueError(f"strategy {self.name!r}: stages must be 'half' or 'layer', got {self.stages!r}")


def check_micro_batching(cfg: StrategyConfig, **more_int_minimums: int) -> None:
    """The checks of the fields every micro-batching config has (micro_batches, min_tokens, split,
    comm_priority), plus integer fields with the given minimums."""
    for key, lo in (("micro_batches", 1), ("min_tokens", 0), *more_int_minimums.items()):
        check_int(cfg, key, lo=lo)
    if cfg.split not in SPLITS:
        raise ValueError(f"strategy {cfg.name!r}: split must be one of {', '.join(SPLITS)}, got {cfg.split!r}")
    check_int(cfg, "comm_priority")


# How a step is split into micro-batches:
SPLITS = {
    # equal token counts; in prefill a bound may fall inside a sequence (AttentionContext.slice_tokens), so even
    # one long prompt splits. Without the step's block tables (hand-built contexts) it acts as "seq_tokens".
    "tokens": "equal token counts, cutting a prompt where needed",
    "seq_tokens": "token counts as equal as sequence boundaries allow",
    "seqs": "equal sequence counts",
}


def split_points(seq_tokens: list[int], parts: int, policy: str) -> list[int]:
    """Sequence boundaries [0, b1, ..., n] of `parts` non-empty micro-batches (parts <= n)."""
    n = len(seq_tokens)
    if policy == "seqs":
        return [round(n * j / parts) for j in range(parts + 1)]
    # "seq_tokens" (and "tokens" where no cut is possible): the sequence boundaries nearest equal token counts
    cum = [0]
    for t in seq_tokens:
        cum.append(cum[-1] + t)
    bounds = [0]
    for j in range(1, parts):
        target = cum[-1] * j / parts
        lo, hi = bounds[-1] + 1, n - (parts - j)  # leave at least one sequence for each later part
        bounds.append(min(range(lo, hi + 1), key=lambda i: (abs(cum[i] - target), i)))
    bounds.append(n)
    return bounds


class MicroBatchPlanning:
    """`plan` and `applicable` of the strategies that split a step into micro-batches (async, async_rsag): their
    configs have micro_batches, min_tokens and split. Put it before CommStrategy in the bases."""

    def plan(self, ctx: AttentionContext, num_tokens: int) -> list[int] | None:
        """Token boundaries [0, ..., num_tokens] of the step's micro-batches (for AttentionContext.slice_tokens),
        or None where the step runs whole (tp=1, fewer than `min_tokens` tokens, one sequence that may not be
        cut): the blocking fallback."""
        cfg = self.cfg
        if self.world_size == 1 or num_tokens < max(cfg.min_tokens, 2):
            return None
        cut = ctx.is_prefill and cfg.split == "tokens" and ctx.seq_tables is not None
        parts = min(cfg.micro_batches, num_tokens if cut else ctx.num_seqs)
        if parts < 2:
            return None
        if cut:
            return [round(num_tokens * j / parts) for j in range(parts + 1)]
        if ctx.is_prefill:
            cq = ctx.cu_seqlens_q_host
            seq_tokens = [b - a for a, b in zip(cq, cq[1:])]
        else:
            seq_tokens = [1] * ctx.num_seqs
        return [ctx.token_range(0, b)[1] for b in split_points(seq_tokens, parts, cfg.split)]

    def applicable(self, ctx: AttentionContext, num_tokens: int) -> bool:
        return self.plan(ctx, num_tokens) is not None


def _last_row_parallel(module: nn.Module) -> nn.Module | None:
    from nanovllm_lab.layers.linear import RowParallelLinear  # lazy: layers import comm
    last = None
    for m in module.modules():
        if isinstance(m, RowParallelLinear):
            last = m
    return last


class _MicroBatch:
    __slots__ = ("ctx", "positions", "hidden", "residual", "pending")

    def __init__(self, ctx: AttentionContext, positions: torch.Tensor, hidden: torch.Tensor) -> None:
        self.ctx, self.positions, self.hidden = ctx, positions, hidden
        self.residual: torch.Tensor | None = None
        self.pending: PendingReduction | None = None  # the reduction that produces `hidden`


def _attn_half(layer: nn.Module, mb: _MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    if mb.residual is None:
        h, r = layer.input_layernorm(mb.hidden), mb.hidden
    else:
        h, r = layer.input_layernorm(mb.hidden, mb.residual)
    return layer.self_attn(mb.positions, h), r


def _mlp_half(layer: nn.Module, mb: _MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    h, r = layer.post_attention_layernorm(mb.hidden, mb.residual)
    return layer.mlp(h), r


def _whole(layer: nn.Module, mb: _MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
    return layer(mb.positions, mb.hidden, mb.residual)


@register_strategy("async", AsyncConfig)
class AsyncOverlapStrategy(MicroBatchPlanning, CommStrategy):
    def __init__(self, cfg: AsyncConfig, info) -> None:
        super().__init__(cfg, info)
        self.reducer = SideReducer(self.device, self.world_size, cfg.comm_priority, cfg.comm_max_ctas)
        self._deferrable: set[int] | None = None  # ids of weights whose reduction may stay pending; None: eager mode
        self._staged: list[PendingReduction] = []
        self._stage_cache: dict[int, list] = {}

    def _stages(self, layer: nn.Module) -> list[tuple[Callable, int]]:
        """(stage function, id of the weight of its final row-parallel GEMM) for one decoder layer."""
        key = id(layer)
        if key not in self._stage_cache:
            halves = self.cfg.stages == "half" and has_layer_parts(layer)
            parts = [(_attn_half, layer.self_attn), (_mlp_half, layer.mlp)] if halves else [(_whole, layer)]
            stages = []
            for fn, module in parts:
                last = _last_row_parallel(module)
                stages.append((fn, id(last.weight) if last is not None else -1))
            self._stage_cache[key] = stages
        return self._stage_cache[key]

    # -- the reductions --------------------------------------------------------------------------------
    def row_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._deferrable is None:
            return super().row_parallel(x, weight, bias)
        pending = self._issue(x, weight, bias)
        if id(weight) in self._deferrable:
            self._staged.append(pending)  # the stage returns its tensor; its consumer waits (lazily) in run_layers
            return pending.tensor
        return pending.wait()  # consumed inside the stage

    def _issue(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> PendingReduction:
        """The GEMM on the compute stream and its reduction left in flight (async_ce replaces the transport)."""
        return self.reducer.issue(F.linear(x, weight, bias))

    def _run_stage(self, fn: Callable, final_weight: int, layer: nn.Module, mb: _MicroBatch) -> None:
        set_context(mb.ctx)
        if mb.pending is not None:  # this micro-batch's last reduction must land before its next stage reads it
            mb.hidden = mb.pending.wait()
            mb.pending = None
        self._deferrable, self._staged = {final_weight}, []
        try:
            out, mb.residual = fn(layer, mb)
        finally:
            staged, self._deferrable, self._staged = self._staged, None, []
        if staged:
            if len(staged) > 1 or staged[0].tensor is not out:
                for p in staged:
                    p.wait()
                raise RuntimeError("strategy 'async': a decoder stage did not end with its row-parallel GEMM, so "
                                   "its reduction cannot be deferred; use stages='layer' or the blocking strategy")
            mb.pending = staged[0]
        mb.hidden = out

    # -- the decoder stack ----------------------------------------------------------------------------
    def run_layers(self, layers, positions: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ctx = get_context()
        bounds = self.plan(ctx, hidden.shape[0])
        if bounds is None:
            return super().run_layers(layers, positions, hidden)
        # positions too: the q/k norm + RoPE kernel reads them (utils/context.py aligned says why)
        mbs = [_MicroBatch(ctx.slice_tokens(t0, t1), aligned(positions[t0:t1]), hidden[t0:t1])
               for t0, t1 in zip(bounds, bounds[1:])]
        self.reducer.fork()
        try:
            for layer in layers:
                for fn, final_weight in self._stages(layer):
                    for mb in mbs:
                        self._run_stage(fn, final_weight, layer, mb)
            for mb in mbs:
                if mb.pending is not None:
                    mb.hidden = mb.pending.wait()
        finally:
            self.reducer.join()  # inside graph capture the side stream must merge back before capture ends
            set_context(ctx)
        return torch.cat([mb.hidden for mb in mbs]), torch.cat([mb.residual for mb in mbs])
