"""CUDA graphs of prefill steps, one per exact step shape (opt-in: `Config.prefill_graphs`).

Why. An eager prefill step pays the host's launch work once per kernel: on 2 x H200 (qwen3-8b, tp=2) a
2048-token step took 50-72 ms while its GPU work was 25-31 ms, and the micro-batched strategies pay each stage's
launches once per micro-batch (results/LOG.md, session 10). Such a step's latency measures the host, so its
overlap efficiency says little about communication. Replaying a captured graph removes the launch work.

How. A prefill step's kernels, grids and host-side splits are fixed by its shape: the query and key boundaries
of its sequences (`cu_seqlens_q`, `cu_seqlens_k`) and its block tables' widths (none where no context is
cached). Those make the key. A step whose key was seen before is captured (the first sighting ran eagerly,
which compiled and autotuned what the capture needs) and replayed from then on; up to `limit` keys keep a graph,
later new keys run eagerly. Each graph has its own static inputs (ids, positions, slots, boundaries, block
tables), refilled before each replay; all share one memory pool, as their replays never overlap on the stream.

This suits steps that repeat a shape: the lab's `prefill` workload and step sweeps. A serving run with
varied prompt lengths mostly runs eagerly (vLLM captures prefill in pieces around attention at fixed token
buckets instead). Every rank sees the same steps in the same order, so every rank captures and replays the same
graphs: a graph that holds collectives is itself collective. Each graph holds its activations' memory for the
engine's lifetime (the KV cache is sized before, with room for one eager step of the same size).
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from nanovllm_lab.engine.inputs import StepInput
from nanovllm_lab.utils.context import reset_context, set_context

if TYPE_CHECKING:
    from nanovllm_lab.engine.model_runner import ModelRunner
    from nanovllm_lab.engine.pending import Carry

log = logging.getLogger(__name__)

ShapeKey = tuple[tuple[int, ...], tuple[int, ...], int, int]
_MAX_SEEN = 4096  # keys remembered as seen once; a serving run with endless new shapes must not grow without end


def shape_key(step: StepInput) -> ShapeKey:
    """What fixes a prefill step's kernels and splits: its boundaries and its block tables' widths (-1: none)."""
    def width(t: torch.Tensor | None) -> int:
        return -1 if t is None else int(t.shape[1])
    return tuple(step.cu_seqlens_q), tuple(step.cu_seqlens_k), width(step.block_tables), width(step.seq_tables)


class CapturePolicy:
    """Which steps run from a graph: "replay" (captured), "capture" (second sighting, room left) or "eager"."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.captured: set[ShapeKey] = set()
        self.seen: set[ShapeKey] = set()

    def decide(self, key: ShapeKey) -> str:
        if key in self.captured:
            return "replay"
        if len(self.captured) >= self.limit:
            return "eager"
        if key in self.seen:
            self.seen.discard(key)
            self.captured.add(key)
            return "capture"
        if len(self.seen) < _MAX_SEEN:
            self.seen.add(key)
        return "eager"


class _Graph:
    """One captured prefill shape: its static inputs, the context that points at them, the graph, its output."""

    def __init__(self, step: StepInput, device: torch.device) -> None:
        # The step's own context on the device: its boundaries are part of the key, and its per-token tensors
        # and block tables serve as the static buffers that `fill` rewrites before each replay.
        self.ctx = step.to_context(device)
        self.ids = torch.zeros(step.num_tokens, dtype=torch.int64, device=device)
        self.pos = torch.zeros(step.num_tokens, dtype=torch.int64, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None

    def fill(self, step: StepInput, carry: "Carry | None") -> None:
        # The boundaries are part of the key, so only the per-token inputs and the block tables change.
        self.ids.copy_(step.input_ids, non_blocking=True)
        self.pos.copy_(step.positions, non_blocking=True)
        c = self.ctx
        for static, t in ((c.slot_mapping, step.slot_mapping), (c.block_tables, step.block_tables),
                          (c.seq_tables, step.seq_tables)):
            if static is not None:
                static.copy_(t, non_blocking=True)
        if carry is not None:
            carry.apply(self.ids)


class PrefillGraphs:
    def __init__(self, runner: "ModelRunner", limit: int) -> None:
        self.runner = runner
        self.policy = CapturePolicy(limit)
        self.graphs: dict[ShapeKey, _Graph] = {}
        self.pool = None

    def lookup(self, step: StepInput) -> _Graph | None:
        """The graph that runs this step (captured now if this is its shape's second sighting), or None: eager."""
        key = shape_key(step)
        action = self.policy.decide(key)
        if action == "eager":
            return None
        if action == "capture":
            self.graphs[key] = self._capture(step)
        return self.graphs[key]

    @torch.inference_mode()
    def _capture(self, step: StepInput) -> _Graph:
        g = _Graph(step, self.runner.device)
        g.fill(step, None)
        set_context(g.ctx)
        try:
            torch.cuda.synchronize(self.runner.device)
            g.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g.graph, self.pool):
                g.out = self.runner.model(g.ids, g.pos)
            self.pool = g.graph.pool()
        except torch.OutOfMemoryError as e:  # the graph's memory comes on top of the KV cache's budget
            raise RuntimeError(
                f"capturing a prefill CUDA graph of {step.num_tokens} tokens ran out of device memory; lower "
                f"prefill_graphs (now {self.policy.limit}; 0: eager prefill) or gpu_memory_utilization") from e
        finally:
            reset_context()
        log.info("captured a prefill CUDA graph: %d tokens in %d sequences (%d of %d)", step.num_tokens,
                 step.num_seqs, len(self.graphs) + 1, self.policy.limit)
        return g

    def replay(self, g: _Graph, step: StepInput, carry: "Carry | None" = None) -> torch.Tensor:
        g.fill(step, carry)
        g.graph.replay()
        return g.out
