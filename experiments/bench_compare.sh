#!/usr/bin/env bash
# Bench comparison: nano-vLLM's benchmark (256 random requests, qwen3-8b, tp=2) under blocking,
# overlap and none: output tok/s of overlap against blocking and against the no-communication bound.
# Preset: conf/experiment/bench_compare.yaml (its hydra.sweeper.params define the sweep). Extra arguments are Hydra
# overrides, e.g.  experiments/bench_compare.sh model=tiny results_dir=/tmp/try
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m nanovllm_lab.run -m +experiment=bench_compare "$@"
