"""The workload interface, its registry and the request loop the request workloads share.

A workload gets a `RunContext` (the engine, the step recorder, untimed `warmup()` and timed `timed()`
sections) and returns a `WorkloadResult`. Registry keys equal the `workload=` option names.
"""
from __future__ import annotations

import random
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import pandas as pd
from tqdm.auto import tqdm

from nanovllm_lab.lab.metrics import StepRecorder
from nanovllm_lab.lab.schemas import WorkloadSchema
from nanovllm_lab.lab.settings import LabConfigError, RunSettings
from nanovllm_lab.utils.registry import Registry

if TYPE_CHECKING:
    from nanovllm_lab import LLM, SamplingParams


@dataclass
class WorkloadResult:
    metrics: dict[str, Any] = field(default_factory=dict)    # workload-specific summary entries
    throughput_tok_s: float | None = None                     # the headline number of this workload
    requests: pd.DataFrame | None = None                      # one row per request (request workloads)
    layer_rows: list[dict[str, Any]] | None = None            # the layer workload's rows


class RunContext:
    """What a workload runs with. `timed()` marks the measured part (profiled when trace=true)."""

    def __init__(self, settings: RunSettings, llm: "LLM | None", recorder: StepRecorder, run_dir: Path) -> None:
        self.settings = settings
        self.llm = llm
        self.recorder = recorder
        self.run_dir = run_dir
        self.measured_s = 0.0
        self.traced_steps: int | None = None
        self.trace_file: Path | None = None

    @contextmanager
    def warmup(self) -> Iterator[None]:
        self.recorder.warmup = True
        try:
            yield
        finally:
            self.recorder.warmup = False

    @contextmanager
    def timed(self) -> Iterator[None]:
        trace = self.settings.trace and self.trace_file is None  # one trace per run: the first timed section
        first_step = len(self.recorder)
        if trace:
            from nanovllm_lab.lab.trace import profile_to
            self.trace_file = self.run_dir / "profile.trace.json"
        with profile_to(self.trace_file) if trace else nullcontext():
            t0 = time.perf_counter()
            try:
                yield
            finally:  # the trace export (on leaving profile_to) is not measured time
                self.measured_s += time.perf_counter() - t0
        if trace:
            self.traced_steps = len(self.recorder) - first_step

    def bar(self, total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, dynamic_ncols=True, disable=not self.settings.progress, leave=False)


class Workload:
    """Subclasses set `needs_engine`, check their params in `check()` and implement `run()`."""

    needs_engine = True

    def __init__(self, params: WorkloadSchema, settings: RunSettings) -> None:
        self.params = params
        self.settings = settings
        self.check()

    def check(self) -> None:
        """Raise LabConfigError for parameters that cannot run (before any engine starts)."""

    def need(self, cond: bool, msg: str) -> None:
        if not cond:
            raise LabConfigError(f"workload {self.params.name!r}: {msg}")

    def run(self, ctx: RunContext) -> WorkloadResult:
        raise NotImplementedError


WORKLOADS: Registry[type[Workload]] = Registry("workload")


def random_prompts(rng: random.Random, n: int, lo: int, hi: int, max_id: int) -> list[list[int]]:
    """n prompts of U[lo, hi] random token ids in [0, max_id]."""
    return [[rng.randint(0, max_id) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def run_requests(llm: "LLM", prompts: list[list[int]] | list[str], params: list["SamplingParams"],
                 bar: tqdm | None = None) -> tuple[pd.DataFrame, list[list[int]], float]:
    """Queue every request at once, step until done; time each request's first token and finish.

    TTFT counts from queueing (an offline batch: queueing delay is part of it); TPOT is the mean gap between
    a request's later tokens. Returns the per-request table, the completion token ids in request order and
    the wall time from queueing to the last finish.
    """
    if any(isinstance(p, str) for p in prompts) and llm.tokenizer is None:
        raise LabConfigError(f"model {llm.config.model!r} has no tokenizer: text prompts cannot run")
    ids = [llm.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompts]
    t0 = time.perf_counter()
    seq_ids = [llm.add_request(p, sp) for p, sp in zip(ids, params)]
    order = {sid: i for i, sid in enumerate(seq_ids)}
    first: dict[int, float] = {}
    done: dict[int, float] = {}
    outputs: dict[int, list[int]] = {}
    while not llm.is_finished():
        finished, _ = llm.step()
        now = time.perf_counter()
        # The scheduler's running queue holds every prefilled, unfinished sequence: the new ones got their
        # first token in this step. (step() itself only reports finished sequences.)
        for seq in llm.scheduler.running:
            if seq.seq_id not in first and seq.num_completion_tokens > 0:
                first[seq.seq_id] = now
        for sid, toks in finished:
            first.setdefault(sid, now)
            done[sid], outputs[sid] = now, toks
            if bar is not None:
                bar.update(1)
    rows = []
    for sid in seq_ids:
        n_out = len(outputs[sid])
        ttft, e2e = first[sid] - t0, done[sid] - t0
        rows.append({"request": order[sid], "prompt_tokens": len(ids[order[sid]]),
                     "output_tokens": n_out, "ttft_ms": ttft * 1e3,
                     "tpot_ms": (e2e - ttft) / (n_out - 1) * 1e3 if n_out > 1 else float("nan"),
                     "e2e_ms": e2e * 1e3})
    return pd.DataFrame(rows), [outputs[sid] for sid in seq_ids], max(done.values()) - t0
