"""Rotary position embedding (neox layout: rotate the two halves of each head), with a cached cos/sin table."""
from __future__ import annotations

import torch
from torch import nn

from nanovllm_lab.utils.compile import compilable


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], -1), persistent=False)

    @compilable
    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return self.rotate_qk(positions, q, k)

    def rotate_qk(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        """The rotation alone, uncompiled: for callers that put it inside a larger compiled region."""
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, -1)  # [T, 1, D/2]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x1, x2 = x.float().chunk(2, -1)
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).to(x.dtype)
