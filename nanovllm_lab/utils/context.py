"""Per-step attention metadata shared by all attention layers of one forward pass.

The model runner builds an `AttentionContext` for each step (or each micro-batch, when a communication
strategy splits the batch) and installs it with `set_context`; attention layers read it with `get_context`.
A process-wide slot keeps layer signatures free of metadata, as in nano-vLLM.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field, replace

import torch


def aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` if its data starts on a 16-byte boundary, else a fresh copy (which does). A micro-batch's slice of the
    step's slot mapping or block tables starts wherever its first token or sequence falls; Triton specialises
    every pointer argument on 16-byte alignment, so the first slice at an odd offset made the kernels that read
    it (store_kv, the attention kernels) compile a second variant in the middle of a timed step (suspected in
    session 12's bench: a step 68 ms slower than blocking's, whose second micro-batch's int32 slot mapping
    started at element 5878, byte 23512). The copies are tens of KB at most; under graph capture they come from
    the graph's pool, at fixed addresses."""
    if t is None or t.data_ptr() % 16 == 0:
        return t
    return t.clone()


@dataclass
class AttentionContext:
    """Metadata describing where each token's K/V goes and what it attends to.

    Prefill (variable-length, causal): the query tokens of sequence i are rows
    `cu_seqlens_q[i]:cu_seqlens_q[i+1]`; sequence i attends over `cu_seqlens_k[i+1]-cu_seqlens_k[i]`
    keys, the last `q_len` of which are the new tokens. When `block_tables` is set, earlier keys
    (prefix-cache hits, earlier chunks) are read from the paged cache.
    Decode: one query token per sequence; `context_lens[i]` keys, all in the paged cache.
    `slot_mapping[t]` is the flat cache slot of token t (-1: a padding token whose K/V is dropped).
    """

    is_prefill: bool = False
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    slot_mapping: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    block_tables: torch.Tensor | None = None
    # Prefill: every sequence's block table, cached context or not, so that a micro-batch that starts inside a
    # sequence can read that sequence's earlier keys from the paged cache (slice_tokens). None: cannot cut.
    seq_tables: torch.Tensor | None = None
    # Host copies of the prefill boundaries, so reference code can loop without device syncs.
    cu_seqlens_q_host: list[int] = field(default_factory=list)
    cu_seqlens_k_host: list[int] = field(default_factory=list)

    @property
    def num_seqs(self) -> int:
        if self.is_prefill:
            return len(self.cu_seqlens_q_host) - 1
        return 0 if self.context_lens is None else int(self.context_lens.shape[0])

    def slice_seqs(self, start: int, end: int) -> "AttentionContext":
        """The context of sequences [start, end) alone, for micro-batching (token rows renumbered from 0)."""
        if self.is_prefill:
            q0, k0 = self.cu_seqlens_q_host[start], self.cu_seqlens_k_host[start]
            cq = [x - q0 for x in self.cu_seqlens_q_host[start:end + 1]]
            ck = [x - k0 for x in self.cu_seqlens_k_host[start:end + 1]]
            q1 = self.cu_seqlens_q_host[end]
            return replace(
                self,
                cu_seqlens_q=self.cu_seqlens_q[start:end + 1] - q0,
                cu_seqlens_k=self.cu_seqlens_k[start:end + 1] - k0,
                max_seqlen_q=max(b - a for a, b in zip(cq, cq[1:])),
                max_seqlen_k=max(b - a for a, b in zip(ck, ck[1:])),
                slot_mapping=aligned(self.slot_mapping[q0:q1]),
                context_lens=None if self.context_lens is None else aligned(self.context_lens[start:end]),
                block_tables=None if self.block_tables is None else aligned(self.block_tables[start:end]),
                seq_tables=None if self.seq_tables is None else aligned(self.seq_tables[start:end]),
                cu_seqlens_q_host=cq,
                cu_seqlens_k_host=ck,
            )
        return replace(
            self,
            slot_mapping=aligned(self.slot_mapping[start:end]),
            context_lens=aligned(self.context_lens[start:end]),
            block_tables=aligned(self.block_tables[start:end]),
        )

    def token_range(self, start: int, end: int) -> tuple[int, int]:
        """Token rows covered by sequences [start, end)."""
        if self.is_prefill:
            return self.cu_seqlens_q_host[start], self.cu_seqlens_q_host[end]
        return start, end

    def slice_tokens(self, t0: int, t1: int) -> "AttentionContext":
        """The context of token rows [t0, t1) alone (renumbered from 0), for micro-batching. In prefill a bound
        may cut a sequence: the piece before the cut attends to its keys up to the cut (its own tokens: the
        first piece of a fresh sequence needs no cache); the piece after it sees all the sequence's earlier keys,
        which it reads from the paged cache through `seq_tables`, where the earlier piece's attention stored them
        (the micro-batches' attention runs in order on one stream). Built with device ops, no host copy, so a
        CUDA graph may capture it."""
        if not self.is_prefill:
            return self.slice_seqs(t0, t1)
        cq, ck = self.cu_seqlens_q_host, self.cu_seqlens_k_host
        s = bisect.bisect_right(cq, t0) - 1  # the sequence that holds token t0
        e = bisect.bisect_left(cq, t1)       # one past the sequence that holds token t1 - 1
        if cq[s] == t0 and cq[e] == t1:
            return self.slice_seqs(s, e)
        tables = self.block_tables
        if t0 > cq[s] and tables is None:
            if self.seq_tables is None:
                raise ValueError(f"tokens [{t0}, {t1}) start inside a sequence, and the context has no seq_tables "
                                 "to read its earlier keys from")
            tables = self.seq_tables
        after = cq[e] - t1  # tokens of the last sequence past t1: neither queries nor keys of this piece
        q = [min(max(x, t0), t1) - t0 for x in cq[s:e + 1]]
        k = [0]
        for i in range(s, e):
            k.append(k[-1] + ck[i + 1] - ck[i] - (after if i == e - 1 else 0))
        dev_k = self.cu_seqlens_k[s + 1:e + 1] - self.cu_seqlens_k[s:e]
        if after:
            dev_k = torch.cat([dev_k[:-1], dev_k[-1:] - after])
        return replace(
            self,
            cu_seqlens_q=self.cu_seqlens_q[s:e + 1].clamp(t0, t1) - t0,
            cu_seqlens_k=torch.cat([torch.zeros_like(dev_k[:1]), dev_k.cumsum(0).to(dev_k.dtype)]),
            max_seqlen_q=max(b - a for a, b in zip(q, q[1:])),
            max_seqlen_k=max(b - a for a, b in zip(k, k[1:])),
            slot_mapping=aligned(self.slot_mapping[t0:t1]),
            block_tables=None if tables is None else aligned(tables[s:e]),
            seq_tables=None if self.seq_tables is None else aligned(self.seq_tables[s:e]),
            cu_seqlens_q_host=q,
            cu_seqlens_k_host=k,
        )


_CONTEXT = AttentionContext()


def set_context(ctx: AttentionContext) -> None:
    global _CONTEXT
    _CONTEXT = ctx


def get_context() -> AttentionContext:
    return _CONTEXT


def reset_context() -> None:
    set_context(AttentionContext())
