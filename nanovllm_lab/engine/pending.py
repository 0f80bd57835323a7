"""A launched step: its timer, the input ids it carries over from the previous step's sampled tokens, and its
sampled tokens on their way to the host. The model runner's `launch` makes one, `collect` waits for it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from nanovllm_lab.engine.inputs import StepInput

# The name prefix of the profiler range around each launched step (`step_range`): lab/trace.py finds each step's
# kernels by the device-side range (a gpu_user_annotation) that torch.profiler records for it.
STEP_RANGE = "nanovllm_step"


def step_range(step: StepInput) -> str:
    """`nanovllm_step <phase> <tokens>`: the step's profiler range name."""
    return f"{STEP_RANGE} {'prefill' if step.is_prefill else 'decode'} {step.num_tokens}"


class StepTimer:
    """Device events on cuda, a monotonic clock on cpu. `stop()` marks the end of the step's work when it is
    queued (a later step may be queued behind it); `elapsed()` waits for it. `host_s`: the host's time from the
    start to `stop()`, i.e. to build and launch the step: where it is close to `elapsed()` the device waited for
    the launches (a host-paced step), where it is far below, the device work set the pace."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.t0, self.host_s = time.perf_counter(), 0.0
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()

    def stop(self) -> None:
        self.t1 = time.perf_counter()
        self.host_s = self.t1 - self.t0
        if self.cuda:
            self.end.record()

    def elapsed(self) -> float:
        if self.cuda:
            self.end.synchronize()
            return self.start.elapsed_time(self.end) / 1e3
        return self.t1 - self.t0


@dataclass
class Carry:
    """Input ids that come from the previous step's sampled tokens, still on the device: ids[dst] = tokens[src]."""

    tokens: torch.Tensor
    src: list[int]
    dst: list[int]

    def apply(self, ids: torch.Tensor) -> None:
        idx = torch.tensor([self.src, self.dst], dtype=torch.int64).to(ids.device, non_blocking=True)
        ids.index_copy_(0, idx[1], self.tokens.index_select(0, idx[0]).to(ids.dtype))


class Pending:
    """A launched step's sampled tokens on their way to the host (a pinned buffer and an event on cuda)."""

    def __init__(self, step: StepInput, tokens: torch.Tensor, timer: StepTimer, cuda_graph: bool) -> None:
        self.step, self.tokens, self.timer, self.cuda_graph = step, tokens, timer, cuda_graph
        self.host, self.done = tokens, None

    def start_copy(self) -> None:
        self.timer.stop()
        if self.tokens.device.type == "cuda":
            self.host = torch.empty(self.tokens.shape, dtype=self.tokens.dtype, pin_memory=True)
            self.host.copy_(self.tokens, non_blocking=True)
            self.done = torch.cuda.Event()
            self.done.record()

    def wait(self) -> list[int]:
        if self.done is not None:
            self.done.synchronize()
        return self.host.tolist()
