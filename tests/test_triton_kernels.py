"""Triton kernels vs their plain-PyTorch references, on CPU under the Triton interpreter: attention (the
torch backend) and the fused all-reduce + add + RMSNorm, one-shot and two-shot (comm.symm_norm's reference).

TRITON_INTERPRET must be set before triton (or any kernel module) is imported, because `@triton.jit`
decides at decoration time whether a kernel is compiled or interpreted. Shapes are small: the interpreter
runs every program in Python/numpy.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from nanovllm_lab.attention.torch_backend import TorchAttentionBackend, store_kvcache_torch  # noqa: E402
from nanovllm_lab.attention.triton_backend import TritonAttentionBackend  # noqa: E402
from nanovllm_lab.comm.symm_norm import sum_add_norm_reference  # noqa: E402
from nanovllm_lab.kernels import store_kv as _store_mod  # noqa: E402
from nanovllm_lab.kernels import allreduce_norm  # noqa: E402
from nanovllm_lab.kernels import lamport_norm  # noqa: E402
from nanovllm_lab.kernels.lamport_norm import lamport_add_norm  # noqa: E402
from nanovllm_lab.kernels.allreduce_norm import (row_shard, sum_add_norm, two_shot_add_norm,  # noqa: E402
                                                 two_shot_reduce_rows)
from nanovllm_lab.layers.layernorm import RMSNorm  # noqa: E402
from nanovllm_lab.kernels.decode_attention import paged_decode_attention  # noqa: E402
from nanovllm_lab.kernels.store_kv import store_kvcache  # noqa: E402
from nanovllm_lab.utils.context import AttentionContext  # noqa: E402

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

if not isinstance(_store_mod._store_kvcache_kernel, InterpretedFunction):
    pytest.skip("kernel modules were imported before TRITON_INTERPRET=1 was set; run this file on its own",
                allow_module_level=True)

REF = TorchAttentionBackend()
TRI = TritonAttentionBackend()


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(shape, dtype, g) -> torch.Tensor:
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype)


def _check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
    assert out.shape == ref.shape and out.dtype == dtype
    out, ref = out.float(), ref.float()
    assert torch.isfinite(out).all()
    if dtype == torch.float32:
        assert (out - ref).abs().max().item() <= 1e-4
    else:
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel <= 2e-2, rel
        assert (out - ref).abs().max().item() <= 2e-2 * max(1.0, ref.abs().max().item())


def _paged_layout(lens: list[int], block_size: int, g, extra_cols: int = 1):
    """Random (shuffled) block assignment: block_tables [B, max_blocks] int32 padded with -1, and num_blocks."""
    need = [triton.cdiv(n, block_size) for n in lens]
    num_blocks = sum(need) + 2  # a couple of spare blocks nobody owns
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(need) + extra_cols  # extra -1 columns: grids must not depend on the real lengths
    bt = torch.full((len(lens), width), -1, dtype=torch.int32)
    i = 0
    for s, n in enumerate(need):
        bt[s, :n] = torch.tensor(perm[i:i + n], dtype=torch.int32)
        i += n
    return bt, num_blocks


def _slots(bt_row: torch.Tensor, positions: range, block_size: int) -> list[int]:
    return [int(bt_row[p // block_size]) * block_size + p % block_size for p in positions]


# ----------------------------------------------------------------------------------------------------- store
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size", [16, 256])
def test_store_kvcache_skips_padding(dtype, block_size):
    g = _gen(1)
    n, hkv, d, num_blocks = 11, 2, 24, 3
    k, v = _randn((n, hkv, d), dtype, g), _randn((n, hkv, d), dtype, g)
    # The last block is the scratch block (never handed out); real slots come from the others.
    slots = torch.randperm((num_blocks - 1) * block_size, generator=g)[:n].to(torch.int32)
    slots[[0, 4, 10]] = -1
    kc = torch.full((num_blocks, block_size, hkv, d), float("nan"), dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    store_kvcache(k, v, kc, vc, slots)
    # Reference: the torch store (which parks padding tokens in the scratch block's last slot).
    kr, vr = torch.full_like(kc, float("nan")), torch.full_like(vc, float("nan"))
    store_kvcache_torch(k, v, kr, vr, slots)
    real = slice(0, num_blocks - 1)
    for out, ref in ((kc, kr), (vc, vr)):
        assert torch.equal(torch.isnan(out[real]), torch.isnan(ref[real]))
        assert torch.equal(out[real].nan_to_num(), ref[real].nan_to_num())
        assert torch.isnan(out[-1]).all()  # padding tokens were dropped, not written anywhere
    written = (slots >= 0).sum().item()
    assert (~torch.isnan(kc.view(-1, hkv, d)[:, 0, 0])).sum().item() == written
    assert (~torch.isnan(vc.view(-1, hkv, d)[:, 0, 0])).sum().item() == written


# ---------------------------------------------------------------------------------------------------- decode
# Ragged, crossing block boundaries, and long enough that forced splits each get work (64-key tiles).
DECODE_LENS = {16: [1, 16, 17, 50, 200, 33], 256: [1, 255, 257, 40, 700]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("num_splits", [1, 4, None])
def test_decode_matches_torch(dtype, group, block_size, num_splits):
    g = _gen(hash((str(dtype), group, block_size, num_splits)) % 2**31)
    hkv, d = 2, 32
    hq = hkv * group
    lens = DECODE_LENS[block_size]
    bt, num_blocks = _paged_layout(lens, block_size, g)
    kc = _randn((num_blocks, block_size, hkv, d), dtype, g)
    vc = _randn((num_blocks, block_size, hkv, d), dtype, g)
    q = _randn((len(lens), hkv * group, d), dtype, g)
    ctx_lens = torch.tensor(lens, dtype=torch.int32)
    scale = 1.0 / math.sqrt(d)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, kc, vc, bt, ctx_lens, scale, out=out, num_splits=num_splits)
    ctx = AttentionContext(block_tables=bt, context_lens=ctx_lens)
    ref = REF.decode(q.float(), kc.float(), vc.float(), ctx, scale)
    _check(out, ref, dtype)
    assert out.shape == (len(lens), hq, d)


@pytest.mark.parametrize("head_dim", [16, 24])
def test_decode_small_and_odd_head_dims(head_dim):
    g = _gen(7 + head_dim)
    lens, bs = [3, 20], 16
    bt, nb = _paged_layout(lens, bs, g)
    kc, vc = _randn((nb, bs, 1, head_dim), torch.float32, g), _randn((nb, bs, 1, head_dim), torch.float32, g)
    q = _randn((2, 4, head_dim), torch.float32, g)
    ctx = AttentionContext(block_tables=bt, context_lens=torch.tensor(lens, dtype=torch.int32))
    out = TRI.decode(q, kc, vc, ctx, 0.3)
    _check(out, REF.decode(q, kc, vc, ctx, 0.3), torch.float32)


@pytest.mark.parametrize("pad_len", [0, 1])
def test_decode_padding_rows(pad_len):
    """CUDA-graph padding rows (block table all -1, context_len 1 as the graph runner fills it, or 0) must
    neither fault nor disturb the real rows; a zero-length row yields zeros, not NaN."""
    g = _gen(3 + pad_len)
    bt, nb = _paged_layout([20, 1, 1], 16, g)
    bt[1:] = -1
    kc, vc = _randn((nb, 16, 2, 32), torch.float32, g), _randn((nb, 16, 2, 32), torch.float32, g)
    q = _randn((3, 4, 32), torch.float32, g)
    lens = torch.tensor([20, pad_len, pad_len], dtype=torch.int32)
    for splits in (1, 2):
        out = paged_decode_attention(q, kc, vc, bt, lens, 0.2, num_splits=splits)
        assert torch.isfinite(out).all()
        if pad_len == 0:
            assert (out[1:] == 0).all()
        ref = REF.decode(q[:1], kc, vc, AttentionContext(block_tables=bt[:1], context_lens=lens[:1]), 0.2)
        _check(out[:1], ref, torch.float32)


# --------------------------------------------------------------------------------------------------- prefill
def _cache_with_context(q_lens, k_lens, block_size, hkv, d, dtype, g):
    """A paged cache (random block layout) that holds each sequence's k_len - q_len earlier keys and NaN
    everywhere else, and the new tokens' K/V and cache slots: (block_tables, k_cache, v_cache, k, v, slots)."""
    bt, nb = _paged_layout(k_lens, block_size, g)
    kc = torch.full((nb, block_size, hkv, d), float("nan"), dtype=dtype)
    vc = torch.full_like(kc, float("nan"))
    new_k, new_v, slots = [], [], []
    for i, (ql, kl) in enumerate(zip(q_lens, k_lens)):
        ks, vs = _randn((kl, hkv, d), dtype, g), _randn((kl, hkv, d), dtype, g)
        prefix = torch.tensor(_slots(bt[i], range(kl - ql), block_size), dtype=torch.long)
        kc.view(-1, hkv, d)[prefix] = ks[:kl - ql]
        vc.view(-1, hkv, d)[prefix] = vs[:kl - ql]
        new_k.append(ks[kl - ql:])
        new_v.append(vs[kl - ql:])
        slots += _slots(bt[i], range(kl - ql, kl), block_size)
    return bt, kc, vc, torch.cat(new_k), torch.cat(new_v), torch.tensor(slots, dtype=torch.int32)


def _prefill_ctx(q_lens, k_lens, bt=None) -> AttentionContext:
    cq = [0]
    ck = [0]
    for a, b in zip(q_lens, k_lens):
        cq.append(cq[-1] + a)
        ck.append(ck[-1] + b)
    return AttentionContext(
        is_prefill=True, cu_seqlens_q=torch.tensor(cq, dtype=torch.int32),
        cu_seqlens_k=torch.tensor(ck, dtype=torch.int32), max_seqlen_q=max(q_lens), max_seqlen_k=max(k_lens),
        block_tables=bt, cu_seqlens_q_host=cq, cu_seqlens_k_host=ck)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("group", [1, 4])
def test_prefill_no_cache(dtype, group):
    g = _gen(11 + group)
    hkv, d = 2, 32
    lens = [1, 7, 40, 70]
    n = sum(lens)
    q = _randn((n, hkv * group, d), dtype, g)
    k, v = _randn((n, hkv, d), dtype, g), _randn((n, hkv, d), dtype, g)
    ctx = _prefill_ctx(lens, lens)
    empty = torch.empty(0, 16, hkv, d, dtype=dtype)  # warm-up style: no cache allocated
    out = TRI.prefill(q, k, v, empty, empty, ctx, 1 / math.sqrt(d))
    ref = REF.prefill(q.float(), k.float(), v.float(), empty, empty, ctx, 1 / math.sqrt(d))
    _check(out, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("block_size,group,q_lens,k_lens", [
    (16, 1, [5, 33, 1, 20], [40, 33, 17, 70]),  # prefix hits, a fresh sequence, a 1-token chunk
    (16, 4, [3, 12], [3, 50]),
    (256, 2, [1, 30, 45], [300, 30, 270]),       # contexts crossing a 256-token block boundary
])
def test_prefill_with_cached_context(dtype, block_size, group, q_lens, k_lens):
    g = _gen(sum(k_lens) + block_size + group)
    hkv, d = 2, 32
    hq = hkv * group
    bt, kc, vc, k, v, slots = _cache_with_context(q_lens, k_lens, block_size, hkv, d, dtype, g)
    q = _randn((sum(q_lens), hq, d), dtype, g)
    # Chunked-prefill flow: store the new tokens first (Triton store kernel), then attend over the cache.
    TRI.store_kv(k, v, kc, vc, slots)
    ctx = _prefill_ctx(q_lens, k_lens, bt)
    scale = 1 / math.sqrt(d)
    out = TRI.prefill(q, k, v, kc, vc, ctx, scale)
    ref = REF.prefill(q.float(), k.float(), v.float(), kc.float(), vc.float(), ctx, scale)
    _check(out, ref, dtype)


@pytest.mark.parametrize("cached", [False, True], ids=["fresh", "cached"])
@pytest.mark.parametrize("bounds", [[0, 20, 58], [0, 3, 40, 58], [0, 5, 38, 58]],
                         ids=["cut-seq1", "cut-seq0-and-seq2", "at-seq-bounds"])
def test_prefill_micro_batches_that_cut_sequences(cached, bounds):
    """AttentionContext.slice_tokens (micro-batches of a step, comm.async_overlap's "tokens" split): each piece
    stores its K/V and attends, in order, through the Triton kernels; together they must give the whole step's
    attention (torch backend). A piece that starts inside a sequence reads that sequence's earlier keys from the
    paged cache (seq_tables) even when the step itself has no cached context; the cache is NaN elsewhere."""
    g = _gen(7 + len(bounds) + cached)
    hkv, d, group, bs = 2, 32, 2, 16
    q_lens = [5, 33, 20]
    k_lens = [5, 33, 40] if cached else q_lens  # with `cached`, the third sequence has 20 tokens cached
    bt, kc, vc, k, v, slots = _cache_with_context(q_lens, k_lens, bs, hkv, d, torch.float32, g)
    q = _randn((sum(q_lens), hkv * group, d), torch.float32, g)
    whole = _prefill_ctx(q_lens, k_lens, bt if cached else None)
    whole.slot_mapping, whole.seq_tables = slots, bt
    scale = 1 / math.sqrt(d)
    out = torch.full_like(q, float("nan"))
    for t0, t1 in zip(bounds, bounds[1:]):
        piece = whole.slice_tokens(t0, t1)
        # the device boundaries (what the Triton kernel reads) agree with the host ones
        assert piece.cu_seqlens_q.tolist() == piece.cu_seqlens_q_host
        assert piece.cu_seqlens_k.tolist() == piece.cu_seqlens_k_host
        assert piece.cu_seqlens_q_host[-1] == t1 - t0 and torch.equal(piece.slot_mapping, slots[t0:t1])
        TRI.store_kv(k[t0:t1], v[t0:t1], kc, vc, piece.slot_mapping)
        out[t0:t1] = TRI.prefill(q[t0:t1], k[t0:t1], v[t0:t1], kc, vc, piece, scale)
    ref = REF.prefill(q, k, v, kc, vc, whole, scale)
    _check(out, ref, torch.float32)


def test_slice_tokens_needs_tables_to_start_inside_a_sequence():
    ctx = _prefill_ctx([4, 4], [4, 4])
    ctx.slot_mapping = torch.arange(8, dtype=torch.int32)
    assert ctx.slice_tokens(4, 8).cu_seqlens_q_host == [0, 4]  # a sequence boundary: no tables needed
    with pytest.raises(ValueError, match="start inside a sequence"):
        ctx.slice_tokens(2, 8)


def test_micro_batch_slices_that_kernels_read_start_16_byte_aligned():
    """Triton specialises pointer arguments on 16-byte alignment: a micro-batch's slot mapping, block tables and
    context lengths are copied where their slice starts off a 16-byte boundary (else a kernel compiles a new
    variant mid-step) and stay views where it starts on one. Values are those of the slice either way."""
    ctx = _prefill_ctx([5, 6], [5, 6])
    ctx.slot_mapping = torch.arange(100, 111, dtype=torch.int32)
    ctx.seq_tables = torch.arange(6, dtype=torch.int32).view(2, 3)
    # (t0, t1, first and end sequence): int32 slot offsets 0 and 4 are aligned, 5 and 3 are not; a table slice
    # from sequence 1 starts 12 bytes in
    for t0, t1, s0, s1 in ((0, 4, 0, 1), (4, 11, 0, 2), (5, 11, 1, 2), (3, 8, 0, 2)):
        piece = ctx.slice_tokens(t0, t1)
        for got, want in ((piece.slot_mapping, ctx.slot_mapping[t0:t1]), (piece.seq_tables, ctx.seq_tables[s0:s1])):
            assert got.data_ptr() % 16 == 0 and torch.equal(got, want), (t0, t1)
            assert (got.data_ptr() == want.data_ptr()) == (want.data_ptr() % 16 == 0)  # a view where it could be
    dec = AttentionContext(is_prefill=False, slot_mapping=torch.arange(7, dtype=torch.int32),
                           context_lens=torch.arange(7, dtype=torch.int32),
                           block_tables=torch.arange(14, dtype=torch.int32).view(7, 2))
    piece = dec.slice_seqs(3, 7)
    assert all(t.data_ptr() % 16 == 0 for t in (piece.slot_mapping, piece.context_lens, piece.block_tables))
    assert piece.context_lens.tolist() == [3, 4, 5, 6] and piece.block_tables[0].tolist() == [6, 7]


# -- fused all-reduce + residual add + RMSNorm ------------------------------------------------------------
def _fused_inputs(world: int, n: int, hidden: int, dtype, g, norm: bool):
    """One [n, hidden] partial sum per simulated rank, a residual, and an RMSNorm layer (None without norm)."""
    bufs = [_randn((n, hidden), dtype, g) for _ in range(world)]
    residual = _randn((n, hidden), dtype, g)
    layer = None
    if norm:
        layer = RMSNorm(hidden, 1e-6).to(dtype)
        layer.weight.data = (1 + 0.1 * _randn((hidden,), torch.float32, g)).to(dtype)
    return bufs, residual, layer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("world, n, hidden", [(1, 1, 64), (2, 5, 80), (3, 2, 64), (8, 3, 48)])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "sum_only"])
