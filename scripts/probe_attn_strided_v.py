"""One-off probe (session 13): does the engine's strided v (a view of the qkv rows) slow the prefill kernel?
8 prompts of 2048 tokens, qwen3-8b heads at tp=1 (32/8) and tp=2 (16/4), bf16; do_bench medians (L2 flushed)."""
import math

import torch
import triton.testing

from nanovllm_lab.kernels.prefill_attention import paged_prefill_attention

for hq, hkv in ((32, 8), (16, 4)):
    d, seqs, seq = 128, 8, 2048
    n = seqs * seq
    qkv = torch.randn(n, (hq + 2 * hkv) * d, dtype=torch.bfloat16, device="cuda")
    q = qkv[:, :hq * d].reshape(n, hq, d).contiguous()
    k = qkv[:, hq * d:(hq + hkv) * d].reshape(n, hkv, d).contiguous()
    v_view = qkv[:, (hq + hkv) * d:].view(n, hkv, d)  # what Attention.forward's v.view gives
    v_dense = v_view.contiguous()
    cu = torch.arange(0, n + 1, seq, dtype=torch.int32, device="cuda")
    flops = seqs * 2 * 2 * seq * seq / 2 * hq * d
    for name, v in (("strided v", v_view), ("contiguous v", v_dense), ("contiguous v + copy", None)):
        if v is None:
            def fn():
                return paged_prefill_attention(q, k, v_view.contiguous(), None, None, cu, cu, seq, seq, None,
                                               d ** -0.5)
        else:
            def fn(v=v):
                return paged_prefill_attention(q, k, v, k, v, cu, cu, seq, seq, None, d ** -0.5)
        fn()
        ms = triton.testing.do_bench(fn, return_mode="median")
        print(f"heads {hq}/{hkv} {name:20s}: {ms:.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s", flush=True)
    o1 = paged_prefill_attention(q, k, v_view, k, v_view, cu, cu, seq, seq, None, d ** -0.5)
    o2 = paged_prefill_attention(q, k, v_dense, k, v_dense, cu, cu, seq, seq, None, d ** -0.5)
    print("same output:", torch.equal(o1, o2), math.isfinite(o1.float().abs().max().item()))
