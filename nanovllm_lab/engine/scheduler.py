"""Continuous batching: which sequences run in the next step, and how many tokens of each.

A step is either prefill (new or preempted sequences, chunked so that a step holds at most
`max_num_batched_tokens` tokens) or decode (one token for every running sequence). When the cache runs out of
blocks during decode, the newest running sequence is preempted and later recomputed from its tokens.
"""
from __future__ import annotations

from collections import deque

from nanovllm_lab.engine.block_manager import BlockManager
from nanovllm_lab.engine.sequence import Sequence, SequenceStatus


class Scheduler:
    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int, eos_token_ids: set[int],
                 num_blocks: int, block_size: int) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.eos_token_ids = set(eos_token_ids)
        self.block_manager = BlockManager(num_blocks, block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()
        self.num_preemptions = 0

    def is_finished(self) -> bool:
        return not self.waiting and not self.running

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """The sequences of the next step and whether it is a prefill step."""
        scheduled: list[Sequence] = []
        budget = self.max_num_batched_tokens
        # Sequences whose prefill completes join `running` at once, so `running` counts them too.
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not seq.block_table:
                if not self.block_manager.can_allocate(seq):
                    break
                self.block_manager.allocate(seq)
            remaining = seq.num_tokens - seq.num_cached_tokens
            chunk = min(remaining, budget)
            seq.num_scheduled_tokens = chunk
            budget -= chunk
            scheduled.append(seq)
            if chunk < remaining:
                break  # the rest of this prompt goes in later steps; it stays at the head of the queue
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
        if scheduled:
            return scheduled, True

        while self.running and len(scheduled) < self.max_num_seqs:
            seq = self.running.popleft()
            while not self.block_manager.can_append(seq):
                if self.running:
                    self.preempt(self.running.pop())
                else:
                    self.preempt(seq)
                    break
            else:
                self.block_manager.may_append(seq)
                seq.num_scheduled_tokens = 1
                scheduled.append(seq)
        assert scheduled or self.is_finished() or self.waiting, "scheduler made no progress"
        self.running.extendleft(reversed(scheduled))
        return scheduled, False

    def preempt(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.block_manager.deallocate(seq)
        self.waiting.appendleft(seq)

    def postprocess(self, seqs: list[Sequence], token_ids: list[int | None]) -> list[Sequence]:
        """Record computed tokens and sampled tokens; return the sequences that finished."""
        finished = []
        for seq, token_id in zip(seqs, token_ids):
            seq.num_cached_tokens += seq.num_scheduled_tokens
            seq.num_scheduled_tokens = 0
            self.block_manager.mark_computed(seq)
            if token_id is None:  # a prefill chunk that did not reach the end of the prompt
                continue
            seq.append_token(token_id)
            if (not seq.ignore_eos and token_id in self.eos_token_ids) or seq.num_completion_tokens >= seq.max_tokens:
                seq.status = SequenceStatus.FINISHED
                self.block_manager.deallocate(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished
