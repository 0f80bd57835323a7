"""The whole engine on a GPU: a tiny bf16 model against transformers on the same GPU, and CUDA-graph decode
against eager decode. Run on a GPU machine: `python -m pytest -m gpu` (scripts/gpu_run.sh)."""
from __future__ import annotations

import pytest
import torch

from nanovllm_lab import LLM, SamplingParams

pytestmark = pytest.mark.gpu
if not torch.cuda.is_available():
    pytest.skip("needs CUDA", allow_module_level=True)

PROMPTS = [[(13 * i + j) % 300 + 2 for i in range(n)] for j, n in enumerate((3, 17, 64, 130, 250, 9, 33, 1))]
N = 32
TIE = 0.05  # bf16 logits of a tiny model: a token whose logit is within this of the max counts as agreeing


def _agreement(hf, prompt: list[int], ours: list[int]) -> tuple[int, int]:
    """Teacher-forced: at each generated position, does transformers pick our token (or tie with it)?"""
    ids = torch.tensor([prompt + ours], device="cuda")
    with torch.no_grad():
        logits = hf(ids).logits[0, len(prompt) - 1:-1].float()
    best = logits.max(-1).values
    mine = logits.gather(1, torch.tensor(ours, device="cuda")[:, None])[:, 0]
    return int(((best - mine) <= TIE).sum()), len(ours)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_bf16_engine_agrees_with_transformers(qwen3_dir, backend):
    from transformers import Qwen3ForCausalLM
    hf = Qwen3ForCausalLM.from_pretrained(qwen3_dir, dtype=torch.bfloat16).cuda().eval()
    sp = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    with LLM(qwen3_dir, dtype="bfloat16", attention_backend=backend, kvcache_block_size=16,
             gpu_memory_utilization=0.3, max_num_seqs=16) as llm:
        outs = llm.generate(PROMPTS, sp, use_tqdm=False)
    agree = total = 0
    for p, o in zip(PROMPTS, outs):
        a, t = _agreement(hf, p, o["token_ids"])
        agree, total = agree + a, total + t
    assert agree / total >= 0.99, f"{agree}/{total} positions agree"


def test_cuda_graph_decode_equals_eager(qwen3_dir):
    sp = SamplingParams(temperature=0, max_tokens=N, ignore_eos=True)
    runs, logs = [], []
    for eager in (True, False):
        with LLM(qwen3_dir, dtype="bfloat16", enforce_eager=eager, kvcache_block_size=16,
                 gpu_memory_utilization=0.3, max_num_seqs=16, torch_compile=False) as llm:
            llm.model_runner.logits_log = []
            steps = []
            llm.model_runner.step_hooks.append(steps.append)
            runs.append([o["token_ids"] for o in llm.generate(PROMPTS, sp, use_tqdm=False)])
            logs.append(llm.model_runner.logits_log)
            assert any(s.cuda_graph for s in steps) == (not eager)
    # Same tokens, and the first decode step's logits agree to bf16 rounding.
    assert runs[0] == runs[1]
    assert (logs[0][1] - logs[1][1]).abs().max().item() <= 2e-2


def test_overlapped_decode_equals_synchronous(qwen3_dir):
    """engine/overlap.py on cuda (CUDA graphs, pinned copies, device-side ids): the synchronous engine's tokens."""
    params = [SamplingParams(temperature=t, max_tokens=n, ignore_eos=True)
              for t, n in ((0, 17), (0.8, 9), (0, 1), (0.8, 24))]
    runs = []
    for a in (False, True):
        with LLM(qwen3_dir, dtype="bfloat16", async_scheduling=a, kvcache_block_size=16, gpu_memory_utilization=0.3,
                 max_num_seqs=16, torch_compile=False) as llm:
            runs.append([o["token_ids"] for o in llm.generate(PROMPTS[:4], params, use_tqdm=False)])
            assert (llm.overlap.num_overlapped > 0) == a
    assert runs[0] == runs[1]
