"""Profiler traces (trace=true) and their overlap analysis.

`profile_to(path)` wraps the timed part of a run in torch.profiler (rank 0's process only: worker ranks run
the same kernels in lockstep) and exports a Chrome trace (open it in chrome://tracing or Perfetto).
`analyze_events` is a pure function over (name, start_us, dur_us, category) events:

- communication kernels: names containing nccl, all_reduce/allreduce, one_shot, two_shot, symm, cross_device,
  reduce_scatter, all_gather (NCCL's kernels and the project's own reduction kernels); every other device
  kernel is compute. CPU ops are not kernels: a CPU-only trace analyses to zeros.
- busy time: the length of the union of a kind's intervals (streams overlap; summed durations double count).
- concurrent communication: |union(comm) intersect union(compute)|; trace concurrency = that / comm busy time.
- exposed communication (trace view): comm busy time with no compute kernel running. The headline
  definition (T_strategy - T_none) comes from timings, not traces: see the layer workload.
- copy-engine transfers: device-to-device and peer-to-peer memcpy events (torch.profiler's `gpu_memcpy`
  category) are communication too: async_ce moves its reductions with them, on no SM. Host-device copies are not
  counted. `ce_copy_us` is their summed duration.
- kernel classes (`kernel_class`): each device event's time per step also goes to one of gemm, attention,
  norm (plain RMSNorm / add kernels), sum_norm (the fused sum + residual add + RMSNorm consumers of symm_norm,
  async_ce and lamport_norm), nccl (NCCL and symm_mem's own collectives), barrier (symm_mem's signal pads),
  ce_copy, other. Why: the comm/compute split above counts a fused sum + norm kernel as communication, though
  it also does the norm that a `none` run does as compute; comparing a strategy with `none` (or `none_mb`) class
  by class says where its extra time goes (a GEMM slowed beside copies, a norm that reads two inputs, waits).
- per step (`steps_by_size`): the engine names a profiler range after each step it launches
  (engine/pending.py `step_range`: `nanovllm_step <phase> <tokens>`), and torch.profiler records that range on the
  device too (a gpu_user_annotation from the step's first kernel to its last). Each device event that starts
  inside a step's device range counts for that step: its span and its kernel time by class, as medians over the
  traced steps of one phase and token count. Why: a trace over several sizes (prefill 2048 and 16384) otherwise
  averages them into one row.
- device idle: the part of the kernel span with no kernel at all running. A large share means the host,
  not the GPU, sets the pace (launch-bound eager steps; session 6's tp=4 prefill steps up to 2048 tokens were
  suspected of it). A long NCCL kernel in a host-bound run is mostly waiting for a slower rank to launch its half.
"""
from __future__ import annotations

import bisect
import json
import os
import statistics
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, NamedTuple

from nanovllm_lab.comm.interference import COMM_KERNEL_RE, is_comm_kernel  # noqa: F401 (re-exported)
from nanovllm_lab.engine.pending import STEP_RANGE
from nanovllm_lab.lab.results import atomic_write

KERNEL_CATEGORIES = frozenset({"kernel"})  # torch.profiler's Chrome-trace category of device kernels
STEP_CATEGORY = "gpu_user_annotation"  # a profiler range's device-side extent
MEMCPY_CATEGORY = "gpu_memcpy"


def is_ce_transfer(ev: "TraceEvent") -> bool:
    """A copy-engine transfer between GPU buffers (own or a peer's), as async_ce's reductions issue them."""
    return ev.category == MEMCPY_CATEGORY and any(k in ev.name for k in ("DtoD", "PtoP", "Device -> Device", "Peer"))


class TraceEvent(NamedTuple):
    name: str
    start_us: float
    dur_us: float
    category: str


Interval = tuple[float, float]


def union(intervals: Iterable[Interval]) -> list[Interval]:
    """Merge overlapping or touching intervals; the result is sorted and disjoint."""
    out: list[list[float]] = []
    for s, e in sorted(intervals):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Intersection of two sorted disjoint interval lists (two-pointer sweep)."""
    i = j = 0
    out: list[Interval] = []
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if s < e:
            out.append((s, e))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def length(intervals: Iterable[Interval]) -> float:
    return float(sum(e - s for s, e in intervals))


KERNEL_CLASSES = ("gemm", "attention", "norm", "sum_norm", "nccl", "barrier", "ce_copy", "other")
_CLASS_RULES = (  # first match wins: (class, substrings of the lower-cased kernel name)
    ("barrier", ("barrier",)),
    ("sum_norm", ("sum_add_norm", "lamport", "two_shot_add_norm", "two_shot_reduce")),
    ("nccl", ("nccl", "one_shot", "two_shot", "all_reduce", "allreduce", "reduce_scatter", "all_gather",
              "cross_device", "symm")),
    ("attention", ("attention", "attn", "flash", "_prefill_kernel", "_decode_partial", "_decode_reduce")),
    ("norm", ("rsqrt", "rms", "norm")),
    ("gemm", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "sm90_", "wgmma")),
)


def kernel_class(ev: "TraceEvent") -> str:
    """Which of KERNEL_CLASSES a device event is (see the module docstring)."""
    if is_ce_transfer(ev):
        return "ce_copy"
    name = ev.name.lower()
    return next((cls for cls, keys in _CLASS_RULES if any(k in name for k in keys)), "other")


def _top(events: list[TraceEvent], n: int = 10) -> list[dict[str, Any]]:
    acc: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for ev in events:
        acc[ev.name][0] += 1
        acc[ev.name][1] += ev.dur_us
    ranked = sorted(acc.items(), key=lambda kv: -kv[1][1])[:n]
    return [{"name": k, "count": int(c), "total_us": t} for k, (c, t) in ranked]


def step_breakdown(events: list[TraceEvent]) -> list[dict[str, Any]]:
    """One row per traced engine step (its device range, see the module docstring), in time order: phase, tokens,
    the span of its device events and their summed time by kernel class (us)."""
    device = sorted((ev for ev in events if ev.category in KERNEL_CATEGORIES or is_ce_transfer(ev)),
                    key=lambda ev: ev.start_us)
    starts = [ev.start_us for ev in device]
    ranges = sorted((ev for ev in events if ev.category == STEP_CATEGORY and ev.name.startswith(STEP_RANGE + " ")),
                    key=lambda ev: ev.start_us)
    rows = []
    for r in ranges:
        _, phase, tokens = r.name.split()
        inside = device[bisect.bisect_left(starts, r.start_us):bisect.bisect_left(starts, r.start_us + r.dur_us)]
        row: dict[str, Any] = {"phase": phase, "tokens": int(tokens), "span_us": 0.0,
                               **{f"{cls}_us": 0.0 for cls in KERNEL_CLASSES}}
        if inside:
            row["span_us"] = max(ev.start_us + ev.dur_us for ev in inside) - inside[0].start_us
        for ev in inside:
            row[f"{kernel_class(ev)}_us"] += ev.dur_us
        rows.append(row)
    return rows


def steps_by_size(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`step_breakdown`'s rows as medians per (phase, tokens), with the number of steps behind each."""
    groups: dict[tuple[str, int], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row["phase"], row["tokens"]].append(row)
    return [{"phase": phase, "tokens": tokens, "steps": len(g),
             **{k: float(statistics.median(r[k] for r in g)) for k in g[0] if k.endswith("_us")}}
            for (phase, tokens), g in sorted(groups.items())]


