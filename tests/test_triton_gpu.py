"""Triton kernels on a CUDA GPU in bfloat16: attention against the plain-PyTorch backend (fp32 reference), and
the fused all-reduce + add + RMSNorm kernels on one GPU with the ranks simulated.

Skipped without CUDA. Checks the relative error ||out - ref|| / ||ref|| <= 1e-2 for decode and prefill (with
and without cached context), block sizes 16 and 256, head dims 64 and 128, and that decode can be captured
in a CUDA graph whose replay matches eager execution, also after the inputs change in place. The all-reduce
kernels must round like torch (the Triton interpreter cannot check that: it truncates to bf16) and two-shot
must give one-shot's bits.
"""
import math

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)
triton = pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from nanovllm_lab.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from nanovllm_lab.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from nanovllm_lab.kernels import decode_attention as _dec  # noqa: E402
from nanovllm_lab.kernels.allreduce_norm import (sum_add_norm, two_shot_add_norm,  # noqa: E402
                                                 two_shot_reduce_rows)
from nanovllm_lab.kernels.decode_attention import paged_decode_attention  # noqa: E402
from nanovllm_lab.kernels.prefill_attention import paged_prefill_attention  # noqa: E402
from nanovllm_lab.utils.context import AttentionContext  # noqa: E402

if isinstance(_dec._decode_partial_kernel, InterpretedFunction):
    pytest.skip("kernels were imported under TRITON_INTERPRET=1; run this file on its own", allow_module_level=True)

DEV = "cuda"
REF = TorchAttentionBackend()
BF16 = torch.bfloat16


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm()).item()


def _layout(lens: list[int], block_size: int, g: torch.Generator, extra_cols: int = 2):
    need = [triton.cdiv(n, block_size) for n in lens]
    nb = sum(need) + 3
    perm = torch.randperm(nb, generator=g)
    bt = torch.full((len(lens), max(need) + extra_cols), -1, dtype=torch.int32)
    i = 0
    for s, n in enumerate(need):
        bt[s, :n] = perm[i:i + n].to(torch.int32)
        i += n
    return bt.to(DEV), nb


def _cache(nb, bs, hkv, d, g):
    return (torch.randn((nb, bs, hkv, d), generator=g).to(DEV, BF16),
            torch.randn((nb, bs, hkv, d), generator=g).to(DEV, BF16))


def _prefill_ctx(q_lens, k_lens, bt=None) -> AttentionContext:
    cq, ck = [0], [0]
    for a, b in zip(q_lens, k_lens):
        cq.append(cq[-1] + a)
        ck.append(ck[-1] + b)
    return AttentionContext(
        is_prefill=True, cu_seqlens_q=torch.tensor(cq, dtype=torch.int32, device=DEV),
        cu_seqlens_k=torch.tensor(ck, dtype=torch.int32, device=DEV), max_seqlen_q=max(q_lens),
        max_seqlen_k=max(k_lens), block_tables=bt, cu_seqlens_q_host=cq, cu_seqlens_k_host=ck)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("num_splits", [1, 7, None])
def test_decode_bf16(head_dim, block_size, group, num_splits):
    g = torch.Generator().manual_seed(head_dim + block_size + group)
    hkv = 4
    lens = [1, 15, 16, 17, 255, 257, 1000, 3000]
    bt, nb = _layout(lens, block_size, g)
    kc, vc = _cache(nb, block_size, hkv, head_dim, g)
    q = torch.randn((len(lens), hkv * group, head_dim), generator=g).to(DEV, BF16)
    ctx_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = 1 / math.sqrt(head_dim)
    out = paged_decode_attention(q, kc, vc, bt, ctx_lens, scale, num_splits=num_splits)
    ctx = AttentionContext(block_tables=bt, context_lens=ctx_lens)
    ref = REF.decode(q.float(), kc.float(), vc.float(), ctx, scale)
    assert _rel(out, ref) <= 1e-2


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("use_varlen", [False, True])
def test_prefill_no_cache_bf16(head_dim, group, use_varlen):
    g = torch.Generator().manual_seed(head_dim + group)
    hkv = 4
    lens = [1, 100, 128, 129, 700]
    n = sum(lens)
    q = torch.randn((n, hkv * group, head_dim), generator=g).to(DEV, BF16)
    k = torch.randn((n, hkv, head_dim), generator=g).to(DEV, BF16)
    v = torch.randn((n, hkv, head_dim), generator=g).to(DEV, BF16)
    ctx = _prefill_ctx(lens, lens)
    empty = torch.empty(0, device=DEV, dtype=BF16)
    scale = 1 / math.sqrt(head_dim)
    out = TritonAttentionBackend(use_torch_varlen=use_varlen).prefill(q, k, v, empty, empty, ctx, scale)
    ref = REF.prefill(q.float(), k.float(), v.float(), empty, empty, ctx, scale)
    assert _rel(out, ref) <= 1e-2


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_cached_bf16(head_dim, block_size, group):
    g = torch.Generator().manual_seed(head_dim + block_size + group)
    hkv = 4
    q_lens, k_lens = [1, 200, 64, 300], [500, 200, 1000, 301]
    bt, nb = _layout(k_lens, block_size, g)
    kc, vc = _cache(nb, block_size, hkv, head_dim, g)  # the new tokens' K/V are assumed already stored
    nq = sum(q_lens)
    q = torch.randn((nq, hkv * group, head_dim), generator=g).to(DEV, BF16)
    k = torch.randn((nq, hkv, head_dim), generator=g).to(DEV, BF16)  # unused on the paged path
    ctx = _prefill_ctx(q_lens, k_lens, bt)
    scale = 1 / math.sqrt(head_dim)
    out = TritonAttentionBackend().prefill(q, k, k, kc, vc, ctx, scale)
    ref = REF.prefill(q.float(), k.float(), k.float(), kc.float(), vc.float(), ctx, scale)
    assert _rel(out, ref) <= 1e-2
    # The backend is a thin wrapper: calling the kernel directly gives the same bits.
    out2 = paged_prefill_attention(q, k, k, kc, vc, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q,
                                   ctx.max_seqlen_k, bt, scale)
    assert torch.equal(out, out2)


