"""The memory-traffic floor: bytes per step against independently known architecture sizes."""
from __future__ import annotations

import pandas as pd
import pytest

from nanovllm_lab.lab.floor import bytes_per_step, memory_floor
from nanovllm_lab.models.arch import BUILTIN_ARCHS


@pytest.mark.parametrize("name, billions", [("qwen3-0.6b", 0.596), ("qwen3-8b", 8.19), ("qwen3-32b", 32.76)])
def test_parameter_counts_match_published_sizes(name, billions):
    assert BUILTIN_ARCHS[name].num_params / 1e9 == pytest.approx(billions, abs=0.01)


def test_floor_counts_weights_once_per_step_and_kv_traffic():
    a = BUILTIN_ARCHS["qwen3-8b"]  # untied: the input embedding table is not read per step
    w, kv = bytes_per_step(a, tp=2, dtype_bytes=2)
    assert w == pytest.approx((8.19073536e9 - 151936 * 4096) * 2 / 2)
    assert kv == 2 * 36 * 8 * 128 * 2 / 2  # K and V, layers, KV heads, head dim, bf16, split over 2 ranks
    steps = pd.DataFrame({"num_tokens": [100, 4, 4], "kv_tokens_read": [100, 404, 408], "warmup": [True, False, False],
                          "latency_ms": [50.0, 3.0, 4.0]})
    f = memory_floor(steps, a, 2, 2, copy_gbs=1000.0)
    expected = 2 * w + kv * (404 + 408 + 4 + 4)  # the warm-up step is not counted
    assert f["floor_bytes_per_rank"] == pytest.approx(expected)
    assert f["floor_s"] == pytest.approx(expected / 1e12)
    assert f["step_time_s"] == pytest.approx(0.007)  # the timed steps' own latencies, warm-up excluded
    assert memory_floor(steps, a, 2, 2, copy_gbs=None)["floor_s"] is None


def test_kernels_workload_refuses_cpu_clearly(tmp_path):
    import subprocess
    import sys

    import torch
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run([sys.executable, "-m", "nanovllm_lab.run", "workload=kernels", f"results_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "the kernels workload needs a CUDA device" in r.stderr + r.stdout
