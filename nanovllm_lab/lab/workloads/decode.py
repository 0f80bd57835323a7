"""`decode`: fixed-batch decode steps. For each batch size B, B sequences of `context_len` random tokens are
prefilled together and then decode together: `warmup_steps` untimed steps, then `steps` timed ones, every
step at exactly B sequences. The answer is decode-step latency against batch size (steps.parquet).
"""
from __future__ import annotations

import logging
import random

from nanovllm_lab.lab.schemas import DecodeWorkloadSchema
from nanovllm_lab.lab.workloads.base import WORKLOADS, RunContext, Workload, WorkloadResult, random_prompts
from nanovllm_lab.sampling_params import SamplingParams

log = logging.getLogger(__name__)


@WORKLOADS.register("decode")
class DecodeWorkload(Workload):
    params: DecodeWorkloadSchema

    def check(self) -> None:
        p, kw = self.params, self.settings.engine_kwargs
        self.need(bool(p.batch_sizes) and min(p.batch_sizes) >= 1, "batch_sizes must be a non-empty list of ints >= 1")
        self.need(p.context_len >= 1 and p.steps >= 1 and p.warmup_steps >= 0,
                  "need context_len >= 1, steps >= 1, warmup_steps >= 0")
        self.need(max(p.batch_sizes) <= kw["max_num_seqs"],
                  f"batch size {max(p.batch_sizes)} exceeds max_num_seqs={kw['max_num_seqs']} "
                  "(the batch would not be fixed)")
        need_len = p.context_len + p.warmup_steps + p.steps + 1
        self.need(need_len <= kw["max_model_len"],
                  f"context_len + warmup_steps + steps + 1 = {need_len} exceeds max_model_len={kw['max_model_len']}")

    def run(self, ctx: RunContext) -> WorkloadResult:
        p, llm = self.params, ctx.llm
        rng = random.Random(p.seed)
        max_id = llm.config.arch.vocab_size - 1
        # The prefill yields the first token; then warmup_steps + steps decode steps.
        sp = SamplingParams(temperature=0.0, max_tokens=p.warmup_steps + p.steps + 1, ignore_eos=True)
        bar = ctx.bar(len(p.batch_sizes) * (p.warmup_steps + p.steps), f"decode [{self.settings.strategy_name}]")
        preempted = llm.scheduler.num_preemptions
        with ctx.timed():
            for bs in p.batch_sizes:
                for prompt in random_prompts(rng, bs, p.context_len, p.context_len, max_id):
                    llm.add_request(prompt, sp)
                first = len(ctx.recorder.rows)
                while not llm.is_finished():
                    _, n = llm.step()
                    if n < 0:
                        bar.update(1)
                # Labelled from the records, not from the step calls: with overlapped decode a step's record
                # arrives one call later. The prefill and the first warmup_steps decode steps are warm-up.
                rows = ctx.recorder.rows[first:]
                decode_rows = [r for r in rows if r["phase"] == "decode"]
                for r in rows:
                    r["warmup"] = r["phase"] != "decode"
                for r in decode_rows[:p.warmup_steps]:
                    r["warmup"] = True
        bar.close()
        if llm.scheduler.num_preemptions > preempted:
            log.warning("decode: %d preemptions (KV cache too small): some steps ran below the batch size",
                        llm.scheduler.num_preemptions - preempted)
        decode = [r for r in ctx.recorder.rows if r["phase"] == "decode" and not r["warmup"]]
        secs = sum(r["latency_ms"] for r in decode) / 1e3
        tok_s = sum(r["num_tokens"] for r in decode) / secs if secs > 0 else None
        return WorkloadResult(metrics={"batch_sizes": list(p.batch_sizes), "context_len": p.context_len},
                              throughput_tok_s=tok_s)
