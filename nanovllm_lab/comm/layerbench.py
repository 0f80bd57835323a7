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

`step_sweep` times whole engine steps per strategy through `ModelRunner.step_hooks`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing as mp
import os
import queue
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch

from nanovllm_lab.distributed.parallel import SAFE_ENV

ROW_KEYS = ("arch", "tp", "phase", "tokens", "seqs", "unit", "strategy", "params", "t_ms", "t_p10_ms", "t_p90_ms",
            "t_blocking_ms", "t_none_ms", "t_comm_ms", "exposed_comm_ms", "overlap_efficiency", "comm_calls",
            "stack", "cuda_graph", "device", "card", "error", "compute_kernel_ms", "compute_interference",
            "torch_compile")


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


# -- the worker ---------------------------------------------------------------------------------------
def _batch(job: _Job, phase: str, n: int, arch, dev: torch.device):
    """(AttentionContext, positions, number of cache blocks) of one prefill or decode batch."""
    from nanovllm_lab.utils.context import AttentionContext
    bs = job.block_size
    if phase == "prefill":
        k = max(1, min(job.prefill_seqs, n))
        lens = [n // k + (i < n % k) for i in range(k)]
        cu, pos, slots, block = [0], [], [], 0
        for ln in lens:
            cu.append(cu[-1] + ln)
            pos += range(ln)
            slots += [block * bs + p for p in range(ln)]
            block += -(-ln // bs)
        ctx = AttentionContext(is_prefill=True, cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
                               cu_seqlens_k=torch.tensor(cu, dtype=torch.int32, device=dev),
                               max_seqlen_q=max(lens), max_seqlen_k=max(lens),
                               slot_mapping=torch.tensor(slots, dtype=torch.int32, device=dev),
                               cu_seqlens_q_host=cu, cu_seqlens_k_host=list(cu))
        return ctx, torch.tensor(pos, dtype=torch.int64, device=dev), block
    c = job.decode_context
    per = -(-c // bs)
    tables = torch.arange(n * per, dtype=torch.int32, device=dev).view(n, per)
    slots = tables[:, (c - 1) // bs] * bs + (c - 1) % bs
    ctx = AttentionContext(is_prefill=False, slot_mapping=slots.contiguous(),
                           context_lens=torch.full((n,), c, dtype=torch.int32, device=dev), block_tables=tables)
    return ctx, torch.full((n,), c - 1, dtype=torch.int64, device=dev), n * per


def _measure(fns: dict[str, Callable[[], Any]], job: _Job, dev: torch.device, world: int) -> dict[str, list[float]]:
    import torch.distributed as dist
    cuda = dev.type == "cuda"
    for fn in fns.values():
        for _ in range(job.warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(job.repeats):
        for key, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(dev)
            if world > 1:
                dist.barrier()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times[key].append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times[key].append((time.perf_counter() - t0) * 1e3)
    return times


def _graphed(fn: Callable[[], Any], dev: torch.device) -> tuple[Callable[[], Any], Any]:
    side = torch.cuda.Stream(dev)
    side.wait_stream(torch.cuda.current_stream(dev))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(dev).wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay, g


def _worker(rank: int, job: _Job, init_file: str, q: Any) -> None:
    import torch.distributed as dist

    from nanovllm_lab.attention.base import get_backend, resolve_backend
    from nanovllm_lab.comm.base import StrategyConfig, build_strategy, resolve_strategy, set_comm
    from nanovllm_lab.comm.interference import kernel_ms
    from nanovllm_lab.distributed.parallel import destroy_distributed, init_distributed
    from nanovllm_lab.layers.attention import Attention
    from nanovllm_lab.layers.linear import RowParallelLinear
    from nanovllm_lab.models.arch import load_arch
    from nanovllm_lab.models.qwen3 import Qwen3DecoderLayer
    from nanovllm_lab.utils.compile import set_compile
    from nanovllm_lab.utils.context import reset_context, set_context
    try:
        if job.device == "cpu":  # one share of the cores per rank: oversubscribed OpenMP threads spin for ms
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.tp))
        info = init_distributed(rank, job.tp, job.device, init_file)
        dev, world = torch.device(info.device), info.world_size
        compiled = dev.type == "cuda" if job.torch_compile is None else job.torch_compile
        set_compile(compiled)
        arch = load_arch(job.arch)
        dtype = getattr(torch, job.dtype or (arch.torch_dtype if dev.type == "cuda" else "float32"))
        torch.manual_seed(1234 + rank)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device(dev):
                layer, row = Qwen3DecoderLayer(arch), RowParallelLinear(arch.intermediate_size, arch.hidden_size)
        finally:
            torch.set_default_dtype(prev)
        for name, p in [*layer.named_parameters(), *row.named_parameters()]:
            if name.endswith("norm.weight"):
                p.data.fill_(1.0)
            else:
                p.data.normal_(0, 0.02)
        attn = next(m for m in layer.modules() if isinstance(m, Attention))
        attn.backend = get_backend(resolve_backend("auto", job.device))
        card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        max_tokens = max(job.tokens)
        strategies: dict[str, Any] = {"blocking": build_strategy(StrategyConfig(name="blocking"), info),
                                      "none": build_strategy(StrategyConfig(name="none"), info)}
        errors: dict[str, str] = {}
        labels = []
        for spec in job.strategies:
            name, params = _spec_name_params(spec)
            label = name + (json.dumps(params, sort_keys=True) if params else "")
            labels.append((label, name, params))
            if label in strategies or label in errors:
                continue
            try:
                strategies[label] = build_strategy(resolve_strategy(spec), info)
            except ValueError as e:  # e.g. symm on gloo: a row that says why instead of a failed sweep
                errors[label] = str(e)
        for s in strategies.values():
            s.prepare(max_tokens, arch.hidden_size, dtype)
        layers = [layer] * job.stack
        kv_heads = arch.num_key_value_heads // world
        rows: list[dict] = []
        for phase in job.phases:
            for n in job.tokens:
                ctx, positions, blocks = _batch(job, phase, n, arch, dev)
                shape = (max(blocks, 1), job.block_size, kv_heads, arch.head_dim)
                attn.k_cache = torch.zeros(shape, dtype=dtype, device=dev)
                attn.v_cache = torch.zeros(shape, dtype=dtype, device=dev)
                hidden = torch.randn(n, arch.hidden_size, dtype=dtype, device=dev)
                x_row = torch.randn(n, arch.intermediate_size // world, dtype=dtype, device=dev)
                comm_bufs = [torch.randn(n, arch.hidden_size, dtype=dtype, device=dev) for _ in range(2)]
                graph = job.cuda_graph and dev.type == "cuda" and (phase == "decode" or job.prefill_graph)

                def unit_fn(unit: str, s: Any) -> Callable[[], Any]:
                    def run() -> Any:
                        set_comm(s)
                        set_context(ctx)
                        try:
                            if unit == "layer":
                                return s.run_layers(layers, positions, hidden)
                            return row(x_row)
                        finally:
                            reset_context()
                    return run

                def comm_fn(calls: int) -> Callable[[], Any]:
                    def run() -> None:
                        if world > 1:
                            for i in range(calls):
                                dist.all_reduce(comm_bufs[i % 2])
                    return run

                for unit, calls, scale in (("layer", 2 * job.stack, job.stack), ("row_linear", 1, 1)):
                    fns = {k: unit_fn(unit, s) for k, s in strategies.items()}
                    fns["__comm__"] = comm_fn(calls)
                    keep = []
                    if graph:
                        for k in list(fns):
                            fns[k], g = _graphed(fns[k], dev)
                            keep.append(g)
                    t = _measure(fns, job, dev, world)
                    kern: dict[str, tuple[float, float]] = {}
                    if job.interference and unit == "layer" and dev.type == "cuda":
                        for k in strategies:  # every rank runs the calls (collectives); rank 0 profiles
                            if world > 1:
                                dist.barrier()
                            kern[k] = kernel_ms(fns[k], 3, profile=rank == 0)
                    del keep
                    stat = {k: (_quantile(v, 0.5) / scale, _quantile(v, 0.1) / scale, _quantile(v, 0.9) / scale)
                            for k, v in t.items()}
                    tb, tn, tc = stat["blocking"][0], stat["none"][0], stat["__comm__"][0]
                    for label, name, params in labels:
                        tm, p10, p90 = stat.get(label, (math.nan,) * 3)
                        ck = kern.get(label, (math.nan, math.nan))[0] / scale
                        cn = kern.get("none", (math.nan, math.nan))[0] / scale
                        rows.append({
                            "arch": job.arch, "tp": job.tp, "phase": phase, "tokens": n, "seqs": ctx.num_seqs,
                            "unit": unit, "strategy": name, "params": json.dumps(params, sort_keys=True),
                            "t_ms": tm, "t_p10_ms": p10, "t_p90_ms": p90, "t_blocking_ms": tb, "t_none_ms": tn,
                            "t_comm_ms": tc, "exposed_comm_ms": tm - tn, "overlap_efficiency": efficiency(tm, tb, tn),
                            "comm_calls": calls // scale, "stack": job.stack, "cuda_graph": graph,
                            "device": dev.type, "card": card, "error": errors.get(label, ""),
                            "compute_kernel_ms": ck, "compute_interference": ck / cn if cn > 0 else math.nan,
                            "torch_compile": compiled})
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
        for s in strategies.values():
            s.close()
        q.put(("rows", rank, rows if rank == 0 else None))
    except BaseException:
        q.put(("error", rank, traceback.format_exc()))
    finally:
        set_comm(None)
        destroy_distributed()


def _resolve_device(device: str) -> str:
    if device in ("auto", "", None):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cuda" if device.startswith("cuda") else device


def layer_sweep(arch_name: str, tp: int, strategies: list, tokens: list[int], phases=("prefill", "decode"),
                repeats: int = 20, device: str = "auto", *, warmup: int = 3, prefill_seqs: int = 4,
                decode_context: int = 512, block_size: int = 256, stack: int = 1, cuda_graph: bool = True,
                dtype: str | None = None, timeout_s: float = 1800.0, prefill_graph: bool = True,
                interference: bool = True, torch_compile: bool | None = None) -> list[dict]:
    """Rows (ROW_KEYS) per unit ("layer", "row_linear") x phase x tokens x strategy; see the module doc.
    `strategies` holds names or specs ({"name": "chunked", "chunks": 2}); an unavailable one (symm on
    gloo) gives rows with NaN times and the reason in `error`."""
    job = _Job(arch_name, int(tp), tuple(strategies), tuple(int(t) for t in tokens), tuple(phases), int(repeats),
               _resolve_device(device), warmup, prefill_seqs, decode_context, block_size, stack, cuda_graph, dtype,
               prefill_graph, interference, torch_compile)
    if job.repeats < 1 or not job.tokens or min(job.tokens) < 1:
        raise ValueError("layer_sweep needs repeats >= 1 and token counts >= 1")
    for spec in job.strategies:
        _spec_name_params(spec)  # unknown names / bad parameters fail here, before anything is spawned
    for k, v in SAFE_ENV.items():
        os.environ[k] = v
    tmp = tempfile.mkdtemp(prefix="nanovllm_lab_layer_")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
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


def step_sweep(arch_name: str, tp: int, strategies: list, decode_batches=(1, 8, 32, 128, 512),
               prefill_tokens=(512, 2048, 8192), repeats: int = 5, device: str = "auto", *,
               decode_context: int = 128, prefill_seqs: int = 4, enforce_eager: bool = False,
               **engine_kwargs: Any) -> list[dict]:
    """End-to-end engine steps per strategy (one engine each): prefill steps of `prefill_tokens` tokens in
    `prefill_seqs` fresh prompts, decode steps of `decode_batches` sequences. Rows: arch, tp, phase, tokens
    (prefill tokens / decode batch), seqs, unit="step", strategy, params, t_ms, t_p10_ms, t_p90_ms,
    t_blocking_ms, t_none_ms, exposed_comm_ms, overlap_efficiency, cuda_graph."""
    from nanovllm_lab import LLM, SamplingParams
    g = torch.Generator().manual_seed(0)
    rows: list[dict] = []
    for spec in strategies:
        name, params = _spec_name_params(spec)
        max_seq = max([-(-t // prefill_seqs) for t in prefill_tokens] + [decode_context]) + repeats + 8
        kw = dict(tensor_parallel_size=tp, strategy=spec, load_format="dummy", device=device,
                  enforce_eager=enforce_eager, max_num_seqs=max(*decode_batches, prefill_seqs),
                  max_num_batched_tokens=max(max(prefill_tokens), max(decode_batches)), max_model_len=max_seq)
        kw.update(engine_kwargs)
        llm = LLM(arch_name, **kw)
        records: list = []
        llm.model_runner.step_hooks.append(records.append)
        vocab = min(llm.config.arch.vocab_size, 50000)

        def prompts(k: int, length: int) -> list[list[int]]:  # random, so the prefix cache never hits
            return torch.randint(0, vocab, (k, length), generator=g).tolist()

        def add(phase: str, n: int, seqs: int, lat: list[float], graph: bool) -> None:
            lat = [x * 1e3 for x in lat]
            row = {"arch": arch_name, "tp": tp, "phase": phase, "tokens": n, "seqs": seqs, "unit": "step",
                   "strategy": name,
                   "params": json.dumps(params, sort_keys=True), "cuda_graph": graph, "t_ms": math.nan,
                   "t_p10_ms": math.nan, "t_p90_ms": math.nan}
            if lat:
                row.update(t_ms=_quantile(lat, 0.5), t_p10_ms=_quantile(lat, 0.1), t_p90_ms=_quantile(lat, 0.9))
            rows.append(row)

        try:
            for t in prefill_tokens:
                k = min(prefill_seqs, t)
                lat = []
                for i in range(repeats + 1):  # the first one warms up
                    records.clear()
                    lens = [t // k + (j < t % k) for j in range(k)]
                    llm.generate([prompts(1, ln)[0] for ln in lens], SamplingParams(temperature=0, max_tokens=1),
                                 use_tqdm=False)
                    if i:
                        lat += [r.latency_s for r in records if r.phase == "prefill" and r.num_tokens == t]
                add("prefill", t, k, lat, False)
            for b in decode_batches:
                records.clear()
                llm.generate(prompts(b, decode_context), SamplingParams(temperature=0, max_tokens=repeats + 2,
                                                                        ignore_eos=True), use_tqdm=False)
                dec = [r for r in records if r.phase == "decode" and r.num_seqs == b][1:]
                add("decode", b, b, [r.latency_s for r in dec], any(r.cuda_graph for r in dec))
        finally:
            llm.exit()
    base = {(r["phase"], r["tokens"], r["strategy"]): r["t_ms"] for r in rows if r["params"] == "{}"}
    for r in rows:
        tb = base.get((r["phase"], r["tokens"], "blocking"), math.nan)
        tn = base.get((r["phase"], r["tokens"], "none"), math.nan)
        r.update(t_blocking_ms=tb, t_none_ms=tn, exposed_comm_ms=r["t_ms"] - tn,
                 overlap_efficiency=efficiency(r["t_ms"], tb, tn))
    return rows


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
