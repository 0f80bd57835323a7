#!/usr/bin/env bash
# On a GPU machine (2 GPUs for the tp=2 parts): GPU tests, the bench workload and a tp=2 layer sweep, with the
# card, versions and git SHA written beside the numbers. Outputs go to $OUT (the device tool) or results/gpu_out.
#   GIT_SHA=$(git rev-parse HEAD) bash scripts/gpu_run.sh
# Installs the wheelhouse from .whl/ (scripts/build_wheelhouse.sh) with --no-index when it is present; the
# engine itself needs nothing beyond the GPU image. Multicast stays off.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ] && [ "${INSTALL_WHEELS:-1}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
O=${OUT:-results/gpu_out}; mkdir -p "$O"
{ echo "git_sha=${GIT_SHA:-unknown}"; date -u; nvidia-smi -L
  python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'cuda',torch.version.cuda,'nccl',torch.cuda.nccl.version(),'triton',triton.__version__,'transformers',transformers.__version__)"
} > "$O/env.txt" 2>&1
cat "$O/env.txt"
ngpu=$(nvidia-smi -L | wc -l)
# 1. bench (nano-vLLM's workload, qwen3-0.6b, dummy bf16 weights) on the last GPU while the single-GPU tests run.
CUDA_VISIBLE_DEVICES=$((ngpu - 1)) timeout "${BENCH_S:-80}" python3 scripts/smoke_gpu.py --seqs 256 > "$O/bench.log" 2>&1 &
bench=$!
CUDA_VISIBLE_DEVICES=0 timeout "${TEST1_S:-80}" python3 -m pytest -m gpu -q -x tests/test_engine_gpu.py > "$O/tests_engine.log" 2>&1
wait $bench
tail -n 3 "$O/tests_engine.log"; grep RESULT "$O/bench.log" || tail -n 5 "$O/bench.log"
if [ "$ngpu" -ge 2 ]; then
  # 2. strategies over NCCL (eager and CUDA-graph decode), then 3. a qwen3-8b tp=2 layer sweep.
  timeout "${TEST2_S:-80}" python3 -m pytest -m gpu -q -x tests/test_strategies_gpu.py > "$O/tests_strategies.log" 2>&1
  tail -n 3 "$O/tests_strategies.log"
  timeout "${SWEEP_S:-60}" python3 -m nanovllm_lab.comm.layerbench --arch qwen3-8b --tp 2 --out "$O/layer_qwen3-8b_tp2.json" \
    > "$O/layer.log" 2>&1
  tail -n 30 "$O/layer.log"
fi
