#!/usr/bin/env bash
# Strategy x tp x workload: each strategy end to end against blocking and the no-communication bound
# (none), at tp=1 and 2, on decode-bound and prefill-bound steps (40 jobs; qwen3-8b dummy weights).
# Preset: conf/experiment/strategy_matrix.yaml (its hydra.sweeper.params define the sweep). Extra arguments are Hydra
# overrides, e.g.  experiments/strategy_matrix.sh model=tiny results_dir=/tmp/try
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m nanovllm_lab.run -m +experiment=strategy_matrix "$@"
