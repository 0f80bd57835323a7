"""SiLU-gated activation of the fused gate/up projection."""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm_lab.utils.compile import compilable


class SiluAndMul(nn.Module):
    @compilable
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = x.chunk(2, -1)
        return F.silu(gate) * up
