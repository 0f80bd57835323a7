#!/usr/bin/env bash
# TP scaling: the bench workload on qwen3-32b at tp=1,2,4,8 under blocking, overlap and none; throughput as a
# fraction of linear scaling, and overlap's gain over blocking per tp. Preset: conf/experiment/tp_scaling.yaml.
# Extra arguments are Hydra overrides, e.g.  experiments/tp_scaling.sh tp=1,2,4   (a 4-GPU machine)
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m nanovllm_lab.run -m +experiment=tp_scaling "$@"
