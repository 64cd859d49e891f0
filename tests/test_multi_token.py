"""Multi-token steps: the seam speculative decoding plugs into (drafts, `Scheduler.postprocess`, rollback).

A sequence with k draft tokens (`seq.spec_token_ids`) is scheduled for its uncomputed token plus the drafts; the
runner samples at the last k + 1 rows; an acceptance rule keeps drafts[:a] + [one sampled token]; postprocess
appends them and gives back the blocks that only rejected drafts used. What must hold: the same tokens as a run
that never drafted, the same blocks held after every step, and no rejected token ever in the prefix cache.

The engine test proposes drafts by setting `spec_token_ids` on the scheduler's running sequences before a step
and verifies them through the `LLMEngine.verify_drafts` hook (greedy: a draft is accepted while it equals the
model's own sample at its row).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.block_manager import BlockManager
from minillm.engine.cuda_graph import DecodeCUDAGraphs
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.prefix_cache import chain_hashes
from minillm.engine.scheduler import Scheduler
from minillm.engine.scheduler_interface import ScheduledBatch, update_sequences
from minillm.engine.scheduler_sim import ShadowKVCache, SimulatedEngine, prefix_identities
from minillm.engine.sequence import Sequence
from minillm.engine.static_scheduler import StaticScheduler
from minillm.forward_context import AttentionMetadata, forward_context
from minillm.sampling_params import SamplingParams
from test_engine import tiny_config, tiny_model
from test_triton_backend import _ReplayRecorder  # DecodeCUDAGraphs whose "graphs" rerun the forward on a CPU
from tiny import ByteTokenizer, one_thread  # noqa: F401  (one_thread: autouse fixture)

K = 3  # drafts per step
BLOCK = 4


# -- the real engine ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_and_config():
    config = tiny_config()
    return tiny_model(config), config


PROMPTS = {"a": list(range(10, 20)), "b": list(range(10, 18)) + [7, 7, 7], "c": [99, 98, 97, 96, 95]}
MAX_TOKENS = 13


def make_engine(model_and_config, prefix_caching: bool, requests: dict | None = None) -> LLMEngine:
    """A continuous-batching engine over the tiny model with `requests` (default: PROMPTS, greedy) queued."""
    model, config = model_and_config
    engine_config = EngineConfig(scheduling="continuous", kv_layout="paged", block_size=BLOCK, num_kv_blocks=48,
                                 max_model_len=64, max_num_seqs=4, enable_prefix_caching=prefix_caching)
    engine = LLMEngine(model, ByteTokenizer(), config, engine_config)
    if requests is None:
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        requests = {rid: (prompt, params) for rid, prompt in PROMPTS.items()}
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    return engine


def greedy_verify(batch: ScheduledBatch, sampled: list[list[int]]) -> list[list[int]]:
    """Greedy acceptance: drafts are kept while each equals the model's sample at its row, then one sample."""
    accepted = []
    for seq, samples in zip(batch.seqs, sampled):
        spec, out = seq.spec_token_ids, []
        for j, token in enumerate(samples):
            out.append(token)
            if j == len(spec) or spec[j] != token:
                break
        accepted.append(out)
    return accepted


def run_plain(engine: LLMEngine) -> tuple[dict[str, list[int]], dict[tuple[str, int], int]]:
    """Outputs, and the block-table length of every running sequence after every step, by (request, num_tokens)."""
    outputs, blocks = {}, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        for seq in engine.scheduler.running:
            blocks[(seq.request_id, seq.num_tokens)] = len(seq.block_table)
    return outputs, blocks


