"""Attention backend built on this repo's Triton kernels (nanovllm_lab.kernels).

- store_kv: one-program-per-token scatter into the paged cache (padding slots -1 are dropped).
- decode: GQA-grouped, split-K paged decode kernel; CUDA-graph capturable (static grid, no host syncs).
- prefill: causal varlen FlashAttention-2 style kernel, reading all keys from the paged cache when some
  sequence has cached context (block_tables set). Without cached context on CUDA in fp16/bf16, PyTorch's
  `torch.nn.attention.varlen.varlen_attn` (FlashAttention, torch >= 2.11) is used when present, since it
  is the faster path; our kernel remains the path on CPU (Triton interpreter), for fp32 and for the paged case.
"""
from __future__ import annotations

import inspect
import logging
from typing import Callable

import torch

from nanovllm_lab.attention.base import AttentionBackend
from nanovllm_lab.kernels.decode_attention import paged_decode_attention
from nanovllm_lab.kernels.prefill_attention import paged_prefill_attention
from nanovllm_lab.kernels.store_kv import store_kvcache
from nanovllm_lab.utils.context import AttentionContext

log = logging.getLogger(__name__)


def _load_varlen_attn() -> tuple[Callable | None, set[str]]:
    """PyTorch's varlen FlashAttention entry point and its keyword names, or (None, {}) if absent."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None, set()
    try:
        params = set(inspect.signature(varlen_attn).parameters)
    except (TypeError, ValueError):
        return None, set()
    # Causality is spelled window_size=(-1, 0) in newer releases and is_causal=True in the first one.
    if "window_size" not in params and "is_causal" not in params:
        return None, set()
    return varlen_attn, params


class TritonAttentionBackend(AttentionBackend):
    name = "triton"
    fused_store = True

    # Off by default: on torch 2.11 varlen_attn measured slower than our kernel for long prompts (H200, bf16,
    # causal, 8k tokens, head dim 128: 306 vs 417 TFLOP/s) and it has no GQA option, which every Qwen3 needs.
    def __init__(self, use_torch_varlen: bool = False) -> None:
        self._varlen, self._varlen_params = _load_varlen_attn() if use_torch_varlen else (None, set())

    def store_kv(self, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 slot_mapping: torch.Tensor) -> None:
        store_kvcache(k, v, k_cache, v_cache, slot_mapping)

    def _torch_varlen(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext,
                      scale: float) -> torch.Tensor | None:
        """Run varlen_attn when it applies; None means "use our kernel"."""
        if self._varlen is None or q.device.type != "cuda" or q.dtype not in (torch.float16, torch.bfloat16):
            return None
        kwargs: dict = {"scale": scale}
        if "window_size" in self._varlen_params:
            kwargs["window_size"] = (-1, 0)
        else:
            kwargs["is_causal"] = True
        if q.shape[1] != k.shape[1]:
            if "enable_gqa" not in self._varlen_params:
                return None
            kwargs["enable_gqa"] = True
        try:
            return self._varlen(q, k, v, ctx.cu_seqlens_q, ctx.cu_seqlens_k, ctx.max_seqlen_q,
                                ctx.max_seqlen_k, **kwargs)
        except (RuntimeError, TypeError, NotImplementedError) as e:  # e.g. unsupported head dim / arch
            log.warning("varlen_attn failed (%s); using the Triton prefill kernel from now on", e)
            self._varlen = None
            return None

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, ctx: AttentionContext, scale: float) -> torch.Tensor:
        if ctx.block_tables is None:
            out = self._torch_varlen(q, k, v, ctx, scale)
            if out is not None:
                return out
        return paged_prefill_attention(q, k, v, k_cache, v_cache, ctx.cu_seqlens_q, ctx.cu_seqlens_k,
                                       ctx.max_seqlen_q, ctx.max_seqlen_k, ctx.block_tables, scale)

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ctx: AttentionContext,
               scale: float) -> torch.Tensor:
        return paged_decode_attention(q, k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale)
