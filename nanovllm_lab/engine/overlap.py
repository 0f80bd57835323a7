"""Overlapped decode: build and queue step N+1 on the host while the device runs step N.

A synchronous engine leaves the GPU idle while the host schedules, builds inputs and post-processes, about
0.9 ms per decode step on an H200 host (qwen3-0.6b `bench`: 0.94 s of a 7.2 s run, scripts/host_profile.py).
Here step N+1 is scheduled and launched before step N's tokens reach the host:

- at launch, each sequence of step N gets a placeholder for the token it is about to receive, so its length,
  slot and blocks for step N+1 are right (the scheduler's usual accounting);
- step N+1's input id for such a sequence is taken on the device from step N's sampled tokens (`Carry`);
- when step N's tokens arrive, the placeholders are replaced and the prefix-cache hashes registered; only
  then are tokens hashed, so no placeholder ever reaches the prefix cache.

It applies where a sequence's end is known before its token is (ignore_eos, or a model without EOS ids), and
while no prompt waits and no preemption is due: otherwise the engine drains the step in flight and runs
synchronously. With tensor parallelism every rank samples the same all-gathered logits with the same seeded
generator, so each worker takes its next ids from its own copy of the tokens. Tokens are the same as the
synchronous engine's, in the same sampler order (tests/test_overlap.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from nanovllm_lab.engine.inputs import prepare_decode
from nanovllm_lab.engine.pending import Pending
from nanovllm_lab.engine.sequence import Sequence, SequenceStatus

if TYPE_CHECKING:
    from nanovllm_lab.engine.llm_engine import LLMEngine

PLACEHOLDER = 0  # a valid id: a missed substitution gives wrong tokens (which the tests catch), not a device fault


@dataclass
class InFlight:
    seqs: list[Sequence]
    pending: Pending
    slots: list[int]  # index of each sequence's placeholder in its token_ids


class OverlapDecoder:
    def __init__(self, engine: "LLMEngine") -> None:
        self.engine = engine
        self.inflight: InFlight | None = None
        self.num_overlapped = 0  # steps launched while another was in flight (tests, stats)

    def applies(self, seqs: Iterable[Sequence], is_prefill: bool) -> bool:
        e = self.engine
        return (e.config.async_scheduling and not is_prefill
                and e.model_runner.logits_log is None
                and (not e.scheduler.eos_token_ids or all(s.ignore_eos for s in seqs)))

    def start(self, seqs: list[Sequence], step) -> None:
        """Launch a decode step without waiting for it."""
        self.inflight = self._launch(seqs, step, None)

    def can_continue(self) -> bool:
        """The next step can be a decode of the running sequences, launched before the one in flight ends."""
        sched = self.engine.scheduler
        return (bool(sched.running) and not sched.waiting and self._decode_fits()
                and self.applies(sched.running, False))

    def step(self) -> tuple[list[tuple[int, list[int]]], int]:
        """With a step in flight and can_continue(): launch the next decode step, then collect the one in flight."""
        e, sched = self.engine, self.engine.scheduler
        prev = self.inflight
        seqs, is_prefill = sched.schedule()
        assert seqs and not is_prefill
        step = prepare_decode(seqs, e.config.kvcache_block_size)
        row = {s.seq_id: i for i, s in enumerate(prev.seqs)}
        src, dst = [], []
        for j, s in enumerate(seqs):
            if s.seq_id in row:
                src.append(row[s.seq_id])
                dst.append(j)
        self.inflight = self._launch(seqs, step, (src, dst) if src else None)
        self.num_overlapped += 1
        return self._resolve(prev), -len(seqs)

    def drain(self) -> list[tuple[int, list[int]]]:
        prev, self.inflight = self.inflight, None
        return self._resolve(prev) if prev is not None else []

    # -- internals -----------------------------------------------------------------------------------
    def _decode_fits(self) -> bool:
        """Every running sequence can take its next token without a preemption (preempting a sequence whose
        last token is still a placeholder would recompute it from a wrong prompt)."""
        sched = self.engine.scheduler
        bs = sched.block_manager.block_size
        need = sum(1 for s in sched.running if len(s.block_table) * bs < s.num_tokens)
        return need <= sched.block_manager.num_free_blocks

    def _launch(self, seqs: list[Sequence], step, carry_rows: tuple[list[int], list[int]] | None) -> InFlight:
        pending = self.engine._call("launch", step, carry_rows)  # every rank: workers take the ids themselves
        slots = []
        sched = self.engine.scheduler
        for s in seqs:  # the scheduler's postprocess, less what needs the token's value
            s.num_cached_tokens += s.num_scheduled_tokens
            s.num_scheduled_tokens = 0
            slots.append(s.num_tokens)
            s.append_token(PLACEHOLDER)
            if s.num_completion_tokens >= s.max_tokens:
                s.status = SequenceStatus.FINISHED  # out of the next schedule; blocks freed once hashed
                sched.running.remove(s)
        return InFlight(seqs, pending, slots)

    def _resolve(self, f: InFlight) -> list[tuple[int, list[int]]]:
        tokens = self.engine.model_runner.collect(f.pending)
        bm = self.engine.scheduler.block_manager
        finished = []
        for s, i, t in zip(f.seqs, f.slots, tokens):
            s.token_ids[i] = t
            bm.mark_computed(s)
            if s.status == SequenceStatus.FINISHED:
                bm.deallocate(s)
                finished.append((s.seq_id, s.completion_token_ids))
        return finished
