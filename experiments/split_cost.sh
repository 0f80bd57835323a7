#!/usr/bin/env bash
# Split cost: none and none_mb on prefill steps (from CUDA graphs) of qwen3-8b, rank 0 of the tp=2 shard alone on
# one GPU (single_rank=true). none_mb - none is what the micro-batch split costs by itself. Preset:
# conf/experiment/split_cost.yaml. Extra arguments are Hydra overrides, e.g.  experiments/split_cost.sh tp=4
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m nanovllm_lab.run -m +experiment=split_cost "$@"
