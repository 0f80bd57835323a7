"""Microbenchmarks for the Triton attention kernels and the GPU's ceilings (copy bandwidth, bf16 matmul).

Decode is memory bound, so it is reported as achieved GB/s against `measure_copy_bandwidth()`; prefill is
compute bound and reported as TFLOP/s against `measure_matmul_tflops()`. Timing uses
`triton.testing.do_bench` (median of many runs, L2 flushed between runs) and needs CUDA; this module
imports on CPU too (triton.testing is imported lazily). Run `python -m nanovllm_lab.kernels.bench` for a table.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def _do_bench(fn: Callable[[], object], cuda_graph: bool = False) -> float:
    """Median milliseconds of fn(); with cuda_graph, fn is captured and replayed (no launch overhead)."""
    import triton.testing  # lazy: keeps the module import-safe without triton / a GPU

    if cuda_graph:
        return float(triton.testing.do_bench_cudagraph(fn, return_mode="median"))
    return float(triton.testing.do_bench(fn, return_mode="median"))


def _paged_cache(lens: list[int], block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: str, gen: torch.Generator):
    """Random caches with shuffled blocks and an int32 block table covering `lens` (no -1 padding)."""
    need = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(need)
    perm = torch.randperm(num_blocks, generator=gen, device="cpu")
    bt = torch.full((len(lens), max(need)), -1, dtype=torch.int32)
    i = 0
    for s, n in enumerate(need):
        bt[s, :n] = perm[i:i + n].to(torch.int32)
        i += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    kc = torch.randn(shape, dtype=dtype, device=device)
    vc = torch.randn(shape, dtype=dtype, device=device)
    return kc, vc, bt.to(device)


def bench_decode(batch: int, context: int, num_q_heads: int = 32, num_kv_heads: int = 8, head_dim: int = 128,
                 block_size: int = 256, dtype: torch.dtype = torch.bfloat16, num_splits: int | None = None,
                 cuda_graph: bool = True, device: str = "cuda") -> dict:
    """Time paged decode for `batch` sequences of `context` cached tokens each.

    cuda_graph=True (the default) replays a captured graph, as the engine does for decode, so small
    batches measure the kernels rather than Python launch overhead.
    bytes = K and V cache bytes actually read (context tokens, not the whole blocks) + q + out.
    """
    from nanovllm_lab.kernels.decode_attention import paged_decode_attention

    gen = torch.Generator().manual_seed(0)
    kc, vc, bt = _paged_cache([context] * batch, block_size, num_kv_heads, head_dim, dtype, device, gen)
    q = torch.randn(batch, num_q_heads, head_dim, dtype=dtype, device=device)
    out = torch.empty_like(q)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    fn = lambda: paged_decode_attention(q, kc, vc, bt, lens, scale, out=out, num_splits=num_splits)  # noqa: E731
    fn()  # compile outside any capture
    ms = _do_bench(fn, cuda_graph)
    elt = kc.element_size()
    nbytes = 2 * batch * context * num_kv_heads * head_dim * elt + 2 * q.numel() * elt
    return {"batch": batch, "context": context, "block_size": block_size, "head_dim": head_dim,
            "num_splits": num_splits, "ms": ms, "bytes": nbytes, "gb_per_s": nbytes / ms / 1e6}


def bench_prefill(tokens: int, num_seqs: int = 1, num_q_heads: int = 32, num_kv_heads: int = 8,
                  head_dim: int = 128, dtype: torch.dtype = torch.bfloat16, impl: str = "triton",
                  paged: bool = False, block_size: int = 256, device: str = "cuda") -> dict:
    """Time causal prefill of `num_seqs` sequences of tokens // num_seqs tokens each (no cached prefix).

    impl: "triton" (our kernel; `paged=True` reads K/V through the block table) or "varlen"
    (torch.nn.attention.varlen.varlen_attn). FLOPs = sum over sequences of 2 * 2 * L^2 / 2 * heads * head_dim.
    """
    from nanovllm_lab.kernels.prefill_attention import paged_prefill_attention

    seq = tokens // num_seqs
    n = seq * num_seqs
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(n, num_q_heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(n, num_kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn_like(k)
    cu = torch.arange(0, n + 1, seq, dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    if impl == "varlen":
        from nanovllm_lab.attention.triton_backend import _load_varlen_attn

        varlen_attn, params = _load_varlen_attn()
        if varlen_attn is None:
            raise RuntimeError("torch.nn.attention.varlen.varlen_attn is not available")
        kw: dict = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}
        if num_q_heads != num_kv_heads:
            if "enable_gqa" in params:
                kw["enable_gqa"] = True
            else:  # older torch: expand K/V outside the timed region
                k = k.repeat_interleave(num_q_heads // num_kv_heads, dim=1)
                v = v.repeat_interleave(num_q_heads // num_kv_heads, dim=1)
        fn = lambda: varlen_attn(q, k, v, cu, cu, seq, seq, scale=scale, **kw)  # noqa: E731
    elif paged:
        kc, vc, bt = _paged_cache([seq] * num_seqs, block_size, num_kv_heads, head_dim, dtype, device, gen)
        fn = lambda: paged_prefill_attention(q, k, v, kc, vc, cu, cu, seq, seq, bt, scale)  # noqa: E731
    else:
        fn = lambda: paged_prefill_attention(q, k, v, k, v, cu, cu, seq, seq, None, scale)  # noqa: E731
    ms = _do_bench(fn)
    flops = num_seqs * 2 * 2 * seq * seq / 2 * num_q_heads * head_dim
    return {"tokens": n, "num_seqs": num_seqs, "head_dim": head_dim, "impl": impl, "paged": paged, "ms": ms,
            "flops": flops, "tflop_per_s": flops / ms / 1e9}


def bench_activation(tokens: int, cols: int, impl: str = "triton", dtype: torch.dtype = torch.bfloat16,
                     cuda_graph: bool = True, device: str = "cuda") -> dict:
    """Time SiLU-and-mul of the fused gate/up output [tokens, 2 * cols] -> [tokens, cols].

    impl: "triton" (kernels/silu_mul.py), "compiled" (the layer's torch.compile fallback with dynamic shapes,
    as the engine compiles it) or "eager". The input is the contiguous [tokens, 2 * cols] that the gate/up GEMM
    writes. bytes = input read + output written. Replayed from a CUDA graph by default: decode-sized inputs
    would otherwise time the launch.
    """
    from nanovllm_lab.kernels.silu_mul import silu_and_mul
    from nanovllm_lab.layers.activation import silu_and_mul_torch

    x = torch.randn(tokens, 2 * cols, dtype=dtype, device=device)
    if impl == "triton":
        fn = lambda: silu_and_mul(x)  # noqa: E731
    elif impl == "compiled":
        compiled = torch.compile(silu_and_mul_torch, dynamic=True)
        fn = lambda: compiled(x)  # noqa: E731
    elif impl == "eager":
        fn = lambda: silu_and_mul_torch(x)  # noqa: E731
    else:
        raise ValueError(f"bench_activation: impl must be triton, compiled or eager, got {impl!r}")
    fn()  # compile outside the timed (and captured) region
    ms = _do_bench(fn, cuda_graph)
    nbytes = 3 * tokens * cols * x.element_size()
    return {"tokens": tokens, "cols": cols, "impl": impl, "ms": ms, "bytes": nbytes, "gb_per_s": nbytes / ms / 1e6}


def bench_qk_norm_rope(tokens: int, num_q: int = 32, num_kv: int = 8, head_dim: int = 128, impl: str = "triton",
                       dtype: torch.dtype = torch.bfloat16, cuda_graph: bool = True, device: str = "cuda") -> dict:
    """Time the attention prologue (per-head q/k RMSNorm + RoPE) on a [tokens, (num_q + 2 num_kv) head_dim] qkv.

    impl: "triton" (kernels/qk_norm_rope.py) or "compiled" (models/qwen3.py's region, torch.compile with
    dynamic shapes, as the engine compiles it). bytes = q and k read once + written once."""
    from nanovllm_lab.kernels.qk_norm_rope import qk_norm_rope
    from nanovllm_lab.layers.layernorm import RMSNorm
    from nanovllm_lab.layers.rotary_embedding import RotaryEmbedding
    from nanovllm_lab.models.qwen3 import qk_norm_rope_torch

    with torch.device(device):
        q_norm, k_norm = RMSNorm(head_dim).to(dtype), RMSNorm(head_dim).to(dtype)
        rope = RotaryEmbedding(head_dim, 40960, 1e6)
    qkv = torch.randn(tokens, (num_q + 2 * num_kv) * head_dim, dtype=dtype, device=device)
    positions = torch.randint(0, 40960, (tokens,), device=device)
    if impl == "triton":
        fn = lambda: qk_norm_rope(qkv, positions, rope.cos_sin, q_norm.weight, k_norm.weight,  # noqa: E731
                                  q_norm.eps, num_q, num_kv, head_dim)
    elif impl == "compiled":
        compiled = torch.compile(qk_norm_rope_torch, dynamic=True)
        fn = lambda: compiled(qkv, positions, q_norm, k_norm, rope, num_q, num_kv, head_dim)  # noqa: E731
    else:
        raise ValueError(f"bench_qk_norm_rope: impl must be triton or compiled, got {impl!r}")
    fn()  # compile outside the timed (and captured) region
    ms = _do_bench(fn, cuda_graph)
    nbytes = 2 * tokens * (num_q + num_kv) * head_dim * qkv.element_size()
    return {"tokens": tokens, "cols": (num_q + num_kv) * head_dim, "impl": impl, "ms": ms, "bytes": nbytes,
            "gb_per_s": nbytes / ms / 1e6}


def measure_copy_bandwidth(nbytes: int = 2 << 30, device: str = "cuda") -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _do_bench(lambda: dst.copy_(src))
    return 2 * nbytes / ms / 1e6


def measure_matmul_tflops(n: int = 8192, device: str = "cuda") -> float:
    """bf16 n x n x n matmul throughput on random data (zeros would flatter the tensor cores' power draw)."""
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    ms = _do_bench(lambda: a @ b)
    return 2 * n ** 3 / ms / 1e9


if __name__ == "__main__":
    print(f"copy bandwidth {measure_copy_bandwidth():.0f} GB/s, bf16 matmul {measure_matmul_tflops():.0f} TFLOP/s")
    for bsz, ctx in [(1, 8192), (8, 4096), (64, 2048), (256, 1024)]:
        for bs in (16, 256):
            r = bench_decode(bsz, ctx, block_size=bs)
            print(f"decode B={bsz:4d} ctx={ctx:5d} bs={bs:3d}: {r['ms'] * 1e3:8.1f} us {r['gb_per_s']:7.0f} GB/s")
    for d in (64, 128):
        for impl, paged in [("triton", False), ("triton", True), ("varlen", False)]:
            try:
                r = bench_prefill(8192, num_seqs=2, head_dim=d, impl=impl, paged=paged)
            except Exception as e:  # varlen_attn may be missing on this torch
                print(f"prefill {impl} D={d}: unavailable ({e})")
                continue
            print(f"prefill {impl:6s} paged={paged!s:5s} D={d:3d}: {r['ms']:.3f} ms {r['tflop_per_s']:6.1f} TFLOP/s")
