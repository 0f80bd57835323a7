"""Communication strategies on CPU: tensor parallelism 2 over gloo, the built-in `tiny` arch, dummy weights.

Every strategy except `none` must reproduce `blocking`: the same greedy tokens and the same logits (float32
tolerance) over one fixed scenario that hits the edge cases: a one-token prompt, odd token and sequence
counts, fewer tokens/sequences than chunks/micro-batches, chunked prefill (prompts longer than
max_num_batched_tokens, so later chunks read earlier ones from the paged cache), a prefix-cached prefill,
and decode steps below `min_tokens` (fallback). On gloo the overlapping strategies issue real async
all-reduces, so a missing wait shows up as wrong numbers. Engines are module-scoped (each costs seconds).
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import os

import pytest
import torch
import torch.distributed as dist

from nanovllm_lab import LLM, SamplingParams
from nanovllm_lab.comm.async_overlap import split_points
from nanovllm_lab.comm.chunked import chunk_bounds
from nanovllm_lab.comm.overlap import load_table
from nanovllm_lab.comm.overlap_write import write_table

ENGINE = dict(tensor_parallel_size=2, enforce_eager=True, max_model_len=256, kvcache_block_size=16,
              num_kvcache_blocks=96, max_num_batched_tokens=96, max_num_seqs=8, device="cpu")
BATCH_A = [[7], list(range(1, 8)), list(range(3, 36)), list(range(1, 65)), [5, 4, 3, 2, 1], list(range(40, 170))]
PREFIX = list(range(1, 65))  # 4 full blocks of BATCH_A[3], cached once that prefill completes
BATCH_B = [PREFIX + [9], PREFIX + [11, 12, 13]]
GREEDY = SamplingParams(temperature=0, max_tokens=5)


@pytest.fixture(scope="module", autouse=True)
def _one_thread_per_rank():
    """Two ranks on few cores: oversubscribed OpenMP threads spin and make every op milliseconds slower."""
    old_env, old_threads = os.environ.get("OMP_NUM_THREADS"), torch.get_num_threads()
    os.environ["OMP_NUM_THREADS"] = "1"  # inherited by the spawned worker ranks
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old_threads)
    if old_env is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = old_env


COUNTED = ("all_reduce", "reduce_scatter_tensor", "all_gather_into_tensor")


@contextlib.contextmanager
def counting_collectives():
    """Rank 0's calls of the collectives a strategy can issue (this process is rank 0; every rank takes the
    same path). Equal outputs alone cannot tell a strategy from a silent fallback to blocking."""
    counts: collections.Counter = collections.Counter()
    saved = {name: getattr(dist, name) for name in COUNTED}

    def counting(name):
        def call(*args, **kwargs):
            counts[name] += 1
            return saved[name](*args, **kwargs)
        return call
    for name in COUNTED:
        setattr(dist, name, counting(name))
    try:
        yield counts
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


def run_scenario(strategy, tp: int = 2) -> dict:
    """Batch A then the prefix-sharing batch B through one engine: tokens, per-step logits, cache hits, and the
    collectives rank 0 issued."""
    llm = LLM("tiny", strategy=strategy, **{**ENGINE, "tensor_parallel_size": tp})
    try:
        logits: list[torch.Tensor] = []
        sampler = llm.model_runner.sampler

        def recording_sampler(lg, temps, gen):
            logits.append(lg.detach().clone())
            return sampler(lg, temps, gen)

        llm.model_runner.sampler = recording_sampler
        with counting_collectives() as collectives:
            out_a = llm.generate(BATCH_A, GREEDY, use_tqdm=False)
            hits_before = llm.scheduler.block_manager.num_cache_hit_tokens
            out_b = llm.generate(BATCH_B, GREEDY, use_tqdm=False)
        return {"outputs": out_a + out_b, "tokens": [o["token_ids"] for o in out_a + out_b], "logits": logits,
                "cache_hits": llm.scheduler.block_manager.num_cache_hit_tokens - hits_before,
                "history": dict(getattr(llm.model_runner.strategy, "history", {})),
                "counters": {k: getattr(llm.model_runner.strategy, k) for k in ("copies", "fused", "fused_gemms")
                             if hasattr(llm.model_runner.strategy, k)},  # async_ce's own counts
                "collectives": dict(collectives)}
    finally:
        llm.exit()


@pytest.fixture(scope="module")
def reference() -> dict:
    return run_scenario("blocking")


@pytest.fixture(scope="module")
def overlap_table(tmp_path_factory) -> str:
    """A measured-looking table that makes `overlap` switch between chunked and async by token count."""
    rows = []
    for phase, tokens, best in [("decode", 2, {"name": "async", "min_tokens": 1}),
                                ("decode", 8, {"name": "chunked", "chunks": 2, "min_tokens_per_chunk": 2}),
                                ("prefill", 16, {"name": "chunked", "chunks": 3, "min_tokens_per_chunk": 1}),
                                ("prefill", 96, {"name": "async", "min_tokens": 1, "micro_batches": 3})]:
        name = best.pop("name")
        rows += [{"arch": "tiny", "tp": 2, "phase": phase, "tokens": tokens, "unit": "layer", "strategy": name,
                  "params": json.dumps(best), "t_ms": 1.0, "t_p10_ms": 0.9, "t_p90_ms": 1.1},
                 {"arch": "tiny", "tp": 2, "phase": phase, "tokens": tokens, "unit": "layer",
                  "strategy": "blocking", "params": "{}", "t_ms": 2.0, "t_p10_ms": 1.9, "t_p90_ms": 2.1}]
    path = str(tmp_path_factory.mktemp("tables") / "overlap.json")
    write_table(rows, path)
    return path


STRATEGIES = {
    "async": {"name": "async", "min_tokens": 1},
    "async-3-seqs-layer": {"name": "async", "micro_batches": 3, "split": "seqs", "stages": "layer", "min_tokens": 1},
    "async-4-fallback": {"name": "async", "micro_batches": 4, "min_tokens": 40},  # decode steps fall back
    "chunked-3": {"name": "chunked", "chunks": 3, "min_tokens_per_chunk": 1},
    "chunked-4-fallback": {"name": "chunked", "chunks": 4, "min_tokens_per_chunk": 16},
    # On gloo there is no NCCL communicator to cap: the parameter must leave results unchanged.
    "chunked-ctas": {"name": "chunked", "chunks": 2, "min_tokens_per_chunk": 1, "comm_max_ctas": 4},
    "rsag": {"name": "rsag"},  # odd token counts pad the collectives; one-token decode steps too
    "rsag-fallback": {"name": "rsag", "min_tokens": 8},  # decode steps (<= 8 tokens) take the blocking path
    # micro-batches with odd token counts (padded shards), 3 parts by sequences, one-token decode micro-batches
    "async_rsag": {"name": "async_rsag", "min_tokens": 1},
    "async_rsag-3-seqs": {"name": "async_rsag", "micro_batches": 3, "split": "seqs", "min_tokens": 1},
    # decode steps and batch B's prefix-cached 5-token prefill take the blocking loop: the embedding reduced whole
    "async_rsag-fallback": {"name": "async_rsag", "min_tokens": 8},
    # the copy-engine transport's slot logic, its peers' rows fetched by an all-gather on gloo
    "async_ce": {"name": "async_ce", "emulate": True, "min_tokens": 1},
    "async_ce-3-layer": {"name": "async_ce", "emulate": True, "micro_batches": 3, "stages": "layer", "min_tokens": 1},
    # async_rsag's shards through the slots: the peers' shard rows and normed shards by all-gathers on gloo
    "async_rsag_ce": {"name": "async_rsag_ce", "emulate": True, "min_tokens": 1},
    "async_rsag_ce-3-seqs": {"name": "async_rsag_ce", "emulate": True, "micro_batches": 3, "split": "seqs",
                             "min_tokens": 1},
    "async_rsag_ce-fallback": {"name": "async_rsag_ce", "emulate": True, "min_tokens": 8},
    # GEMM-fused gather / scatter, each half unfused on gloo: odd token counts pad the scatters, one-token decode too
    "async_tp": {"name": "async_tp", "emulate": True, "min_tokens": 1},
    "async_tp-fallback": {"name": "async_tp", "emulate": True, "min_tokens": 8},  # decode steps: the blocking loop
}


def assert_same(got: dict, ref: dict, what: str) -> None:
    assert got["tokens"] == ref["tokens"], f"{what}: greedy tokens differ from blocking"
    assert len(got["logits"]) == len(ref["logits"]), f"{what}: different number of steps"
    for i, (a, b) in enumerate(zip(got["logits"], ref["logits"])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"{what}, step {i}: {m}")


def test_reference_scenario_hits_the_edge_cases(reference):
    assert reference["cache_hits"] >= 64, "batch B should reuse the cached 64-token prefix"
    assert all(len(t) == GREEDY.max_tokens for t in reference["tokens"])
    assert all(o["text"] is not None for o in reference["outputs"])


def more_all_reduces(got: dict, ref: dict) -> bool:  # micro-batches / chunks: one reduction per part
    return got.get("all_reduce", 0) > ref.get("all_reduce", 0)


def sharded(got: dict, ref: dict) -> bool:  # reduce-scatter + all-gather in place of (some) all-reduces
    return got.get("reduce_scatter_tensor", 0) > 0 and got.get("all_reduce", 0) < ref.get("all_reduce", 0)


def through_slots(got: dict, ref: dict) -> bool:  # async_ce emulated: all-gathers of the slots replace all-reduces
    return (got.get("all_gather_into_tensor", 0) > ref.get("all_gather_into_tensor", 0)
            and got.get("all_reduce", 0) < ref.get("all_reduce", 0))


def shards_through_slots(got: dict, ref: dict) -> bool:  # async_rsag_ce emulated: shard reductions via the slots
    return got.get("copies", 0) > 0 and got.get("all_reduce", 0) < ref.get("all_reduce", 0)


def fused_gemms(got: dict, ref: dict) -> bool:  # async_tp: GEMMs through the fused operators' reference code
    return got.get("fused_gemms", 0) > 0 and got.get("all_reduce", 0) < ref.get("all_reduce", 0)


def test_async_tp_falls_back_below_min_tokens():
    """With min_tokens=8 the decode steps (at most 6 sequences here) take the blocking loop: more all-reduces and
    fewer fused GEMMs than with every step fused."""
    every = run_scenario({"name": "async_tp", "emulate": True, "min_tokens": 1})
    prefill_only = run_scenario({"name": "async_tp", "emulate": True, "min_tokens": 8})
    assert prefill_only["collectives"]["all_reduce"] > every["collectives"]["all_reduce"]
    assert 0 < prefill_only["counters"]["fused_gemms"] < every["counters"]["fused_gemms"]


def test_async_tp_odd_token_counts_match_blocking():
    """Odd token counts (a 45-token prefill, 3-token decode steps) pad the fused scatters and slice the gathers:
    the same greedy tokens as blocking, and the fused path ran."""
    prompts = [list(range(1, 8)), list(range(3, 36)), [5, 4, 3, 2, 1]]
    with LLM("tiny", strategy="blocking", **ENGINE) as llm:
        ref = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
    with LLM("tiny", strategy={"name": "async_tp", "emulate": True, "min_tokens": 1}, **ENGINE) as llm:
        got = [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]
        assert llm.model_runner.strategy.fused_gemms > 0
    assert got == ref


def test_async_tp_workspace_grows_and_is_replaced_for_a_new_group(monkeypatch, tmp_path):
    """The async-TP workspace (torch's, cached per group name) is allocated in prepare, only grows within one
    process group, and is replaced when a new group reuses the name (the next engine in a process)."""
    import torch.distributed._symmetric_memory as symm_mem

    from nanovllm_lab.comm import symm
    assert not dist.is_initialized()
    cache: dict = {}
    made: list[int] = []

    def fake_workspace(name, min_size):
        if name not in cache or cache[name].numel() < min_size:
            cache[name] = torch.empty(min_size, dtype=torch.uint8)
            made.append(min_size)
    monkeypatch.setattr(symm_mem, "_group_name_to_workspace_tensor", cache, raising=False)
    monkeypatch.setattr(symm_mem, "get_symm_mem_workspace", fake_workspace)
    for engine in range(2):
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg{engine}", rank=0, world_size=1)
        try:
            symm.rendezvous_workspace(100, torch.device("cpu"))
            symm.rendezvous_workspace(50, torch.device("cpu"))   # fits: nothing made
            symm.rendezvous_workspace(200, torch.device("cpu"))  # grows
        finally:
            dist.destroy_process_group()
    # the second group found the first one's 200-byte workspace under the same name and replaced it
    assert made == [100, 200, 100, 200], made


def test_async_ce_sums_inside_the_norm():
    """With stages="half" each pending copy-engine reduction is consumed by the next stage's RMSNorm, which
    sums the parts itself (no separate add); with stages="layer" o_proj's reduction is summed by an add."""
    half = run_scenario({"name": "async_ce", "emulate": True, "min_tokens": 1})["counters"]
    layer = run_scenario({"name": "async_ce", "emulate": True, "min_tokens": 1, "stages": "layer"})["counters"]
    # all but each micro-batch's last reduction of the stack (tiny: 4 layers, 8 reductions each: 7 of 8)
    assert half["copies"] > half["fused"] >= 0.75 * half["copies"], half
    assert layer["copies"] > 0 and layer["fused"] == 0, layer


# What each strategy must be seen doing, beyond giving blocking's outputs.
OWN_PATH = {"async": more_all_reduces, "async-3-seqs-layer": more_all_reduces, "async-4-fallback": more_all_reduces,
            "chunked-3": more_all_reduces, "chunked-4-fallback": more_all_reduces, "chunked-ctas": more_all_reduces,
            "rsag": sharded, "rsag-fallback": sharded, "async_rsag": sharded, "async_rsag-3-seqs": sharded,
            "async_rsag-fallback": sharded, "async_ce": through_slots, "async_ce-3-layer": through_slots,
            "async_rsag_ce": shards_through_slots, "async_rsag_ce-3-seqs": shards_through_slots,
            "async_rsag_ce-fallback": shards_through_slots, "async_tp": fused_gemms, "async_tp-fallback": fused_gemms}


def test_reference_issues_all_reduces(reference):
    assert reference["collectives"].get("all_reduce", 0) > 0 and "reduce_scatter_tensor" not in reference["collectives"]


@pytest.mark.parametrize("key", list(STRATEGIES))
def test_strategy_matches_blocking(key, reference):
    got = run_scenario(STRATEGIES[key])
    assert got["cache_hits"] == reference["cache_hits"]
    assert_same(got, reference, key)
    assert OWN_PATH[key]({**got["collectives"], **got["counters"]}, reference["collectives"]), (
        f"{key} gave blocking's outputs without taking its own path: {got['collectives']} against blocking's "
        f"{reference['collectives']}")


@pytest.mark.parametrize("key", ["blocking", "async", "chunked-3", "rsag", "async_rsag", "async_rsag_ce"])
def test_tp4_matches_tp2_blocking(key, reference, monkeypatch):
    """Four ranks (the tiny arch's 4 KV heads: one per rank; 2 query heads each): shards of a quarter, rsag's
    token shards padded four ways. Tokens as at tp=2; logits within float32 tolerance (sums in another order).
    The engine refuses more CPU ranks than cores (a usability guard, not a correctness one): CI has 2 cores."""
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    got = run_scenario(STRATEGIES.get(key, key), tp=4)
    assert got["cache_hits"] == reference["cache_hits"]
    assert_same(got, reference, f"{key} at tp=4")


def test_overlap_matches_blocking_and_switches(reference, overlap_table):
    got = run_scenario({"name": "overlap", "table": overlap_table})
    assert_same(got, reference, "overlap")
    used = set(got["history"].values())
    assert {"async", "chunked"} <= used, got["history"]
    assert "symm" not in used  # not available on gloo


def test_overlap_skips_symm_norm_where_it_cannot_run(reference):
    """The GPU tests' table (tests/data) sends decode to symm_norm and large prefill to rsag. On gloo symm_norm
    cannot run: overlap takes the next choice (blocking) instead of failing, and still equals blocking."""
    path = os.path.join(os.path.dirname(__file__), "data", "overlap_symm_norm_table.json")
    rules = load_table(path)["entries"][0]["rules"]
    assert [c["strategy"] for c in rules["decode"][0]["choices"]] == ["symm_norm", "blocking"]
    got = run_scenario({"name": "overlap", "table": path})
    assert_same(got, reference, "overlap with a symm_norm table on gloo")
    assert set(got["history"].values()) == {"blocking", "rsag"}, got["history"]


def test_overlap_forwards_column_parallel_to_async_tp(reference, tmp_path):
    """overlap with async_tp (emulated) for prefill and blocking for decode: column-parallel GEMMs reach the
    active delegate (the gathers are fused into them), and the outputs are blocking's."""
    table = {"format": 1, "entries": [{"model": "*", "tp": "*", "card": "*", "rules": {
        "decode": [{"max_tokens": None, "choices": [{"strategy": "blocking", "params": {}}]}],
        "prefill": [{"max_tokens": None, "choices": [
            {"strategy": "async_tp", "params": {"emulate": True, "min_tokens": 1}}]}]}}]}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    got = run_scenario({"name": "overlap", "table": str(path)})
    assert_same(got, reference, "overlap-async_tp")
    assert {"async_tp", "blocking"} <= set(got["history"].values()), got["history"]
    assert got["collectives"].get("all_reduce", 0) < reference["collectives"]["all_reduce"]


@pytest.mark.parametrize("table", ["overlap_async_ce_table.json", "overlap_lamport_table.json",
                                   "overlap_rsag_ce_table.json"])
def test_overlap_skips_symmetric_memory_delegates_where_they_cannot_run(reference, table):
    """The bench's table shapes (symm_norm for decode, async_ce or async_rsag_ce for prefill) and the
    lamport_norm / symm_norm switching table (tests/data): on gloo none of them can run, so overlap runs blocking
    throughout instead of failing."""
    got = run_scenario({"name": "overlap", "table": os.path.join(os.path.dirname(__file__), "data", table)})
    assert_same(got, reference, f"overlap with {table} on gloo")
    assert set(got["history"].values()) == {"blocking"}, got["history"]


def test_none_runs_and_flags_outputs_invalid():
    got = run_scenario("none")
    assert all(o["valid"] is False and o["text"] is None for o in got["outputs"])
    assert all(len(t) == GREEDY.max_tokens for t in got["tokens"])


def test_none_mb_is_none_split_into_micro_batches():
    """none_mb runs async's split with no reduction at all, and the split is transparent: the same logits as
    `none`. Its outputs are flagged like none's, and overlap never delegates to it."""
    from nanovllm_lab.comm import none_mb
    from nanovllm_lab.comm.overlap import delegates
    issued = []
    orig = none_mb.NoneMbStrategy._issue

    def counting(self, x, weight, bias):
        issued.append(x.shape[0])
        return orig(self, x, weight, bias)

    none_mb.NoneMbStrategy._issue = counting
    try:
        got = run_scenario({"name": "none_mb", "min_tokens": 1})
    finally:
        none_mb.NoneMbStrategy._issue = orig
    ref = run_scenario("none")
    assert issued, "the micro-batched loop never ran"
    assert got["collectives"].get("all_reduce", 0) == 0 and not got["collectives"].get("reduce_scatter_tensor")
    assert all(o["valid"] is False and o["text"] is None for o in got["outputs"])
    assert got["tokens"] == ref["tokens"]
    for i, (a, b) in enumerate(zip(got["logits"], ref["logits"])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {i}: {m}")
    assert "none_mb" not in delegates() and "none" not in delegates() and "async" in delegates()


def test_none_mb_rejects_a_communicator():
    from nanovllm_lab.comm import resolve_strategy
    with pytest.raises(ValueError, match="'none_mb' communicates nothing: comm_max_ctas must be 0"):
        resolve_strategy({"name": "none_mb", "comm_max_ctas": 8})


def test_a_device_side_reduction_error_fails_generate():
    """lamport_norm's timed-out wait sets a device flag; check() turns it into an error naming the cause, and the
    engine calls check() at the end of generate(), so such a run fails instead of returning tokens."""
    from nanovllm_lab.comm import lamport_norm
    with LLM("tiny", strategy={"name": "lamport_norm", "local": True},
             **{**ENGINE, "tensor_parallel_size": 1}) as llm:
        s = llm.model_runner.strategy
        assert llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)  # flag clear: fine
        s.err.fill_(1)  # on CPU the fused loop runs PyTorch's arithmetic: set the flag as the kernel would
        with pytest.raises(RuntimeError, match="lamport_norm: a peer's rows never arrived within spin_limit"):
            llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
        s.err.zero_()
        assert isinstance(s, lamport_norm.LamportNormStrategy)


@pytest.mark.parametrize("name", ["symm", "symm_norm", "async_ce", "lamport_norm", "async_tp"])
def test_symmetric_memory_strategy_on_cpu_tp2_is_a_clear_error(name):
    with pytest.raises(ValueError, match=rf"'{name}' needs CUDA GPUs with peer access.*gloo on cpu"):
        LLM("tiny", strategy=name, **ENGINE)


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"spin_limit": 1 << 31}, {"local": "yes"}, {"programs_per_sm": 9}])
def test_lamport_norm_rejects_bad_parameters(bad):
    from nanovllm_lab.comm import resolve_strategy
    with pytest.raises(ValueError, match=f"'lamport_norm': {next(iter(bad))}"):
        resolve_strategy({"name": "lamport_norm", **bad})


