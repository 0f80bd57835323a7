"""Where a decode step's time goes: the bench workload, shortened, under torch.profiler.

    python3 scripts/profile_step.py [--model qwen3-0.6b] [--seqs 256] [--max-tokens 48] [--compile 0,1]
    python3 scripts/profile_step.py --decode-only 256,64,8 --compile 1   # decode steps alone, per batch size

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


def kernel_table(prof, n_steps: int, top: int) -> None:
    # Kernel records only: CPU ops also carry the device time of the kernels they launched (double counting).
    rows = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    rows.sort(key=lambda e: e.self_device_time_total, reverse=True)
    total = sum(e.self_device_time_total for e in rows)
    print(f"kernels: {total / n_steps:.1f} us of device time per step over {n_steps} profiled steps")
    for e in rows[:top]:
        print(f"{e.self_device_time_total / n_steps:9.1f} us/step {e.count / n_steps:7.1f} calls/step "
              f"{100 * e.self_device_time_total / max(total, 1):5.1f}%  {e.key[:110]}")


def decode_only(llm: LLM, seqs: int, steps: int, top: int) -> None:
    """Prefill `seqs` bench-shaped prompts, then time and profile `steps` decode steps at that batch."""
    from torch.profiler import ProfilerActivity, profile
    prompts, sps = workload(seqs, 2 * steps + 4, llm.config.arch.vocab_size)
    for p, sp in zip(prompts, sps):
        llm.add_request(p, sp)
    while llm.scheduler.waiting:
        llm.step()
    recs = []
    llm.model_runner.step_hooks.append(recs.append)
    t = time.perf_counter()
    for _ in range(steps):
        llm.step()
    wall = (time.perf_counter() - t) / steps * 1e3
    dev = statistics.median(r.latency_s for r in recs) * 1e3
    llm.model_runner.step_hooks.remove(recs.append)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            llm.step()
    print(f"\n### decode only: batch {seqs}, {steps} steps: wall {wall:.2f} ms/step, step record median {dev:.2f} ms")
    kernel_table(prof, steps, top)
    while not llm.is_finished():
        llm.step()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--compile", default="0,1")
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--decode-only", default="", help="batch sizes (e.g. 256,64,8): profile decode steps only")
    a = ap.parse_args()
    for comp in (bool(int(x)) for x in a.compile.split(",")):
        llm = LLM(a.model, max_model_len=4096, torch_compile=comp)
        llm.generate([[1, 2, 3]] * 8, SamplingParams(max_tokens=16), use_tqdm=False)
        if a.decode_only:
            print(f"\n## torch_compile={comp} model={a.model}")
            for b in (int(x) for x in a.decode_only.split(",")):
                decode_only(llm, b, 20, a.top)
            llm.exit()
            continue
        prompts, sps = workload(a.seqs, a.max_tokens, llm.config.arch.vocab_size)
        recs = []
        llm.model_runner.step_hooks.append(recs.append)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
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
        print("profiled: the whole generate (prefill kernels included), per decode step:")
        kernel_table(prof, max(1, sum(r.phase == "decode" for r in recs)), a.top)
        llm.exit()
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
