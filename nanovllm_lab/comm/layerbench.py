"""The `layer` and `step` measurements as library functions (the lab's `layer` workload wraps them).

`layer_sweep` spawns `tp` ranks (FileStore rendezvous in a temporary directory), builds ONE Qwen3 decoder
layer and one row-parallel linear of the down_proj shape at an architecture's sizes with random weights,
a paged KV cache and the attention context of a prefill batch (`prefill_seqs` sequences totalling `tokens`)
or a decode batch (`tokens` sequences of `decode_context` tokens each), and times, in one run, every
strategy asked for plus T_blocking, T_none and T_comm (the unit's all-reduces of [tokens, hidden] alone).
CUDA: events, warm-up, decode and prefill timed as CUDA-graph replays (eager prefill timing, `prefill_graph=False`,
adds host launch cost, which dominated at 2048 tokens: results/LOG.md); CPU: perf_counter. Variants
are timed round-robin within each repeat so drift hits all alike; ranks meet at a barrier before each.
Rows hold the median and p10/p90 of the repeats, per layer (`stack` > 1 runs the layer that many times in
one call, so the pipeline fill/drain of micro-batching is amortised as in a full model). On cuda, each
strategy's layer call is also profiled (3 calls, rank 0) for its compute-kernel time and compute
interference against `none` (comm/interference.py).

The ranks' body is comm/layerbench_worker.py; `step_sweep` (whole engine steps) is comm/stepbench.py.
"""
from __future__ import annotations

import dataclasses
import math
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from nanovllm_lab.distributed.parallel import SAFE_ENV
from nanovllm_lab.utils.compile import ELEMENTWISE_KERNELS

ROW_KEYS = ("arch", "tp", "phase", "tokens", "seqs", "unit", "strategy", "params", "t_ms", "t_p10_ms", "t_p90_ms",
            "t_blocking_ms", "t_none_ms", "t_comm_ms", "exposed_comm_ms", "overlap_efficiency", "comm_calls",
            "stack", "cuda_graph", "device", "card", "error", "compute_kernel_ms", "compute_interference",
            "torch_compile", "elementwise_kernels")


@dataclass(frozen=True)
class _Job:
    arch: str
    tp: int
    strategies: tuple
    tokens: tuple
    phases: tuple
    repeats: int
    device: str
    warmup: int
    prefill_seqs: int
    decode_context: int
    block_size: int
    stack: int
    cuda_graph: bool
    dtype: str | None
    prefill_graph: bool = True  # replay prefill from CUDA graphs too (eager timing adds launch cost: LOG.md)
    interference: bool = True  # profile each strategy's layer kernels on cuda (comm/interference.py)
    # The engine's torch.compile of RMSNorm/RoPE/SiLU-mul (None: on for cuda, as Config). The first sweeps ran
    # these eager while the engine compiles them: rsag's halved norm work then looked like a prefill win (0.63
    # at 8192 tokens) that the compiled engine did not show (results/LOG.md, session 4).
    torch_compile: bool | None = None
    # SiLU-and-mul and the q/k norm + RoPE: "triton" or "torch" (None / "auto": triton on cuda, as Config)
    elementwise_kernels: str | None = None


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def _spec_name_params(spec: Any) -> tuple[str, dict]:
    from nanovllm_lab.comm.base import resolve_strategy
    cfg = resolve_strategy(spec)
    params = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
              if f.name != "name" and getattr(cfg, f.name) != f.default}
    return cfg.name, params


def efficiency(t: float, t_blocking: float, t_none: float) -> float:
    """Overlap efficiency (T_blocking - T) / (T_blocking - T_none); NaN when there is no penalty to recover."""
    den = t_blocking - t_none
    return (t_blocking - t) / den if den > 0 else math.nan


def _resolve_device(device: str) -> str:
    if device in ("auto", "", None):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else device


