"""`step_sweep`: whole engine steps timed per strategy through `ModelRunner.step_hooks`, one engine each, with
T_blocking and T_none from the same call (the lab's `decode` and `prefill` workloads time steps the same way)."""
from __future__ import annotations

import json
import math
from typing import Any

import torch

from nanovllm_lab.comm.layerbench import _quantile, _spec_name_params, efficiency


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
