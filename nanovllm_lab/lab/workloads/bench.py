"""`bench` and `small`: random-token requests, all queued at once (nano-vLLM's bench).

bench: 256 requests, prompts U[100,1024] tokens of ids U[0,10000] (clipped to the vocabulary), outputs
U[100,1024] tokens with ignore_eos, temperature 0.6, seed 0, one warm-up generate; the headline is output
tokens/s. small: the same code path with CPU-sized numbers (the default workload).
"""
from __future__ import annotations

import random

from nanovllm_lab.lab.floor import memory_floor
from nanovllm_lab.lab.metrics import request_stats
from nanovllm_lab.lab.schemas import RequestsWorkloadSchema
from nanovllm_lab.lab.workloads.base import (WORKLOADS, RunContext, Workload, WorkloadResult, random_prompts,
                                             run_requests)
from nanovllm_lab.sampling_params import SamplingParams


@WORKLOADS.register("small")
@WORKLOADS.register("bench")
class RequestsWorkload(Workload):
    params: RequestsWorkloadSchema

    def check(self) -> None:
        p = self.params
        self.need(p.num_seqs >= 1, f"num_seqs must be >= 1, got {p.num_seqs}")
        self.need(1 <= p.min_input_len <= p.max_input_len, "need 1 <= min_input_len <= max_input_len")
        self.need(1 <= p.min_output_len <= p.max_output_len, "need 1 <= min_output_len <= max_output_len")
        self.need(p.max_token_id >= 0, "max_token_id must be >= 0")
        limit = self.settings.engine_kwargs["max_model_len"]
        total = p.max_input_len + p.max_output_len
        self.need(total <= limit, f"max_input_len + max_output_len = {total} exceeds max_model_len={limit}")

    def run(self, ctx: RunContext) -> WorkloadResult:
        p, llm = self.params, ctx.llm
        rng = random.Random(p.seed)
        max_id = min(p.max_token_id, llm.config.arch.vocab_size - 1)
        prompts = random_prompts(rng, p.num_seqs, p.min_input_len, p.max_input_len, max_id)
        params = [SamplingParams(temperature=p.temperature, ignore_eos=p.ignore_eos,
                                 max_tokens=rng.randint(p.min_output_len, p.max_output_len)) for _ in prompts]
        if p.warmup:
            # The same shapes as the timed run (long and short prompts in one prefill, then decode), so Triton's
            # and inductor's compilations for them happen here and not inside the timed run.
            warm = random_prompts(rng, 16, p.min_input_len, p.max_input_len, max_id)
            with ctx.warmup():
                run_requests(llm, warm, [SamplingParams(temperature=p.temperature, max_tokens=8)] * len(warm))
        bar = ctx.bar(len(prompts), f"{p.name} [{self.settings.strategy_name} tp{self.settings.tp}]")
        with ctx.timed():
            requests, _, elapsed = run_requests(llm, prompts, params, bar)
        bar.close()
        stats = request_stats(requests, elapsed)
        stats.update(self._floor(ctx, elapsed))
        return WorkloadResult(metrics=stats, throughput_tok_s=stats["output_tok_s"], requests=requests)

    def _floor(self, ctx: RunContext, elapsed: float) -> dict:
        """The memory-traffic floor (lab/floor.py), with the copy bandwidth measured now on this device."""
        llm = ctx.llm
        copy_gbs = None
        if llm.config.device.startswith("cuda"):
            from nanovllm_lab.kernels.bench import measure_copy_bandwidth
            copy_gbs = measure_copy_bandwidth(device=llm.model_runner.device)
        floor = memory_floor(ctx.recorder.frame(), llm.config.arch, llm.config.tensor_parallel_size,
                             llm.model_runner.dtype.itemsize, copy_gbs)
        floor["achieved_over_floor"] = floor["floor_s"] / elapsed if floor["floor_s"] and elapsed > 0 else None
        floor["between_steps_s"] = elapsed - floor["step_time_s"]  # scheduling, input building, Python
        return floor
