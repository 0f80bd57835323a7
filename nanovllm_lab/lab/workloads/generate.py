"""`generate`: text prompts through the request loop; prints each generation (none for the `none`
strategy, whose outputs are wrong by design) and stores the texts in requests.parquet."""
from __future__ import annotations

from nanovllm_lab.lab.metrics import request_stats
from nanovllm_lab.lab.schemas import GenerateWorkloadSchema
from nanovllm_lab.lab.workloads.base import WORKLOADS, RunContext, Workload, WorkloadResult, run_requests
from nanovllm_lab.sampling_params import SamplingParams


@WORKLOADS.register("generate")
class GenerateWorkload(Workload):
    params: GenerateWorkloadSchema

    def check(self) -> None:
        p = self.params
        self.need(bool(p.prompts) and all(p.prompts), "prompts must be a non-empty list of non-empty strings")
        self.need(p.max_tokens >= 1 and p.temperature >= 0, "need max_tokens >= 1 and temperature >= 0")

    def run(self, ctx: RunContext) -> WorkloadResult:
        p, llm = self.params, ctx.llm
        sp = SamplingParams(temperature=p.temperature, max_tokens=p.max_tokens, ignore_eos=p.ignore_eos)
        bar = ctx.bar(len(p.prompts), "generate")
        with ctx.timed():
            requests, outputs, elapsed = run_requests(llm, list(p.prompts), [sp] * len(p.prompts), bar)
        bar.close()
        texts = [llm.tokenizer.decode(toks) if llm.valid_outputs and llm.tokenizer is not None else None
                 for toks in outputs]
        requests["prompt"] = list(p.prompts)
        requests["text"] = texts
        invalid = f"<no text: strategy {self.settings.strategy_name!r} gives invalid outputs>"
        for prompt, text in zip(p.prompts, texts):
            shown = text if text is not None else invalid
            print(f"Prompt: {prompt!r}\nGeneration: {shown!r}\n")
        stats = request_stats(requests, elapsed)
        return WorkloadResult(metrics=stats, throughput_tok_s=stats["output_tok_s"], requests=requests)
