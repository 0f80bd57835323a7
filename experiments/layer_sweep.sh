#!/usr/bin/env bash
# Layer sweep: per decoder layer, exposed communication and overlap efficiency of each strategy by
# phase and token count, qwen3-8b and qwen3-32b at tp=2 (layer.parquet per job).
# Preset: conf/experiment/layer_sweep.yaml (its hydra.sweeper.params define the sweep). Extra arguments are Hydra
# overrides, e.g.  experiments/layer_sweep.sh model=tiny results_dir=/tmp/try
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m nanovllm_lab.run -m +experiment=layer_sweep "$@"
