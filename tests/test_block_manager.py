"""Unit tests of the paged block manager and the scheduler, with small fakes."""
from __future__ import annotations


from nanovllm_lab.engine.block_manager import BlockManager, chain_hash
from nanovllm_lab.engine.scheduler import Scheduler
from nanovllm_lab.engine.sequence import Sequence, SequenceStatus
from nanovllm_lab.sampling_params import SamplingParams

SP = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


def seq(tokens, bs=4, sp=SP):
    return Sequence(list(tokens), sp, bs)


def computed(bm: BlockManager, s: Sequence) -> None:
    """Pretend the whole sequence was prefilled."""
    s.num_cached_tokens = s.num_tokens
    bm.mark_computed(s)


def test_allocation_and_block_boundaries():
    bm = BlockManager(8, 4)
    for n, blocks in [(1, 1), (4, 1), (5, 2), (8, 2), (9, 3)]:
        s = seq(range(100, 100 + n))
        bm.allocate(s)
        assert len(s.block_table) == blocks and s.num_cached_tokens == 0
        bm.deallocate(s)
    assert bm.num_free_blocks == 8


def test_prefix_hit_refcount_and_last_token_recomputed():
    bm = BlockManager(8, 4)
    a = seq(range(10))                      # blocks [0-3][4-7][8-9]
    bm.allocate(a)
    computed(bm, a)
    b = seq(list(range(8)) + [50, 51, 52])  # shares two full blocks
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2] and b.block_table[2] != a.block_table[2]
    assert b.num_cached_tokens == 8
    assert [bm.blocks[i].ref_count for i in a.block_table] == [2, 2, 1]
    c = seq(range(8))                       # fully cached: the last token is still computed
    bm.allocate(c)
    assert c.num_cached_tokens == 7
    bm.deallocate(b)
    bm.deallocate(c)
    assert [bm.blocks[i].ref_count for i in a.block_table] == [1, 1, 1]


def test_freed_blocks_keep_hash_until_reused_then_evicted():
    bm = BlockManager(3, 4)
    a = seq(range(8))
    bm.allocate(a)
    computed(bm, a)
    first = list(a.block_table)
    bm.deallocate(a)
    assert bm.num_free_blocks == 3
    b = seq(range(8))  # freed blocks are still findable
    bm.allocate(b)
    assert b.block_table == first and b.num_cached_tokens == 7
    bm.deallocate(b)
    # Now use all three blocks for other content: the cached blocks are reused and their hashes dropped.
    c = seq(range(200, 212))
    bm.allocate(c)
    computed(bm, c)
    bm.deallocate(c)
    d = seq(range(8))
    bm.allocate(d)
    assert d.num_cached_tokens == 0


def test_unfinished_blocks_are_not_shared():
    bm = BlockManager(8, 4)
    a = seq(range(12))
    bm.allocate(a)
    a.num_cached_tokens = 4  # only the first chunk computed so far
    bm.mark_computed(a)
    b = seq(range(12))
    bm.allocate(b)
    assert b.num_cached_tokens == 4  # blocks 1-2 of `a` hold no K/V yet


def test_hash_collision_is_caught_by_token_check():
    bm = BlockManager(8, 4)
    a = seq(range(4))
    bm.allocate(a)
    computed(bm, a)
    # Forge a collision: point the hash of another block's content at a's block.
    other = [9, 9, 9, 9]
    bm.hash_to_block_id[chain_hash(other)] = a.block_table[0]
    b = seq(other + [1])
    bm.allocate(b)
    assert b.num_cached_tokens == 0 and b.block_table[0] != a.block_table[0]


def test_append_allocates_at_block_boundary():
    bm = BlockManager(4, 4)
    s = seq(range(4))
    bm.allocate(s)
    computed(bm, s)
    s.append_token(5)
    assert bm.can_append(s)
    bm.may_append(s)
    assert len(s.block_table) == 2
    s.append_token(6)
    bm.may_append(s)
    assert len(s.block_table) == 2


def make_scheduler(num_blocks=8, bs=4, max_seqs=4, max_tokens=16):
    return Scheduler(max_seqs, max_tokens, {0}, num_blocks, bs)


def test_scheduler_prefill_then_decode_and_finish():
    sch = make_scheduler()
    a, b = seq(range(1, 6)), seq(range(1, 4))
    sch.add(a), sch.add(b)
    seqs, prefill = sch.schedule()
    assert prefill and seqs == [a, b] and [s.num_scheduled_tokens for s in seqs] == [5, 3]
    sch.postprocess(seqs, [7, 7])
    for _ in range(3):
        seqs, prefill = sch.schedule()
        assert not prefill and seqs == [a, b]
        sch.postprocess(seqs, [7, 7])
    assert sch.is_finished() and a.completion_token_ids == [7] * 4
    assert sch.block_manager.num_free_blocks == 8


def test_scheduler_chunked_prefill_budget():
    sch = make_scheduler(max_tokens=6)
    a, b = seq(range(1, 11)), seq(range(20, 23))
    sch.add(a), sch.add(b)
    seqs, _ = sch.schedule()
    assert seqs == [a] and a.num_scheduled_tokens == 6
    sch.postprocess(seqs, [None])
    seqs, _ = sch.schedule()
    assert seqs == [a, b] and [a.num_scheduled_tokens, b.num_scheduled_tokens] == [4, 2]
    sch.postprocess(seqs, [9, None])
    assert a.num_completion_tokens == 1 and b.status == SequenceStatus.WAITING


def test_scheduler_eos_and_max_seqs():
    sch = make_scheduler(max_seqs=2)
    s1, s2, s3 = (seq(range(1, 3), sp=SamplingParams(temperature=0, max_tokens=4)) for _ in range(3))
    for s in (s1, s2, s3):
        sch.add(s)
    seqs, _ = sch.schedule()
    assert seqs == [s1, s2]
    finished = sch.postprocess(seqs, [0, 5])  # 0 is EOS
    assert finished == [s1] and s1.is_finished


def test_scheduler_preempts_newest():
    sch = make_scheduler(num_blocks=3, bs=2, max_tokens=16)
    a, b = seq(range(1, 3), bs=2), seq(range(5, 7), bs=2)
    sch.add(a), sch.add(b)
    sch.postprocess(*[(s, [1] * len(s)) for s in [sch.schedule()[0]]][0])
    seqs, prefill = sch.schedule()  # both need a third block, only one is free: b is preempted
    assert not prefill and seqs == [a] and b.status == SequenceStatus.WAITING
    assert sch.num_preemptions == 1 and not b.block_table and sch.waiting[0] is b
