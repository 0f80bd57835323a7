"""GPU smoke check: the engine on cuda with a given backend, CUDA graphs on, a shortened bench workload.

    python3 scripts/smoke_gpu.py [--backend triton|torch] [--model qwen3-0.6b] [--seqs 64]
Prints output tok/s. The real benchmark is the lab's `bench` workload; this is a quick sanity run.
"""
from __future__ import annotations

import argparse
import random
import time

import torch

from nanovllm_lab import LLM, SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=1024)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--strategy", default="blocking")
    ap.add_argument("--eager", action="store_true")
    a = ap.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, a.max_len))] for _ in range(a.seqs)]
    sps = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(100, a.max_len)) for _ in prompts]
    t0 = time.perf_counter()
    llm = LLM(a.model, attention_backend=a.backend, max_model_len=4096, tensor_parallel_size=a.tp,
              strategy=a.strategy, enforce_eager=a.eager)
    print(f"engine up in {time.perf_counter() - t0:.1f} s; backend {llm.config.attention_backend}; "
          f"{llm.model_runner.num_kvcache_blocks} KV blocks")
    llm.generate(["warm up"] if llm.tokenizer else [[1, 2, 3]], SamplingParams(max_tokens=8), use_tqdm=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    llm.generate(prompts, sps, use_tqdm=False)
    dt = time.perf_counter() - t
    n = sum(sp.max_tokens for sp in sps)
    print(f"RESULT model={a.model} tp={a.tp} strategy={a.strategy} backend={llm.config.attention_backend} "
          f"seqs={a.seqs} out_tokens={n} time={dt:.2f}s throughput={n / dt:.0f} tok/s")
    llm.exit()


if __name__ == "__main__":
    main()
