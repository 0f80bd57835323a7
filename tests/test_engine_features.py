"""Engine behaviours against an unconstrained reference run: tensor parallelism, prefix caching, chunked
prefill and preemption must not change greedy outputs."""
from __future__ import annotations

import pytest
import torch

from nanovllm_lab import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPTS = [[3 + (7 * i) % 300 for i in range(n)] for n in (5, 40, 17, 64, 1)]


@pytest.fixture(scope="module")
def reference(qwen3_dir):
    with LLM(qwen3_dir, kvcache_block_size=16, num_kvcache_blocks=128) as llm:
        return [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_tensor_parallel_2_matches_1(qwen3_dir, reference):
    with LLM(qwen3_dir, tensor_parallel_size=2, kvcache_block_size=16, num_kvcache_blocks=128) as llm:
        outs = [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert outs == reference


def test_prefix_cache_hits_and_same_tokens(qwen3_dir):
    prefix = [(11 * i) % 300 + 2 for i in range(50)]
    batch1 = [prefix + [7, 8], prefix + [9]]
    batch2 = [prefix + [10, 11, 12], prefix + [13]]
    with LLM(qwen3_dir, kvcache_block_size=16, num_kvcache_blocks=64) as llm:
        llm.generate(batch1, GREEDY, use_tqdm=False)
        before = llm.scheduler.block_manager.num_cache_hit_tokens
        cached = [o["token_ids"] for o in llm.generate(batch2, GREEDY, use_tqdm=False)]
        hits = llm.scheduler.block_manager.num_cache_hit_tokens - before
    assert hits >= 2 * 48  # three full 16-token blocks of the prefix, for each sequence
    with LLM(qwen3_dir, kvcache_block_size=16, num_kvcache_blocks=64) as llm:
        fresh = [o["token_ids"] for o in llm.generate(batch2, GREEDY, use_tqdm=False)]
        assert llm.scheduler.block_manager.num_cache_hit_tokens <= 48  # only within-batch sharing
    assert cached == fresh


def test_chunked_prefill_same_tokens(qwen3_dir, reference):
    steps = []
    with LLM(qwen3_dir, kvcache_block_size=16, num_kvcache_blocks=128, max_num_batched_tokens=24) as llm:
        llm.model_runner.step_hooks.append(steps.append)
        outs = [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        hits = llm.scheduler.block_manager.num_cache_hit_tokens  # the prompts share prefixes
    assert outs == reference
    prefill = [s for s in steps if s.phase == "prefill"]
    assert max(s.num_tokens for s in prefill) <= 24
    assert sum(s.num_tokens for s in prefill) == sum(len(p) for p in PROMPTS) - hits
    assert max(len(p) for p in PROMPTS) > 24  # some prompts needed several chunks


def test_preemption_same_tokens(qwen3_dir, reference):
    # 12 blocks of 8 tokens = 96 slots for five sequences needing 5+40+17+64+1 + 5*12 tokens: must preempt.
    with LLM(qwen3_dir, kvcache_block_size=8, num_kvcache_blocks=12, max_model_len=96) as llm:
        outs = [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        assert llm.scheduler.num_preemptions > 0
        assert llm.scheduler.block_manager.num_free_blocks == 12
    assert outs == reference


def test_manual_loop_and_per_prompt_params(qwen3_dir, reference):
    with LLM(qwen3_dir, kvcache_block_size=16, num_kvcache_blocks=64) as llm:
        ids = [llm.add_request(p, GREEDY) for p in PROMPTS[:2]]
        done = {}
        while not llm.is_finished():
            finished, _ = llm.step()
            done.update(finished)
        assert [done[i] for i in ids] == reference[:2]
        outs = llm.generate(PROMPTS[:2], [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                                          SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)],
                            use_tqdm=False)
        assert [len(o["token_ids"]) for o in outs] == [3, 5]
        assert outs[0]["token_ids"] == reference[0][:3]


def test_builtin_tiny_runs_with_text():
    with LLM("tiny", max_model_len=256) as llm:
        out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    assert len(out["token_ids"]) <= 4 and isinstance(out["text"], str)


def test_dummy_weights_identical_across_tp():
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    prompts = [[1, 2, 3, 4], [100, 200]]
    with LLM("tiny", max_model_len=256) as llm:
        a = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    with LLM("tiny", max_model_len=256, tensor_parallel_size=2) as llm:
        b = [o["token_ids"] for o in llm.generate(prompts, sp, use_tqdm=False)]
    assert a == b


def test_warm_up_prefill_with_context_writes_nothing(qwen3_dir, reference):
    """The start-up warm-up of the paged-prefill kernels (cuda) reads the scratch block and writes no K/V: the
    cache is unchanged and later outputs are the reference's."""
    with LLM(qwen3_dir, kvcache_block_size=16, num_kvcache_blocks=128) as llm:
        runner = llm.model_runner
        runner.kv_cache[:, :, :-1].normal_()  # any content the scheduler's blocks may hold
        before = runner.kv_cache.clone()
        runner._prefill_dummy([2, 5], cached=20)  # two blocks of context per sequence, all from the scratch block
        assert torch.equal(runner.kv_cache[:, :, :-1], before[:, :, :-1])
        runner.kv_cache.zero_()
        outs = [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert outs == reference


def test_step_input_pickles_by_value_not_through_shared_memory():
    """Worker ranks get each step's tensors in the message itself. torch's multiprocessing reducers (shared
    memory, descriptors fetched from rank 0's resource-sharer thread) made workers wait for rank 0's GIL while
    it launched kernels (engine/inputs.py)."""
    from multiprocessing.reduction import ForkingPickler
    import pickle

    from nanovllm_lab.engine.inputs import prepare_prefill
    from nanovllm_lab.engine.sequence import Sequence
    seqs = []
    for n in (5, 9):
        s = Sequence(list(range(1, n + 1)), SamplingParams(temperature=0.5), 16)
        s.block_table = [3, 7]
        s.num_scheduled_tokens = n
        seqs.append(s)
    step = prepare_prefill(seqs, block_size=16)
    blob = bytes(ForkingPickler.dumps(step))  # what multiprocessing's Connection.send writes
    assert b"rebuild_storage" not in blob and b"rebuild_tensor" not in blob
    back = pickle.loads(blob)
    assert back.cu_seqlens_q == step.cu_seqlens_q == [0, 5, 14]
    for name in ("input_ids", "positions", "slot_mapping", "temperatures"):
        got, want = getattr(back, name), getattr(step, name)
        assert isinstance(got, torch.Tensor) and got.dtype == want.dtype and torch.equal(got, want), name


def test_prefill_graph_policy_captures_repeated_shapes_up_to_the_limit():
    """Which prefill steps run from a CUDA graph (engine/prefill_graphs.py): a shape's first sighting runs
    eagerly (it warms what the capture needs), its second is captured, later ones replay; once `limit` shapes
    hold graphs, new shapes stay eager. The key separates what fixes the kernels: boundaries and cached context."""
    from nanovllm_lab.engine.inputs import StepInput
    from nanovllm_lab.engine.prefill_graphs import CapturePolicy, shape_key

    def step(lens, cached=0, width=None):
        n = sum(lens)
        cq, ck = [0], [0]
        for x in lens:
            cq.append(cq[-1] + x)
            ck.append(ck[-1] + x + cached)
        tables = None if width is None else torch.zeros(len(lens), width, dtype=torch.int32)
        return StepInput(True, torch.zeros(n, dtype=torch.int64), torch.arange(n), torch.zeros(n, dtype=torch.int32),
                         torch.zeros(len(lens)), cq, ck, None, tables)

    a, b, c = shape_key(step([4, 4])), shape_key(step([5, 3])), shape_key(step([4, 4], cached=16, width=2))
    assert len({a, b, c, shape_key(step([4, 4], cached=16, width=3))}) == 4  # same token count, other kernels
    assert shape_key(step([4, 4])) == a  # other tokens, same shape
    p = CapturePolicy(limit=2)
    assert [p.decide(k) for k in (a, a, a, b, c, b, b, c, c)] == [
        "eager", "capture", "replay", "eager", "eager", "capture", "replay", "eager", "eager"]
    assert p.captured == {a, b}
    assert CapturePolicy(limit=0).decide(a) == "eager"


def test_prefill_graph_static_inputs_take_the_next_steps_values():
    """A captured shape's static inputs (engine/prefill_graphs.py, `_Graph`) hold the capture step's values and
    are rewritten in place with each replayed step's: ids, positions, slots and both block tables (the tensors
    the captured kernels read keep their addresses). Device-independent, so it runs on cpu."""
    from nanovllm_lab.engine.inputs import StepInput
    from nanovllm_lab.engine.prefill_graphs import _Graph

    def step(seed):
        g = torch.Generator().manual_seed(seed)
        tables = torch.randint(0, 50, (2, 3), dtype=torch.int32, generator=g)
        return StepInput(True, torch.randint(0, 99, (9,), generator=g), torch.arange(16, 25),
                         torch.randint(0, 800, (9,), dtype=torch.int32, generator=g), torch.zeros(2),
                         [0, 4, 9], [0, 20, 41], None, tables, tables.clone())

    first, second = step(1), step(2)
    gr = _Graph(first, torch.device("cpu"))
    addresses = [t.data_ptr() for t in (gr.ids, gr.ctx.slot_mapping, gr.ctx.block_tables, gr.ctx.seq_tables)]
    assert gr.ctx.cu_seqlens_k.tolist() == [0, 20, 41] and gr.ctx.max_seqlen_q == 5 and gr.ctx.max_seqlen_k == 21
    gr.fill(second, None)
    assert [t.data_ptr() for t in (gr.ids, gr.ctx.slot_mapping, gr.ctx.block_tables, gr.ctx.seq_tables)] == addresses
    assert torch.equal(gr.ids, second.input_ids) and torch.equal(gr.pos, second.positions)
    assert torch.equal(gr.ctx.slot_mapping, second.slot_mapping)
    assert torch.equal(gr.ctx.block_tables, second.block_tables) and torch.equal(gr.ctx.seq_tables, second.seq_tables)


def test_prefill_graphs_ignored_on_cpu(qwen3_dir, reference):
    """CUDA graphs exist only on cuda: on cpu the option leaves every step eager and the outputs unchanged."""
    with LLM(qwen3_dir, kvcache_block_size=16, num_kvcache_blocks=128, prefill_graphs=4) as llm:
        assert llm.model_runner.prefill_graphs is None
        assert [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == reference