def test_symm_norm_does_not_need_the_symm_all_reduce_ops(monkeypatch):
    """On a (faked) NCCL group with peer access but a torch without symm_mem's all-reduce ops, symm is refused
    naming the missing op, and symm_norm, which never calls them, is not."""
    import types

    from nanovllm_lab.comm import symm
    from nanovllm_lab.distributed.parallel import ParallelInfo
    monkeypatch.setattr(symm.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(symm.dist, "get_backend", lambda *a: "nccl")
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: True)
    monkeypatch.setattr(torch.ops, "symm_mem", types.SimpleNamespace())  # no ops at all
    info = ParallelInfo(rank=0, world_size=2, device="cuda:0")
    assert "one_shot_all_reduce" in symm.unavailable_reason(info, "symm")
    assert symm.unavailable_reason(info, "async_ce") is None  # copies and a barrier: no symm_mem collective
    assert symm.unavailable_reason(info, "symm_norm") is None
    assert symm.unavailable_reason(info, "lamport_norm") is None
    assert "fused_all_gather_matmul" in symm.unavailable_reason(info, "async_tp")  # PyTorch's async-TP operators
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: False)
    assert "peer access" in symm.unavailable_reason(info, "symm_norm")


@pytest.mark.parametrize("spec", [{"name": "symm_norm", "max_tokens": 2048}, {"name": "symm_norm", "max_tokens": 16},
                                  {"name": "symm_norm", "max_tokens": 2048, "shots": 2},
                                  {"name": "lamport_norm", "max_tokens": 16}],
                         ids=["every_step", "decode_only", "two_shot_tp1", "lamport_decode_only"])
