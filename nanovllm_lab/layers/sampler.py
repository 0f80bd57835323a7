"""Greedy and temperature sampling of the next token, per sequence."""
from __future__ import annotations

import torch
from torch import nn


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, temperatures: torch.Tensor,
                generator: torch.Generator | None = None) -> torch.Tensor:
        logits = logits.float()
        greedy = logits.argmax(-1)
        t = temperatures.clamp_min(1e-5).unsqueeze(1)
        probs = torch.softmax(logits / t, -1)
        # Gumbel-style trick: argmax(p / E) with E ~ Exp(1) draws from p without a cumulative sum.
        noise = torch.empty_like(probs).exponential_(1, generator=generator).clamp_min(1e-10)
        sampled = (probs / noise).argmax(-1)
        return torch.where(temperatures == 0, greedy, sampled)