def analyze_events(events: Iterable[TraceEvent | tuple], num_steps: int | None = None) -> dict[str, Any]:
    """Compute/communication kernel times and their concurrency from trace events (all times in us)."""
    events = [TraceEvent(*ev) for ev in events]
    copies = [ev for ev in events if is_ce_transfer(ev)]
    kernels = [ev for ev in events if ev.category in KERNEL_CATEGORIES]
    compute = [ev for ev in kernels if not is_comm_kernel(ev.name)]
    comm = [ev for ev in kernels if is_comm_kernel(ev.name)] + copies
    kernels = kernels + copies  # "kernels" below: everything that occupies the device
    comm_u = union((ev.start_us, ev.start_us + ev.dur_us) for ev in comm)
    compute_u = union((ev.start_us, ev.start_us + ev.dur_us) for ev in compute)
    comm_busy, concurrent = length(comm_u), length(intersect(comm_u, compute_u))
    span = (max(ev.start_us + ev.dur_us for ev in kernels) - min(ev.start_us for ev in kernels)) if kernels else 0.0
    busy = length(union((ev.start_us, ev.start_us + ev.dur_us) for ev in kernels))
    out: dict[str, Any] = {
        "num_kernels": len(kernels), "num_comm_kernels": len(comm), "num_compute_kernels": len(compute),
        "compute_kernel_us": float(sum(ev.dur_us for ev in compute)),
        "comm_kernel_us": float(sum(ev.dur_us for ev in comm)),
        "num_ce_copies": len(copies), "ce_copy_us": float(sum(ev.dur_us for ev in copies)),
        "compute_busy_us": length(compute_u), "comm_busy_us": comm_busy,
        "concurrent_comm_us": concurrent, "exposed_comm_us": comm_busy - concurrent,
        "trace_concurrency": concurrent / comm_busy if comm_busy > 0 else 0.0,
        "kernel_span_us": float(span),
        "device_idle_us": float(span - busy), "device_busy_fraction": busy / span if span > 0 else 0.0,
        "top_comm_kernels": _top(comm), "top_compute_kernels": _top(compute),
        "steps_by_size": steps_by_size(step_breakdown(events)),
    }
    if num_steps:
        by_class = dict.fromkeys(KERNEL_CLASSES, 0.0)
        for ev in kernels:
            by_class[kernel_class(ev)] += ev.dur_us
        for cls, us in by_class.items():
            out[f"{cls}_us_per_step"] = us / num_steps
        out["num_steps"] = num_steps
        out["exposed_comm_us_per_step"] = out["exposed_comm_us"] / num_steps
        out["comm_busy_us_per_step"] = comm_busy / num_steps
        out["compute_busy_us_per_step"] = out["compute_busy_us"] / num_steps
    return out


def events_from_chrome_trace(trace: str | os.PathLike | dict) -> list[TraceEvent]:
    """Complete ('X') events of a Chrome trace (a path or the loaded JSON)."""
    if not isinstance(trace, dict):
        with open(trace) as f:
            trace = json.load(f)
    out = []
    for ev in trace.get("traceEvents", []):
        if ev.get("ph") == "X" and "dur" in ev and "ts" in ev:
            out.append(TraceEvent(str(ev.get("name", "")), float(ev["ts"]), float(ev["dur"]), str(ev.get("cat", ""))))
    return out


@contextmanager
def profile_to(path: str | os.PathLike) -> Iterator[None]:
    """torch.profiler around the block (CPU, plus CUDA when available); the Chrome trace lands at path."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        yield
    atomic_write(path, prof.export_chrome_trace)


def analyze_trace_file(path: str | os.PathLike, num_steps: int | None = None) -> dict[str, Any]:
    summary = analyze_events(events_from_chrome_trace(path), num_steps)
    summary["trace_file"] = Path(path).name
    summary["rank"] = 0
    return summary