def test_fused_norm_loop_matches_blocking(spec):
    """The fused loop of symm_norm and lamport_norm (GEMMs into alternating slots, reduce + add + norm in one
    call; `local` runs it at tp=1 with PyTorch's add + norm) gives blocking's tokens and logits. With
    max_tokens=16 the prefill steps (up to 96 tokens) take the blocking loop and decode steps the fused one, in
    one engine. shots=2 must run too at tp=1 (where there is nothing to scatter; the two-shot and lamport
    kernels are tested in test_triton_kernels.py)."""
    from nanovllm_lab.comm import lamport_norm, symm_norm
    cls = lamport_norm.LamportNormStrategy if spec["name"] == "lamport_norm" else symm_norm.SymmNormStrategy
    ref = run_scenario("blocking", tp=1)
    llm_calls, slots = [], []
    orig = cls._reduce

    def counting(self, n, residual, norm, nxt=None):
        llm_calls.append(n)
        slots.append(self._slot)
        return orig(self, n, residual, norm, nxt)

    cls._reduce = counting
    try:
        got = run_scenario({**spec, "local": True}, tp=1)
    finally:
        cls._reduce = orig
    # The two slots alternate, across steps too (the cross-rank safety arguments in comm/symm_norm.py and
    # comm/lamport_norm.py need every step to start on slot 0).
    assert slots == [i % 2 for i in range(len(slots))]
    assert got["tokens"] == ref["tokens"]
    for i, (a, b) in enumerate(zip(got["logits"], ref["logits"])):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m: f"step {i}: {m}")
    assert llm_calls, "the fused loop never ran"
    assert max(llm_calls) <= spec["max_tokens"]
    if spec["max_tokens"] == 16:
        assert max(llm_calls) < 96  # the long prefill steps went to the blocking loop


