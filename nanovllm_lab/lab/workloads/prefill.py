"""`prefill`: prefill steps of given token counts. Each count T becomes ceil(T / seq_len) fresh random
prompts (so the prefix cache never hits) with max_tokens=1: one prefill step of T tokens (several if T is
above max_num_batched_tokens). `warmup` untimed rounds per count (all counts' first), then `repeats` timed ones
per count. With `prefill_graphs`, a count's second round is captured and later ones replay.
"""
from __future__ import annotations

import random

from nanovllm_lab.lab.schemas import PrefillWorkloadSchema
from nanovllm_lab.lab.workloads.base import WORKLOADS, RunContext, Workload, WorkloadResult
from nanovllm_lab.sampling_params import SamplingParams


@WORKLOADS.register("prefill")
class PrefillWorkload(Workload):
    params: PrefillWorkloadSchema

    def check(self) -> None:
        p, kw = self.params, self.settings.engine_kwargs
        self.need(bool(p.tokens) and min(p.tokens) >= 1, "tokens must be a non-empty list of ints >= 1")
        self.need(p.repeats >= 1 and p.warmup >= 0, "need repeats >= 1 and warmup >= 0")
        self.need(1 <= p.seq_len < kw["max_model_len"], f"seq_len must be in [1, max_model_len={kw['max_model_len']})")
        most = max(-(-t // p.seq_len) for t in p.tokens)
        self.need(most <= kw["max_num_seqs"], f"{most} sequences per step exceed max_num_seqs={kw['max_num_seqs']}")

    def run(self, ctx: RunContext) -> WorkloadResult:
        p, llm = self.params, ctx.llm
        rng = random.Random(p.seed)
        max_id = llm.config.arch.vocab_size - 1
        sp = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
        bar = ctx.bar(len(p.tokens) * (p.warmup + p.repeats), f"prefill [{self.settings.strategy_name}]")

        def rounds(total: int, k: int) -> None:
            for _ in range(k):
                left = total
                while left > 0:
                    n = min(left, p.seq_len)
                    llm.add_request([rng.randint(0, max_id) for _ in range(n)], sp)
                    left -= n
                while not llm.is_finished():
                    llm.step()
                bar.update(1)

        # Every size's warm-up rounds before the timed (and traced) part: compiles, autotuning and, with
        # prefill_graphs, a shape's capture (its second sighting: warmup >= 2) stay out of the trace.
        ctx.recorder.warmup = True
        for total in p.tokens:
            rounds(total, p.warmup)
        ctx.recorder.warmup = False
        with ctx.timed():
            for total in p.tokens:
                rounds(total, p.repeats)
        bar.close()
        rows = [r for r in ctx.recorder.rows if r["phase"] == "prefill" and not r["warmup"]]
        secs = sum(r["latency_ms"] for r in rows) / 1e3
        tok_s = sum(r["num_tokens"] for r in rows) / secs if secs > 0 else None
        return WorkloadResult(metrics={"tokens": list(p.tokens), "seq_len": p.seq_len}, throughput_tok_s=tok_s)
