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
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.context_lens = torch.ones(n, dtype=torch.int32, device=dev)
        self.block_tables = torch.full((n, self.max_blocks), -1, dtype=torch.int32, device=dev)
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

    def replay(self, step: StepInput) -> torch.Tensor:
        b = step.num_seqs
        g = self.sizes[bisect.bisect_left(self.sizes, b)]
        dev = self.runner.device
        self.input_ids[:b].copy_(step.input_ids, non_blocking=True)
        self.positions[:b].copy_(step.positions, non_blocking=True)
        self.slot_mapping[:g].fill_(-1)
        self.slot_mapping[:b].copy_(step.slot_mapping, non_blocking=True)
        self.context_lens[:g].fill_(1)
        self.context_lens[:b].copy_(step.context_lens, non_blocking=True)
        self.block_tables[:g].fill_(-1)
        w = step.block_tables.shape[1]
        self.block_tables[:b, :w].copy_(step.block_tables.to(dev, non_blocking=True))
        self.graphs[g].replay()
        return self.outputs[g][:b]
