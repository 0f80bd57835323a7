"""The engine against transformers' own Qwen3 on CPU in float32: prefill logits and greedy generations."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from nanovllm_lab import LLM, SamplingParams

PROMPTS = [[5, 17, 42, 99, 3], [7] * 1 + [8, 9], list(range(20, 60)), [300, 2, 250, 11, 19, 77, 123, 64, 12, 31, 4]]
TIE = 1e-4


def hf_greedy(hf_model, prompt: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy continuation by transformers, with the logits that chose each token."""
    ids = torch.tensor([prompt])
    out, logits = [], []
    with torch.no_grad():
        for _ in range(n):
            lg = hf_model(ids).logits[0, -1].float()
            tok = int(lg.argmax())
            out.append(tok)
            logits.append(lg)
            ids = torch.cat([ids, torch.tensor([[tok]])], 1)
    return out, logits


def assert_greedy_agrees(ours: list[int], ref: list[int], ref_logits: list[torch.Tensor]) -> None:
    """Equal up to the first position where transformers' top two logits tie (within 1e-4)."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            top2 = ref_logits[i].topk(2).values
            assert float(top2[0] - top2[1]) <= TIE, f"token {i}: ours {a}, transformers {b}, not a tie"
            return
    assert len(ours) == len(ref)


@pytest.fixture(scope="module")
def llm(qwen3_dir):
    with LLM(qwen3_dir, kvcache_block_size=16, num_kvcache_blocks=64) as engine:
        yield engine


def test_prefill_logits_match_transformers(llm, hf_model):
    llm.model_runner.logits_log = []
    try:
        llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
        ours = torch.cat(llm.model_runner.logits_log)
    finally:
        llm.model_runner.logits_log = None
    assert ours.shape == (len(PROMPTS), hf_model.config.vocab_size)
    with torch.no_grad():
        for i, p in enumerate(PROMPTS):
            ref = hf_model(torch.tensor([p])).logits[0, -1]
            assert (ours[i] - ref).abs().max().item() <= 1e-4


def test_greedy_generation_matches_transformers(llm, hf_model):
    n = 24
    outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
    for p, o in zip(PROMPTS, outs):
        ref, ref_logits = hf_greedy(hf_model, p, n)
        assert_greedy_agrees(o["token_ids"], ref, ref_logits)


def test_text_prompts_round_trip(llm, qwen3_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(qwen3_dir)
    text = "hello world, the quick brown fox"
    assert tok.decode(llm.tokenizer.encode(text)) == text
    out = llm.generate([text], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)[0]
    assert out["text"] == tok.decode(out["token_ids"], skip_special_tokens=True)
    by_ids = llm.generate([tok.encode(text)], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0]
    assert by_ids["token_ids"] == out["token_ids"]


def test_eos_stops_generation(llm, hf_model):
    # Make the EOS token the greedy choice by asking which token transformers picks, then treating it as EOS.
    p = PROMPTS[0]
    ref, _ = hf_greedy(hf_model, p, 3)
    llm.scheduler.eos_token_ids = {ref[1]}
    try:
        out = llm.generate([p], SamplingParams(temperature=0, max_tokens=10), use_tqdm=False)[0]
        assert out["token_ids"] == ref[:2]
        out = llm.generate([p], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True), use_tqdm=False)[0]
        assert len(out["token_ids"]) == 10
    finally:
        llm.scheduler.eos_token_ids = set(llm.config.arch.eos_token_ids)


def test_tied_embeddings_match_transformers(qwen3_tied_dir):
    from transformers import Qwen3ForCausalLM
    hf = Qwen3ForCausalLM.from_pretrained(qwen3_tied_dir, torch_dtype=torch.float32).eval()
    with LLM(qwen3_tied_dir, kvcache_block_size=16, num_kvcache_blocks=32) as llm:
        outs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for p, o in zip(PROMPTS[:2], outs):
        ref, ref_logits = hf_greedy(hf, p, 12)
        assert_greedy_agrees(o["token_ids"], ref, ref_logits)


def test_sampling_with_temperature_is_seeded(qwen3_dir):
    sp = SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True)
    runs = []
    for _ in range(2):
        with LLM(qwen3_dir, kvcache_block_size=16, num_kvcache_blocks=32, seed=3) as llm:
            runs.append([o["token_ids"] for o in llm.generate(PROMPTS, sp, use_tqdm=False)])
    assert runs[0] == runs[1]
    assert all(len(t) == 8 for t in runs[0])


def test_torch_compile_matches_transformers(qwen3_dir, hf_model):
    """The opt-in fused layers (torch.compile of RMSNorm, RoPE, SiLU-mul) keep the engine exact."""
    with LLM(qwen3_dir, kvcache_block_size=16, num_kvcache_blocks=32, torch_compile=True) as llm:
        llm.model_runner.logits_log = []
        outs = llm.generate(PROMPTS[:2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
        first = llm.model_runner.logits_log[0]
    with torch.no_grad():
        for i, p in enumerate(PROMPTS[:2]):
            assert (first[i] - hf_model(torch.tensor([p])).logits[0, -1]).abs().max().item() <= 1e-4
    for p, o in zip(PROMPTS[:2], outs):
        ref, ref_logits = hf_greedy(hf_model, p, 8)
        assert_greedy_agrees(o["token_ids"], ref, ref_logits)


def test_compile_runs_without_inductor_worker_pool():
    """Compiling turns inductor's worker pool off (its shutdown held a tp=2 GPU sweep's exit for minutes),
    unless the user chose a thread count: checked in fresh interpreters, as the setting is process-wide."""
    code = ("import torch._inductor.config as c; from nanovllm_lab.utils.compile import set_compile; "
            "set_compile(True); print(c.compile_threads)")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_COMPILE_THREADS"}
    ours = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    theirs = subprocess.run([sys.executable, "-c", code], env={**env, "TORCHINDUCTOR_COMPILE_THREADS": "2"},
                            capture_output=True, text=True, timeout=120)
    assert ours.stdout.split() == ["1"], ours.stderr
    assert theirs.stdout.split() == ["2"], theirs.stderr