@pytest.mark.parametrize("num_splits", [1, None])
def test_decode_cuda_graph_replay_matches_eager(num_splits):
    g = torch.Generator().manual_seed(5)
    bs, hkv, hq, d = 16, 4, 16, 128
    lens = [3, 40, 700, 1200, 1]
    bt, nb = _layout(lens, bs, g)
    bt[4] = -1  # a padding row exactly as the graph runner fills it: context_len 1, block table all -1
    kc, vc = _cache(nb, bs, hkv, d, g)
    q = torch.randn((len(lens), hq, d), generator=g).to(DEV, BF16)
    ctx_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    out = torch.empty_like(q)

    def step():
        paged_decode_attention(q, kc, vc, bt, ctx_lens, 0.1, out=out, num_splits=num_splits)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up (compiles the kernels) outside the capture
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for trial in range(2):
        if trial:  # new inputs in place: shorter/longer contexts and fresh queries
            ctx_lens.copy_(torch.tensor([1, 45, 16, 1190, 1], dtype=torch.int32))  # within each allocation
            q.copy_(torch.randn(q.shape, generator=g).to(BF16))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        eager = paged_decode_attention(q, kc, vc, bt, ctx_lens, 0.1, num_splits=num_splits)
        assert torch.equal(out, eager)


# -- fused all-reduce + residual add + RMSNorm, the ranks simulated by tensors on one GPU -------------------
@pytest.mark.parametrize("world, n, hidden", [(2, 1, 1024), (2, 7, 5120), (4, 3, 4000), (4, 130, 5120),
                                              (8, 512, 4096)])
def test_two_shot_matches_one_shot_and_rounds_like_torch(world, n, hidden):
    g = torch.Generator().manual_seed(world * 1000 + n)
    bufs = [torch.randn((n, hidden), generator=g).to(DEV, BF16) for _ in range(world)]
    residual = torch.randn((n, hidden), generator=g).to(DEV, BF16)
    weight = (1 + 0.1 * torch.randn((hidden,), generator=g)).to(DEV, BF16)
    acc = bufs[0].float()
    for b in bufs[1:]:  # float32, rank order, then torch's round-to-nearest-even: what an all-reduce returns
        acc = acc + b.float()
    exact = acc.to(BF16)
    one_sum, _ = sum_add_norm(bufs, None, None, 0.0)
    one_out, one_res = sum_add_norm(bufs, residual, weight, 1e-6)
    assert torch.equal(one_sum, exact)
    assert torch.equal(one_res, (exact.float() + residual.float()).to(BF16))
    sums = [torch.full((n, hidden), float("nan"), dtype=BF16, device=DEV) for _ in range(world)]
    for r in range(world):
        two_shot_reduce_rows(bufs, sums[r], r)
    two_sum, _ = two_shot_add_norm(sums, None, None, 0.0)
    out, res = two_shot_add_norm(sums, residual, weight, 1e-6)
    assert torch.equal(two_sum, exact)
    assert torch.equal(out, one_out) and torch.equal(res, one_res)


