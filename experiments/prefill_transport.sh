#!/usr/bin/env bash
# Prefill steps of 2048-16384 tokens at tp=2, replayed from CUDA graphs: blocking, none, none_mb (the split alone),
# async (NCCL on a side stream), async_ce (copy engines), async_rsag (sequence-parallel norms under micro-batches),
# rsag: how much communication each hides and how much compute it slows (qwen3-8b dummy weights).
# Preset: conf/experiment/prefill_transport.yaml. Extra arguments are Hydra overrides, e.g. trace=true.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python -m nanovllm_lab.run -m +experiment=prefill_transport "$@"
