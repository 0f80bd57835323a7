"""Replay the bench workload's schedule on the CPU, with no model: the memory-traffic floor of that exact step
sequence, and the host time per step spent in the scheduler and input preparation.

    python scripts/replay_bench_schedule.py [--copy-gbs 4250] [--elapsed 13.91]

The requests are those of scripts/smoke_gpu.py --seqs 256 (nano-vLLM's bench: random.Random(0), prompt lengths
U[100,1024], max_tokens U[100,1024]); KV blocks and limits as in the 2 x H200 run (4447 blocks of 256).
"""
from __future__ import annotations

import argparse
import random
import time

import pandas as pd

from nanovllm_lab.engine.inputs import prepare_decode, prepare_prefill
from nanovllm_lab.engine.scheduler import Scheduler
from nanovllm_lab.engine.sequence import Sequence
from nanovllm_lab.lab.floor import memory_floor
from nanovllm_lab.models.arch import BUILTIN_ARCHS
from nanovllm_lab.sampling_params import SamplingParams


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--copy-gbs", type=float, default=4250.0, help="copy bandwidth measured on the card")
    ap.add_argument("--elapsed", type=float, default=None, help="measured bench time, for achieved/floor")
    ap.add_argument("--blocks", type=int, default=4447)
    a = ap.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randint(0, 10000) for _ in range(rng.randint(100, 1024))] for _ in range(256)]
    sps = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=rng.randint(100, 1024)) for _ in prompts]
    sch = Scheduler(512, 16384, set(), a.blocks, 256)
    for p, sp in zip(prompts, sps):
        sch.add(Sequence(p, sp, 256))
    rows, host = [], {"schedule": 0.0, "prepare": 0.0, "postprocess": 0.0}
    while not sch.is_finished():
        t0 = time.perf_counter()
        seqs, pre = sch.schedule()
        t1 = time.perf_counter()
        st = prepare_prefill(seqs, 256) if pre else prepare_decode(seqs, 256)
        t2 = time.perf_counter()
        done = [not pre or s.num_cached_tokens + s.num_scheduled_tokens == s.num_tokens for s in seqs]
        sch.postprocess(seqs, [1 if d else None for d in done])
        t3 = time.perf_counter()
        if not pre:
            host["schedule"] += t1 - t0
            host["prepare"] += t2 - t1
            host["postprocess"] += t3 - t2
        rows.append({"phase": "prefill" if pre else "decode", "num_seqs": len(seqs), "num_tokens": st.num_tokens,
                     "kv_tokens_read": st.kv_tokens_read, "warmup": False})
    df = pd.DataFrame(rows)
    f = memory_floor(df, BUILTIN_ARCHS["qwen3-0.6b"], 1, 2, a.copy_gbs)
    n_dec = int((df.phase == "decode").sum())
    print(f"steps {len(df)} (decode {n_dec}), preemptions {sch.num_preemptions}, output tokens "
          f"{sum(sp.max_tokens for sp in sps)}")
    print(f"floor: {f['floor_bytes_per_rank'] / 1e12:.2f} TB -> {f['floor_s']:.2f} s at {a.copy_gbs:.0f} GB/s")
    if a.elapsed:
        print(f"achieved/floor = {f['floor_s'] / a.elapsed:.2f} (measured {a.elapsed:.2f} s)")
    print("host ms per decode step: " + ", ".join(f"{k} {v / n_dec * 1e3:.3f}" for k, v in host.items()))


if __name__ == "__main__":
    main()
