"""Overlapped decode (engine/overlap.py) gives the synchronous engine's tokens and prefix-cache state."""
from __future__ import annotations

import random

import pytest

from nanovllm_lab import LLM, SamplingParams
from nanovllm_lab.engine.pending import Carry

rng = random.Random(0)
PROMPTS = [[rng.randint(0, 500) for _ in range(rng.randint(5, 60))] for _ in range(12)]
# Greedy and sampled rows, lengths from 1 token (finishes at its prefill) to 30.
PARAMS = [SamplingParams(temperature=0.8 if i % 2 else 0, ignore_eos=True, max_tokens=rng.randint(1, 30))
          for i in range(12)]
KW = dict(device="cpu", kvcache_block_size=16)


def generate(async_scheduling: bool, prompts=PROMPTS, params=PARAMS, **kw):
    with LLM("tiny", async_scheduling=async_scheduling, **{"num_kvcache_blocks": 256, **KW, **kw}) as llm:
        outs = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
        bm = llm.scheduler.block_manager
        return outs, llm.overlap.num_overlapped, set(bm.hash_to_block_id), llm.scheduler.num_preemptions


def test_same_tokens_and_hashes_as_synchronous():
    sync, n_sync, hashes_sync, _ = generate(False)
    over, n_over, hashes_over, _ = generate(True)
    assert n_sync == 0 and n_over > 10  # the overlapped path really ran
    assert over == sync
    assert [len(o) for o in over] == [p.max_tokens for p in PARAMS]
    assert hashes_over == hashes_sync  # no placeholder token was ever hashed into the prefix cache


def test_prefix_hits_on_generated_tokens():
    """A second batch whose prompts extend the first batch's prompt + completion hits the cache equally."""
    results = []
    for a in (False, True):
        with LLM("tiny", async_scheduling=a, num_kvcache_blocks=256, **KW) as llm:
            first = llm.generate(PROMPTS[:4], PARAMS[:4], use_tqdm=False)
            before = llm.scheduler.block_manager.num_cache_hit_tokens
            follow = [p + o["token_ids"] + [7] for p, o in zip(PROMPTS[:4], first)]
            outs = llm.generate(follow, SamplingParams(temperature=0, max_tokens=5, ignore_eos=True), use_tqdm=False)
            results.append(([o["token_ids"] for o in outs], llm.scheduler.block_manager.num_cache_hit_tokens - before))
    assert results[0] == results[1]
    assert results[1][1] >= 16


def test_preemption_drains_and_matches():
    sync = generate(False, num_kvcache_blocks=10)
    over = generate(True, num_kvcache_blocks=10)
    assert over[3] > 0 and over[1] > 0  # preempted, and overlapped where it could
    assert over[0] == sync[0]


def test_eos_requests_stay_synchronous():
    params = [SamplingParams(temperature=0, max_tokens=8) for _ in PROMPTS]  # ignore_eos=False
    sync, _, _, _ = generate(False, params=params)
    over, n, _, _ = generate(True, params=params)
    assert n == 0 and over == sync


def test_requests_arriving_mid_flight():
    outs = []
    for a in (False, True):
        with LLM("tiny", async_scheduling=a, num_kvcache_blocks=256, **KW) as llm:
            done = {}
            ids = [llm.add_request(p, sp) for p, sp in zip(PROMPTS[:3], PARAMS[:3])]
            for i in range(200):
                if i in (3, 7):  # new prompts while a decode step is in flight
                    ids += [llm.add_request(p, sp) for p, sp in zip(PROMPTS[3 + i:5 + i], PARAMS[3 + i:5 + i])]
                finished, _ = llm.step()
                done.update(finished)
                if llm.is_finished():
                    break
            outs.append([done[i] for i in ids])
    assert outs[0] == outs[1]


def test_missing_carry_is_caught(monkeypatch):
    """Without the device-side ids the overlapped steps would read placeholders: the comparison must see it."""
    sync, _, _, _ = generate(False)
    monkeypatch.setattr(Carry, "apply", lambda self, ids: None)
    broken, _, _, _ = generate(True)
    assert broken != sync


def test_async_scheduling_must_be_bool():
    with pytest.raises(ValueError, match="async_scheduling"):
        LLM("tiny", device="cpu", async_scheduling="yes")


def test_tensor_parallel_2_over_gloo():
    """At tp=2 every rank samples the all-gathered logits with the same generator, so the worker's ids carried on
    its own device equal rank 0's: the overlapped engine gives the synchronous one's tokens, sampled rows too.
    (A worker that skipped its carry fails this: checked by planting it.)"""
    sync, _, _, _ = generate(False, tensor_parallel_size=2)
    over, n, _, _ = generate(True, tensor_parallel_size=2)
    assert n > 10
    assert over == sync


@pytest.mark.parametrize("strategy", [{"name": "async", "min_tokens": 1}, {"name": "async_rsag", "min_tokens": 1},
                                      {"name": "chunked", "chunks": 2, "min_tokens_per_chunk": 1}])
def test_strategies_at_tp2_overlapped_equal_synchronous(strategy):
    """The communication strategies' own stream and micro-batch handling under overlapped decode."""
    sync, _, _, _ = generate(False, tensor_parallel_size=2, strategy=strategy)
    over, n, _, _ = generate(True, tensor_parallel_size=2, strategy=strategy)
    assert n > 10 and over == sync