def drafts_for(seq: Sequence, reference: list[int], step: int) -> list[int]:
    """The next K tokens of the plain run's output (0 past its end), one of them corrupted on 3 steps out of 4:
    full acceptance, and rejection at the 1st, 2nd and 3rd draft all occur."""
    m = seq.num_output_tokens  # reference[m] is the token this step should produce
    drafts = [reference[m + j] if m + j < len(reference) else 0 for j in range(K)]
    bad = step % (K + 1)
    if bad < K:
        drafts[bad] = (drafts[bad] + 1) % 256
    return drafts


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_drafted_run_matches_plain_run_and_blocks(model_and_config, prefix_caching):
    plain_outputs, plain_blocks = run_plain(make_engine(model_and_config, prefix_caching))
    engine = make_engine(model_and_config, prefix_caching)
    engine.verify_drafts = greedy_verify
    bm = engine.scheduler.block_manager
    released = []
    truncate = bm.truncate

    def counting_truncate(seq, num_tokens):
        before = len(seq.block_table)
        truncate(seq, num_tokens)
        released.append(before - len(seq.block_table))
    bm.truncate = counting_truncate
    # every block the prefix cache may ever hold: full blocks of the accepted streams (prompt + plain output)
    valid_hashes = set()
    for rid, prompt in PROMPTS.items():
        stream = prompt + plain_outputs[rid]
        valid_hashes |= set(chain_hashes(stream, BLOCK, len(stream) // BLOCK))
    outputs, steps, proposed, accepted = {}, 0, 0, 0
    while engine.has_unfinished_requests():
        steps += 1
        for seq in engine.scheduler.running:
            if not seq.is_prefill and seq.num_uncomputed_tokens == 1:
                seq.spec_token_ids = drafts_for(seq, plain_outputs[seq.request_id], steps)
                proposed += K
        before = {seq.request_id: seq.num_tokens for seq in engine.scheduler.running}
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.outputs[0].token_ids
        used = 0
        for seq in engine.scheduler.running:
            assert not seq.spec_token_ids
            assert len(seq.block_table) == plain_blocks[(seq.request_id, seq.num_tokens)], seq
            used += len(seq.block_table)
            accepted += max(0, seq.num_tokens - before.get(seq.request_id, seq.num_tokens) - 1)
        if not prefix_caching:  # no sharing: the pool holds exactly the running tables' blocks
            assert bm.num_free_blocks == bm.num_blocks - used
        engine.scheduler.check_invariants()
        if prefix_caching:
            assert set(bm.prefix_cache.entries()) <= valid_hashes, "a block with a rejected token was cached"
    assert outputs == plain_outputs
    assert bm.num_used_blocks == 0 and bm.num_free_blocks == bm.num_blocks
    assert 0 < accepted < proposed  # some drafts were accepted, some rejected
    assert sum(released) > 0  # rejected drafts really gave blocks back
    if prefix_caching:
        assert len(bm.prefix_cache.entries()) >= 8  # the check above was not vacuous


def test_stop_token_inside_accepted_tokens_trims_the_rest(model_and_config):
    """A stop token in the middle of L ends the request there, as in the plain run; max_tokens likewise."""
    plain_outputs, _ = run_plain(make_engine(model_and_config, False))
    reference = plain_outputs["c"]
    stop = reference[5]
    assert stop not in reference[:5]
    requests = {"s": (PROMPTS["c"], SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True,
                                                   stop_token_ids=[stop])),
                "m": (PROMPTS["b"], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))}
    references = {"s": reference, "m": plain_outputs["b"]}
    results = {}
    for drafted in (False, True):
        engine = make_engine(model_and_config, False, requests)
        engine.verify_drafts = greedy_verify
        done = {}
        while engine.has_unfinished_requests():
            for seq in engine.scheduler.running:
                if drafted and not seq.is_prefill:  # all drafts right: L is K + 1 tokens long
                    ref, m = references[seq.request_id], seq.num_output_tokens
                    seq.spec_token_ids = [ref[m + j] if m + j < len(ref) else 0 for j in range(K)]
            for out in engine.step():
                if out.finished:
                    done[out.request_id] = (out.outputs[0].token_ids, out.outputs[0].finish_reason)
        results[drafted] = done
        assert engine.scheduler.block_manager.num_used_blocks == 0
    assert results[True] == results[False]
    assert results[True]["s"] == (reference[:6], "stop")
    assert results[True]["m"] == (plain_outputs["b"][:4], "length")


