"""The flash-attn backend against the torch backend; skipped where flash-attn is not importable (it is absent
on the project's GPU machines)."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu
flash_attn = pytest.importorskip("flash_attn")
if not torch.cuda.is_available():
    pytest.skip("flash-attn needs CUDA", allow_module_level=True)

from nanovllm_lab.attention.flash_attn_backend import FlashAttnBackend  # noqa: E402
from nanovllm_lab.attention.torch_backend import TorchAttentionBackend  # noqa: E402
from nanovllm_lab.utils.context import AttentionContext  # noqa: E402


def test_decode_matches_torch():
    g = torch.Generator(device="cuda").manual_seed(0)
    nb, bs, hkv, hq, d, b = 8, 256, 2, 8, 128, 3
    kc = torch.randn(nb, bs, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    vc = torch.randn(nb, bs, hkv, d, device="cuda", dtype=torch.bfloat16, generator=g)
    q = torch.randn(b, hq, d, device="cuda", dtype=torch.bfloat16, generator=g)
    ctx = AttentionContext(is_prefill=False, context_lens=torch.tensor([5, 300, 700], device="cuda", dtype=torch.int32),
                           block_tables=torch.tensor([[0, -1, -1], [1, 2, -1], [3, 4, 5]], device="cuda",
                                                     dtype=torch.int32))
    ref = TorchAttentionBackend().decode(q, kc, vc, ctx, d ** -0.5).float()
    out = FlashAttnBackend().decode(q, kc, vc, ctx, d ** -0.5).float()
    assert (out - ref).norm() / ref.norm() <= 1e-2
