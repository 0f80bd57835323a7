"""RMSNorm, with the residual add fused in when a residual is given (Qwen3's pre-norm blocks)."""
from __future__ import annotations

import torch
from torch import nn

from nanovllm_lab.utils.compile import compilable


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def norm(self, x: torch.Tensor) -> torch.Tensor:
        """The norm alone, uncompiled: for callers that put it inside a larger compiled region."""
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)

    @compilable
    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.norm(x)
        # Sum in float32, keep the residual stream in the activation dtype (as transformers does).
        x = (x.float() + residual.float()).to(x.dtype)
        return self.norm(x), x