@pytest.mark.parametrize("mib", [0, 8])
def test_lamport_norm_prefetches_the_next_blocks_first_weight(mib):
    """With prefetch_mib, each fused reduction hands the kernel the weight of the GEMM that runs right after its
    norm: the same layer's gate_up_proj after attention, the next layer's qkv_proj after the MLP, nothing after
    the last layer. A stand-in for the CUDA kernel records what it is given and computes the kernel's contract
    (sum, residual add, RMSNorm), so the tokens must still be blocking's."""
    from nanovllm_lab.comm import lamport_norm
    from nanovllm_lab.layers.layernorm import RMSNorm
    calls = []

    def kernel(partial, dst, src, residual, weight, eps, err, spin_limit, programs_per_sm, prefetch, prefetch_bytes):
        calls.append((prefetch, prefetch_bytes))
        if weight is None:
            return partial, residual
        norm = RMSNorm(weight.numel(), eps)
        norm.weight.data = weight
        x = (partial.float() + residual.float()).to(partial.dtype)  # RMSNorm.forward's add, then its norm
        return norm.norm(x), x

    ref = run_scenario("blocking", tp=1)
    orig = lamport_norm.LamportNormStrategy.prepare

    def prepare(self, *a):
        orig(self, *a)
        self._kernel = kernel
        seen.append(self)

    seen: list = []
    lamport_norm.LamportNormStrategy.prepare = prepare
    try:
        got = run_scenario({"name": "lamport_norm", "local": True, "max_tokens": 16, "prefetch_mib": mib}, tp=1)
    finally:
        lamport_norm.LamportNormStrategy.prepare = orig
    assert got["tokens"] == ref["tokens"]
    assert seen and calls and len(calls) % 2 == 0
    if mib == 0:
        assert all(p is None and b == 0 for p, b in calls)
        return
    ends = [i for i, (p, _) in enumerate(calls) if p is None]  # each forward's last reduction
    step = calls[:ends[0] + 1]
    assert len(step) >= 4 and len(calls) == len(step) * len(ends)  # two reductions per layer, every forward
    assert step[-1] == (None, 0) and all(b == 8 << 20 for _, b in step[:-1])
    shapes = [tuple(p.shape) for p, _ in step[:-1]]
    assert shapes[0] != shapes[1] and shapes[::2] == [shapes[0]] * len(shapes[::2])  # gate_up, qkv, gate_up, ...
    assert shapes[1::2] == [shapes[1]] * len(shapes[1::2])
    assert len({id(p) for p, _ in step[:-1]}) == len(step) - 1  # a different layer's weight each time
    assert [id(p) for p, _ in calls[len(step):2 * len(step)]] == [id(p) for p, _ in step]  # same every forward
    assert seen[0].prefetch_target(None) is None  # after the last layer: nothing to prefetch


