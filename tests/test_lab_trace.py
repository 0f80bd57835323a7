"""Trace analysis over synthetic events: compute/communication time, concurrency, exposed communication."""
from __future__ import annotations

import json

import pytest

from nanovllm_lab.lab.trace import (TraceEvent, analyze_events, events_from_chrome_trace, intersect, is_comm_kernel,
                                    union)


def test_interval_union_and_intersection():
    assert union([(5, 7), (0, 2), (1, 3), (3, 4), (9, 9)]) == [(0, 4), (5, 7)]
    assert intersect([(0, 4), (5, 7)], [(3, 6), (6.5, 10)]) == [(3, 4), (5, 6), (6.5, 7)]
    assert intersect([], [(0, 1)]) == []


@pytest.mark.parametrize("name", ["ncclDevKernel_AllReduce_Sum_f32_RING_LL", "void one_shot_all_reduce_kernel<float>",
                                  "two_shot_all_reduce", "symm_mem::barrier", "cross_device_reduce_1stage",
                                  "reduce_scatter_kernel", "all_gather_into_tensor", "custom_allreduce",
                                  "_sum_add_norm_kernel", "_two_shot_reduce_rows_kernel",
                                  "_two_shot_add_norm_kernel",
                                  "void c10d::symmetric_memory::barrier_kernel(unsigned int**, int, int, int, unsigned long)"])
def test_comm_kernel_names(name):
    assert is_comm_kernel(name)


@pytest.mark.parametrize("name", ["ampere_sgemm_128x64_tn", "flash_fwd_kernel", "rms_norm_kernel", "aten::mm"])
def test_compute_kernel_names(name):
    assert not is_comm_kernel(name)


def test_partial_overlap():
    # compute on stream 7: [0,100) and [150,200); comm on stream 13: [80,160) -> 20 + 10 us concurrent
    events = [("gemm", 0, 100, "kernel"), ("gemm", 150, 50, "kernel"),
              ("ncclDevKernel_AllReduce", 80, 80, "kernel"),
              ("aten::mm", 0, 500, "cpu_op"), ("cudaLaunchKernel", 1, 2, "cuda_runtime")]
    s = analyze_events(events, num_steps=2)
    assert s["num_kernels"] == 3 and s["num_comm_kernels"] == 1
    assert s["compute_kernel_us"] == 150 and s["comm_kernel_us"] == 80
    assert s["concurrent_comm_us"] == pytest.approx(30)
    assert s["exposed_comm_us"] == pytest.approx(50)
    assert s["trace_concurrency"] == pytest.approx(30 / 80)
    assert s["kernel_span_us"] == 200
    assert s["device_idle_us"] == 0 and s["device_busy_fraction"] == 1.0  # [0,200) always has a kernel running
    assert s["exposed_comm_us_per_step"] == pytest.approx(25)
    assert s["top_comm_kernels"] == [{"name": "ncclDevKernel_AllReduce", "count": 1, "total_us": 80}]


def test_kernel_classes_split_a_step_by_what_ran():
    """Per-step kernel time by class: a fused sum + norm kernel is its own class (not plain communication), a
    barrier and a copy-engine copy are theirs, and every device event lands in exactly one class."""
    from nanovllm_lab.lab.trace import KERNEL_CLASSES, kernel_class
    events = [("nvjet_tst_128x256_64x4_2x1_v_bz_coopA_TNT", 0, 100, "kernel"), ("_prefill_kernel", 100, 20, "kernel"),
              ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_0", 120, 10, "kernel"),
              ("_sum_add_norm_kernel", 130, 12, "kernel"), ("_lamport_allreduce_norm_kernel", 142, 4, "kernel"),
              ("c10d::symmetric_memory::barrier_kernel(unsigned int**, int, int)", 50, 30, "kernel"),
              ("Memcpy PtoP (Device -> Device)", 60, 8, "gpu_memcpy"),
              ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 150, 6, "kernel"), ("_store_kvcache_kernel", 156, 2, "kernel"),
              ("Memcpy HtoD (Pageable -> Device)", 0, 3, "gpu_memcpy"), ("aten::mm", 0, 500, "cpu_op")]
    s = analyze_events(events, num_steps=2)
    got = {c: s[f"{c}_us_per_step"] for c in KERNEL_CLASSES}
    assert got == {"gemm": 50, "attention": 10, "norm": 5, "sum_norm": 8, "nccl": 3, "barrier": 15, "ce_copy": 4,
                   "other": 1}  # the host-to-device copy and the CPU op are not device kernels
    assert kernel_class(TraceEvent("ncclDevKernel_AllGather_RING_LL", 0, 1, "kernel")) == "nccl"
    assert sum(got.values()) * 2 == pytest.approx(s["compute_kernel_us"] + s["comm_kernel_us"])


def test_overlapping_comm_kernels_are_not_double_counted():
    events = [TraceEvent("one_shot_all_reduce", 0, 10, "kernel"), TraceEvent("ncclKernel", 5, 10, "kernel"),
              TraceEvent("gemm", 0, 100, "kernel")]
    s = analyze_events(events)
    assert s["comm_kernel_us"] == 20 and s["comm_busy_us"] == 15
    assert s["trace_concurrency"] == 1.0 and s["exposed_comm_us"] == 0


def test_device_idle_is_the_span_with_no_kernel():
    # gemm [0,10), nccl [10,15), then nothing until gemm [40,50): 25 of the 50 us idle (a launch-bound step)
    s = analyze_events([("gemm", 0, 10, "kernel"), ("nccl", 10, 5, "kernel"), ("gemm", 40, 10, "kernel"),
                        ("aten::mm", 15, 25, "cpu_op")])
    assert s["kernel_span_us"] == 50 and s["device_idle_us"] == pytest.approx(25)
    assert s["device_busy_fraction"] == pytest.approx(0.5)


