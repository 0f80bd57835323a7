"""What the copy-engine strategies (async_ce, async_rsag_ce) share: a ring of S symmetric slots numbered per step,
the barrier that opens each step, the wait before a slot is reused, and the fused sum + add + RMSNorm.

Each step numbers its reductions from 0 after a barrier on the communication stream (forked from the compute
stream) that the compute stream waits for. A peer reaches that barrier only after everything it queued before
the step, its copies out of this rank's slots included, so every slot is free; a step's slot sequence then
depends on nothing before it, and a CUDA graph may capture it. Within a step, the strategy records the event
E_k of reduction k, and the GEMM that reuses a slot first waits for the event that proves the peers are done
with it (`wait_slot_free`; which k that is depends on where the strategy's barriers sit).
"""
from __future__ import annotations

from typing import Any

import torch

from nanovllm_lab.comm.symm import forget_group
from nanovllm_lab.comm.symm_norm import sum_add_norm_reference

BARRIER_TIMEOUT_MS = 300_000  # a dead peer traps the barrier kernel (a named error), not a silent spin


class CopyEngineSlots:
    """Mixin for a CommStrategy whose config has `micro_batches`: call `init_slots()` in __init__."""

    def init_slots(self) -> None:
        self.handle = None                      # the symmetric buffer's handle (its barrier); None: emulate
        self.group_name = ""
        self._k = 0                             # this step's reductions through the slots so far
        self._events: dict[int, Any] = {}      # E_k of this step's reductions (CUDA)
        self.copies = 0                         # reductions through the slots, all steps (as issued; tests, logs)
        self._fused_norm = None
        if self.device.type == "cuda":
            from nanovllm_lab.kernels.allreduce_norm import sum_add_norm
            self._fused_norm = sum_add_norm

    @property
    def num_slots(self) -> int:
        # fewer than S reductions lie between a reduction and its consumer: at most 2 (micro_batches - 1)
        return 2 * self.cfg.micro_batches + 1

    def barrier(self) -> None:
        """The peers' signal pads, on the current (communication) stream."""
        self.handle.barrier(channel=0, timeout_ms=BARRIER_TIMEOUT_MS)

    def open_step(self, stream) -> None:
        """Number this step's reductions from 0; on cuda (stream not None), behind the opening barrier."""
        self._k, self._events = 0, {}
        if stream is not None:
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                self.barrier()
            torch.cuda.current_stream(self.device).wait_stream(stream)

    def wait_slot_free(self, stream, k: int) -> None:
        """The compute stream waits for E_k, if this step recorded it (earlier ones: the opening barrier)."""
        if stream is not None:
            guard = self._events.pop(k, None)
            if guard is not None:
                torch.cuda.current_stream(self.device).wait_event(guard)

    def _sum_add_norm(self, parts: list[torch.Tensor], residual: torch.Tensor | None, norm,
                      out: torch.Tensor | None = None, programs: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        """symm_norm's fused sum + add + RMSNorm kernel on cuda, its PyTorch reference elsewhere (norm=None: the
        float32 sum over the ranks in rank order, rounded, alone). `out` receives the first result; `programs`
        caps the kernel's grid (kernels/allreduce_norm.py). Without a residual (async_rsag_ce's embedding
        reduction) the sum is the new residual: (norm(sum), sum)."""
        if residual is None and norm is not None:
            # The fused kernel's norm always adds a residual; this runs once per micro-batch and step, so the
            # sum alone and then the norm layer (same rounding as the reference) cost one extra small launch.
            s, _ = self._sum_add_norm(parts, None, None, programs=programs)
            y = norm(s)
            return (y if out is None else out.copy_(y)), s
        if self._fused_norm is None:
            first, res = sum_add_norm_reference(parts, residual, norm)
            return (first if out is None else out.copy_(first)), res
        weight, eps = (norm.weight, norm.eps) if norm is not None else (None, 0.0)
        return self._fused_norm(parts, residual, weight, eps, out=out, programs=programs)

    def close_slots(self) -> None:
        self.handle, self._events = None, {}
        forget_group(self.group_name)
