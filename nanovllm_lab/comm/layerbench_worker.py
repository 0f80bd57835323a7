"""The per-rank body of `layer_sweep` (comm/layerbench.py): one decoder layer and one row-parallel linear at an
architecture's sizes, a batch's attention context and paged KV cache, and every strategy timed round-robin
against blocking, none and the reductions alone. Rank 0 sends the rows back through the queue."""
from __future__ import annotations

import json
import math
import os
import time
import traceback
from typing import Any, Callable

import torch

from nanovllm_lab.comm.layerbench import _Job, _quantile, _spec_name_params, efficiency


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
    from nanovllm_lab.utils.compile import set_compile, set_elementwise_kernels
    from nanovllm_lab.utils.context import reset_context, set_context
    try:
        if job.device == "cpu":  # one share of the cores per rank: oversubscribed OpenMP threads spin for ms
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // job.tp))
        info = init_distributed(rank, job.tp, job.device, init_file)
        dev, world = torch.device(info.device), info.world_size
        compiled = dev.type == "cuda" if job.torch_compile is None else job.torch_compile
        set_compile(compiled)
        # As Config resolves it: "auto" is triton on cuda; on cpu the PyTorch path runs whatever was asked.
        kernels = job.elementwise_kernels if job.elementwise_kernels in ("triton", "torch") else "triton"
        kernels = kernels if dev.type == "cuda" else "torch"
        set_elementwise_kernels(kernels)
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
                            "torch_compile": compiled, "elementwise_kernels": kernels})
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
