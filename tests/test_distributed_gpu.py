"""Worker failure over NCCL (2 GPUs): rank 0 raises naming the rank instead of waiting out the NCCL timeout."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import pytest
import torch

pytestmark = pytest.mark.gpu
if torch.cuda.device_count() < 2:
    pytest.skip("needs >= 2 CUDA GPUs", allow_module_level=True)

from nanovllm_lab import LLM, SamplingParams  # noqa: E402


def test_worker_death_over_nccl_raises_naming_rank():
    sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
    llm = LLM("tiny", tensor_parallel_size=2, dtype="bfloat16", enforce_eager=True, max_model_len=256,
              gpu_memory_utilization=0.2)
    try:
        llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
        llm.add_request([1, 2, 3], sp)
        llm.step()  # a prefill, then kill the worker while rank 0 keeps stepping into collectives
        os.kill(llm.control.procs[0].pid, signal.SIGKILL)
        t = time.monotonic()
        with pytest.raises(RuntimeError, match="rank 1"):
            while not llm.is_finished():
                llm.step()
        assert time.monotonic() - t < 60
    finally:
        llm.exit()
    assert mp.active_children() == []


def test_exit_after_cuda_graph_decode_is_prompt():
    """Seen on 2 x H200 (torch 2.11, NCCL 2.28): after CUDA-graph decode at tp=2, destroy_process_group hung in
    both ranks at exit (results/gpu/2026-11-28b_h200/exit_hang_*.log). The engine now aborts NCCL instead."""
    llm = LLM("tiny", tensor_parallel_size=2, dtype="bfloat16", max_model_len=256, max_num_seqs=8,
              gpu_memory_utilization=0.2, torch_compile=False)
    try:
        assert llm.model_runner.graphs is not None
        out = llm.generate([[7], list(range(1, 40))], SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)
        assert [len(o["token_ids"]) for o in out] == [6, 6]
    finally:
        t = time.monotonic()
        llm.exit()
    assert time.monotonic() - t < 20
    assert mp.active_children() == []
