"""The lab's command line: one Hydra app for runs, sweeps and experiment presets.

    python -m nanovllm_lab.run                                   # tiny model, small workload, blocking, tp=1
    python -m nanovllm_lab.run +strategy=overlap tp=2            # cpu + gloo here, cuda + NCCL on a GPU machine
    python -m nanovllm_lab.run -m +strategy=blocking,async,chunked,overlap tp=1,2
    python -m nanovllm_lab.run -m +experiment=bench_compare      # a preset study (experiments/README.md)
    python -m nanovllm_lab.run --cfg job +strategy=chunked       # print the composed config, run nothing

Results land in results/runs/<time>_<strategy>_tp<N>/ (a run) or results/sweeps/<time>_<tag>/<job>_.../
(a multirun); set results_dir=... to move them. A multirun exits 1 only if every job
failed (failed jobs leave error.json). Config lives in conf/ at the repository root (an editable install).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from nanovllm_lab.lab import schemas  # noqa: F401  (registers the config schemas before Hydra composes)
from nanovllm_lab.lab import exit_guard, runner


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def _app(cfg: DictConfig) -> None:
    runner.hydra_task(cfg)


def main() -> None:
    _app()
    code = 1 if runner.LAST_SWEEP.failed and not runner.LAST_SWEEP.ok else 0
    exit_guard.finish(code)  # results are on disk: bounded atexit handlers, no native teardown (exit_guard.py)


if __name__ == "__main__":
    main()
