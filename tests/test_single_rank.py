"""`single_rank`: rank 0 of a tp=N shard run alone, with no peers, for the strategies that communicate nothing.

The claim it rests on: with `none`, rank 0 of a real tp=2 engine computes from its own shard only, so rank 0 run
alone computes the same numbers. Checked against a real tp=2 engine over gloo (the reference), on the logits of
rank 0's vocabulary shard for every prefill step of a scenario with chunked prefill. Plus what it must refuse.
"""
from __future__ import annotations

import os

import pandas as pd
import pytest
import torch
import torch.distributed as dist

from nanovllm_lab import LLM, SamplingParams
from nanovllm_lab.distributed.control import PipeControlPlane
from nanovllm_lab.lab.results import run_variants

ENGINE = dict(enforce_eager=True, max_model_len=256, kvcache_block_size=16, num_kvcache_blocks=64,
              max_num_batched_tokens=96, max_num_seqs=8, device="cpu")
# Prompts of 1 to 130 tokens; the longest is prefilled in two chunks (96-token budget). max_tokens=1: every step
# is a prefill, so both engines run the same steps whatever they sample (their samples differ: see below).
PROMPTS = [[7], list(range(1, 8)), list(range(3, 36)), list(range(40, 170))]
ONE = SamplingParams(temperature=0, max_tokens=1)


def prefill_logits(strategy, **kwargs) -> tuple[list[torch.Tensor], dict]:
    llm = LLM("tiny", strategy=strategy, **{**ENGINE, **kwargs})
    try:
        logits: list[torch.Tensor] = []
        llm.model_runner.logits_log = logits  # each step's gathered logits, as the sampler gets them
        spawned = isinstance(llm.control, PipeControlPlane)
        grouped = dist.is_initialized()
        out = llm.generate(PROMPTS, ONE, use_tqdm=False)
        assert all(o["valid"] is False and o["text"] is None for o in out)
        return logits, {"spawned": spawned, "grouped": grouped, "info": llm.model_runner.info}
    finally:
        llm.exit()


@pytest.fixture(scope="module")
def tp2_none():
    old = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # the spawned worker rank inherits it: two ranks on few cores
    try:
        return prefill_logits("none", tensor_parallel_size=2)
    finally:
        if old is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = old


def test_single_rank_none_computes_what_rank0_of_tp2_computes(tp2_none):
    ref, ref_facts = tp2_none
    got, facts = prefill_logits("none", tensor_parallel_size=2, single_rank=True)
    assert ref_facts["spawned"] and ref_facts["grouped"], "the reference must be a real two-rank engine"
    assert not facts["spawned"] and not facts["grouped"], "single_rank started a worker or a process group"
    assert facts["info"].world_size == 2 and facts["info"].single_rank
    assert len(got) == len(ref) >= 2
    half = ref[0].shape[1] // 2
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.shape == b.shape  # the all-gather's width: rank 0's shard stands in for rank 1's
        torch.testing.assert_close(a[:, :half], b[:, :half], atol=1e-5, rtol=1e-5, msg=lambda m: f"step {i}: {m}")
        torch.testing.assert_close(a[:, half:], a[:, :half], atol=0, rtol=0)
    # rank 1's shard is different in the real engine, so the test could tell the two halves apart
    assert not torch.allclose(ref[0][:, half:], ref[0][:, :half])


def test_single_rank_none_mb_splits_like_tp2(tp2_none, monkeypatch):
    """At tp=1 none_mb runs whole; single_rank at tp=2 must run its micro-batches, with none's numbers."""
    from nanovllm_lab.comm.none_mb import NoneMbStrategy
    issued = []
    orig = NoneMbStrategy._issue
    monkeypatch.setattr(NoneMbStrategy, "_issue", lambda self, x, *wb: issued.append(len(x)) or orig(self, x, *wb))
    got, _ = prefill_logits({"name": "none_mb", "min_tokens": 1}, tensor_parallel_size=2, single_rank=True)
    assert issued, "the micro-batched loop never ran"
    ref, _ = tp2_none
    half = ref[0].shape[1] // 2
    for i, (a, b) in enumerate(zip(got, ref)):
        torch.testing.assert_close(a[:, :half], b[:, :half], atol=1e-5, rtol=1e-5, msg=lambda m: f"step {i}: {m}")


def test_single_rank_shards_like_rank0_and_ignores_the_device_count(monkeypatch):
    """tp=4 on a 1-core machine is refused for a real engine but runs alone: one process, quarter shards."""
    import nanovllm_lab.config as config
    monkeypatch.setattr(config.os, "cpu_count", lambda: 1)
    with pytest.raises(ValueError, match="tensor_parallel_size=4 exceeds the 1 CPU cores"):
        LLM("tiny", strategy="none", tensor_parallel_size=4, **ENGINE)
    llm = LLM("tiny", strategy="none", tensor_parallel_size=4, single_rank=True, **ENGINE)
    try:
        arch = llm.config.arch
        qkv = llm.model_runner.model.model.layers[0].self_attn.qkv_proj.weight
        heads = (arch.num_attention_heads + 2 * arch.num_key_value_heads) // 4
        assert qkv.shape[0] == heads * arch.head_dim
        assert llm.model_runner.kv_cache.shape[4] == arch.num_key_value_heads // 4
    finally:
        llm.exit()


