"""The lab: the Hydra front end around the engine (`python -m nanovllm_lab.run`), its results store and reports.

- `schemas`: typed dataclass schemas of every config group, registered in Hydra's ConfigStore.
- `settings`: a composed config -> validated, resolved `RunSettings` (the engine's kwargs and strategy dict).
- `workloads/`: what a run does with the engine (small, bench, decode, prefill, generate, layer); one registry.
- `runner`: one job: build the engine, run the workload, write the run directory; the sweep-end callback.
- `results`: the on-disk layout of a run directory (atomic writes) and loaders for notebooks and reports.
- `metrics`, `env`, `trace`, `loggers`, `console`: step statistics, environment capture, profiler traces and
  their overlap analysis, wandb, console tables.
- `compare`, `plots`: the side-by-side report (`python -m nanovllm_lab.report`) and the figures it shares with
  wandb and the notebooks.
- `testing`: compose/run helpers for the tests.

The engine never sees a DictConfig: Hydra composes once, here, and the engine gets plain values.
"""
