"""Where the bench's wall time goes on the host: the `bench` workload's shapes, with the engine step's parts timed.

    python3 scripts/host_profile.py [--model qwen3-0.6b] [--seqs 256] [--max-out 1024] [--cprofile]

Times each part of LLMEngine.step with perf_counter (schedule, input building, the runner's `launch`, and
`collect`, which waits for the device), with overlapped decode (default) or without it (--sync). The device time per
step comes from the engine's own CUDA-event step records. Host time the GPU waits for = wall - device time.
With --cprofile a second pass runs under cProfile and prints the functions with the most own time.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import random
import statistics
import sys
import time
from collections import defaultdict

import torch

from nanovllm_lab import LLM, SamplingParams
from nanovllm_lab.engine import llm_engine, overlap


def requests(rng: random.Random, n: int, max_out: int, vocab: int):
    prompts = [[rng.randint(0, min(10000, vocab - 1)) for _ in range(rng.randint(100, 1024))] for _ in range(n)]
    sps = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(min(100, max_out), max_out))
           for _ in prompts]
    return prompts, sps


def timed(table: dict, name: str, fn):
    def wrapper(*a, **k):
        t = time.perf_counter()
        try:
            return fn(*a, **k)
        finally:
            table[name] += time.perf_counter() - t
    return wrapper


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--device", default=None)
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--max-out", type=int, default=1024)
    ap.add_argument("--cprofile", action="store_true")
    ap.add_argument("--sync", action="store_true", help="async_scheduling=False: no overlapped decode")
    a = ap.parse_args()
    llm = LLM(a.model, max_model_len=4096, async_scheduling=not a.sync, **({"device": a.device} if a.device else {}))
    eng = llm
    rng = random.Random(0)
    prompts, sps = requests(rng, a.seqs, a.max_out, llm.config.arch.vocab_size)
    warm, _ = requests(rng, 16, 8, llm.config.arch.vocab_size)
    llm.generate(warm, SamplingParams(temperature=0.6, max_tokens=8), use_tqdm=False)
    recs = []
    llm.model_runner.step_hooks.append(recs.append)
    parts: dict[str, float] = defaultdict(float)
    sched = eng.scheduler
    sched.schedule = timed(parts, "schedule", sched.schedule)
    sched.postprocess = timed(parts, "postprocess", sched.postprocess)
    llm_engine.prepare_decode = timed(parts, "prepare_decode", llm_engine.prepare_decode)
    overlap.prepare_decode = timed(parts, "prepare_decode", overlap.prepare_decode)
    llm_engine.prepare_prefill = timed(parts, "prepare_prefill", llm_engine.prepare_prefill)
    runner = llm.model_runner
    runner.launch = timed(parts, "launch (host)", runner.launch)
    runner.collect = timed(parts, "collect (waits for the device)", runner.collect)
    if runner.graphs is not None:
        runner.graphs.replay = timed(parts, "  of launch: graph replay", runner.graphs.replay)
    runner.sampler.forward = timed(parts, "  of launch: sampler", runner.sampler.forward)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    print("== timed run starts", file=sys.stderr, flush=True)
    t = time.perf_counter()
    llm.generate(prompts, sps, use_tqdm=False)
    wall = time.perf_counter() - t
    n_out = sum(sp.max_tokens for sp in sps)
    dev = sum(r.latency_s for r in recs)
    print(f"{a.model}: {len(recs)} steps, {n_out} output tokens in {wall:.2f} s = {n_out / wall:.0f} tok/s; "
          f"step records (CUDA events) {dev:.2f} s; decode {sum(r.phase == 'decode' for r in recs)} steps")
    for k, v in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"  {k:36s} {v:7.3f} s  {1e3 * v / max(len(recs), 1):6.3f} ms/step")
    host = wall - parts["collect (waits for the device)"]
    print(f"  {'host, not waiting':36s} {host:7.3f} s  {1e3 * host / max(len(recs), 1):6.3f} ms/step")
    print(f"  {'device idle (wall - step records)':36s} {wall - dev:7.3f} s")
    pre = [r for r in recs if r.phase == "prefill"]
    print("  prefill steps (tokens: ms): " + ", ".join(f"{r.num_tokens}: {r.latency_s * 1e3:.0f}" for r in pre))
    slow = sorted(recs, key=lambda r: -r.latency_s)[:5]
    print("  slowest steps: " + ", ".join(f"{r.phase} b={r.num_seqs} {r.latency_s * 1e3:.0f} ms" for r in slow))
    # Decode step time against batch size: the fixed per-step cost is what small batches pay.
    kv_tok = 2 * llm.config.arch.num_hidden_layers * llm.config.arch.num_key_value_heads * llm.config.arch.head_dim * 2
    print(f"  {'decode batch':>14s} {'steps':>6s} {'p50 ms':>7s} {'ctx/seq':>8s} {'KV GB/s':>8s} {'s total':>8s}")
    for lo, hi in ((1, 8), (9, 32), (33, 64), (65, 128), (129, 192), (193, 256), (257, 1 << 20)):
        rs = [r for r in recs if r.phase == "decode" and lo <= r.num_seqs <= hi]
        if rs:
            p50 = statistics.median(r.latency_s for r in rs)
            kv = sum(r.kv_tokens_read for r in rs) * kv_tok / sum(r.latency_s for r in rs) / 1e9
            ctx = sum(r.kv_tokens_read for r in rs) / sum(r.num_seqs for r in rs)
            print(f"  {lo:>6d}-{hi:<7d} {len(rs):6d} {p50 * 1e3:7.2f} {ctx:8.0f} {kv:8.0f} {sum(r.latency_s for r in rs):8.2f}")
    if a.cprofile:
        recs.clear()
        prompts, sps = requests(random.Random(0), a.seqs, a.max_out, llm.config.arch.vocab_size)
        prof = cProfile.Profile()
        prof.enable()
        llm.generate(prompts, sps, use_tqdm=False)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(30)
    llm.exit()


if __name__ == "__main__":
    main()
