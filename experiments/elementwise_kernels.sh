#!/usr/bin/env bash
# Elementwise kernels: prefill steps (from CUDA graphs) of qwen3-8b with the Triton SiLU-and-mul and q/k norm +
# RoPE kernels against the compiled PyTorch versions, one job each. Preset: conf/experiment/elementwise_kernels.yaml.
# Extra arguments are Hydra overrides, e.g.  experiments/elementwise_kernels.sh tp=2 strategy=blocking,none
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m nanovllm_lab.run -m +experiment=elementwise_kernels "$@"
