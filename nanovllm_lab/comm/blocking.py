"""`blocking`: one all-reduce on the compute stream after each row-parallel GEMM (nano-vLLM's behaviour).

The baseline every other strategy is measured and tested against.
"""
from nanovllm_lab.comm.base import CommStrategy, StrategyConfig, register_strategy


@register_strategy("blocking", StrategyConfig)
class BlockingStrategy(CommStrategy):
    pass