def layer_sweep(arch_name: str, tp: int, strategies: list, tokens: list[int], phases=("prefill", "decode"),
                repeats: int = 20, device: str = "auto", *, warmup: int = 3, prefill_seqs: int = 4,
                decode_context: int = 512, block_size: int = 256, stack: int = 1, cuda_graph: bool = True,
                dtype: str | None = None, timeout_s: float = 1800.0, prefill_graph: bool = True,
                interference: bool = True, torch_compile: bool | None = None,
                elementwise_kernels: str | None = None) -> list[dict]:
    """Rows (ROW_KEYS) per unit ("layer", "row_linear") x phase x tokens x strategy; see the module doc.
    `strategies` holds names or specs ({"name": "chunked", "chunks": 2}); an unavailable one (symm on
    gloo) gives rows with NaN times and the reason in `error`."""
    job = _Job(arch_name, int(tp), tuple(strategies), tuple(int(t) for t in tokens), tuple(phases), int(repeats),
               _resolve_device(device), warmup, prefill_seqs, decode_context, block_size, stack, cuda_graph, dtype,
               prefill_graph, interference, torch_compile, elementwise_kernels)
    if job.repeats < 1 or not job.tokens or min(job.tokens) < 1:
        raise ValueError("layer_sweep needs repeats >= 1 and token counts >= 1")
    if elementwise_kernels is not None and elementwise_kernels not in ELEMENTWISE_KERNELS:
        raise ValueError(f"layer_sweep: elementwise_kernels must be auto, triton or torch, got {elementwise_kernels!r}")
    for spec in job.strategies:
        _spec_name_params(spec)  # unknown names / bad parameters fail here, before anything is spawned
    for k, v in SAFE_ENV.items():
        os.environ[k] = v
    tmp = tempfile.mkdtemp(prefix="nanovllm_lab_layer_")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    from nanovllm_lab.comm.layerbench_worker import _worker  # imports this module: loaded here, not at the top
    procs = [ctx.Process(target=_worker, args=(r, job, os.path.join(tmp, "rendezvous"), q), daemon=True)
             for r in range(job.tp)]
    try:
        for p in procs:
            p.start()
        rows, pending, deadline = None, set(range(job.tp)), time.monotonic() + timeout_s
        while pending:
            try:
                kind, rank, payload = q.get(timeout=1.0)
            except queue.Empty:
                dead = [r for r in pending if not procs[r].is_alive() and procs[r].exitcode != 0]
                if dead:
                    raise RuntimeError(f"layer_sweep: rank {dead[0]} died (exit code {procs[dead[0]].exitcode})")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"layer_sweep: ranks {sorted(pending)} did not finish in {timeout_s:.0f} s")
                continue
            if kind == "error":
                raise RuntimeError(f"layer_sweep: rank {rank} failed:\n{payload}")
            pending.discard(rank)
            if rank == 0:
                rows = payload
        return rows
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join()
        shutil.rmtree(tmp, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    """`python -m nanovllm_lab.comm.layerbench --arch qwen3-8b --tp 2 --out rows.json`: a quick layer sweep
    outside the lab (for GPU machines without Hydra); the lab's `layer` workload is the full version."""
    import argparse
    import json
    import time

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--arch", default="qwen3-8b")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--decode", default="8,128")
    ap.add_argument("--prefill", default="2048,8192")
    ap.add_argument("--prefill-graph", action="store_true", help="(the default; kept for old command lines)")
    ap.add_argument("--eager-prefill", action="store_true", help="time prefill eagerly (launch cost included)")
    a = ap.parse_args(argv)
    strategies = ["blocking", "async", {"name": "async", "stages": "layer"}, "chunked", "symm", "overlap",
                  {"name": "chunked", "comm_max_ctas": 8}, {"name": "async", "comm_max_ctas": 8}, "rsag", "async_rsag"]
    rows: list[dict] = []
    for phase, toks in (("decode", a.decode), ("prefill", a.prefill)):
        t = time.time()
        rows += layer_sweep(a.arch, a.tp, strategies, [int(x) for x in toks.split(",")], (phase,), a.repeats,
                            "auto", stack=2, prefill_graph=not a.eager_prefill)
        print(f"{phase} sweep {time.time() - t:.1f} s", flush=True)
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(rows, f)
        os.replace(tmp, a.out)
    for r in rows:
        print(f'{r["unit"]:10s} {r["phase"]:7s} {r["tokens"]:5d} {r["strategy"]:8s} {str(r.get("params", ""))[:28]:28s} '
              f't={r["t_ms"] * 1e3:8.1f}us blk={r["t_blocking_ms"] * 1e3:8.1f} none={r["t_none_ms"] * 1e3:8.1f} '
              f'comm={r["t_comm_ms"] * 1e3:7.1f} eff={r["overlap_efficiency"]:.2f} intf={r["compute_interference"]:.2f} '
              f'{str(r.get("error", ""))[:40]}')


if __name__ == "__main__":
    main()
