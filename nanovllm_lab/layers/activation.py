"""SiLU-gated activation of the fused gate/up projection.

On CUDA it runs the Triton kernel of kernels/silu_mul.py (utils/compile.py `use_triton`, set per process from
`Config.elementwise_kernels`); elsewhere plain PyTorch, compiled with the other small elementwise layers when
`torch_compile` is on. The PyTorch version is the reference the kernel is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm_lab.utils.compile import compilable, use_triton


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, -1)
    return F.silu(gate) * up


_silu_and_mul_compilable = compilable(silu_and_mul_torch)


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(x):
            from nanovllm_lab.kernels.silu_mul import silu_and_mul  # triton imports lazily: CPU-only installs

            return silu_and_mul(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:-1], x.shape[-1] // 2)
        return _silu_and_mul_compilable(x)
