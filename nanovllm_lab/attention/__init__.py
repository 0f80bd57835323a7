"""Attention backends: how K/V are stored into the paged cache and how attention is computed.

`get_backend(name)` returns a backend instance; `resolve_backend("auto", device)` picks flash_attn where it
is importable on cuda, else triton on cuda, else torch, and logs the choice.
"""
from nanovllm_lab.attention.base import AttentionBackend, BACKENDS, get_backend, resolve_backend

__all__ = ["AttentionBackend", "BACKENDS", "get_backend", "resolve_backend"]
