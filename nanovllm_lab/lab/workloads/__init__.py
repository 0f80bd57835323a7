"""Workloads: what a run does with the engine. One registry (`WORKLOADS`), keys = `workload=` options.

- small / bench: random-token requests (nano-vLLM's bench; small is CPU-sized); output tok/s, TTFT, TPOT
- decode: fixed-batch decode steps per batch size     - prefill: prefill steps of given token counts
- generate: text prompts, prints the generations      - layer: one decoder layer per strategy (no engine)
- kernels: attention-kernel microbenchmarks against the measured copy bandwidth and matmul rate (GPU)
"""
from nanovllm_lab.lab.workloads.base import WORKLOADS, RunContext, Workload, WorkloadResult
from nanovllm_lab.lab.workloads import bench, decode, generate, kernels, layer, prefill  # noqa: F401  (register)

__all__ = ["WORKLOADS", "RunContext", "Workload", "WorkloadResult"]