def test_every_strategy_runs_at_tp1():
    """At tp=1 there is nothing to reduce: every strategy (symm too) behaves like blocking."""
    kw = {**ENGINE, "tensor_parallel_size": 1}
    results = {}
    for s in ["blocking", "symm", {"name": "async", "min_tokens": 1}, {"name": "chunked", "min_tokens_per_chunk": 1},
              "overlap", "symm_norm", "async_ce", "lamport_norm", "async_tp"]:
        with LLM("tiny", strategy=s, **kw) as llm:
            results[str(s)] = [o["token_ids"] for o in llm.generate(BATCH_A[:3], GREEDY, use_tqdm=False)]
    assert all(r == results["blocking"] for r in results.values()), results


# -- configuration errors (no engine starts: the config is resolved first) ------------------------------
def test_unknown_strategy_lists_the_valid_names():
    with pytest.raises(ValueError, match="unknown strategy 'bogus'") as e:
        LLM("tiny", strategy="bogus", **ENGINE)
    for name in ("async", "blocking", "chunked", "none", "overlap", "symm"):
        assert name in str(e.value)


@pytest.mark.parametrize("spec, exc, needle", [
    ({"name": "chunked", "chunkz": 3}, TypeError, "chunkz"),
    ({"name": "chunked", "chunks": 0}, ValueError, "chunks"),
    ({"name": "async", "micro_batches": -1}, ValueError, "micro_batches"),
    ({"name": "async", "split": "rows"}, ValueError, "split"),
    ({"name": "symm", "one_shot_max_bytes": -5}, ValueError, "one_shot_max_bytes"),
    ({"name": "symm_norm", "max_tokens": 0}, ValueError, "max_tokens"),
    ({"name": "symm_norm", "shots": 3}, ValueError, "shots must be 1 .* or 2 .*, got 3"),
    ({"name": "symm_norm", "shots": True}, ValueError, "shots"),
    ({"name": "async_ce", "emulate": "yes"}, ValueError, "emulate must be true or false"),
    ({"name": "async_ce", "micro_batches": 0}, ValueError, "micro_batches"),
    ({"name": "async_tp", "min_tokens": 0}, ValueError, "min_tokens must be an integer >= 1"),
    ({"name": "async_rsag_ce", "norm_programs": -2}, ValueError, "norm_programs must be an integer >= 0"),
    ({"name": "async_tp", "min_tokens": 4096, "max_tokens": 2048}, ValueError, "min_tokens .4096. exceeds max_tokens"),
    ({"name": "overlap", "candidates": ["blocking", "magic"]}, ValueError, "candidates"),
    ({"name": "overlap", "table": "/nonexistent/table.json"}, ValueError, "table"),
])
def test_bad_parameter_is_named(spec, exc, needle):
    with pytest.raises(exc, match=needle):
        LLM("tiny", strategy=spec, **ENGINE)


# -- pure helpers --------------------------------------------------------------------------------------
def test_split_points_balance_tokens_or_sequences():
    assert split_points([5, 1, 1, 1, 10], 2, "tokens") == [0, 4, 5]
    assert split_points([5, 1, 1, 1, 10], 3, "seqs") == [0, 2, 3, 5]
    assert split_points([1, 1], 2, "tokens") == [0, 1, 2]
    for n in range(2, 30):
        for parts in range(2, min(n, 6) + 1):
            b = split_points(list(range(1, n + 1)), parts, "tokens")
            assert b[0] == 0 and b[-1] == n and all(x < y for x, y in zip(b, b[1:])) and len(b) == parts + 1


def test_micro_batch_plans_in_tokens():
    """plan(): token bounds per split policy. "tokens" cuts a prompt when the step carries its block tables
    (seq_tables), else it keeps to prompt boundaries like "seq_tokens"; one part is no split (blocking)."""
    from nanovllm_lab.comm.async_overlap import AsyncConfig, AsyncOverlapStrategy
    from nanovllm_lab.distributed.parallel import ParallelInfo
    from nanovllm_lab.utils.context import AttentionContext

    def ctx(lens, tables=True):
        cq = [0]
        for x in lens:
            cq.append(cq[-1] + x)
        return AttentionContext(is_prefill=True, cu_seqlens_q_host=cq, cu_seqlens_k_host=cq,
                                seq_tables=torch.zeros(len(lens), 1, dtype=torch.int32) if tables else None)

    def plan(c, **cfg):
        s = AsyncOverlapStrategy(AsyncConfig(min_tokens=1, **cfg), ParallelInfo(0, 2, "cpu"))
        return s.plan(c, c.cu_seqlens_q_host[-1])

    assert plan(ctx([2048])) == [0, 1024, 2048]                    # one prompt, cut in half
    assert plan(ctx([2048]), split="seq_tokens") is None            # one prompt, not cut: unsplit
    assert plan(ctx([2048], tables=False)) is None                  # no tables: cannot cut
    assert plan(ctx([100, 10, 10])) == [0, 60, 120]
    assert plan(ctx([100, 10, 10]), split="seq_tokens") == [0, 100, 120]
    assert plan(ctx([100, 10, 10]), split="seqs") == [0, 110, 120]         # 2 prompts + 1
    assert plan(ctx([7]), micro_batches=3) == [0, 2, 5, 7]
    assert plan(ctx([2048]), micro_batches=1) is None
    decode = AttentionContext(is_prefill=False, context_lens=torch.ones(5, dtype=torch.int32))
    s = AsyncOverlapStrategy(AsyncConfig(min_tokens=1), ParallelInfo(0, 2, "cpu"))
    assert s.plan(decode, 5) == [0, 2, 5]


def test_chunk_bounds():
    assert chunk_bounds(1, 3, 1) == [0, 1]
    assert chunk_bounds(2, 3, 1) == [0, 1, 2]
    assert chunk_bounds(300, 4, 128) == [0, 128, 300]
    for n in range(1, 700, 13):
        for chunks in (1, 2, 3, 4):
            b = chunk_bounds(n, chunks, 16)
            sizes = [y - x for x, y in zip(b, b[1:])]
            assert b[-1] == n and len(sizes) <= chunks and (len(sizes) == 1 or min(sizes) >= 16)


def test_write_table_picks_fastest_within_spread(tmp_path):
    rows = [
        {"phase": "decode", "tokens": 1, "strategy": "blocking", "t_ms": 1.0, "t_p10_ms": 0.9, "t_p90_ms": 1.1},
        {"phase": "decode", "tokens": 1, "strategy": "none", "t_ms": 0.1},  # never chosen: wrong outputs
        {"phase": "decode", "tokens": 1, "strategy": "none_mb", "t_ms": 0.2},  # nor this bound
        {"phase": "decode", "tokens": 1, "strategy": "chunked", "t_ms": 1.5, "t_p10_ms": 1.4, "t_p90_ms": 1.6},
        {"phase": "decode", "tokens": 64, "strategy": "blocking", "t_ms": 2.0},
        {"phase": "decode", "tokens": 64, "strategy": "async", "params": {"micro_batches": 3}, "t_ms": 1.2},
        {"phase": "prefill", "tokens": 512, "strategy": "chunked", "t_ms": 3.0, "t_blocking_ms": 4.0},
        {"phase": "prefill", "tokens": 512, "strategy": "symm", "t_ms": math.nan, "t_blocking_ms": 4.0},
    ]
    path = str(tmp_path / "t.json")
    table = write_table(rows, path)
    assert load_table(path)["entries"][0] == json.loads(json.dumps(table["entries"][0]))
    entry = table["entries"][0]
    dec = entry["rules"]["decode"]
    assert [c["strategy"] for c in dec[0]["choices"]] == ["blocking"] and dec[0]["max_tokens"] == 8  # sqrt(1*64)
    assert dec[1]["choices"][0] == {"strategy": "async", "params": {"micro_batches": 3}} and dec[1]["max_tokens"] is None
    assert [c["strategy"] for c in entry["rules"]["prefill"][0]["choices"]] == ["chunked", "blocking"]
    assert any(e["model"] == "*" for e in table["entries"])  # a new file keeps the default fallback
    # A later decode-only sweep replaces the decode rules and keeps the prefill ones.
    table = write_table([{"phase": "decode", "tokens": 1, "strategy": "chunked", "t_ms": 0.5}], path)
    entry = table["entries"][0]
    assert [c["strategy"] for c in entry["rules"]["decode"][0]["choices"]] == ["chunked", "blocking"]  # blocking: always the last choice
    assert [c["strategy"] for c in entry["rules"]["prefill"][0]["choices"]] == ["chunked", "blocking"]
    assert entry["sources"] == {"decode": "write_table from 1 rows", "prefill": "write_table from 8 rows"}
    assert sum(e["model"] == entry["model"] for e in table["entries"]) == 1


def test_layer_sweep_rows_on_cpu():
    from nanovllm_lab.comm.layerbench import ROW_KEYS, layer_sweep
    rows = layer_sweep("tiny", 2, ["blocking", "async", {"name": "chunked", "min_tokens_per_chunk": 2}, "symm"],
                       [1, 8], ("prefill", "decode"), 2, "cpu", block_size=16, decode_context=32,
                       elementwise_kernels="triton")
    assert len(rows) == 2 * 2 * 2 * 4  # units x phases x tokens x strategies
    assert {r["elementwise_kernels"] for r in rows} == {"torch"}  # what ran: on cpu the PyTorch path, whatever asked
    with pytest.raises(ValueError, match="elementwise_kernels must be auto, triton or torch"):
        layer_sweep("tiny", 2, ["blocking"], [1], ("decode",), 1, "cpu", elementwise_kernels="cuda")
    required = {"arch", "tp", "phase", "tokens", "unit", "strategy", "t_ms", "t_p10_ms", "t_p90_ms", "t_blocking_ms",
                "t_none_ms", "t_comm_ms", "exposed_comm_ms", "overlap_efficiency"}
    for r in rows:
        assert required <= set(r) and set(r) == set(ROW_KEYS)
        if r["strategy"] == "symm":
            assert math.isnan(r["t_ms"]) and "needs CUDA" in r["error"]
        else:
            assert math.isfinite(r["t_ms"]) and r["t_ms"] > 0 and math.isfinite(r["t_blocking_ms"]), r
            assert r["exposed_comm_ms"] == pytest.approx(r["t_ms"] - r["t_none_ms"])


def test_step_sweep_plumbing():
    from nanovllm_lab.comm.stepbench import step_sweep
    rows = step_sweep("tiny", 1, ["blocking", "none"], decode_batches=(2,), prefill_tokens=(24,), repeats=2,
                      device="cpu", decode_context=8, kvcache_block_size=16, num_kvcache_blocks=32)
    assert {(r["phase"], r["strategy"]) for r in rows} == {(p, s) for p in ("prefill", "decode")
                                                           for s in ("blocking", "none")}
    assert all(math.isfinite(r["t_ms"]) and math.isfinite(r["t_blocking_ms"]) for r in rows), rows


def test_tokens_split_cuts_prompts_and_seq_tokens_does_not(reference, monkeypatch):
    """The default split ("tokens") gives micro-batches equal token counts, so a prefill step of one prompt (the
    130-token prompt's chunks) or of uneven prompts is cut inside a sequence: the later piece reads the earlier
    piece's keys from the paged cache. Outputs stay blocking's. "seq_tokens" splits only at sequence bounds."""
    from nanovllm_lab.utils.context import AttentionContext
    cuts: list[tuple[int, int]] = []
    original = AttentionContext.slice_tokens

    def spy(self, t0, t1):
        if self.is_prefill and t0 not in self.cu_seqlens_q_host:
            cuts.append((t0, t1))
        return original(self, t0, t1)

    monkeypatch.setattr(AttentionContext, "slice_tokens", spy)
    got = run_scenario({"name": "async", "min_tokens": 1})
    assert cuts, "no micro-batch started inside a sequence"
    assert_same(got, reference, "async, cut prompts")
    cuts.clear()
    got = run_scenario({"name": "async", "min_tokens": 1, "split": "seq_tokens"})
    assert not cuts, cuts
    assert_same(got, reference, "async, seq_tokens")


@pytest.mark.parametrize("spec", [{"name": "async_rsag", "min_tokens": 8},
                                  {"name": "async_rsag_ce", "emulate": True, "min_tokens": 8}],
                         ids=["async_rsag", "async_rsag_ce"])
def test_async_rsag_reduces_the_embedding_per_micro_batch(spec, reference):
    """Step by step on rank 0: a micro-batched step issues no all-reduce at all, the embedding's included (it is
    each micro-batch's first reduction: async_rsag reduce-scatters 2 L + 1 times per micro-batch, async_rsag_ce
    moves all 2 L + 1 through its slots and issues no collective); a step that does not micro-batch (decode and
    a prefix-cached prefill below min_tokens) all-reduces the embedding once before its blocking loop's 2 L."""
    from nanovllm_lab.models.arch import BUILTIN_ARCHS
    from nanovllm_lab.utils.context import get_context
    two_l = 2 * BUILTIN_ARCHS["tiny"].num_hidden_layers
    llm = LLM("tiny", strategy=spec, **ENGINE)
    try:
        s = llm.model_runner.strategy
        original, steps = s.run_layers, []
        with counting_collectives() as counts:
            last = collections.Counter()  # the counts when the previous step's layers ended

            def run_layers(layers, positions, hidden):
                bounds = s.plan(get_context(), hidden.shape[0])
                entry, copies = collections.Counter(counts), getattr(s, "copies", 0)
                out = original(layers, positions, hidden)
                inside = collections.Counter(counts)
                inside.subtract(entry)
                steps.append({"mbs": 0 if bounds is None else len(bounds) - 1,
                              "embedding": entry["all_reduce"] - last["all_reduce"],
                              "all_reduce": inside["all_reduce"], "reduce_scatter": inside["reduce_scatter_tensor"],
                              "copies": getattr(s, "copies", 0) - copies})
                last.clear()
                last.update(counts)
                return out
            s.run_layers = run_layers
            out = llm.generate(BATCH_A, GREEDY, use_tqdm=False) + llm.generate(BATCH_B, GREEDY, use_tqdm=False)
    finally:
        llm.exit()
    assert [o["token_ids"] for o in out] == reference["tokens"]
    split, whole = [st for st in steps if st["mbs"]], [st for st in steps if not st["mbs"]]
    assert split and whole, steps
    ce = spec["name"] == "async_rsag_ce"
    for st in split:
        m = st["mbs"]
        want = {"mbs": m, "embedding": 0, "all_reduce": 0, "reduce_scatter": 0 if ce else m * (two_l + 1),
                "copies": m * (two_l + 1) if ce else 0}
        assert st == want, steps
    for st in whole:
        assert st == {"mbs": 0, "embedding": 1, "all_reduce": two_l, "reduce_scatter": 0, "copies": 0}, steps


def test_overlap_hands_the_embedding_to_its_micro_batching_delegate(tmp_path, reference):
    """overlap's prefill delegate async_rsag_ce (emulated) reduces the embedding per micro-batch too: after the
    first step (which matches the table entry, so its embedding is all-reduced as before) no prefill step that
    the delegate splits issues an all-reduce; decode steps (blocking) all-reduce it. Tokens equal blocking's."""
    table = {"format": 1, "note": "test", "entries": [{"model": "*", "tp": "*", "card": "*", "rules": {
        "decode": [{"max_tokens": None, "choices": [{"strategy": "blocking", "params": {}}]}],
        "prefill": [{"max_tokens": None, "choices": [
            {"strategy": "async_rsag_ce", "params": {"emulate": True, "min_tokens": 8}}]}]}}]}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    llm = LLM("tiny", strategy={"name": "overlap", "table": str(path)}, **ENGINE)
    try:
        s = llm.model_runner.strategy
        marks: list[int] = []  # per step: the all-reduces its embedding issued (0: left to the micro-batches)
        with counting_collectives() as counts:
            def reduce_embedding(x, _original=s.reduce_embedding):
                before = counts["all_reduce"]
                y = _original(x)
                marks.append(counts["all_reduce"] - before)
                return y
            s.reduce_embedding = reduce_embedding
            out = llm.generate(BATCH_A, GREEDY, use_tqdm=False) + llm.generate(BATCH_B, GREEDY, use_tqdm=False)
        delegate = next(d for d in s.delegates.values() if d.name == "async_rsag_ce")
        history = dict(s.history)
    finally:
        llm.exit()
    assert [o["token_ids"] for o in out] == reference["tokens"]
    assert "async_rsag_ce" in history.values() and "blocking" in history.values(), history
    assert marks[0] == 1 and 0 in marks[1:] and 1 in marks[1:], marks
    assert delegate.copies > 0 and not delegate._embed_pending


def test_overlap_refuses_an_embedding_and_layers_split_between_delegates(tmp_path, monkeypatch):
    """If a step's embedding went to one delegate (left unreduced for its micro-batches) and its layers to another,
    overlap raises a RuntimeError naming both, and the first delegate forgets the pending embedding (a later call of
    it must not treat a reduced input as its own)."""
    from nanovllm_lab.comm import build_strategy, resolve_strategy
    from nanovllm_lab.distributed.parallel import ParallelInfo
    from nanovllm_lab.utils.context import AttentionContext, reset_context, set_context
    table = {"format": 1, "note": "test", "entries": [{"model": "*", "tp": "*", "card": "*", "rules": {
        "prefill": [{"max_tokens": None, "choices": [{"strategy": "async_rsag", "params": {"min_tokens": 1}}]}]}}]}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    s = build_strategy(resolve_strategy({"name": "overlap", "table": str(path)}), ParallelInfo(0, 2, "cpu"))
    rsag = next(d for d in s.delegates.values() if d.name == "async_rsag")
    s._entry = table["entries"][0]  # resolved, as after a first step
    set_context(AttentionContext(is_prefill=True, cu_seqlens_q_host=[0, 2, 4], cu_seqlens_k_host=[0, 2, 4]))
    try:
        x = torch.ones(4, 8)
        assert s.reduce_embedding(x) is x and rsag._embed_pending  # left for async_rsag's micro-batches
        monkeypatch.setattr(s, "choose", lambda *a, **k: s._blocking)  # the layers then go elsewhere
        with pytest.raises(RuntimeError, match="embedding went to async_rsag but its layers to blocking"):
            s.run_layers([], torch.arange(4), x)
        assert not rsag._embed_pending
    finally:
        reset_context()


