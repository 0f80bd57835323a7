"""`kernels`: kernel microbenchmarks against the card's own ceilings, measured in the same run.

Decode attention (memory bound) as achieved GB/s over the measured device-to-device copy bandwidth, per batch
x context; prefill attention (compute bound, causal, head dim 128, GQA 32/8) as TFLOP/s over the measured bf16
matmul rate, per token count; SiLU-and-mul and the q/k norm + RoPE (the Triton kernels and the compiled PyTorch
versions they replace) as GB/s over the copy bandwidth, per token count x width. Timing: `triton.testing.do_bench`
medians (decode attention and the elementwise kernels replayed from a CUDA graph). Needs CUDA; no engine starts.
"""
from __future__ import annotations

from typing import Any

from nanovllm_lab.lab.schemas import KernelsWorkloadSchema
from nanovllm_lab.lab.workloads.base import WORKLOADS, RunContext, Workload, WorkloadResult


@WORKLOADS.register("kernels")
class KernelsWorkload(Workload):
    params: KernelsWorkloadSchema
    needs_engine = False

    def check(self) -> None:
        p = self.params
        self.need(self.settings.device.startswith("cuda") or self.settings.device == "auto",
                  "the kernels workload needs a CUDA device")
        self.need(bool(p.decode_batches) and bool(p.decode_contexts) and min(p.decode_batches + p.decode_contexts) >= 1,
                  "decode_batches and decode_contexts must be non-empty lists of ints >= 1")
        self.need(all(t >= 2 for t in p.prefill_tokens), "prefill_tokens must be ints >= 2")
        self.need(min(p.activation_tokens + p.activation_cols, default=1) >= 1,
                  "activation_tokens and activation_cols must be ints >= 1")

    def run(self, ctx: RunContext) -> WorkloadResult:
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("the kernels workload needs a CUDA device; this machine has none")
        from nanovllm_lab.kernels import bench
        p = self.params
        rows: list[dict[str, Any]] = []
        with ctx.timed():
            copy_gbs = bench.measure_copy_bandwidth()
            mm_tflops = bench.measure_matmul_tflops()
            for b in p.decode_batches:
                for c in p.decode_contexts:
                    r = bench.bench_decode(b, c, block_size=p.block_size)
                    rows.append({"kernel": "decode", **r, "of_ceiling": r["gb_per_s"] / copy_gbs})
            for t in p.prefill_tokens:
                r = bench.bench_prefill(t, num_seqs=1, head_dim=128)
                rows.append({"kernel": "prefill", **r, "of_ceiling": r["tflop_per_s"] / mm_tflops})
            for c in p.activation_cols:
                for t in p.activation_tokens:
                    for impl in ("triton", "compiled"):
                        r = bench.bench_activation(t, c, impl)
                        rows.append({"kernel": "silu_mul", **r, "of_ceiling": r["gb_per_s"] / copy_gbs})
            for t in p.activation_tokens:  # qwen3-8b's heads at tp=2 (16 q, 4 kv) and tp=1 (32, 8)
                for heads in ((16, 4), (32, 8)):
                    for impl in ("triton", "compiled"):
                        r = bench.bench_qk_norm_rope(t, *heads, impl=impl)
                        rows.append({"kernel": "qk_norm_rope", **r, "of_ceiling": r["gb_per_s"] / copy_gbs})
        for r in rows:
            if r["kernel"] == "decode":
                what = f"B={r['batch']:4d} ctx={r['context']:5d} {r['gb_per_s']:7.0f} GB/s"
            elif r["kernel"] in ("silu_mul", "qk_norm_rope"):
                what = f"{r['impl']:8s} tokens={r['tokens']:6d} I={r['cols']:5d} {r['gb_per_s']:7.0f} GB/s"
            else:
                what = f"tokens={r['tokens']:6d} {r['tflop_per_s']:6.1f} TFLOP/s"
            print(f"{r['kernel']:8s} {what}  {100 * r['of_ceiling']:5.1f}% of ceiling")
        metrics = {"copy_bandwidth_gbs": copy_gbs, "matmul_tflops": mm_tflops, "kernel_rows": rows}
        return WorkloadResult(metrics=metrics)