def test_fully_exposed_and_empty():
    s = analyze_events([("gemm", 0, 10, "kernel"), ("nccl", 10, 5, "kernel")])
    assert s["exposed_comm_us"] == 5 and s["trace_concurrency"] == 0
    empty = analyze_events([("aten::add", 0, 10, "cpu_op")])  # what a CPU-only trace holds
    assert empty["num_kernels"] == 0 and empty["comm_busy_us"] == 0 and empty["trace_concurrency"] == 0.0


def test_chrome_trace_parsing(tmp_path):
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "gemm", "ts": 1.5, "dur": 3.0, "pid": 0, "tid": 7},
        {"ph": "X", "cat": "kernel", "name": "ncclKernel", "ts": 2.0, "dur": 4.0},
        {"ph": "i", "cat": "kernel", "name": "marker", "ts": 2.0},
        {"ph": "M", "name": "process_name"}]}
    path = tmp_path / "t.trace.json"
    path.write_text(json.dumps(trace))
    events = events_from_chrome_trace(path)
    assert events == [TraceEvent("gemm", 1.5, 3.0, "kernel"), TraceEvent("ncclKernel", 2.0, 4.0, "kernel")]
    assert analyze_events(events)["concurrent_comm_us"] == pytest.approx(2.5)


def test_compute_interference_split_by_kernel_name():
    from nanovllm_lab.comm.interference import split_kernel_ms
    kernels = [("nvjet_sm90_tst_256x128", 3000.0), ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", 900.0),
               ("_decode_partial_kernel", 1500.0), ("one_shot_all_reduce_kernel", 300.0)]
    compute, comm = split_kernel_ms(kernels, calls=3)
    assert compute == pytest.approx(1.5) and comm == pytest.approx(0.4)


def test_copy_engine_transfers_count_as_communication():
    """async_ce's reductions are peer memcpy events, not kernels: they must count as communication (and as
    device activity); host-to-device input copies must not."""
    events = [("gemm", 0, 10, "kernel"), ("Memcpy DtoD (Device -> Device)", 5, 10, "gpu_memcpy"),
              ("Memcpy HtoD (Pageable -> Device)", 20, 3, "gpu_memcpy"), ("add", 15, 2, "kernel")]
    s = analyze_events(events)
    assert s["num_ce_copies"] == 1 and s["ce_copy_us"] == pytest.approx(10)
    assert s["comm_busy_us"] == pytest.approx(10) and s["concurrent_comm_us"] == pytest.approx(5)
    assert s["exposed_comm_us"] == pytest.approx(5)
    assert s["device_idle_us"] == pytest.approx(0) and s["kernel_span_us"] == pytest.approx(17)


def test_steps_by_size_splits_a_trace_into_its_steps():
    """Each engine step's device range (a gpu_user_annotation named by engine/pending.py's step_range) claims the
    device events that start inside it: per (phase, tokens), the median span and kernel time by class. Events
    outside every step range, CPU-side ranges and other annotations count for no step."""
    import types

    from nanovllm_lab.engine.pending import step_range

    def name(is_prefill: bool, tokens: int) -> str:  # a StepInput's two fields that name its range
        return step_range(types.SimpleNamespace(is_prefill=is_prefill, num_tokens=tokens))
    small, large, decode = name(True, 2048), name(True, 16384), name(False, 8)
    assert small == "nanovllm_step prefill 2048" and decode == "nanovllm_step decode 8"
    events = [(small, 0, 100, "gpu_user_annotation"), (small, 0, 400, "user_annotation"),
              ("nvjet_gemm", 0, 60, "kernel"), ("_sum_add_norm_kernel", 50, 30, "kernel"),
              ("Memcpy PtoP (Device -> Device)", 70, 20, "gpu_memcpy"),
              (large, 200, 1000, "gpu_user_annotation"),
              ("nvjet_gemm", 200, 700, "kernel"), ("_prefill_kernel", 900, 100, "kernel"),
              ("ncclDevKernel_AllReduce", 1000, 150, "kernel"),
              (small, 1500, 120, "gpu_user_annotation"),
              ("nvjet_gemm", 1500, 80, "kernel"), ("_sum_add_norm_kernel", 1580, 40, "kernel"),
              ("nccl:all_reduce", 1590, 20, "gpu_user_annotation"),  # not a step
              ("nvjet_gemm", 1700, 500, "kernel"),  # after every step range
              (decode, 2300, 10, "gpu_user_annotation"), ("_decode_partial", 2300, 10, "kernel")]
    rows = {(r["phase"], r["tokens"]): r for r in analyze_events(events)["steps_by_size"]}
    assert set(rows) == {("prefill", 2048), ("prefill", 16384), ("decode", 8)}
    s = rows["prefill", 2048]  # medians of (90, 120) span, gemm (60, 80), sum_norm (30, 40), ce (20, 0)
    assert s["steps"] == 2 and s["span_us"] == 105 and s["gemm_us"] == 70 and s["sum_norm_us"] == 35
    assert s["ce_copy_us"] == 10 and s["nccl_us"] == 0
    big = rows["prefill", 16384]
    assert big["steps"] == 1 and big["span_us"] == 950 and big["gemm_us"] == 700 and big["attention_us"] == 100
    assert big["nccl_us"] == 150
    assert rows["decode", 8]["attention_us"] == 10 and rows["decode", 8]["gemm_us"] == 0
    assert analyze_events([("nvjet_gemm", 0, 5, "kernel")])["steps_by_size"] == []  # no step ranges: no rows
