"""Where a decode step's time goes: the bench workload, shortened, under torch.profiler.

    python3 scripts/profile_step.py [--model qwen3-0.6b] [--seqs 256] [--max-tokens 48] [--compile 0,1] [--out DIR]

For each setting it runs the workload once untraced (output tok/s, mean decode-step device time from the
engine's own CUDA-event step records, wall time per step) and once under torch.profiler, then prints the
kernels that took the most device time, per decode step. The gap between wall time per step and device
time per step is host time the GPU waits for; the kernel table shows what the device time is made of.
"""
from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from nanovllm_lab import LLM, SamplingParams


def workload(seqs: int, max_tokens: int, vocab: int) -> tuple[list[list[int]], list[SamplingParams]]:
    rng = random.Random(0)
    prompts = [[rng.randint(0, min(10000, vocab - 1)) for _ in range(rng.randint(100, 1024))] for _ in range(seqs)]
    sps = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=max_tokens) for _ in prompts]
    return prompts, sps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--compile", default="0,1")
    ap.add_argument("--top", type=int, default=22)
    a = ap.parse_args()
    for comp in (bool(int(x)) for x in a.compile.split(",")):
        llm = LLM(a.model, max_model_len=4096, torch_compile=comp)
        prompts, sps = workload(a.seqs, a.max_tokens, llm.config.arch.vocab_size)
        recs = []
        llm.model_runner.step_hooks.append(recs.append)
        llm.generate([[1, 2, 3]] * 8, SamplingParams(max_tokens=16), use_tqdm=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        recs.clear()
        t = time.perf_counter()
        llm.generate(prompts, sps, use_tqdm=False)
        wall = time.perf_counter() - t
        dec = [r for r in recs if r.phase == "decode"]
        pre = [r for r in recs if r.phase == "prefill"]
        dec_dev = statistics.median(r.latency_s for r in dec) * 1e3
        print(f"\n### torch_compile={comp} model={a.model} seqs={a.seqs} max_tokens={a.max_tokens}")
        print(f"wall {wall:.2f} s, {a.seqs * a.max_tokens / wall:.0f} out tok/s; {len(pre)} prefill steps "
              f"(device {sum(r.latency_s for r in pre):.2f} s), {len(dec)} decode steps "
              f"(device median {dec_dev:.2f} ms, sum {sum(r.latency_s for r in dec):.2f} s, "
              f"graph {sum(r.cuda_graph for r in dec)}/{len(dec)})")
        from torch.profiler import ProfilerActivity, profile
        recs.clear()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, sps, use_tqdm=False)
        n_dec = max(1, sum(r.phase == "decode" for r in recs))
        print(f"profiled: {n_dec} decode steps; kernels by device time (us per decode step = total / steps):")
        # Kernel records only: CPU ops also carry the device time of the kernels they launched (double counting).
        rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
        total = sum(e.self_device_time_total for e in rows)
        print(f"total device time {total / 1e6:.2f} s over the profiled generate")
        for e in rows[: a.top]:
            print(f"{e.self_device_time_total / n_dec:9.1f} us/step {e.count / n_dec:7.1f} calls/step "
                  f"{100 * e.self_device_time_total / max(total, 1):5.1f}%  {e.key[:110]}")
        llm.exit()
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
