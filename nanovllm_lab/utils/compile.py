"""Opt-in torch.compile for the small elementwise layers (RMSNorm, RoPE, SiLU-and-mul, sampler).

In a decode step these are dozens of tiny kernels per layer; inductor fuses each into one or two Triton
kernels, as nano-vLLM does with @torch.compile. Off unless `Config.torch_compile` is set, because compile
time and inductor support depend on the machine; the model runner switches it on per process.
"""
from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)
_ENABLED = False


def set_compile(enabled: bool) -> None:
    global _ENABLED
    _ENABLED = enabled


def compilable(fn: F) -> F:
    """Run `fn` eagerly, or through torch.compile (built on first use) while compilation is enabled."""
    compiled: Callable | None = None

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        nonlocal compiled
        if not _ENABLED:
            return fn(*args, **kwargs)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
