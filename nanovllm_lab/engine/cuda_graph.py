"""CUDA graphs for decode steps.

One graph per padded batch size (1, 2, 4, 8, then steps of 16 up to max_num_seqs), sharing one memory pool
and one set of static input buffers. A step of b sequences replays the smallest graph >= b; padding rows
get slot -1 (their K/V is dropped) and context length 1. The communication strategy is captured with the
model: its side streams fork from and rejoin the capturing stream. Every rank captures and replays the
same graphs in the same order, since a graph holding NCCL work is itself collective.
"""
from __future__ import annotations

import bisect
import logging
from typing import TYPE_CHECKING

import torch

from nanovllm_lab.engine.inputs import StepInput
from nanovllm_lab.utils.context import AttentionContext, reset_context, set_context

if TYPE_CHECKING:
    from nanovllm_lab.engine.model_runner import ModelRunner
    from nanovllm_lab.engine.pending import Carry

log = logging.getLogger(__name__)


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b <= max_num_seqs] + list(range(16, max_num_seqs + 1, 16))
    if sizes[-1] < max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class DecodeGraphs:
    @torch.inference_mode()
    def __init__(self, runner: "ModelRunner") -> None:
        c = runner.config
        self.runner = runner
        self.sizes = graph_batch_sizes(min(c.max_num_seqs, 512, runner.backend.max_graph_batch))
        n = self.sizes[-1]
        dev = runner.device
        self.max_blocks = (c.max_model_len + runner.block_size - 1) // runner.block_size
        # The static inputs are views of one int32 buffer, filled from one pinned host buffer of the same layout:
        # a step's inputs reach the device in one copy instead of nine small copies and fills, which the GPU
        # would wait for (host time between steps). int32 ids and positions index the embedding and RoPE tables.
        size = 4 * n + n * self.max_blocks
        self._host = torch.empty(size, dtype=torch.int32, pin_memory=True)
        self._dev = torch.empty(size, dtype=torch.int32, device=dev)
        self._copied = torch.cuda.Event()
        h = self._host.numpy()
        self._h_ids, self._h_pos, self._h_slots, self._h_ctx = h[:n], h[n:2 * n], h[2 * n:3 * n], h[3 * n:4 * n]
        self._h_bt = h[4 * n:].reshape(n, self.max_blocks)
        self._h_ids[:], self._h_pos[:], self._h_slots[:], self._h_ctx[:], self._h_bt[:] = 0, 0, -1, 1, -1
        self._dev.copy_(self._host)
        d = self._dev
        self.input_ids, self.positions = d[:n], d[n:2 * n]
        self.slot_mapping, self.context_lens = d[2 * n:3 * n], d[3 * n:4 * n]
        self.block_tables = d[4 * n:].view(n, self.max_blocks)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        pool = None
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its pool
            ctx = self._context(b)
            set_context(ctx)
            out = runner.model(self.input_ids[:b], self.positions[:b])  # warm-up (allocators, autotuning)
            torch.cuda.synchronize(dev)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool):
                out = runner.model(self.input_ids[:b], self.positions[:b])
            pool = g.pool()
            self.graphs[b], self.outputs[b] = g, out
            reset_context()
        torch.cuda.synchronize(dev)
        log.info("captured %d decode CUDA graphs (batch sizes %s)", len(self.sizes), self.sizes)

    def _context(self, b: int) -> AttentionContext:
        return AttentionContext(is_prefill=False, slot_mapping=self.slot_mapping[:b],
                                context_lens=self.context_lens[:b], block_tables=self.block_tables[:b])

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.sizes[-1]

    def replay(self, step: StepInput, carry: "Carry | None" = None) -> torch.Tensor:
        b = step.num_seqs
        g = self.sizes[bisect.bisect_left(self.sizes, b)]
        self._copied.synchronize()  # the previous step's copy has left the pinned buffer
        w = step.block_tables.shape[1]
        self._h_ids[:b] = step.input_ids.numpy()
        self._h_pos[:b] = step.positions.numpy()
        self._h_slots[:b] = step.slot_mapping.numpy()
        self._h_slots[b:g] = -1  # padding rows: K/V dropped, context of one token, no blocks
        self._h_ctx[:b] = step.context_lens.numpy()
        self._h_ctx[b:g] = 1
        self._h_bt[:b, :w] = step.block_tables.numpy()
        self._h_bt[:b, w:] = -1
        self._h_bt[b:g] = -1
        self._dev.copy_(self._host, non_blocking=True)
        self._copied.record()
        if carry is not None:
            carry.apply(self.input_ids)
        self.graphs[g].replay()
        return self.outputs[g][:b]