def test_drafts_without_an_acceptance_rule_fail_that_step_not_the_engine(model_and_config):
    engine = make_engine(model_and_config, False)
    engine.step()  # the prefills
    engine.scheduler.running[0].spec_token_ids = [1, 2]
    outputs = engine.step()
    assert outputs and all(out.finished and "verify_drafts" in out.outputs[0].error for out in outputs)
    assert engine.scheduler.block_manager.num_used_blocks == 0
    engine.add_request("later", [1, 2, 3], SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.scheduler.block_manager.num_used_blocks == 0


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


# -- CUDA graphs of verify steps (a fixed q_len per sequence) --------------------------------------------------
def verify_step_inputs(config, seq_lens: list[int], q_len: int, block_size: int, num_blocks: int, device):
    """Random K/V caches bound to the model's attention modules, and one verify step's inputs: the last q_len
    tokens of each sequence, their slots, block tables (scattered blocks) and metadata."""
    g = torch.Generator().manual_seed(len(seq_lens) * 10 + q_len)
    width = max(-(-n // block_size) for n in seq_lens)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    tables = [perm[i * width:(i + 1) * width] for i in range(len(seq_lens))]
    positions = [p for n in seq_lens for p in range(n - q_len, n)]
    slots = [tables[i][p // block_size] * block_size + p % block_size
             for i, n in enumerate(seq_lens) for p in range(n - q_len, n)]
    meta = AttentionMetadata(
        cu_seqlens_q=torch.arange(0, q_len * len(seq_lens) + 1, q_len, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device), max_seqlen_q=q_len,
        max_seqlen_k=max(seq_lens), slot_mapping=torch.tensor(slots, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device), block_size=block_size,
        seq_lens_list=list(seq_lens), query_lens_list=[q_len] * len(seq_lens))
    input_ids = torch.randint(0, config.vocab_size, (len(positions),), generator=g).to(device)
    shape = (num_blocks, block_size, config.num_key_value_heads, config.hidden_size // config.num_attention_heads)
    caches = [(torch.randn(shape, generator=g).to(device), torch.randn(shape, generator=g).to(device))
              for _ in range(config.num_hidden_layers)]
    return input_ids, torch.tensor(positions, device=device), meta, caches


def replay_equals_eager(graphs: DecodeCUDAGraphs, model, config, seq_lens, q_len, block_size, num_blocks, device,
                        torch_reference: bool = False):
    """One verify step eagerly and through `graphs`: the same hidden states, the same cache writes (and, with
    torch_reference, the same hidden states as the torch attention path, which gathers the cache instead)."""
    input_ids, positions, meta, caches = verify_step_inputs(config, seq_lens, q_len, block_size, num_blocks, device)
    layers = [m for m in model.modules() if hasattr(m, "k_cache")]
    for layer, (k, v) in zip(layers, caches):
        layer.k_cache, layer.v_cache = k, v
    snapshot = [(k.clone(), v.clone()) for k, v in caches]
    with torch.inference_mode():
        if torch_reference:
            backend, model.attention_backend = model.attention_backend, "torch"
            with forward_context(dataclasses.replace(meta)):
                reference = model(input_ids, positions)
            model.attention_backend = backend
            for (k, v), (k0, v0) in zip(caches, snapshot):
                k.copy_(k0)
                v.copy_(v0)
        with forward_context(meta):
            eager = model(input_ids, positions)
        if torch_reference:  # the paged decode kernel with q_len = 3 computes what the torch path computes
            torch.testing.assert_close(eager, reference, rtol=1e-4, atol=1e-4)
        after_eager = [(k.clone(), v.clone()) for k, v in caches]
        for (k, v), (k0, v0) in zip(caches, snapshot):  # the same step again, through the graph
            k.copy_(k0)
            v.copy_(v0)
        assert graphs.can_run(meta)
        replayed = graphs.run(input_ids, positions, meta)
    assert replayed.shape == eager.shape == (len(seq_lens) * q_len, config.hidden_size)
    torch.testing.assert_close(replayed, eager, rtol=1e-4, atol=1e-4)
    for (k, v), (k1, v1) in zip(caches, after_eager):  # padding rows (slot -1) stored nothing
        torch.testing.assert_close(k, k1, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(v, v1, rtol=1e-5, atol=1e-5)


def test_verify_step_graph_bookkeeping_on_cpu(model_and_config):
    model, config = model_and_config
    backend, model.attention_backend = model.attention_backend, "triton"  # the paged kernel, interpreted
    try:
        graphs = _ReplayRecorder(model, 4, 6, BLOCK, config.hidden_size, torch.float32, torch.device("cpu"),
                                 query_lens=(3,))
        with torch.inference_mode():
            graphs.capture()
        assert sorted(graphs.graphs) == [1, 2, 4] and all(list(g) == [3] for g in graphs.graphs.values())
        # batch 3 replays the graph of 4 with one padding sequence; the 3 new tokens cross block boundaries
        replay_equals_eager(graphs, model, config, [5, 13, 19], 3, BLOCK, 24, torch.device("cpu"),
                            torch_reference=True)
        _, _, one_token, _ = verify_step_inputs(config, [5, 13, 19], 1, BLOCK, 24, "cpu")
        assert not graphs.can_run(one_token)  # q_len 1 was not captured
    finally:
        model.attention_backend = backend
    with pytest.raises(ValueError, match="query_lens"):
        _ReplayRecorder(model, 4, 6, BLOCK, config.hidden_size, torch.float32, torch.device("cpu"), query_lens=(0,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_gpu_verify_step_graph_replay_equals_eager(batch):
    device = torch.device("cuda")
    config = tiny_config(max_position_embeddings=256)
    with torch.device(device):
        model = tiny_model(config, seed=4)
    model.attention_backend = "triton"
    graphs = DecodeCUDAGraphs(model, 8, 16, 16, config.hidden_size, torch.float32, device, query_lens=(1, 3))
    graphs.capture()
    seq_lens = [3 + (37 * i) % 200 for i in range(batch)]
    replay_equals_eager(graphs, model, config, seq_lens, 3, 16, 64, device)
    replay_equals_eager(graphs, model, config, seq_lens, 1, 16, 64, device)
