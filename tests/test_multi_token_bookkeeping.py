"""Multi-token steps without a model: scheduling drafts, `postprocess`, and the block manager's rollback.

The simulator (SimulatedEngine) runs the scheduler with a fake model and a shadow KV cache that checks every
read, through the same `Scheduler.postprocess` as the engine: with drafts it must produce the plain run's tokens,
hold after every verify step the blocks a plain decode holds, and never let the prefix cache hold a block with a
rejected draft's K/V. Then the scheduler's trimming of drafts, the validation of postprocess, and
`BlockManager.truncate` on its own, with shared (forked) blocks, copy-on-write and prefix caching.
"""
from __future__ import annotations

import pytest

from minillm.config import EngineConfig
from minillm.engine.block_manager import BlockManager
from minillm.engine.prefix_cache import chain_hashes
from minillm.engine.scheduler import Scheduler
from minillm.engine.scheduler_interface import ScheduledBatch, update_sequences
from minillm.engine.scheduler_sim import ShadowKVCache, SimulatedEngine, prefix_identities
from minillm.engine.sequence import Sequence
from minillm.engine.static_scheduler import StaticScheduler
from minillm.sampling_params import SamplingParams

K = 3  # at most this many drafts per step
BLOCK = 4


# -- the simulator: same postprocess, a shadow KV cache that checks every read --------------------------------
VOCAB = 50


def fake_continuation(token_ids: list[int], n: int) -> list[int]:
    """What SimulatedEngine's fake model would generate next (its token is a function of the prefix)."""
    tokens = list(token_ids)
    for _ in range(n):
        tokens.append(prefix_identities(tokens)[-1] % VOCAB)
    return tokens[len(token_ids):]


def simulate(drafting: bool, prefix_caching: bool, num_blocks: int, chunked: bool = False):
    config = EngineConfig(block_size=BLOCK, max_model_len=96, max_num_batched_tokens=96 if not chunked else 12,
                          max_num_seqs=4, enable_prefix_caching=prefix_caching, enable_chunked_prefill=chunked)
    bm = BlockManager(num_blocks, BLOCK, enable_prefix_caching=prefix_caching)
    calls = []

    def propose(seq: Sequence) -> list[int]:  # right, then one wrong, on alternate calls; 0..3 drafts
        calls.append(seq.seq_id)
        drafts = fake_continuation(seq.token_ids, len(calls) % (K + 1))
        if len(calls) % 2 and drafts:
            drafts[-1] = (drafts[-1] + 1) % VOCAB
        return drafts
    engine = SimulatedEngine(Scheduler(config, bm), vocab_size=VOCAB, propose=propose if drafting else None)
    system = [7, 1, 8, 2, 8, 1, 8, 2, 8]  # a shared prefix: the prefix cache has something to share
    for i in range(6):
        engine.add_request(system + [i] * (i + 2), max_tokens=5 + 3 * i)
    return engine


def check_cached_blocks_hold_accepted_tokens(engine: SimulatedEngine, valid: set[int]) -> None:
    """Every slot of every prefix-cached block holds the K/V (here: prefix identity) of an accepted stream."""
    bm = engine.scheduler.block_manager
    for block in bm.prefix_cache.entries().values():
        assert all(identity in valid for identity in engine.kv.device[block]), f"block {block} holds a rejected token"


@pytest.mark.parametrize("prefix_caching, num_blocks, chunked", [(False, 64, False), (True, 64, False),
                                                                 (True, 14, False), (False, 14, True)])
