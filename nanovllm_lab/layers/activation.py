"""SiLU-gated activation of the fused gate/up projection.

Two implementations, chosen per process by `Config.activation_kernel` (the model runner calls
`set_activation_kernel`): the Triton kernel of kernels/silu_mul.py on CUDA, and plain PyTorch (compiled with the
other small elementwise layers when `torch_compile` is on) everywhere else. The PyTorch one is the reference the
kernel is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm_lab.utils.compile import compilable

ACTIVATION_KERNELS = ("auto", "triton", "torch")
_USE_TRITON = False


def set_activation_kernel(name: str) -> None:
    """'triton' routes CUDA inputs through the Triton kernel; 'torch' (or anything on CPU) through PyTorch."""
    global _USE_TRITON
    if name not in ("triton", "torch"):
        raise ValueError(f"activation kernel must be 'triton' or 'torch' once resolved, got {name!r}")
    _USE_TRITON = name == "triton"


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


_silu_and_mul_compilable = compilable(silu_and_mul_torch)


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _USE_TRITON and x.is_cuda:
            from nanovllm_lab.kernels.silu_mul import silu_and_mul  # triton imports lazily: CPU-only installs

            return silu_and_mul(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], x.shape[-1] // 2)
        return _silu_and_mul_compilable(x)
