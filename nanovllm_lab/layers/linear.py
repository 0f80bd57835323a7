"""Tensor-parallel linear layers (Megatron style).

Column-parallel layers split the output features across ranks and need no communication (a strategy that keeps
activations sharded by token may fuse its all-gather into them); the row-parallel layer splits the input
features, so its partial sums are reduced by the installed communication strategy. Both GEMMs go through the
strategy.
Each parameter has a `weight_loader(param, full_tensor[, shard_id])` that slices a checkpoint tensor for
this rank and names the tensor when its shape is wrong.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm_lab.comm import get_comm
from nanovllm_lab.distributed.parallel import tp_rank, tp_size


def _check(param: torch.Tensor, loaded: torch.Tensor, what: str) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"{what}: expected shape {tuple(param.shape)} for this rank, got {tuple(loaded.shape)}")


class LinearBase(nn.Module):
    def __init__(self, input_size: int, output_size: int, bias: bool, tp_dim: int | None) -> None:
        super().__init__()
        self.tp_dim, self.tp_rank, self.tp_size = tp_dim, tp_rank(), tp_size()
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _shard(self, full: torch.Tensor, dim: int, size: int, name: str) -> torch.Tensor:
        if full.shape[dim] != size * self.tp_size:
            raise ValueError(f"{name}: dim {dim} is {full.shape[dim]}, expected {size * self.tp_size}")
        return full.narrow(dim, self.tp_rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
        if self.tp_dim is not None and param.dim() > self.tp_dim:
            loaded = self._shard(loaded, self.tp_dim, param.shape[self.tp_dim], name)
        _check(param, loaded, name)
        param.data.copy_(loaded)


class ReplicatedLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        super().__init__(input_size, output_size, bias, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        if output_size % tp_size():
            raise ValueError(f"output size {output_size} not divisible by tensor_parallel_size {tp_size()}")
        super().__init__(input_size, output_size // tp_size(), bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return get_comm().column_parallel(x, self.weight, self.bias)

    def _load_part(self, param: nn.Parameter, loaded: torch.Tensor, offset: int, size: int, name: str) -> None:
        """Copy this rank's `size` rows of a packed part into rows [offset, offset+size) of the parameter."""
        loaded = self._shard(loaded, 0, size, name)
        target = param.data.narrow(0, offset, size)
        _check(target, loaded, name)
        target.copy_(loaded)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs in one GEMM (gate and up); shard_id picks the part being loaded."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False) -> None:
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "", shard_id: int = 0) -> None:
        size = self.output_sizes[shard_id] // self.tp_size
        self._load_part(param, loaded, sum(self.output_sizes[:shard_id]) // self.tp_size, size, name)


class QKVParallelLinear(ColumnParallelLinear):
    """q, k and v projections in one GEMM; each rank holds its heads of each (GQA: fewer KV heads)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False) -> None:
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        super().__init__(hidden_size, (num_heads + 2 * num_kv_heads) * head_dim, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "", shard_id: str = "q") -> None:
        q = self.num_heads * self.head_dim // self.tp_size
        kv = self.num_kv_heads * self.head_dim // self.tp_size
        size, offset = {"q": (q, 0), "k": (kv, q), "v": (kv, q + kv)}[shard_id]
        self._load_part(param, loaded, offset, size, name)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; the strategy runs the GEMM and reduces the partial sums."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False) -> None:
        if input_size % tp_size():
            raise ValueError(f"input size {input_size} not divisible by tensor_parallel_size {tp_size()}")
        super().__init__(input_size // tp_size(), output_size, bias, 1)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
        if param.dim() == 1:  # the bias is added once, by rank 0's partial sum (see forward)
            _check(param, loaded, name)
            param.data.copy_(loaded)
            return
        super().weight_loader(param, loaded, name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp_rank == 0 else None
        return get_comm().row_parallel(x, self.weight, bias)