def test_simulator_drafts_match_plain_run(prefix_caching, num_blocks, chunked):
    plain = simulate(False, prefix_caching, num_blocks, chunked)
    expected = {s.request_id: s.output_token_ids for s in plain.run()}
    drafted = simulate(True, prefix_caching, num_blocks, chunked)
    valid = set()
    for seq in list(drafted.scheduler.waiting):
        valid |= set(prefix_identities(seq.token_ids + expected[seq.request_id]))
    bm, propose, base = drafted.scheduler.block_manager, drafted.propose, {}

    def recording_propose(seq: Sequence) -> list[int]:
        base[seq.seq_id] = seq.num_uncomputed_tokens
        return propose(seq)
    drafted.propose = recording_propose
    steps, num_verified = 0, 0
    while drafted.scheduler.has_unfinished():
        base.clear()
        batch = drafted.step()  # the shadow cache checks every position each sequence reads
        steps += 1
        assert steps < 500
        if prefix_caching:
            check_cached_blocks_hold_accepted_tokens(drafted, valid)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            if not seq.is_finished and n > base.get(seq.seq_id, n):  # it verified drafts this step
                num_verified += 1  # rolled back to what a plain decode holds: the blocks of its computed tokens
                assert len(seq.block_table) == bm.blocks_needed(seq.num_computed_tokens), seq
        for seq in drafted.scheduler.running:
            assert len(seq.block_table) <= bm.blocks_needed(seq.num_tokens), seq
    assert {s.request_id: s.output_token_ids for s in drafted.finished} == expected
    assert steps < len(plain.batches)  # accepted drafts saved steps
    assert num_verified > 10  # multi-token steps really ran
    if num_blocks == 14:
        assert drafted.scheduler.num_preemptions > 0 or chunked


def test_drafts_are_trimmed_to_budget_and_pool_never_preempting():
    config = EngineConfig(block_size=BLOCK, max_model_len=64, max_num_batched_tokens=64, max_num_seqs=4)
    bm = BlockManager(4, BLOCK, watermark=0.0)
    sched = Scheduler(config, bm)
    seqs = [Sequence(str(i), [1, 2, 3], SamplingParams(max_tokens=20)) for i in range(2)]
    for seq in seqs:
        sched.add(seq)
    batch = sched.schedule()  # both prefills: 1 block each
    sched.postprocess(batch, [[4], [4]])
    for seq in seqs:
        seq.spec_token_ids = list(range(5, 14))  # 1 + 9 tokens from position 3 need 4 blocks; 2 are free
    batch = sched.schedule()
    assert not batch.preempted and [len(s.block_table) for s in seqs] == [3, 1]
    assert batch.num_new_tokens == [1 + 8, 1] and seqs[0].spec_token_ids == list(range(5, 13))
    assert seqs[1].spec_token_ids == []  # nothing left for the second one's drafts: dropped, nobody preempted
    sched.postprocess(batch, [[5, 6, 0], [11]])  # two drafts accepted, the third rejected
    assert seqs[0].token_ids == [1, 2, 3, 4, 5, 6, 0] and seqs[0].num_computed_tokens == 6
    assert [len(s.block_table) for s in seqs] == [2, 1] and bm.num_free_blocks == 1
    sched.check_invariants()
    config_small = EngineConfig(block_size=BLOCK, max_model_len=64, max_num_batched_tokens=3, max_num_seqs=4,
                                enable_chunked_prefill=True)
    sched = Scheduler(config_small, BlockManager(16, BLOCK))
    seq = Sequence("x", [1, 2], SamplingParams(max_tokens=20))
    sched.add(seq)
    sched.postprocess(sched.schedule(), [[3]])
    seq.spec_token_ids = [4, 5, 6, 7]
    batch = sched.schedule()
    assert batch.num_new_tokens == [3] and seq.spec_token_ids == [4, 5]  # the token budget of 3
    sched.postprocess(batch, [[4, 5, 9]])
    assert seq.token_ids == [1, 2, 3, 4, 5, 9] and seq.num_computed_tokens == 5


def test_prefill_never_carries_drafts_and_static_batching_refuses_them():
    sched = Scheduler(EngineConfig(block_size=BLOCK, max_model_len=64, max_num_seqs=2), BlockManager(8, BLOCK))
    seq = Sequence("p", [1, 2, 3, 4, 5], SamplingParams(max_tokens=3))
    seq.spec_token_ids = [6, 7]
    sched.add(seq)
    batch = sched.schedule()
    assert batch.num_new_tokens == [5] and seq.spec_token_ids == []
    static = StaticScheduler(max_num_seqs=2, max_model_len=16, block_size=16)
    seq = Sequence("s", [1, 2], SamplingParams(max_tokens=3))
    static.add(seq)
    batch = static.schedule()
    static.postprocess(batch, [[3]])
    assert seq.token_ids == [1, 2, 3] and seq.num_computed_tokens == 2
    seq.spec_token_ids = [4]
    with pytest.raises(ValueError, match="draft tokens"):
        static.schedule()