def test_single_rank_decodes_with_async_scheduling():
    """Decode steps, overlapped with the host's scheduling (rank 0's OverlapDecoder), run alone as well: none_mb
    at tp=2 gives none's tokens."""
    got = {}
    for strategy in ("none", {"name": "none_mb", "min_tokens": 1}):
        llm = LLM("tiny", strategy=strategy, tensor_parallel_size=2, single_rank=True, async_scheduling=True, **ENGINE)
        try:
            out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
            got[str(strategy)] = [o["token_ids"] for o in out]
        finally:
            llm.exit()
    a, b = got.values()
    assert a == b and all(len(t) == 6 for t in a)


@pytest.mark.parametrize("strategy", ["blocking", "async", "chunked", "overlap"])
def test_single_rank_refuses_strategies_that_communicate(strategy):
    with pytest.raises(ValueError, match=f"single_rank runs rank 0 with no peers, so strategy '{strategy}'.*none, none_mb"):
        LLM("tiny", strategy=strategy, tensor_parallel_size=2, single_rank=True, **ENGINE)


def test_single_rank_at_tp1_is_plain_tp1():
    llm = LLM("tiny", strategy="blocking", tensor_parallel_size=1, single_rank=True, **ENGINE)
    try:
        assert not llm.model_runner.info.single_rank and llm.valid_outputs
    finally:
        llm.exit()


def test_single_rank_must_be_a_bool():
    with pytest.raises(ValueError, match="Config.single_rank: must be a bool"):
        LLM("tiny", single_rank="yes", **ENGINE)


def test_lab_refuses_single_rank_for_a_workload_without_the_engine(tmp_path):
    from nanovllm_lab.lab.settings import LabConfigError
    from nanovllm_lab.lab.testing import TINY_WORKLOAD, run_in_process
    with pytest.raises(LabConfigError, match="single_rank=true runs the engine's rank 0 alone; workload 'layer'"):
        run_in_process(["workload=layer", *TINY_WORKLOAD["layer"], "tp=2", "+strategy=none", "single_rank=true",
                        "device=cpu"], tmp_path / "run")


def test_lab_records_single_rank_and_the_report_keeps_it_apart(tmp_path):
    from nanovllm_lab.lab.testing import TINY_WORKLOAD, run_in_process
    s = run_in_process(["workload=prefill", *TINY_WORKLOAD["prefill"], "tp=2", "+strategy=none", "single_rank=true",
                        "device=cpu", "enforce_eager=true"], tmp_path / "run")
    assert s["single_rank"] is True and s["valid_outputs"] is False and s["tp"] == 2
    # the label comes from what ran (the summary), however the override was spelled; older results lack the field
    runs = pd.DataFrame({"workload": ["prefill"] * 4, "model": ["tiny"] * 4, "tp": [2, 2, 2, 1],
                         "strategy": ["none", "none", "none_mb", "none"],
                         "overrides": [["tp=2"], ["tp=2", "single_rank=True"], ["tp=2", "single_rank=true"],
                                       ["tp=1", "single_rank=true"]],
                         "single_rank": [None, True, True, False]})
    assert list(run_variants(runs)) == ["", "single_rank=true", "single_rank=true", ""]
    assert list(run_variants(runs.drop(columns="single_rank"))) == ["", "", "", ""]


def test_report_never_takes_references_across_single_rank():
    """A real tp=2 sweep (blocking, async) without none, and single-rank none / none_mb at the same tp: the real
    runs get no efficiency from the single-rank none, and the single-rank runs no speedup over real blocking."""
    from nanovllm_lab.lab.compare import comparison_table, scaling_table, step_table
    runs = pd.DataFrame({"run": ["b", "a", "n", "m", "b1"], "status": "ok", "workload": "prefill", "model": "tiny",
                         "tp": [2, 2, 2, 2, 1], "strategy": ["blocking", "async", "none", "none_mb", "blocking"],
                         "single_rank": [False, False, True, True, None],
                         "throughput_tok_s": [100.0, 110.0, 150.0, 140.0, 60.0],
                         "prefill_latency_ms_p50": [10.0, 9.0, 6.0, 6.5, 16.0]})
    table = comparison_table(runs).set_index("run")
    assert table.loc["a", "speedup_vs_blocking"] == pytest.approx(1.1)
    assert table[["overlap_efficiency", "prefill_step_efficiency"]].isna().all().all()
    assert table.loc[["n", "m"], "speedup_vs_blocking"].isna().all()
    assert table.loc["m", "variant"] == "single_rank=true"
    assert set(scaling_table(runs)["strategy"]) == {"blocking", "async"}  # single-rank runs: no tp=2 throughput
    steps = pd.DataFrame({"run": list("banm"), "workload": "prefill", "model": "tiny", "tp": 2,
                          "strategy": ["blocking", "async", "none", "none_mb"], "phase": "prefill",
                          "num_tokens": 64, "latency_ms": [10.0, 9.0, 6.0, 6.5]})
    st = step_table(steps, runs).set_index("strategy")
    assert st.loc["async", ["t_none_ms", "overlap_efficiency"]].isna().all()
    assert st.loc["none_mb", "exposed_comm_ms"] == pytest.approx(0.5)  # the split's cost, against its own none
    assert bool(st.loc["none_mb", "single_rank"]) and not bool(st.loc["async", "single_rank"])
