"""Compute interference: how much slower the compute kernels run when communication overlaps them.

compute interference = compute-kernel time under a strategy / compute-kernel time with the reductions skipped
(`none`), both from torch.profiler's device-kernel records of the same work (research guide's definition).
Overlapped NCCL kernels take SMs and memory bandwidth from the GEMMs; a value of 1.10 means the strategy's
compute kernels ran 10% longer than alone. Kernels inside CUDA-graph replays are recorded too.

Which kernels are communication is decided by name (`is_comm_kernel`): NCCL's kernels and the reduction kernels
of PyTorch's symmetric memory and of the project. lab/trace.py uses the same rule for whole traces.
"""
from __future__ import annotations

import logging
import math
import re
from typing import Callable, Iterable

import torch

log = logging.getLogger(__name__)

# symm_norm's and lamport_norm's fused kernels (kernels/allreduce_norm.py, kernels/lamport_norm.py) count as
# communication: the peer reads (or pushes and waits) are the reduction, and the add + norm they also do is small
# next to them (the two-shot kernels' names say two_shot).
COMM_KERNEL_RE = re.compile(r"nccl|all_?reduce|one_shot|two_shot|symm|cross_device|reduce_scatter|all_gather|"
                            r"sum_add_norm|lamport", re.IGNORECASE)


def is_comm_kernel(name: str) -> bool:
    return COMM_KERNEL_RE.search(name) is not None


def split_kernel_ms(kernels: Iterable[tuple[str, float]], calls: int) -> tuple[float, float]:
    """(compute, communication) milliseconds per call from (kernel name, total microseconds) records."""
    compute = comm = 0.0
    for name, us in kernels:
        if is_comm_kernel(name):
            comm += us
        else:
            compute += us
    return compute / 1e3 / calls, comm / 1e3 / calls


def kernel_ms(fn: Callable[[], object], calls: int, profile: bool) -> tuple[float, float]:
    """Run `fn` `calls` times; where `profile`, under torch.profiler (CUDA kernels only), returning
    split_kernel_ms of what ran. Every rank of a process group must call this together (fn may hold
    collectives); only the profiling rank gets numbers, the others (and cpu runs) get NaNs."""
    if not profile or not torch.cuda.is_available():
        for _ in range(calls):
            fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return math.nan, math.nan
    from torch.profiler import ProfilerActivity, profile as torch_profile
    prof = torch_profile(activities=[ProfilerActivity.CUDA])
    try:
        prof.start()
    except RuntimeError as e:  # e.g. CUPTI held by another profiler: the timings stand without this column
        log.warning("compute interference not measured: %s", e)
        prof = None
    for _ in range(calls):
        fn()  # always, profiled or not: the other ranks run the same collectives
    torch.cuda.synchronize()
    if prof is None:
        return math.nan, math.nan
    prof.stop()
    kernels = [(e.key, e.device_time_total) for e in prof.key_averages()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    return split_kernel_ms(kernels, calls)
