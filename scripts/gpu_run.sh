#!/usr/bin/env bash
# On a GPU machine: GPU tests and the lab's benchmarks, with the card, versions and git SHA beside the numbers.
#   GIT_SHA=$(git rev-parse HEAD) bash scripts/gpu_run.sh [tests] [bench] [kernels] [layer] [steps|decode|prefill] [prefill_graph]
#                                                         [symm_large] [two_shot] [ce] [lamport_pps] [prefetch] [trace] [trace_prefill] [scaling]  (MODEL=qwen3-32b: tp>1 ones)
#                                                         [split_cost]  (one GPU: rank 0 of tp=$TP alone, single_rank=true)
#   (default: tests bench kernels layer steps; `scaling` is the tp=1..N study of conf/experiment/tp_scaling.yaml)
#   TEST_FILES / TESTS_K pick test files / a pytest -k expression; BENCH_STRATEGIES the tp>1 bench strategies and
#   BENCH_ARGS more overrides for it (e.g. "elementwise_kernels=torch,triton");
#   MODEL and TP the model and tensor-parallel size of the tp>1 stages (default qwen3-8b, 2); STEP_STRATEGIES the
#   decode/prefill sweeps' strategies and STEP_ARGS extra overrides for them (e.g. "workload.batch_sizes=[192,256]");
#   SCALING_TP and SCALING_STRATEGIES the scaling stage's sweep.
# Outputs go to $OUT (the device tool) or results/gpu_out; lab runs write their own directories under it.
# Installs .whl/ (scripts/build_wheelhouse.sh: hydra, omegaconf, wandb...) with --no-index into /tmp/site,
# never touching the image's torch. Each stage is time-boxed (STAGE_S seconds, default 300; each GPU test file TESTS_S,
# default 150, the strategy tests 540): one device call runs at most 10 minutes, so give it one or two stages. Multicast stays off.
set -uo pipefail
cd "$(dirname "$0")/.."
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d .whl ] && [ "${INSTALL_WHEELS:-1}" = 1 ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
O=${OUT:-results/gpu_out}; mkdir -p "$O"
S=${STAGE_S:-300}
stages=${*:-tests bench kernels layer steps}
{ echo "git_sha=${GIT_SHA:-unknown}"; date -u; nvidia-smi -L
  python3 -c "import torch,triton,transformers;print('torch',torch.__version__,'cuda',torch.version.cuda,'nccl',torch.cuda.nccl.version(),'triton',triton.__version__,'transformers',transformers.__version__)"
} > "$O/env.txt" 2>&1
cat "$O/env.txt"
ngpu=$(nvidia-smi -L | wc -l)
# HANG_DUMP_S=N: every Python process dumps its stacks to its stderr every N s (scripts/hang_dump), so a stage
# that stalls inside its box leaves evidence of where. Not for benchmark stages: a dump segfaulted a compiling lab process.
[ -n "${HANG_DUMP_S:-}" ] && export PYTHONPATH=$PYTHONPATH:$PWD/scripts/hang_dump
M=${MODEL:-qwen3-8b}   # the model of the tp>1 stages (qwen3-32b fits 2 x H200 too)
TP=${TP:-2}            # their tensor-parallel size (TP=4 on a 4-GPU machine: issue 6)
# The step sweeps' strategies, in run order: the references and the likely winners first, so that a sweep cut by
# its box still has them.
# (qwen3-32b: about 70 s per strategy, so a 300 s box holds four.)
STEP_STRATEGIES=${STEP_STRATEGIES:-blocking,none,lamport_norm,symm_norm,overlap,async_ce,async_tp,symm,rsag,async_rsag,chunked,async}
alone() { [[ " ${STEP_ARGS:-} " == *" single_rank=true "* ]]; }  # STEP_ARGS runs rank 0 alone (none, none_mb only)
fits() { [ "$ngpu" -ge "$TP" ] || alone; }  # enough GPUs for tp=$TP, or one will do
lab() {  # the whole output to $O/<stage>.log, its tail to the console; a stage's exit time is logged too
  local t0=$SECONDS; timeout "$S" python3 -m nanovllm_lab.run "$@" results_dir="$O/lab" progress=false \
    > "$O/$stage.log" 2>&1; local rc=$?
  tail -n 30 "$O/$stage.log"; echo "$stage: rc=$rc after $((SECONDS - t0)) s (124: the box)" | tee -a "$O/$stage.log"; }
decode_vs_refs() {  # decode steps at batch sizes $1: the reference strategies $2 (as <stage>_refs; skipped unless
  # $3 is 1, e.g. when `decode` ran in the same call), then the swept run whose overrides follow
  local B="workload.batch_sizes=$1" refs=$2 run_refs=$3; shift 3
  [ "$run_refs" = 1 ] && stage=${stage}_refs lab -m workload=decode model=$M tp=$TP "$B" +strategy=$refs
  lab -m workload=decode model=$M tp=$TP "$B" "$@"; }
for stage in $stages; do
  echo "== $stage"
  case $stage in
    tests)   # one file at a time, each boxed, so one stuck file cannot hide the others' results
             for f in ${TEST_FILES:-tests/test_triton_gpu.py tests/test_engine_gpu.py tests/test_strategies_gpu.py \
                      tests/test_distributed_gpu.py tests/test_flash_attn_backend.py}; do
               box=${TESTS_S:-150}; [ "$f" = tests/test_strategies_gpu.py ] && box=${TESTS_S:-570}  # ~30 tp=2 engines, one process each
               [ "$f" = tests/test_engine_gpu.py ] && box=${TESTS_S:-240}  # 4 compiled engines: 170 s cut the 4th (session 14)
               timeout "$box" python3 -m pytest -m gpu -v --tb=short --durations=12 -p no:cacheprovider \
                 ${TESTS_K:+-k "$TESTS_K"} "$f" \
                 > "$O/tests_$(basename "$f" .py).log" 2>&1
               echo "$f rc=$?"; grep -E "passed|failed|FAILED" "$O/tests_$(basename "$f" .py).log" | tail -n 8
             done ;;
    bench)   # One GPU: issue 3's headline (qwen3-0.6b), overlapped decode off/on. Two or more: issue 4's (qwen3-8b,
             # tp=2) for blocking, overlap and none, whose report gives overlap efficiency end to end.
             # BENCH_TABLE=path: then overlap again with that table (a candidate table against the shipped one).
             # BENCH_ARGS: more overrides, e.g. "elementwise_kernels=torch,triton" (a variant per setting in the report)
             if [ "$ngpu" -ge 2 ]; then lab -m workload=bench model=$M tp=$TP +strategy=${BENCH_STRATEGIES:-blocking,overlap,none} ${BENCH_ARGS:-}
               [ -n "${BENCH_TABLE:-}" ] && stage=bench_table lab workload=bench model=$M tp=$TP +strategy=overlap \
                 strategy.table=$BENCH_TABLE
             else lab -m workload=bench model=qwen3-0.6b tp=1 async_scheduling=false,true; fi ;;
    kernels) lab workload=kernels ;;
    elementwise)  # the Triton elementwise kernels (SiLU-and-mul, q/k norm + RoPE; elementwise_kernels=triton)
             # against compiled PyTorch end to end, prefill steps from graphs and decode steps, each a multirun
             # over the two (ATP: the tensor-parallel size, default 1, so one GPU will do)
             stage=elementwise_prefill lab -m workload=prefill model=$M tp=${ATP:-1} prefill_graphs=4 workload.warmup=2 \
               "workload.tokens=${PG_TOKENS:-[2048,8192,16384]}" elementwise_kernels=torch,triton
             stage=elementwise_decode lab -m workload=decode model=$M tp=${ATP:-1} elementwise_kernels=torch,triton ;;
    layer)   [ "$ngpu" -ge 2 ] && lab -m workload=layer model=qwen3-8b,qwen3-32b tp=$([ "$ngpu" -ge 4 ] && echo 2,4 || echo 2) ;;
    steps)   [ "$ngpu" -ge 2 ] && lab -m workload=decode,prefill model=$M tp=$TP +strategy=$STEP_STRATEGIES ;;
    decode|prefill)  # the two halves of `steps`, each fits one device call
             [ "$ngpu" -ge 2 ] && lab -m workload=$stage model=$M tp=$TP +strategy=$STEP_STRATEGIES ${STEP_ARGS:-} ;;
    prefill_graph)  # prefill steps replayed from CUDA graphs (GPU-paced: eager steps below 16384 tokens are
             # host-paced, LOG session 10), each shape captured in its second warm-up round
             # PG_EXTRA: one more multirun at the same sizes, e.g. a strategy's parameter sweep
             # ("+strategy=async_rsag_ce strategy.norm_programs=16,64"), in the same call as its references
             [ "$ngpu" -ge 2 ] && { lab -m workload=prefill model=$M tp=$TP prefill_graphs=4 workload.warmup=2 \
               "workload.tokens=${PG_TOKENS:-[2048,8192,16384]}" +strategy=${PG_STRATEGIES:-blocking,none,none_mb,async_ce,async_rsag_ce,symm_norm,async_rsag} ${STEP_ARGS:-}
               [ -n "${PG_EXTRA:-}" ] && stage=prefill_graph_extra lab -m workload=prefill model=$M tp=$TP prefill_graphs=4 \
                 workload.warmup=2 "workload.tokens=${PG_TOKENS:-[2048,8192,16384]}" $PG_EXTRA; } ;;
    split_cost)  # one rank's compute at tp=$TP on one GPU (single_rank=true: rank 0 alone, no peers): none and
             # none_mb on prefill steps from graphs. none_mb - none is the micro-batch split's own cost, which caps
             # what any micro-batching strategy can hide (the none_mb ceiling). SR_ARGS: more overrides, e.g.
             # "elementwise_kernels=torch,triton"; SR_STRATEGIES=none_mb with SR_ARGS="strategy.micro_batches=3"
             # for none_mb's parameters (a parameter cannot sweep beside `none`, which lacks it).
             lab -m workload=prefill model=$M tp=$TP single_rank=true prefill_graphs=4 workload.warmup=2 \
               "workload.tokens=${PG_TOKENS:-[2048,8192,16384]}" +strategy=${SR_STRATEGIES:-none,none_mb} ${SR_ARGS:-} ;;
    symm_large)  # symm_norm fused up to 16384 tokens per step, for prefill: at tp=2 a one-shot read moves the same
             # bytes as NCCL's ring (1x the partial sum per rank), and fusing the residual add + RMSNorm saves a pass
             # over the activations. Prefill steps and bench in one multirun; run it in the call that runs
             # `prefill` and `bench`, and compare with those (python -m nanovllm_lab.report DIR1 DIR2 ...).
             [ "$ngpu" -ge 2 ] && lab -m workload=prefill,bench model=$M tp=$TP +strategy=symm_norm strategy.max_tokens=16384 ;;
    two_shot)  # symm_norm's two-shot mode (shots=2: ring bytes, two barriers) against one-shot and the references,
             # at decode: one-shot lost its edge at batch >= 128 at tp=4 (session 6). Two multiruns (a strategy
             # parameter cannot sweep alongside strategies that lack it).
             [ "$ngpu" -ge 2 ] && { stage=two_shot_refs lab -m workload=decode model=$M tp=$TP +strategy=blocking,none,symm
               stage=two_shot lab -m workload=decode model=$M tp=$TP +strategy=symm_norm strategy.shots=2,1; } ;;
    ce)      # async_ce (micro-batches whose reductions the copy engines move: no SMs taken from the GEMMs) against
             # the references, none_mb (the split alone), async_tp (GEMM-fused scatter/gather) and async (NCCL), prefill steps of 2048-16384 tokens
             # (16384: the bench's prefill steps), then symm_norm fused at those sizes. Two multiruns (max_tokens is symm_norm's alone).
             [ "$ngpu" -ge 2 ] && { stage=ce lab -m workload=prefill model=$M tp=$TP "workload.tokens=[2048,8192,16384]" \
                 +strategy=${CE_STRATEGIES:-blocking,none,none_mb,async_ce,async_tp,async}
               [ -n "${CE_MB:-}" ] && stage=ce_mb lab -m workload=prefill model=$M tp=$TP "workload.tokens=[2048,8192,16384]" \
                 +strategy=async_ce strategy.micro_batches=$CE_MB  # CE_MB=3,4: more, smaller micro-batches
               [ "${CE_SYMM_LARGE:-1}" = 1 ] && stage=ce_symm_large lab -m workload=prefill model=$M tp=$TP "workload.tokens=[2048,8192,16384]" \
                 +strategy=symm_norm strategy.max_tokens=16384; } ;;
    lamport_pps)  # lamport_norm with 1, 2, 4 kernel programs per SM at decode (it lost to symm_norm at batch 512 with
             # one program per SM, session 8), after blocking, none and symm_norm at the same batches in the same call
             # (PPS_REFS=0 skips them when `decode` ran in the call). 192: the bench's batches 129-256. Two boxed
             # multiruns: up to 2 x STAGE_S (session 9: STAGE_S=150 cut symm_norm's reference run).
             [ "$ngpu" -ge 2 ] && decode_vs_refs "[128,192,256,512]" blocking,none,symm_norm "${PPS_REFS:-1}" \
               +strategy=lamport_norm strategy.programs_per_sm=1,2,4 ;;
    prefetch)  # lamport_norm (4 programs per SM) with its kernel asking L2 for the next GEMM's weight while it
             # waits (prefetch_mib 0 = off, 16, 32), after blocking and none at the same batches (PF_REFS=0 skips
             # them). Decode steps are bound by weight reads, so the wait could be spent on the next GEMM's.
             [ "$ngpu" -ge 2 ] && decode_vs_refs "${PF_BATCHES:-[1,32,128,192,256,512]}" blocking,none "${PF_REFS:-1}" \
               +strategy=lamport_norm strategy.programs_per_sm=4 strategy.prefetch_mib=${PF_MIB:-0,16,32} ;;
    trace)   # profiler traces of decode steps (trace evidence for the overlap analysis): blocking vs overlap
             # (TRACE_STRATEGIES / TRACE_BATCHES narrow it; TP=1 runs on one GPU: where a decode step's time goes)
             # STEP_ARGS adds overrides ("single_rank=true": rank 0 alone, none and none_mb by default)
             fits && lab -m workload=decode model=$M tp=$TP trace=true workload.steps=8 \
               "workload.batch_sizes=${TRACE_BATCHES:-[8,128]}" \
               +strategy=${TRACE_STRATEGIES:-$(alone && echo none,none_mb || echo blocking,overlap,none,symm_norm)} ${STEP_ARGS:-} ;;
    trace_prefill)  # traces of prefill steps: is the engine's eager prefill host-bound (trace_device_busy_fraction),
             # and do rsag/async overlap anything at 8192 tokens, where the layer sweep said they would (session 6)
             # (TRACE_TOKENS / TRACE_STRATEGIES narrow it: the trace covers all of a run's sizes at once; STEP_ARGS
             # adds overrides, e.g. "prefill_graphs=4 workload.warmup=2": graphs captured before the traced part)
             # (TP=1 runs it on one GPU: where the compute time goes, without communication)
             fits && lab -m workload=prefill model=$M tp=$TP trace=true "workload.tokens=${TRACE_TOKENS:-[512,2048,8192]}" \
               workload.repeats=2 +strategy=${TRACE_STRATEGIES:-$(alone && echo none,none_mb || echo blocking,none,async_ce,symm_norm,async,rsag)} ${STEP_ARGS:-} ;;
    scaling) lab -m +experiment=tp_scaling tp=${SCALING_TP:-$(seq -s, 1 "$ngpu" | sed 's/,3//;s/,5,6,7//')} \
               ${SCALING_STRATEGIES:+strategy=$SCALING_STRATEGIES} ;;
    *) echo "unknown stage $stage" ;;
  esac
done
# The device tool returns files at most two folders down: the lab's run directories travel as one archive.
if [ -d "$O/lab" ]; then tar czf "$O/lab.tgz" -C "$O" lab && echo "lab results: $O/lab.tgz"; fi  # rc 0 without a lab run too
