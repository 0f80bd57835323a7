"""`none`: reductions skipped. Outputs are wrong by design.

It exists to time the no-communication lower bound (T_none). The engine flags its results and refuses to
return text from it.
"""
import torch

from nanovllm_lab.comm.base import CommStrategy, StrategyConfig, register_strategy


@register_strategy("none", StrategyConfig)
class NoCommStrategy(CommStrategy):
    valid_outputs = False
    communicates = False

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return x
