"""Communication strategies: how the tensor-parallel reductions are issued and what they overlap with.

Every reduction of the model goes through the strategy installed in this process (`get_comm()`): the
row-parallel GEMM plus its all-reduce (`row_parallel`), the embedding's reduction, the LM-head gather, and
the decoder-layer loop (`run_layers`, which micro-batching strategies replace). Layers never call
torch.distributed themselves.
"""
from nanovllm_lab.comm.base import (CommStrategy, StrategyConfig, STRATEGIES, build_strategy, get_comm,
                                    resolve_strategy, set_comm)

__all__ = ["CommStrategy", "StrategyConfig", "STRATEGIES", "build_strategy", "get_comm", "resolve_strategy",
           "set_comm"]
