"""One-off probe (session 13): the Triton elementwise kernels against compiled and eager PyTorch, 1 GPU; and the
q/k kernel with its fused K/V cache write against the kernel followed by kernels/store_kv.py."""
import sys

import torch
from nanovllm_lab.kernels import bench
from nanovllm_lab.kernels.silu_mul import silu_and_mul
from nanovllm_lab.layers.activation import silu_and_mul_torch

if "--store-only" not in sys.argv:  # the SiLU and q/k tables (calls 1 and 4)
    x = torch.randn(3001, 2 * 6144, device="cuda", dtype=torch.bfloat16)
    ref = silu_and_mul_torch(x.float())
    out = silu_and_mul(x)
    print("max abs err triton vs fp32", (out.float() - ref).abs().max().item(),
          "eager vs fp32", (silu_and_mul_torch(x).float() - ref).abs().max().item())
    print(f"copy {bench.measure_copy_bandwidth():.0f} GB/s")
    for cols in (6144, 12288, 12800):
        for t in (1, 128, 512, 2048, 8192, 16384):
            row = []
            for impl in ("triton", "compiled", "eager"):
                r = bench.bench_activation(t, cols, impl)
                row.append(f"{impl} {r['ms']*1e3:8.1f}us {r['gb_per_s']:6.0f}GB/s")
            print(f"silu I={cols} n={t:6d} | " + " | ".join(row), flush=True)
    for nq, nk in ((16, 4), (32, 8)):
        for t in (1, 128, 512, 2048, 8192, 16384):
            row = []
            for impl in ("triton", "compiled"):
                r = bench.bench_qk_norm_rope(t, nq, nk, impl=impl)
                row.append(f"{impl} {r['ms']*1e3:8.1f}us {r['gb_per_s']:6.0f}GB/s")
            print(f"qk_norm_rope heads={nq}/{nk} n={t:6d} | " + " | ".join(row), flush=True)

import triton.testing  # noqa: E402

from nanovllm_lab.kernels.qk_norm_rope import qk_norm_rope  # noqa: E402
from nanovllm_lab.kernels.store_kv import store_kvcache  # noqa: E402

for nq, nk in ((16, 4), (32, 8)):
    for t in (1, 128, 2048, 16384):
        d = 128
        qkv = torch.randn(t, (nq + 2 * nk) * d, dtype=torch.bfloat16, device="cuda")
        pos = torch.randint(0, 4096, (t,), device="cuda")
        cs = torch.randn(40960, d, device="cuda")
        w = torch.ones(d, dtype=torch.bfloat16, device="cuda")
        kc = torch.zeros(t // 256 + 2, 256, nk, d, dtype=torch.bfloat16, device="cuda")
        vc = torch.zeros_like(kc)
        slots = torch.arange(t, dtype=torch.int32, device="cuda")

        def separate():
            q, k = qk_norm_rope(qkv, pos, cs, w, w, 1e-6, nq, nk, d)
            store_kvcache(k, qkv[:, (nq + nk) * d:].view(t, nk, d), kc, vc, slots)

        def fused():
            qk_norm_rope(qkv, pos, cs, w, w, 1e-6, nq, nk, d, cache=(kc, vc, slots))
        row = []
        for name, fn in (("separate", separate), ("fused", fused)):
            fn()
            row.append(f"{name} {triton.testing.do_bench_cudagraph(fn, return_mode='median') * 1e3:8.1f}us")
        print(f"qk+store heads={nq}/{nk} n={t:6d} | " + " | ".join(row), flush=True)