def test_async_rsag_pending_embedding_is_reduced_once_and_forgotten(monkeypatch):
    """reduce_embedding leaves the embedding of a step that will be micro-batched unreduced. If run_layers then
    runs the layers whole (layers without the pre-norm parts) it all-reduces it itself, and the pending state
    ends with that call: a later run_layers on a reduced input (layerbench's) reduces nothing. A step that will
    not be micro-batched (one token) is reduced by reduce_embedding itself."""
    from nanovllm_lab.comm.async_rsag import AsyncRsAgConfig, AsyncRsAgStrategy
    from nanovllm_lab.distributed.parallel import ParallelInfo
    from nanovllm_lab.utils.context import AttentionContext, reset_context, set_context

    reduced: list[torch.Tensor] = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, *a, **k: reduced.append(t))
    s = AsyncRsAgStrategy(AsyncRsAgConfig(min_tokens=1), ParallelInfo(0, 2, "cpu"))
    layers = [lambda positions, hidden, residual: (hidden + 1, hidden)]  # a layer run whole
    positions = torch.arange(4)
    set_context(AttentionContext(is_prefill=False, context_lens=torch.ones(4, dtype=torch.int32)))
    try:
        y = torch.randn(4, 8)
        assert s.reduce_embedding(y) is y and not reduced  # two micro-batches planned: left for run_layers
        s.run_layers(layers, positions, y)
        assert len(reduced) == 1 and reduced[0] is y, "the pending embedding was not reduced"
        s.run_layers(layers, positions, torch.randn(4, 8))
        assert len(reduced) == 1, "a stale pending embedding reduced a later step's reduced input"
        set_context(AttentionContext(is_prefill=False, context_lens=torch.ones(1, dtype=torch.int32)))
        one = torch.randn(1, 8)
        assert s.reduce_embedding(one) is one and len(reduced) == 2 and reduced[1] is one
        s.run_layers(layers, positions[:1], one)
        assert len(reduced) == 2
    finally:
        reset_context()


def test_async_rsag_ce_device_path_indexing_in_threads(monkeypatch):
    """async_rsag_ce's CUDA path (slots, shard rows, copies, barriers) run by two threads as two ranks over shared
    tensors standing in for symmetric memory, the barrier a threading.Barrier and streams and events no-ops:
    the gathered normed rows and each rank's residual shard must equal the reference (the sum of both partial
    GEMMs, + residual, RMSNorm), at odd and even token counts and across slots. Some reductions are the
    embedding's (each rank's partial lookup copied into its slot, no residual): there the residual shard is the
    sum's shard and the rows are its RMSNorm. Some are a stack's last (no norm): the rows are residual + sum. Stream ordering is the GPU tests' part; this checks the indexing
    that only the device path runs."""
    import dataclasses
    import threading
    import types

    from nanovllm_lab.comm.async_rsag import _MicroBatch
    from nanovllm_lab.comm.async_rsag_ce import AsyncRsAgCeConfig, AsyncRsAgCeStrategy
    from nanovllm_lab.comm.seqpar import token_shard
    from nanovllm_lab.distributed.parallel import ParallelInfo
    from nanovllm_lab.layers.layernorm import RMSNorm

    class Nothing:  # stream / event stand-in
        def __getattr__(self, _):
            return lambda *a, **k: None

    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: Nothing())
    monkeypatch.setattr(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "Event", Nothing)
    hidden, world, sizes = 8, 2, [7, 4, 10, 1, 7, 3, 9]  # more reductions than the 5 slots
    barrier = threading.Barrier(world, timeout=30)
    handle = types.SimpleNamespace(barrier=lambda **kw: barrier.wait())
    shared_p = [torch.full((5, 10, hidden), float("nan")) for _ in range(world)]  # padded rows must not leak
    shared_g = [torch.full((5, 10, hidden), float("nan")) for _ in range(world)]
    g = torch.Generator().manual_seed(0)
    xs = [[torch.randn(n, 6, generator=g) for _ in range(world)] for n in sizes]
    w = [torch.randn(hidden, 6, generator=g) for _ in range(world)]
    resid = [torch.randn(n, hidden, generator=g) for n in sizes]
    embedding = {1, 4, 5}  # these reductions are the embedding's: ys are the ranks' partial lookups
    last = {2, 6}  # these are a stack's last (no norm): the rows are residual + sum, and no residual is returned
    ys = [[torch.randn(n, hidden, generator=g) for _ in range(world)] for n in sizes]
    norm = RMSNorm(hidden, 1e-6)
    norm.weight.data = torch.rand(hidden, generator=g) + 0.5
    got: dict = {}

    def rank_main(r: int) -> None:
        cfg = AsyncRsAgCeConfig(emulate=True, min_tokens=1)
        s = AsyncRsAgCeStrategy(cfg, ParallelInfo(r, world, "cpu"))
        s.cfg = dataclasses.replace(cfg, emulate=False)  # the device path, over the shared stand-ins
        s.stream, s.handle, s.partials, s.gathers = Nothing(), handle, shared_p, shared_g
        s.scratch = torch.full((5, world - 1, 5, hidden), float("nan"))
        s._unreduced = True
        for j, n in enumerate(sizes):
            mb = _MicroBatch(None, None, n)
            if j in embedding:
                s._reduce_embedding(mb, ys[j][r], norm)
            else:
                mb.residual = token_shard(resid[j], r, world)
                partial = s.row_parallel(xs[j][r], w[r], None)
                assert s._reduce(mb, partial, None if j in last else norm) is None  # last: the rows hold the residual
            got[r, j] = (mb.inp.clone(), mb.residual.clone())
        got[r, "copies"] = s.copies

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert got.get((0, "copies")) == len(sizes) == got.get((1, "copies")), got.keys()
    for j, n in enumerate(sizes):
        if j in embedding:
            total = ys[j][0] + ys[j][1]
            want_h, want_res = norm(total), total
        else:
            total = sum(xs[j][r] @ w[r].t() for r in range(world))
            want_h, want_res = (total + resid[j], resid[j]) if j in last else norm(total, resid[j].clone())
        for r in range(world):
            h, res = got[r, j]
            rows = res.shape[0]
            valid = max(0, min(n - r * rows, rows))  # the shard's real rows (the rest pads)
            torch.testing.assert_close(h, want_h, atol=1e-5, rtol=1e-5, msg=lambda m: f"rank {r}, n={n}: {m}")
            torch.testing.assert_close(res[:valid], want_res[r * rows:r * rows + valid], atol=1e-5, rtol=1e-5)


def test_final_residual_is_none_only_when_every_micro_batch_added_its_own():
    """async_rsag's run_layers hands the model's final norm no residual when every micro-batch's last reduction
    put residual + sum in its rows (async_rsag_ce through its slots); mixed, the others' residuals keep their rows
    and zeros stand in for the added ones, so the final norm sees the same sums either way."""
    from nanovllm_lab.comm.async_rsag import final_residual
    a, b = torch.randn(3, 4), torch.randn(2, 4)
    assert final_residual([None, None], [a, b]) is None
    res_b = torch.randn(2, 4)
    mixed = final_residual([None, res_b], [a, b])
    assert torch.equal(mixed, torch.cat([torch.zeros(3, 4), res_b]))
    both = torch.randn(3, 4), res_b
    assert torch.equal(final_residual(list(both), [a, b]), torch.cat(both))