def test_sum_add_norm_matches_the_unfused_path(dtype, world, n, hidden, norm):
    bufs, residual, layer = _fused_inputs(world, n, hidden, dtype, _gen(world * 100 + n), norm)
    out, res = sum_add_norm(bufs, residual, layer.weight if norm else None, 1e-6)
    ref_out, ref_res = sum_add_norm_reference(bufs, residual, layer)
    _check(out, ref_out, dtype)
    if norm:
        # bf16 within tolerance only: the interpreter truncates float32 -> bf16 even when asked to round to
        # nearest even (3.04 -> 3.03125; torch and the GPU give 3.046875)
        _check(res, ref_res, dtype)
    else:
        assert res is residual


@pytest.mark.parametrize("programs", [1, 2, 3, 7])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "sum_only"])
def test_sum_add_norm_capped_grid_and_out_buffer_are_bit_identical(programs, norm):
    """A capped grid walks rows in a stride (5 rows over 1-3 programs: uneven walks; 7: capped to 5) and `out`
    receives the first result in place; both give the default launch's bits."""
    bufs, residual, layer = _fused_inputs(2, 5, 80, torch.bfloat16, _gen(77), norm)
    weight = layer.weight if norm else None
    ref_out, ref_res = sum_add_norm(bufs, residual, weight, 1e-6)
    dest = torch.full((7, 80), float("nan"), dtype=torch.bfloat16)
    out, res = sum_add_norm(bufs, residual, weight, 1e-6, out=dest[1:6], programs=programs)
    assert out.data_ptr() == dest[1:6].data_ptr()
    assert torch.equal(dest[1:6], ref_out)
    assert torch.isnan(dest[0]).all() and torch.isnan(dest[6]).all()  # rows outside `out` untouched
    if norm:
        assert torch.equal(res, ref_res)


