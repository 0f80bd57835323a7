"""`layer`: one decoder layer of an architecture timed per strategy x phase x token count by
`nanovllm_lab.comm.layerbench.layer_sweep`, which also measures T_blocking, T_none and T_comm, so every row
carries its exposed communication and overlap efficiency. No engine starts here: layer_sweep spawns its
own `tp` ranks. With `write_table`, the rows become the `overlap` strategy's table.
"""
from __future__ import annotations

import logging
import math
from collections import defaultdict
from typing import Any

from nanovllm_lab.lab.schemas import LayerWorkloadSchema
from nanovllm_lab.lab.workloads.base import WORKLOADS, RunContext, Workload, WorkloadResult

log = logging.getLogger(__name__)
_PHASES = ("decode", "prefill")


def _median(xs: list[float]) -> float | None:
    xs = sorted(x for x in xs if x is not None and math.isfinite(x))
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


@WORKLOADS.register("layer")
class LayerWorkload(Workload):
    params: LayerWorkloadSchema
    needs_engine = False

    @property
    def arch(self) -> str:
        return self.params.arch or self.settings.model

    def check(self) -> None:
        p = self.params
        self.need(bool(p.strategies), "strategies must be a non-empty list")
        self.need(bool(p.tokens) and min(p.tokens) >= 1, "tokens must be a non-empty list of ints >= 1")
        self.need(bool(p.phases) and set(p.phases) <= set(_PHASES), f"phases must be a subset of {list(_PHASES)}")
        self.need(p.repeats >= 1, "repeats must be >= 1")

    def run(self, ctx: RunContext) -> WorkloadResult:
        from nanovllm_lab.comm.layerbench import layer_sweep  # written alongside the strategies; heavy
        p = self.params
        with ctx.timed():
            rows = layer_sweep(self.arch, self.settings.tp, list(p.strategies), list(p.tokens), list(p.phases),
                               p.repeats, self.settings.device, prefill_graph=p.prefill_graph,
                               torch_compile=self.settings.engine_kwargs.get("torch_compile"),
                               elementwise_kernels=self.settings.engine_kwargs.get("elementwise_kernels"))
        rows = [dict(r) for r in rows]
        metrics: dict[str, Any] = {"arch": self.arch, "num_layer_rows": len(rows)}
        by_strategy: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r.get("unit", "layer") != "layer":  # row_linear rows isolate one GEMM: not the layer's number
                continue
            for key in ("exposed_comm_ms", "overlap_efficiency", "compute_interference"):
                by_strategy[r["strategy"]][key].append(r.get(key))
        # Medians over all shapes: a one-line view; the per-shape rows are what to read.
        metrics["layer_medians"] = {s: {k: _median(v) for k, v in d.items()} for s, d in by_strategy.items()}
        if p.write_table:
            import torch
            from nanovllm_lab.comm.overlap_write import write_table
            # On a GPU the entry is pinned to this card: timings from one card do not transfer to another.
            card = torch.cuda.get_device_name(0) if self.settings.device.startswith("cuda") else None
            write_table(rows, p.write_table, card=card)
            metrics["overlap_table"] = str(p.write_table)
            log.info("overlap table written to %s", p.write_table)
        return WorkloadResult(metrics=metrics, layer_rows=rows)
