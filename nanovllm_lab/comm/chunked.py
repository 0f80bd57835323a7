"""`chunked`: each row-parallel GEMM split along tokens, chunk i's all-reduce overlapping GEMM i+1 (ISO /
Domino / Flux-at-chunk-granularity style).

The chunks are written straight into one preallocated output (no concatenation copy); chunk i's
reduction runs in place on the communication stream while the compute stream computes chunk i+1, and the
compute stream rejoins the communication stream before the output is returned. Steps with fewer than
2 x `min_tokens_per_chunk` tokens (most decode steps) use one chunk, i.e. the blocking path.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from nanovllm_lab.comm.base import CommStrategy, SideReducer, StrategyConfig, check_int, register_strategy
from nanovllm_lab.utils.context import AttentionContext

# Chunk boundaries are rounded to this many rows when chunks are large enough, so that each GEMM keeps
# whole tensor-core tiles.
_ALIGN = 64


@dataclass(frozen=True)
class ChunkedConfig(StrategyConfig):
    name: str = "chunked"
    chunks: int = 4
    min_tokens_per_chunk: int = 128
    comm_priority: int = -1     # CUDA priority of the communication stream (lower = higher priority)
    comm_max_ctas: int = 0      # >0: reductions on an NCCL communicator limited to this many CTAs (SMs)

    def __post_init__(self) -> None:
        for key in ("chunks", "min_tokens_per_chunk"):
            check_int(self, key, lo=1)
        check_int(self, "comm_max_ctas", lo=0)
        check_int(self, "comm_priority")


def chunk_bounds(num_tokens: int, chunks: int, min_tokens_per_chunk: int) -> list[int]:
    """Row boundaries [0, ..., num_tokens] of at most `chunks` chunks of >= min_tokens_per_chunk rows each."""
    n = max(1, min(chunks, num_tokens // min_tokens_per_chunk))
    align = _ALIGN if num_tokens >= n * _ALIGN * 2 else 1
    bounds = [0]
    for i in range(1, n):
        b = round(num_tokens * i / n / align) * align
        m = min_tokens_per_chunk  # n <= num_tokens // m, so every chunk can keep m rows
        bounds.append(min(max(b, bounds[-1] + m), num_tokens - (n - i) * m))
    bounds.append(num_tokens)
    return bounds


@register_strategy("chunked", ChunkedConfig)
class ChunkedStrategy(CommStrategy):
    def __init__(self, cfg: ChunkedConfig, info) -> None:
        super().__init__(cfg, info)
        self.reducer = SideReducer(self.device, self.world_size, cfg.comm_priority, cfg.comm_max_ctas)

    def applicable(self, ctx: AttentionContext, num_tokens: int) -> bool:
        return self.world_size > 1 and len(chunk_bounds(num_tokens, self.cfg.chunks, self.cfg.min_tokens_per_chunk)) > 2

    def row_parallel(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        n = x.shape[0]
        bounds = chunk_bounds(n, self.cfg.chunks, self.cfg.min_tokens_per_chunk)
        if self.world_size == 1 or len(bounds) <= 2 or x.dim() != 2:
            return super().row_parallel(x, weight, bias)
        out = torch.empty(n, weight.shape[0], dtype=x.dtype, device=x.device)
        wt = weight.t()
        pending = []
        self.reducer.fork()
        try:
            for r0, r1 in zip(bounds, bounds[1:]):
                part = out[r0:r1]  # contiguous rows of a contiguous tensor: GEMM and reduction work in place
                if bias is None:
                    torch.mm(x[r0:r1], wt, out=part)
                else:
                    torch.addmm(bias, x[r0:r1], wt, out=part)
                pending.append(self.reducer.issue(part))
            for p in pending:
                p.wait()
        finally:
            self.reducer.join()
        return out