def test_sum_add_norm_rejects_a_bad_out_buffer_or_grid():
    bufs = [torch.zeros(4, 8), torch.zeros(4, 8)]
    with pytest.raises(ValueError, match=r"sum_add_norm: the output must be a contiguous \(4, 8\)"):
        sum_add_norm(bufs, None, None, 0.0, out=torch.zeros(3, 8))
    with pytest.raises(ValueError, match="not contiguous"):
        sum_add_norm(bufs, None, None, 0.0, out=torch.zeros(8, 4).t())
    with pytest.raises(ValueError, match="programs must be an int >= 0"):
        sum_add_norm(bufs, None, None, 0.0, programs=-1)
    with pytest.raises(ValueError, match="programs must be an int >= 0"):
        sum_add_norm(bufs, None, None, 0.0, programs=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_copy_engine_slots_sum_without_a_residual(dtype):
    """async_rsag_ce's embedding reduction has no residual to add: on the device path CopyEngineSlots sums with
    the fused kernel and then normalises with the norm layer, returning (norm(sum), sum) as its reference does."""
    from nanovllm_lab.comm.ce_slots import CopyEngineSlots
    bufs, _, layer = _fused_inputs(2, 5, 80, dtype, _gen(77), True)
    fused, reference = CopyEngineSlots(), CopyEngineSlots()
    fused._fused_norm, reference._fused_norm = sum_add_norm, None
    out, res = fused._sum_add_norm(bufs, None, layer)
    ref_out, ref_res = reference._sum_add_norm(bufs, None, layer)
    _check(res, ref_res, dtype)
    _check(res, bufs[0].float().add(bufs[1].float()).to(dtype), dtype)
    _check(out, ref_out, dtype)
    _check(out, layer(res), dtype)


def test_sum_add_norm_rejects_mismatched_buffers():
    a = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="one shape and dtype"):
        sum_add_norm([a, torch.zeros(3, 8)], a, None, 1e-6)
    with pytest.raises(ValueError, match="1 to 8 buffers"):
        sum_add_norm([a] * 9, a, None, 1e-6)


# Two-shot: ranks simulated by lists of tensors. world 3 gives uneven shards; n < world leaves ranks owning nothing.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 5, 8])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "sum_only"])
def test_two_shot_is_bit_identical_to_one_shot(dtype, world, n, norm, monkeypatch):
    # 32-column reduce-scatter blocks over 72 columns: three column blocks, the last one partly masked.
    monkeypatch.setattr(allreduce_norm, "_REDUCE_BLOCK", 32)
    hidden = 72
    bufs, residual, layer = _fused_inputs(world, n, hidden, dtype, _gen(1000 + world * 10 + n), norm)
    weight = layer.weight if norm else None
    one_out, one_res = sum_add_norm(bufs, residual, weight, 1e-6)
    one_sum, _ = sum_add_norm(bufs, None, None, 0.0)

    # Kernel A on every rank, into sum buffers poisoned with NaN: each must fill exactly its own rows.
    sums = [torch.full((n, hidden), float("nan"), dtype=dtype) for _ in range(world)]
    for r in range(world):
        two_shot_reduce_rows(bufs, sums[r], r)
    shard = row_shard(n, world)
    for r in range(world):
        mine = torch.zeros(n, dtype=torch.bool)
        mine[r * shard: (r + 1) * shard] = True
        assert torch.equal(sums[r][mine], one_sum[mine]), r  # the rounded sum, bit for bit
        assert torch.isnan(sums[r][~mine]).all(), r  # other rows untouched
    # Kernel B: every rank passes the same buffers (its mappings of them) and an equal residual, so one call
    # stands for each; a row read from a rank that does not own it would be NaN.
    out, res = two_shot_add_norm(sums, residual, weight, 1e-6)
    assert torch.equal(out, one_out)
    ref_out, ref_res = sum_add_norm_reference(bufs, residual, layer)
    _check(out, ref_out, dtype)  # bf16 within tolerance only: see test_sum_add_norm_matches_the_unfused_path
    if norm:
        assert torch.equal(res, one_res)
        _check(res, ref_res, dtype)
    else:
        assert res is residual


