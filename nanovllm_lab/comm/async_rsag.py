"""`async_rsag`: micro-batches interleaved through the decoder stack with sequence-parallel reductions:
TokenWeave's schedule (arXiv 2505.11329) without its multicast kernel or fused norms.

Each half-layer of a micro-batch ends in an unreduced row-parallel GEMM. Its partial sum then goes, on the
communication stream, through reduce-scatter -> residual add + the next RMSNorm on this rank's token
shard -> all-gather. Meanwhile the compute stream runs the next micro-batch's half-layer:

    compute:  attn(mb0) attn(mb1) mlp(mb0) mlp(mb1) attn(mb0) ...
    comm:               RS+norm+AG(mb0) RS+norm+AG(mb1) ...

This combines the two measured effects (results/LOG.md, 2026-11-28): `rsag` removes the replicated
norm/residual work (overlap efficiency 0.37-0.68 at 2048 prefill tokens), and `async` hides part of the
reductions behind the other micro-batch (0.13-0.33 at 8192 tokens). The residual stream stays sharded on
the communication stream for the whole stack; the compute stream sees only the gathered, normalised
inputs of each half-layer. Below `min_tokens` tokens, with one sequence, or at tp=1 the blocking loop runs.
On gloo (cpu) the side work runs inline, so CPU tests check the arithmetic, not the overlap.

The embedding's reduction is each micro-batch's first one. Its lookup on this rank is a partial sum too (zero
rows for tokens outside the rank's vocabulary shard), so where the step will be micro-batched
`reduce_embedding` leaves it unreduced and `run_layers` issues, per micro-batch, reduce-scatter -> the first
layer's input norm on the shard (the reduced shard starts the residual stream) -> all-gather, before the first
layer runs: micro-batch 1's reduction overlaps micro-batch 0's attention. Why: a whole-step all-reduce on the
compute stream before the split was 1.4 ms of exposed time per 16384-token prefill step on 2 x H200
(qwen3-8b, tp=2), about 4% of the communication this strategy tries to hide.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from nanovllm_lab.comm.async_overlap import MicroBatchPlanning, check_micro_batching
from nanovllm_lab.comm.base import CommStrategy, StrategyConfig, comm_stream, has_layer_parts, register_strategy
from nanovllm_lab.comm.seqpar import all_gather_rows, reduce_scatter_rows, shard_rows, token_shard
from nanovllm_lab.utils.context import AttentionContext, aligned, get_context, set_context


@dataclass(frozen=True)
class AsyncRsAgConfig(StrategyConfig):
    name: str = "async_rsag"
    micro_batches: int = 2
    split: str = "tokens"     # async_overlap.SPLITS
    min_tokens: int = 1024    # TokenWeave turns its overlap off below 1024 tokens
    comm_priority: int = -1   # CUDA priority of the communication stream (lower = higher priority)

    def __post_init__(self) -> None:
        check_micro_batching(self)


class _MicroBatch:
    """One micro-batch's state. `inp` is the gathered input of its next half-layer; `residual` its token
    shard of the residual stream (touched only on the communication stream); `ready` the event the compute
    stream waits on before reading `inp`; `keep` holds tensors the communication stream still reads."""

    __slots__ = ("ctx", "positions", "n", "inp", "residual", "ready", "keep")

    def __init__(self, ctx: AttentionContext, positions: torch.Tensor, n: int) -> None:
        self.ctx, self.positions, self.n = ctx, positions, n
        self.inp: torch.Tensor | None = None
        self.residual: torch.Tensor | None = None
        self.ready: Any = None
        self.keep: Any = None

    def wait(self) -> None:
        if self.ready is not None:
            torch.cuda.current_stream(self.inp.device).wait_event(self.ready)
            self.ready = self.keep = None


def final_residual(last: list, rows: list[torch.Tensor]) -> torch.Tensor | None:
    """The residual for the model's final norm from the micro-batches' last reductions (`last`, in order; `rows`
    their gathered rows). None where every one added its residual into its rows already (async_rsag_ce's slots);
    where only some did (a micro-batch too large for the slots took the NCCL path), zeros stand in for theirs:
    adding zero leaves the rows' bits as they are."""
    if all(res is None for res in last):
        return None
    return torch.cat([res if res is not None else torch.zeros_like(r) for res, r in zip(last, rows)])


@register_strategy("async_rsag", AsyncRsAgConfig)
class AsyncRsAgStrategy(MicroBatchPlanning, CommStrategy):
    def __init__(self, cfg: AsyncRsAgConfig, info) -> None:
        super().__init__(cfg, info)
        cuda = self.device.type == "cuda" and self.world_size > 1
        self.stream = comm_stream(self.device, cfg.comm_priority) if cuda else None
        self._unreduced = False  # inside run_layers: row-parallel GEMMs return their partial sums
        self._embed_pending = False  # the step's embedding came back unreduced: run_layers reduces it

    def reduce_embedding(self, x: torch.Tensor) -> torch.Tensor:
        # run_layers makes the same plan for the same step; where it ends up not micro-batching (layers without
        # the pre-norm parts) it all-reduces x itself, so correctness never rests on this guess.
        self._embed_pending = self.plan(get_context(), x.shape[0]) is not None
        return x if self._embed_pending else self.all_reduce(x)

    def row_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        y = F.linear(x, weight, bias)
        return y if self._unreduced else self.all_reduce(y)

    def _reduce(self, mb: _MicroBatch, partial: torch.Tensor, norm) -> torch.Tensor | None:
        """RS -> add (+ norm) -> AG of one half-layer's partial sum, on the communication stream.
        norm=None after the last layer: gather the reduced sum and the residual for the model's final norm."""
        world, rows = self.world_size, shard_rows(mb.n, self.world_size)
        # Outputs the compute stream will read are allocated on it, before the side stream writes them.
        out = partial.new_empty(rows * world, partial.shape[1])
        res_out = partial.new_empty(rows * world, partial.shape[1]) if norm is None else None
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(partial.device))
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            shard = reduce_scatter_rows(partial, world)
            if norm is None:  # the model's final norm adds the residual itself
                all_gather_rows(mb.residual, mb.n, world, out=res_out)
            elif mb.residual is None:  # the embedding's reduction: its reduced shard starts the residual stream
                shard, mb.residual = norm(shard), shard
            else:
                shard, mb.residual = norm(shard, mb.residual)
            all_gather_rows(shard, mb.n, world, out=out)
            if self.stream is not None:
                mb.ready = torch.cuda.Event()
                mb.ready.record(self.stream)
                mb.keep = partial  # freed on the compute stream only after it waited for the reads
        mb.inp = out[:mb.n]
        return res_out[:mb.n] if res_out is not None else None

    def _reduce_embedding(self, mb: _MicroBatch, partial: torch.Tensor, norm) -> None:
        """A micro-batch's first reduction: its rows of the embedding's partial lookup, with no residual before it."""
        mb.residual = None
        self._reduce(mb, partial, norm)

    def run_layers(self, layers, positions: torch.Tensor, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pending, self._embed_pending = self._embed_pending, False  # this step's only: no later step may see it
        ctx = get_context()
        bounds = self.plan(ctx, hidden.shape[0])
        if bounds is None or not has_layer_parts(*layers):
            return super().run_layers(layers, positions, self.all_reduce(hidden) if pending else hidden)
        mbs = []
        for t0, t1 in zip(bounds, bounds[1:]):
            mb = _MicroBatch(ctx.slice_tokens(t0, t1), aligned(positions[t0:t1]), t1 - t0)  # read by a Triton kernel
            if not pending:  # hidden came reduced (a caller other than the model's embedding): no collective
                mb.inp = layers[0].input_layernorm(hidden[t0:t1])
                mb.residual = token_shard(hidden[t0:t1], self.rank, self.world_size)
            mbs.append(mb)
        last: list[torch.Tensor | None] = []  # per micro-batch, what its last reduction returned
        # Where hidden came reduced, the first residual shards come from the compute stream (a padded copy when a
        # micro-batch's token count is not a multiple of tp). Each is replaced by the communication stream's first
        # add + norm as soon as that is *queued*, so without this reference its memory went back to the compute
        # stream's pool while the side stream had yet to read it, and the next micro-batch's attention output
        # overwrote it: seen on 2 x H200 as wrong tokens from the first step (gloo runs the side work inline and
        # cannot show it). Held until the compute stream has waited for the side stream, below.
        first_residuals = [mb.residual for mb in mbs]  # noqa: F841
        self._unreduced = True
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        try:
            if pending:  # every micro-batch's embedding reduction first: the next one's overlaps this one's attention
                for mb, t0, t1 in zip(mbs, bounds, bounds[1:]):
                    self._reduce_embedding(mb, hidden[t0:t1], layers[0].input_layernorm)
            for i, layer in enumerate(layers):
                nxt = layers[i + 1].input_layernorm if i + 1 < len(layers) else None
                for half, norm in (("attn", layer.post_attention_layernorm), ("mlp", nxt)):
                    for mb in mbs:
                        set_context(mb.ctx)
                        mb.wait()
                        if half == "attn":
                            partial = layer.self_attn(mb.positions, mb.inp)
                        else:
                            partial = layer.mlp(mb.inp)
                        res = self._reduce(mb, partial, norm)
                        if norm is None:
                            last.append(res)
            for mb in mbs:
                mb.wait()
        finally:
            self._unreduced = False
            if self.stream is not None:  # inside graph capture the side stream must merge back
                torch.cuda.current_stream(self.device).wait_stream(self.stream)
            set_context(ctx)
        return torch.cat([mb.inp for mb in mbs]), final_residual(last, [mb.inp for mb in mbs])
