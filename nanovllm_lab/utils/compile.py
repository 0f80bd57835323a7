"""How the small elementwise layers run: opt-in torch.compile (RMSNorm, RoPE, SiLU-and-mul, sampler), and
hand-written Triton kernels where those beat inductor's (SiLU-and-mul, the q/k norm + RoPE).

In a decode step these are dozens of tiny kernels per layer; inductor fuses each into one or two Triton
kernels, as nano-vLLM does with @torch.compile. `Config.torch_compile` defaults to on for cuda (measured on an
H200, qwen3-0.6b at batch 256: decode step 10.7 -> 7.2 ms) and off on cpu, where compile time outweighs the
gain for the tiny model. `Config.elementwise_kernels` ("triton" by default on cuda) routes SiLU-and-mul and the
q/k norm + RoPE through kernels/silu_mul.py and kernels/qk_norm_rope.py instead: compiled with dynamic shapes,
inductor's versions moved 1.7 TB/s or read their input twice (results/LOG.md, session 13). The model runner
sets both per process; the PyTorch code stays the CPU path and the kernels' test reference.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)
_ENABLED = False
_TRITON = False
ELEMENTWISE_KERNELS = ("auto", "triton", "torch")


def set_compile(enabled: bool) -> None:
    global _ENABLED
    _ENABLED = enabled
    if enabled and "TORCHINDUCTOR_COMPILE_THREADS" not in os.environ:
        # Compile in this process, without inductor's pool of compile workers. On 2 x H200 (torch 2.11) a lab
        # sweep at tp=2 finished, printed its table and then did not exit for minutes: the pool's shutdown at
        # interpreter exit waits up to 300 s for its sidecar (pytorch issues 162199, 125235; the workaround
        # there is this setting). Each TP worker pays the same wait when its engine exits. The compiled regions
        # are a handful of small elementwise kernels, so compiling them serially costs seconds.
        import torch._inductor.config as inductor_config
        inductor_config.compile_threads = 1


def set_elementwise_kernels(name: str) -> None:
    """'triton': CUDA inputs of SiLU-and-mul and the q/k norm + RoPE go through the Triton kernels; 'torch':
    through PyTorch (compiled when compilation is on). CPU inputs always take PyTorch."""
    global _TRITON
    if name not in ("triton", "torch"):
        raise ValueError(f"elementwise kernels must be 'triton' or 'torch' once resolved, got {name!r}")
    _TRITON = name == "triton"


def use_triton(x: torch.Tensor) -> bool:
    """Whether this input takes the Triton kernels (set_elementwise_kernels)."""
    return _TRITON and x.is_cuda


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