# Lamport one-kernel all-reduce + norm (kernels/lamport_norm.py): ranks simulated by lists of receive buffers
# [2 slots, world, capacity, hidden]; the interpreter runs every rank's push phase, then every rank's wait phase
# (on a GPU one kernel does both, concurrently with the peers).
def _lamport_round(parts, recv, slot, residual, weight, err, grid, spin_limit=1 << 20):
    world, n = len(parts), parts[0].shape[0]
    views = [([recv[p][slot, r, :n] for p in range(world)], [recv[r][slot, p, :n] for p in range(world)])
             for r in range(world)]
    for r in range(world):
        lamport_add_norm(parts[r], *views[r], residual, weight, 1e-6, err, spin_limit, grid=grid, wait=False)
    return [lamport_add_norm(parts[r], *views[r], residual, weight, 1e-6, err, spin_limit, grid=grid, push=False)
            for r in range(world)]


def _all_sentinel(t):
    return bool((lamport_norm.int_view(t) == lamport_norm.SENTINEL[t.element_size()]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("world, n, hidden, grid", [(1, 1, 64, 1), (2, 5, 80, 2), (3, 4, 64, 4), (8, 3, 48, 1)])
@pytest.mark.parametrize("norm", [True, False], ids=["norm", "sum_only"])
def test_lamport_is_bit_identical_to_one_shot(dtype, world, n, hidden, grid, norm):
    """Every rank's result equals the one-shot kernel's (torch.equal: the same values; only the sign of an exact
    zero may differ, as a pushed -0.0 travels as +0.0), with grid < n (programs loop over rows), over two rounds on
    alternating slots; every receive buffer is back to the sentinel after each round."""
    recv = [lamport_norm.clear_(torch.empty(2, world, 8, hidden, dtype=dtype)) for _ in range(world)]
    err = torch.zeros(1, dtype=torch.int32)
    for slot in (0, 1):
        parts, residual, layer = _fused_inputs(world, n, hidden, dtype, _gen(2000 + world * 10 + n + slot), norm)
        parts[0][0, :3] = -0.0  # must not read as "not arrived" (it travels as +0.0)
        weight = layer.weight if norm else None
        want_out, want_res = sum_add_norm(parts, residual, weight, 1e-6)
        for r, (out, res) in enumerate(_lamport_round(parts, recv, slot, residual, weight, err, grid)):
            assert torch.equal(out, want_out), (slot, r)
            assert torch.equal(res, want_res) if norm else res is residual
        assert err.item() == 0
        assert all(_all_sentinel(b) for b in recv), "a receive buffer was not cleared"


def test_lamport_wait_times_out_instead_of_hanging():
    """A peer that never pushes: the wait gives up after spin_limit polls and sets the flag; later calls then
    do not wait at all (one timeout per dead peer, not one per reduction). The buffer is still cleared."""
    import time
    dtype, n, hidden = torch.bfloat16, 3, 64
    recv = [lamport_norm.clear_(torch.empty(2, 2, 4, hidden, dtype=dtype)) for _ in range(2)]
    err = torch.zeros(1, dtype=torch.int32)
    parts, residual, layer = _fused_inputs(2, n, hidden, dtype, _gen(5), True)
    dst, src = [recv[p][0, 0, :n] for p in range(2)], [recv[0][0, p, :n] for p in range(2)]
    t0 = time.perf_counter()
    lamport_add_norm(parts[0], dst, src, residual, layer.weight, 1e-6, err, spin_limit=3000)  # rank 1 never runs
    waited = time.perf_counter() - t0
    assert err.item() == 1
    assert _all_sentinel(recv[0])
    t0 = time.perf_counter()
    lamport_add_norm(parts[0], dst, src, residual, layer.weight, 1e-6, err, spin_limit=3000)  # returns at once
    assert time.perf_counter() - t0 < waited / 4, "a call after a timeout waited again"
    assert err.item() == 1


def test_lamport_rejects_bad_buffers():
    a = torch.zeros(2, 8)
    err = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(ValueError, match="contiguous \\[2, 8\\]"):
        lamport_add_norm(a, [a, torch.zeros(3, 8)], [a, a], None, None, 0.0, err)
    with pytest.raises(ValueError, match="int32 error flag"):
        lamport_add_norm(a, [a], [a], None, None, 0.0, torch.zeros(1))
    with pytest.raises(ValueError, match="2- and 4-byte"):
        lamport_norm.clear_(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="floating-point partial sums, got torch.int32"):
        lamport_add_norm(a.int(), [a.int()], [a.int()], None, None, 0.0, err)
    with pytest.raises(ValueError, match="spin_limit, grid and programs_per_sm >= 1"):
        lamport_add_norm(a, [a], [a], None, None, 0.0, err, grid=0)
    with pytest.raises(ValueError, match="spin_limit, grid and programs_per_sm >= 1"):
        lamport_add_norm(a, [a], [a], None, None, 0.0, err, programs_per_sm=0)
    with pytest.raises(ValueError, match="prefetch_bytes=-1"):
        lamport_add_norm(a, [a], [a], None, None, 0.0, err, prefetch=a, prefetch_bytes=-1)
    with pytest.raises(ValueError, match="non-contiguous"):
        lamport_add_norm(a, [a], [a], None, None, 0.0, err, prefetch=torch.zeros(8, 4).t(), prefetch_bytes=128)


def test_lamport_programs_per_sm_is_capped_by_occupancy(monkeypatch):
    """programs_per_sm > 1 is only safe while that many programs fit on one SM at once: the cap comes from the
    compiled kernel's registers (allocated per warp, 256 at a time), threads and shared memory."""
    import types

    from nanovllm_lab.kernels import lamport_norm
    props = types.SimpleNamespace(regs_per_multiprocessor=65536, max_threads_per_multi_processor=2048,
                                  shared_memory_per_multiprocessor=233472)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda d: props)

    def kernel(n_regs, warps=8, shared=0):
        return types.SimpleNamespace(n_regs=n_regs, metadata=types.SimpleNamespace(num_warps=warps, shared=shared),
                                     _init_handles=lambda: None)
    assert lamport_norm._resident_per_sm(kernel(64), "cuda:0") == 4    # 64 x 256 threads = 16384 registers
    assert lamport_norm._resident_per_sm(kernel(60), "cuda:0") == 4    # rounded up to 64 per thread
    assert lamport_norm._resident_per_sm(kernel(128), "cuda:0") == 2
    assert lamport_norm._resident_per_sm(kernel(255), "cuda:0") == 1
    assert lamport_norm._resident_per_sm(kernel(16, warps=4), "cuda:0") == 16  # threads: 2048 / 128
    assert lamport_norm._resident_per_sm(kernel(16, warps=4, shared=100_000), "cuda:0") == 2
    assert lamport_norm._resident_per_sm(kernel(16, warps=4, shared=116_000), "cuda:0") == 1  # + 1 KiB per block
    assert lamport_norm._resident_per_sm(types.SimpleNamespace(), "cuda:0") is None  # the interpreter: unknown
    # The kernel cannot be compiled here: the cap falls back to one program per SM, the always-safe grid.
    monkeypatch.setattr(lamport_norm, "_RESIDENT", {})
    monkeypatch.setattr(lamport_norm._lamport_allreduce_norm_kernel, "warmup",
                        lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no GPU")), raising=False)
    a = torch.zeros(2, 8)
    meta = {"BLOCK": 8, "num_warps": 8}
    assert lamport_norm._programs_per_sm((a,), meta, 4) == 1
    assert list(lamport_norm._RESIDENT.values()) == [0]  # recorded as unknown
    monkeypatch.setattr(lamport_norm._lamport_allreduce_norm_kernel, "warmup", lambda *a, **k: kernel(128),
                        raising=False)
    monkeypatch.setattr(lamport_norm, "_RESIDENT", {})
    assert lamport_norm._programs_per_sm((a, 2, 8), meta, 4) == 2
    assert lamport_norm._programs_per_sm((a, 2, 8), meta, 1) == 1
    assert lamport_norm._programs_per_sm((a, 1, 8), meta, 4) == 2  # n_rows == 1: another variant, read again
    assert len(lamport_norm._RESIDENT) == 2


def test_row_shards_cover_every_row_once():
    for world in range(1, 9):
        for n in range(20):
            shard = row_shard(n, world)
            owned = [i for r in range(world) for i in range(r * shard, min(n, (r + 1) * shard))]
            assert owned == list(range(n)), (world, n)


def test_two_shot_rejects_bad_arguments():
    a = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="rank must be in"):
        two_shot_reduce_rows([a, a], torch.zeros(4, 8), 2)
    with pytest.raises(ValueError, match=r"sum buffer must be a contiguous \[4, 8\]"):
        two_shot_reduce_rows([a, a], torch.zeros(4, 16)[:, :8], 0)
    with pytest.raises(ValueError, match="one shape and dtype"):
        two_shot_add_norm([a, torch.zeros(4, 8, dtype=torch.bfloat16)], a, None, 1e-6)
    with pytest.raises(ValueError, match=r"residual must be \[4, 8\]"):
        two_shot_add_norm([a, a], torch.zeros(3, 8), torch.ones(8), 1e-6)
    with pytest.raises(ValueError, match=r"norm weight must be \[8\]"):
        two_shot_add_norm([a, a], a, torch.ones(9), 1e-6)
    empty = torch.zeros(0, 8)
    two_shot_reduce_rows([empty, empty], empty.clone(), 1)  # no rows: nothing to launch, no division by zero
    out, res = two_shot_add_norm([empty, empty], empty, torch.ones(8), 1e-6)
    assert out.shape == res.shape == (0, 8)


# -- SiLU-and-mul (kernels/silu_mul.py) against the PyTorch activation it replaces on CUDA ---------------------
@pytest.mark.parametrize("n, cols", [(1, 8), (5, 100), (1027, 48)])  # 1027: the 4-rows-per-program path with a tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_matches_torch(n, cols, dtype):
    from nanovllm_lab.kernels.silu_mul import silu_and_mul
    from nanovllm_lab.layers.activation import silu_and_mul_torch

    g = _gen(7)
    wide = _randn((n, 2 * cols + 24), dtype, g) * 4  # rows strided: the gate/up halves sit inside wider rows
    x = wide[:, 24:]
    ref = silu_and_mul_torch(x.float())
    out = silu_and_mul(x)
    assert out.shape == (n, cols) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    else:  # one bf16 rounding of the float32 result (the interpreter truncates rather than rounds)
        assert ((out.float() - ref).abs() <= ref.abs() * 2 ** -7 + 1e-6).all()


def test_silu_and_mul_writes_into_out_and_rejects_bad_shapes():
    from nanovllm_lab.kernels.silu_mul import silu_and_mul
    from nanovllm_lab.layers.activation import silu_and_mul_torch

    x = _randn((3, 16), torch.float32, _gen(8))
    out = torch.full((3, 8), float("nan"))
    assert silu_and_mul(x, out=out) is out
    torch.testing.assert_close(out, silu_and_mul_torch(x))
    with pytest.raises(ValueError, match=r"silu_and_mul needs x of shape \[n, 2I\]"):
        silu_and_mul(torch.zeros(3, 15))
    with pytest.raises(ValueError, match=r"out must be \[3, 8\]"):
        silu_and_mul(x, out=torch.empty(3, 9))
    assert silu_and_mul(torch.zeros(0, 16)).shape == (0, 8)


# -- q/k norm + RoPE (kernels/qk_norm_rope.py) against the eager path of models/qwen3.py ----------------------
def _qk_reference(qkv, positions, q_norm, k_norm, rope, nq, nk, d):
    from nanovllm_lab.models.qwen3 import qk_norm_rope_torch
    return qk_norm_rope_torch(qkv, positions, q_norm, k_norm, rope, nq, nk, d)[:2]


@pytest.mark.parametrize("nq, nk, d", [(4, 2, 16), (6, 1, 8), (2, 2, 64)])  # 6 + 1 heads: a partial head block
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_matches_the_eager_path(nq, nk, d, dtype):
    from nanovllm_lab.kernels.qk_norm_rope import qk_norm_rope
    from nanovllm_lab.layers.rotary_embedding import RotaryEmbedding

    g = _gen(9)
    n = 5
    q_norm, k_norm = RMSNorm(d, 1e-6), RMSNorm(d, 1e-6)
    q_norm.weight.data = (torch.rand(d, generator=g) + 0.5).to(dtype)
    k_norm.weight.data = (torch.rand(d, generator=g) + 0.5).to(dtype)
    rope = RotaryEmbedding(d, 64, 10000.0)
    positions = torch.tensor([0, 3, 17, 63, 5])
    wide = _randn((n, (nq + 2 * nk) * d + 8), dtype, g) * 3  # strided rows, as a column slice would give
    qkv = wide[:, :(nq + 2 * nk) * d]
    want_q, want_k = _qk_reference(qkv, positions, q_norm, k_norm, rope, nq, nk, d)
    q, k = qk_norm_rope(qkv, positions, rope.cos_sin, q_norm.weight, k_norm.weight, 1e-6, nq, nk, d)
    assert q.shape == (n, nq, d) and k.shape == (n, nk, d) and q.is_contiguous() and k.is_contiguous()
    if dtype == torch.float32:
        torch.testing.assert_close(q, want_q, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(k, want_k, rtol=1e-5, atol=1e-5)
    else:  # the interpreter truncates to bf16 where the GPU rounds: a few ulps over three roundings
        torch.testing.assert_close(q.float(), want_q.float(), rtol=3e-2, atol=3e-2)
        torch.testing.assert_close(k.float(), want_k.float(), rtol=3e-2, atol=3e-2)


def test_qk_norm_rope_rejects_bad_inputs():
    from nanovllm_lab.kernels.qk_norm_rope import qk_norm_rope

    cs, w = torch.zeros(8, 16), torch.ones(16)
    pos = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"qkv \[T, >= 96\]"):
        qk_norm_rope(torch.zeros(2, 80), pos, cs, w, w, 1e-6, 4, 2, 16)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        qk_norm_rope(torch.zeros(2, 96), pos, torch.zeros(8, 12), w, w, 1e-6, 6, 2, 12)
    with pytest.raises(ValueError, match="float32 cos_sin"):
        qk_norm_rope(torch.zeros(2, 128), pos, cs.half(), w, w, 1e-6, 4, 2, 16)
    with pytest.raises(ValueError, match=r"contiguous positions of shape \(2,\)"):
        qk_norm_rope(torch.zeros(2, 128), torch.zeros(4, dtype=torch.long)[::2], cs, w, w, 1e-6, 4, 2, 16)


def test_qk_kernel_is_used_only_for_power_of_two_head_dims():
    """Head sizes that are not a power of two (a checkpoint with head_dim 96, say) keep the PyTorch q/k path
    instead of failing at the kernel's check when the engine starts on a GPU."""
    import dataclasses

    from nanovllm_lab.models.arch import load_arch
    from nanovllm_lab.models.qwen3 import Qwen3Attention
    arch = load_arch("tiny")
    assert Qwen3Attention(arch).fused_qk
    assert not Qwen3Attention(dataclasses.replace(arch, head_dim=96)).fused_qk


@pytest.mark.parametrize("nq, nk", [(4, 2), (6, 1), (16, 4)])  # one 8-head program; partial blocks; mixed q/k/v
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_qk_norm_rope_writes_the_cache_as_store_kv_does(dtype, nq, nk):
    """With the cache, the kernel writes this step's k (normalised, rotated) and v into the paged cache at each
    token's slot, and nothing for slot -1 (a padding token): the same cache as the eager path's k and v through
    store_kvcache_torch, everywhere but the scratch slot the torch version parks padding in."""
    from nanovllm_lab.kernels.qk_norm_rope import qk_norm_rope
    from nanovllm_lab.layers.rotary_embedding import RotaryEmbedding

    g = _gen(11)
    d, n, blocks, bs = 16, 6, 3, 4
    q_norm, k_norm = RMSNorm(d, 1e-6), RMSNorm(d, 1e-6)
    q_norm.weight.data = (torch.rand(d, generator=g) + 0.5).to(dtype)
    k_norm.weight.data = (torch.rand(d, generator=g) + 0.5).to(dtype)
    rope = RotaryEmbedding(d, 64, 10000.0)
    positions = torch.tensor([0, 1, 2, 9, 10, 11])
    slots = torch.tensor([5, 6, -1, 0, 9, 3])
    qkv = _randn((n, (nq + 2 * nk) * d), dtype, g) * 3
    want_q, want_k = _qk_reference(qkv, positions, q_norm, k_norm, rope, nq, nk, d)
    v = qkv[:, (nq + nk) * d:].reshape(n, nk, d)
    sentinel = -7.0
    want_kc = torch.full((blocks, bs, nk, d), sentinel, dtype=dtype)
    want_vc = want_kc.clone()
    store_kvcache_torch(want_k, v, want_kc, want_vc, slots)
    kc, vc = torch.full_like(want_kc, sentinel), torch.full_like(want_vc, sentinel)
    q, k = qk_norm_rope(qkv, positions, rope.cos_sin, q_norm.weight, k_norm.weight, 1e-6, nq, nk, d,
                        cache=(kc, vc, slots))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(q.float(), want_q.float(), **tol)
    torch.testing.assert_close(k.float(), want_k.float(), **tol)
    flat = lambda c: c.view(-1, nk, d)[:-1].float()  # noqa: E731  (the last slot: torch's padding scratch)
    torch.testing.assert_close(flat(kc), flat(want_kc), **tol)
    assert torch.equal(flat(vc), flat(want_vc))  # v is copied, not computed
    assert (kc.view(-1, nk, d)[[1, 2, 4, 7, 8, 10]] == sentinel).all()  # slots no token wrote stay untouched


def test_only_the_triton_backend_takes_a_fused_cache_write():
    """Attention hands its cache to the q/k kernel only where the backend's store is kernels/store_kv.py's (the
    triton backend's layout, slot -1 skipped), and only once a cache is bound; `stored=True` then skips the
    backend's own store (a second write would be harmless but costs the launch the fusion saves)."""
    from nanovllm_lab.attention.torch_backend import TorchAttentionBackend
    from nanovllm_lab.layers.attention import Attention
    from nanovllm_lab.utils.context import reset_context, set_context

    attn = Attention(2, 16, 0.25, 1)
    attn.backend = TRI
    assert attn.fused_store_target() is None  # no cache bound yet
    attn.k_cache, attn.v_cache = torch.zeros(2, 4, 1, 16), torch.zeros(2, 4, 1, 16)
    slots = torch.tensor([0, 1], dtype=torch.int32)
    set_context(AttentionContext(is_prefill=False, slot_mapping=slots))
    try:
        kc, vc, got = attn.fused_store_target()
        assert kc is attn.k_cache and vc is attn.v_cache and got is slots
        attn.backend = TorchAttentionBackend()
        assert attn.fused_store_target() is None
        calls = []
        attn.backend.store_kv = lambda *a: calls.append(a)
        attn.backend.decode = lambda q, *a: torch.zeros_like(q)
        q, kv = torch.zeros(2, 2 * 16), torch.zeros(2, 16)
        attn(q, kv, kv, stored=True)
        assert not calls
        attn(q, kv, kv)
        assert len(calls) == 1
    finally:
        reset_context()


def test_qwen3_attention_with_the_fused_kernel_equals_the_eager_path(monkeypatch):
    """Qwen3Attention's fused branch (taken on CUDA; forced here) against its eager branch, through a prefill and
    a decode step on the triton backend: the same outputs and the same KV cache, and the backend's own store
    never runs on the fused branch (a missing or doubled cache write would show)."""
    import dataclasses

    from nanovllm_lab.models import qwen3
    from nanovllm_lab.models.arch import load_arch
    from nanovllm_lab.utils.context import reset_context, set_context

    arch = dataclasses.replace(load_arch("tiny"), num_hidden_layers=1)
    torch.manual_seed(0)
    layer = qwen3.Qwen3Attention(arch)
    for p in layer.parameters():
        p.data.normal_(0, 0.2)
    layer.q_norm.weight.data.uniform_(0.5, 1.5)
    layer.k_norm.weight.data.uniform_(0.5, 1.5)
    bs, blocks, n = 4, 4, 5
    shape = (blocks, bs, layer.num_kv_heads, layer.head_dim)
    x = torch.randn(n, arch.hidden_size)
    x_dec = torch.randn(1, arch.hidden_size)
    prefill = dataclasses.replace(_prefill_ctx([n], [n]), slot_mapping=torch.tensor([4, 5, 6, 7, 8], dtype=torch.int32))
    decode = AttentionContext(is_prefill=False, slot_mapping=torch.tensor([9], dtype=torch.int32),
                              context_lens=torch.tensor([n + 1], dtype=torch.int32),
                              block_tables=torch.tensor([[1, 2]], dtype=torch.int32))

    def run(fused: bool):
        monkeypatch.setattr(qwen3, "use_triton", lambda t: fused)
        layer.attn.backend = TRI
        layer.attn.k_cache, layer.attn.v_cache = torch.zeros(shape), torch.zeros(shape)
        stores = []
        monkeypatch.setattr(TRI, "store_kv", lambda *a: (stores.append(1), TritonAttentionBackend.store_kv(TRI, *a)))
        outs = []
        try:
            for ctx, inp, pos in ((prefill, x, torch.arange(n)), (decode, x_dec, torch.tensor([n]))):
                set_context(ctx)
                outs.append(layer(pos, inp))
        finally:
            reset_context()
        return outs, layer.attn.k_cache.clone(), layer.attn.v_cache.clone(), len(stores)

    (p_ref, d_ref), kc_ref, vc_ref, stores_ref = run(False)
    (p_got, d_got), kc, vc, stores = run(True)
    assert stores_ref == 2 and stores == 0
    torch.testing.assert_close(kc, kc_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(vc, vc_ref) and kc.abs().sum() > 0
    torch.testing.assert_close(p_got, p_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(d_got, d_ref, rtol=1e-4, atol=1e-4)
