#!/usr/bin/env bash
# Overlap tuning: the fastest strategy per (phase, tokens) on this card, model and tp=2, from the engine's own
# decode and prefill steps, written at the sweep's end to results/tables/overlap.json, the table that
# +strategy=overlap strategy.table=results/tables/overlap.json reads.
# Preset: conf/experiment/overlap_tuning.yaml (its hydra.sweeper.params define the sweep). Extra arguments are Hydra
# overrides, e.g.  experiments/overlap_tuning.sh model=tiny results_dir=/tmp/try
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m nanovllm_lab.run -m +experiment=overlap_tuning "$@"