@pytest.mark.parametrize("n, cols", [(1, 6144), (129, 6144), (2051, 12800)])
def test_silu_and_mul_rounds_once_and_replays_in_a_graph(n, cols):
    """The kernel's bf16 output is the float32 SiLU-and-mul rounded once (within one ulp: the GPU's sigmoid need
    not match torch's to the last float32 bit), eager and from a captured graph."""
    from nanovllm_lab.kernels.silu_mul import silu_and_mul
    from nanovllm_lab.layers.activation import silu_and_mul_torch

    g = torch.Generator(device=DEV).manual_seed(3)
    x = torch.randn(n, 2 * cols, device=DEV, generator=g).mul_(4).to(BF16)
    ref = silu_and_mul_torch(x.float())
    out = silu_and_mul(x)
    ulp = ref.abs().to(BF16).float() * 2 ** -7 + 1e-30
    assert ((out.float() - ref).abs() <= ulp).all()
    graph_out = torch.empty_like(out)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        silu_and_mul(x, out=graph_out)
    x.copy_(torch.randn(n, 2 * cols, device=DEV, generator=g).to(BF16))
    graph.replay()
    torch.testing.assert_close(graph_out, silu_and_mul(x), rtol=0, atol=0)


@pytest.mark.parametrize("n, nq, nk", [(1, 16, 4), (300, 32, 8), (4099, 16, 4)])
def test_qk_norm_rope_matches_the_eager_path_in_bf16(n, nq, nk):
    """The fused q/k norm + RoPE kernel against models/qwen3.py's eager operations in bf16. The GPU rounds as
    torch does, so almost every element is bit-identical; where the float32 rsqrt differs in its last bit, a
    normalised element can round one bf16 ulp apart (at most 2**-6 for the |x| < 4 of a normalised head), and
    RoPE carries that into both rotated halves (x |cos| + |sin| <= 1.42): seen as 2**-7 on an H200, where a
    tolerance relative to the rotated output failed on a cancelling element."""
    from nanovllm_lab.kernels.qk_norm_rope import qk_norm_rope
    from nanovllm_lab.layers.layernorm import RMSNorm
    from nanovllm_lab.layers.rotary_embedding import RotaryEmbedding
    from nanovllm_lab.models.qwen3 import qk_norm_rope_torch

    d = 128
    g = torch.Generator(device=DEV).manual_seed(5)
    with torch.device(DEV):
        q_norm, k_norm = RMSNorm(d, 1e-6).to(BF16), RMSNorm(d, 1e-6).to(BF16)
        rope = RotaryEmbedding(d, 40960, 1e6)
    q_norm.weight.data = (torch.rand(d, device=DEV, generator=g) + 0.5).to(BF16)
    k_norm.weight.data = (torch.rand(d, device=DEV, generator=g) + 0.5).to(BF16)
    qkv = (torch.randn(n, (nq + 2 * nk) * d, device=DEV, generator=g) * 3).to(BF16)
    positions = torch.randint(0, 40960, (n,), device=DEV, generator=g)
    q_ref, k_ref, _ = qk_norm_rope_torch(qkv, positions, q_norm, k_norm, rope, nq, nk, d)
    q, k = qk_norm_rope(qkv, positions, rope.cos_sin, q_norm.weight, k_norm.weight, 1e-6, nq, nk, d)
    for out, ref in ((q, q_ref), (k, k_ref)):
        err = (out.float() - ref.float()).abs()
        assert err.max() <= 1.42 * 2 ** -6, err.max()
        assert (err == 0).float().mean() > 0.99, (err == 0).float().mean()  # almost every element bit-identical


@pytest.mark.parametrize("n", [1, 300])
def test_qk_norm_rope_cache_write_equals_store_kv(n):
    """The fused kernel's K/V cache write against kernels/store_kv.py's of the same k and v, bit for bit, with a
    padding slot (-1) that must write nothing."""
    from nanovllm_lab.kernels.qk_norm_rope import qk_norm_rope
    from nanovllm_lab.kernels.store_kv import store_kvcache
    from nanovllm_lab.layers.rotary_embedding import RotaryEmbedding

    nq, nk, d, bs = 16, 4, 128, 256
    g = torch.Generator(device=DEV).manual_seed(6)
    with torch.device(DEV):
        rope = RotaryEmbedding(d, 40960, 1e6)
    w = (torch.rand(d, device=DEV, generator=g) + 0.5).to(BF16)
    qkv = (torch.randn(n, (nq + 2 * nk) * d, device=DEV, generator=g) * 3).to(BF16)
    positions = torch.randint(0, 40960, (n,), device=DEV, generator=g)
    slots = torch.randperm(4 * bs, device=DEV, generator=g)[:n].to(torch.int32)
    slots[n // 2] = -1
    kc = torch.full((4, bs, nk, d), -7.0, dtype=BF16, device=DEV)
    vc = kc.clone()
    ref_kc, ref_vc = kc.clone(), vc.clone()
    q, k = qk_norm_rope(qkv, positions, rope.cos_sin, w, w, 1e-6, nq, nk, d, cache=(kc, vc, slots))
    store_kvcache(k, qkv[:, (nq + nk) * d:].view(n, nk, d), ref_kc, ref_vc, slots)
    assert torch.equal(kc, ref_kc) and torch.equal(vc, ref_vc)