def test_postprocess_validates_before_changing_anything():
    seq = Sequence("v", [1, 2, 3], SamplingParams())
    seq.num_computed_tokens = 2
    seq.spec_token_ids = [4, 5]
    batch = ScheduledBatch(seqs=[seq], num_new_tokens=[3])
    for bad, match in (([[4, 5, 6, 7]], "at most 3"), ([[5, 6]], "not a prefix"), ([[]], "reaches_end"),
                       ([[4], [5]], "one token list per"), ([[4.0]], "list of ints"), ([[True]], "list of ints")):
        with pytest.raises(ValueError, match=match):
            update_sequences(batch, bad)
        assert seq.token_ids == [1, 2, 3] and seq.num_computed_tokens == 2 and seq.spec_token_ids == [4, 5]
    with pytest.raises(ValueError, match="num_new_tokens"):
        update_sequences(ScheduledBatch(seqs=[seq], num_new_tokens=[4]), [[4]])
    update_sequences(batch, [[4, 8]], now=1.5)
    assert seq.token_ids == [1, 2, 3, 4, 8] and seq.num_computed_tokens == 4 and seq.spec_token_ids == []
    assert seq.token_times == [1.5, 1.5]
    seq.truncate_output(4)
    assert seq.token_ids == [1, 2, 3, 4] and seq.num_computed_tokens == 3 and seq.token_times == [1.5]
    with pytest.raises(ValueError, match="truncate"):
        seq.truncate_output(2)  # below the prompt


# -- block-manager rollback -----------------------------------------------------------------------------------
def new_seq(tokens: list[int]) -> Sequence:
    return Sequence("r", tokens, SamplingParams(max_tokens=8))


def verify_step(bm: BlockManager, kv: ShadowKVCache, seq: Sequence, drafts: list[int], accepted: list[int]) -> None:
    """One verify step by hand: slots for the last token + drafts, write them, then postprocess with `accepted`."""
    seq.spec_token_ids = list(drafts)
    n = seq.num_uncomputed_tokens + len(drafts)
    kv.apply(ScheduledBatch(blocks_to_copy=bm.append_slots(seq, n)))
    ids = prefix_identities(seq.token_ids + seq.spec_token_ids)
    kv.write(seq.block_table, seq.num_computed_tokens, seq.num_computed_tokens + n, ids)
    update_sequences(ScheduledBatch(seqs=[seq], num_new_tokens=[n]), [accepted],
                     rollback=lambda s: bm.truncate(s, s.num_computed_tokens))
    kv.check(seq, seq.num_computed_tokens, prefix_identities(seq.token_ids))
    bm.check_invariants()


def test_truncate_frees_whole_blocks_and_checks_its_range():
    bm, kv = BlockManager(8, BLOCK), ShadowKVCache(8, BLOCK)
    seq = new_seq([1, 2, 3])
    bm.allocate(seq)
    verify_step(bm, kv, seq, [], [4])  # the prefill: 3 computed, token 4 pending
    verify_step(bm, kv, seq, [5, 6, 7, 8, 9], [9])  # 6 slots from position 3: 3 blocks; first draft rejected
    assert seq.token_ids == [1, 2, 3, 4, 9] and seq.num_computed_tokens == 4
    assert len(seq.block_table) == 1 and bm.num_free_blocks == 7  # a plain run holds 1 block for 4 tokens
    verify_step(bm, kv, seq, [1, 1], [1, 1, 2])  # both accepted: 7 computed tokens, 2 blocks
    assert seq.num_computed_tokens == 7 and len(seq.block_table) == 2 and seq.token_ids[-3:] == [1, 1, 2]
    with pytest.raises(ValueError, match="truncate"):
        bm.truncate(seq, 6)  # would cut a computed token
    with pytest.raises(ValueError, match="truncate"):
        bm.truncate(seq, 9)  # more than the 8 slots held
    bm.free(seq)
    assert bm.num_free_blocks == 8


