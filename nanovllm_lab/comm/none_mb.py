"""`none_mb`: `async`'s micro-batches with the reductions skipped. Outputs are wrong by design.

`none` bounds what hiding communication could give: T_none. A micro-batching strategy cannot reach it even with
every transfer hidden, because splitting the batch costs something of its own: two half-size GEMMs and attention
calls instead of one, a stream fork and join, the concatenation at the end. This strategy runs that split, with
`async`'s parameters and schedule, and no communication, so a sweep gives the split's own cost
(T_none_mb - T_none). The report computes its overlap efficiency like any strategy's:
(T_blocking - T_none_mb) / (T_blocking - T_none) is the ceiling of `async` and `async_ce` with the same
parameters (not of `async_rsag`, which splits differently). It also drops their per-reduction event record and
wait, so the ceiling is slightly optimistic. Like `none`, the engine flags its results and refuses to return
text, and `overlap` never picks it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from nanovllm_lab.comm.async_overlap import AsyncConfig, AsyncOverlapStrategy
from nanovllm_lab.comm.base import PendingReduction, register_strategy


@dataclass(frozen=True)
class NoneMbConfig(AsyncConfig):
    name: str = "none_mb"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.comm_max_ctas != 0:  # it would build an NCCL communicator that nothing uses
            raise ValueError(f"strategy {self.name!r} communicates nothing: comm_max_ctas must be 0, "
                             f"got {self.comm_max_ctas!r}")


@register_strategy("none_mb", NoneMbConfig)
class NoneMbStrategy(AsyncOverlapStrategy):
    valid_outputs = False
    communicates = False

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x  # the blocking loop below min_tokens, and the embedding: skipped as in `none`

    def _issue(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> PendingReduction:
        return PendingReduction(F.linear(x, weight, bias))  # already "done": nothing in flight
