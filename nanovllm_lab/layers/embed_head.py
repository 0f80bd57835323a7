"""Vocab-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm_lab.comm import get_comm
from nanovllm_lab.distributed.parallel import tp_rank, tp_size
from nanovllm_lab.utils.context import get_context


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        if num_embeddings % self.tp_size:
            raise ValueError(f"vocab size {num_embeddings} not divisible by tensor_parallel_size {self.tp_size}")
        self.num_embeddings = num_embeddings
        self.per_rank = num_embeddings // self.tp_size
        self.vocab_start = self.per_rank * self.tp_rank
        self.weight = nn.Parameter(torch.empty(self.per_rank, embedding_dim), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, name: str = "") -> None:
        if loaded.shape != (self.num_embeddings, param.shape[1]):
            raise ValueError(f"{name}: expected shape {(self.num_embeddings, param.shape[1])}, got {tuple(loaded.shape)}")
        param.data.copy_(loaded.narrow(0, self.vocab_start, self.per_rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(x, self.weight)
        local = x - self.vocab_start
        mine = (local >= 0) & (local < self.per_rank)
        y = F.embedding(local.clamp(0, self.per_rank - 1), self.weight) * mine.unsqueeze(1).to(self.weight.dtype)
        return get_comm().reduce_embedding(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits of the last token of each sequence (prefill) or of every token (decode), gathered to rank 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor | None:
        ctx = get_context()
        if ctx.is_prefill:
            x = x[ctx.cu_seqlens_q[1:] - 1]
        return get_comm().gather_logits(F.linear(x, self.weight))