def test_rollback_of_a_forked_sequence_keeps_shared_blocks_and_copies():
    bm, kv = BlockManager(10, BLOCK), ShadowKVCache(10, BLOCK)
    parent = new_seq([1, 2, 3, 4, 5, 6])
    bm.allocate(parent)
    verify_step(bm, kv, parent, [], [7])  # 6 computed: blocks [A, B (half full)], token 7 pending
    child = new_seq(parent.token_ids)
    bm.fork(parent, child)
    shared_a, shared_b = parent.block_table
    # the child verifies 3 drafts: its write into the shared half block copies it first, 1 more block for drafts
    verify_step(bm, kv, child, [8, 9, 10], [8, 0])  # 8 computed: the draft block goes back
    assert child.block_table[0] == shared_a and child.block_table[1] != shared_b and len(child.block_table) == 2
    assert bm.ref_counts[shared_a] == 2 and bm.ref_counts[shared_b] == 1  # the copy was this table's own
    verify_step(bm, kv, child, [1, 1, 1], [3])  # all rejected: 9 computed -> 3 blocks kept
    assert child.num_computed_tokens == 9 and len(child.block_table) == 3
    # the parent drafts past a block boundary, then the child forks from it *with* the draft block: rolling
    # the parent back only drops its reference to the block the child still holds
    parent.spec_token_ids = [8, 9, 10]
    kv.apply(ScheduledBatch(blocks_to_copy=bm.append_slots(parent, 4)))
    twin = new_seq(parent.token_ids)
    bm.fork(parent, twin)
    draft_block = parent.block_table[2]
    assert bm.ref_counts[draft_block] == 2
    update_sequences(ScheduledBatch(seqs=[parent], num_new_tokens=[4]), [[5]],
                     rollback=lambda s: bm.truncate(s, s.num_computed_tokens))
    assert len(parent.block_table) == 2 and bm.ref_counts[draft_block] == 1 and draft_block in twin.block_table
    assert draft_block not in bm.free_block_ids
    bm.check_invariants()
    for seq in (parent, child, twin):
        bm.free(seq)
    bm.check_invariants()
    assert bm.num_free_blocks == 10


def test_prefix_cache_registers_only_accepted_tokens():
    bm, kv = BlockManager(12, BLOCK, enable_prefix_caching=True), ShadowKVCache(12, BLOCK)
    seq = new_seq([1, 2, 3, 4, 5])
    bm.allocate(seq)
    verify_step(bm, kv, seq, [], [6])
    verify_step(bm, kv, seq, [7, 8, 9], [7, 0])  # positions 6, 7 computed; 8 (draft 9, rejected) was written
    verify_step(bm, kv, seq, [1, 2, 3], [1, 2, 3, 4])  # all accepted
    bm.mark_computed(seq)
    stream = seq.token_ids
    assert set(bm.prefix_cache.entries()) == set(chain_hashes(stream, BLOCK, seq.num_computed_tokens // BLOCK))
    for block in bm.prefix_cache.entries().values():  # and their K/V are the accepted stream's
        assert all(i in set(prefix_identities(stream)) for i in kv.device[block])
    # a second request with the same accepted prefix hits those blocks and reads the right K/V
    other = new_seq(stream[:8] + [42])
    kv.apply(ScheduledBatch(blocks_to_copy=bm.allocate(other)))
    assert other.num_computed_tokens == 8
    kv.check(other, 8, prefix_identities(other.token_ids))
    bm.free(seq)
    bm.free(other)
    bm.check_invariants()




def test_drafts_are_trimmed_at_max_model_len():
    sched = Scheduler(EngineConfig(block_size=BLOCK, max_model_len=8, max_num_seqs=2), BlockManager(16, BLOCK))
    seq = Sequence("m", [1, 2, 3, 4, 5], SamplingParams(max_tokens=20))
    sched.add(seq)
    sched.postprocess(sched.schedule(), [[6]])
    seq.spec_token_ids = [7, 8, 9, 10]
    batch = sched.schedule()
    # position 5 (the last token) and drafts at 6 and 7: nothing at position 8 = max_model_len
    assert batch.num_new_tokens == [3] and seq.spec_token_ids == [7, 8]
