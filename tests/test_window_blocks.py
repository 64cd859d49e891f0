"""Blocks that slid out of a sliding window are given back (minillm/engine/block_window.py): the block manager's
bookkeeping, every attention path beside released (poisoned) table entries, and an engine whose pool is too small
for a request's whole context but not for its window, against transformers."""
from __future__ import annotations

import pytest
import torch

import minillm  # noqa: F401  (TRITON_INTERPRET=1 before triton runs anything, without CUDA)

from minillm.config import EngineConfig
from minillm.engine.block_manager import BlockManager
from minillm.engine.block_window import NULL_BLOCK, num_released
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.sequence import Sequence
from minillm.kernels.paged_attention import paged_decode_attention
from minillm.kernels.paged_prefill import paged_prefill_attention
from minillm.layers.attention import gather_kv
from minillm.layers.decode_attention import padded_decode_attention
from minillm.sampling_params import SamplingParams
from test_sliding_window import _banded_reference, _ours, _tiny_mistral, check_bf16_against_band
from tiny import ByteTokenizer, one_thread  # noqa: F401  (one_thread: autouse fixture)


def _seq(n: int) -> Sequence:
    return Sequence("r", list(range(100, 100 + n)), SamplingParams(max_tokens=4))


def _step(bm: BlockManager, seq: Sequence, n: int) -> None:
    """What the scheduler does for one sequence in one step: release, room for n tokens, then the step computes."""
    bm.release_out_of_window(seq)
    bm.append_slots(seq, n)
    seq.num_computed_tokens += n
    bm.check_invariants()


def test_blocks_before_the_window_go_back_and_a_step_never_holds_more_than_the_peak():
    bm = BlockManager(32, 4, sliding_window=6)
    seq = _seq(3)
    bm.allocate(seq)
    _step(bm, seq, 3)
    for _ in range(40):  # decode 40 tokens: the window is 6 keys, so at most cdiv(6 - 1 + 1, 4) + 1 = 3 blocks
        seq.token_ids.append(7)
        _step(bm, seq, 1)
        assert bm.num_used_blocks <= bm.peak_blocks(seq.num_tokens, 1) <= 3
    released = num_released(seq.block_table)
    assert released == (43 - 6 + 1) // 4 == 9 and seq.block_table[:released] == [NULL_BLOCK] * released
    assert bm.num_used_blocks == len(seq.block_table) - released
    bm.free(seq)
    assert bm.num_free_blocks == 32
    bm.check_invariants()


def test_a_prompt_takes_a_chunk_at_a_time_and_a_cached_prefix_before_the_window_is_not_taken():
    bm = BlockManager(64, 4, sliding_window=5, enable_prefix_caching=True)
    first = _seq(40)
    assert bm.num_blocks_to_allocate(first, 8) == 2 and bm.num_blocks_to_allocate(first) == 10
    bm.allocate(first, 8)
    assert len(first.block_table) == 2
    first.num_computed_tokens = 8
    while first.num_computed_tokens < 40:
        _step(bm, first, 8)  # chunks of 8: never more than cdiv(5 - 1 + 8, 4) + 1 blocks
        assert bm.num_used_blocks <= bm.peak_blocks(40, 8) == 4
    bm.free(first)  # its 10 full blocks are all in the prefix cache now (released ones were offered first)
    second = _seq(40)
    assert bm.num_cached_tokens_on_allocate(second) == 39  # a full hit: the last token is computed again
    bm.allocate(second, 1)
    kept = (39 - 5 + 1) // 4
    assert num_released(second.block_table) == kept == 8 and len(second.block_table) == 10
    bm.check_invariants()
    bm.free(second)


def test_a_prefix_hit_needs_only_the_blocks_its_window_sees():
    """The oldest blocks of a finished sequence were released first, so they are evicted first; a request with the
    same prefix still hits all of it, holding only the block its window reads (the chain from block 0 is gone)."""
    bm = BlockManager(16, 4, sliding_window=5, enable_prefix_caching=True)
    first = _seq(40)
    bm.allocate(first, 8)
    first.num_computed_tokens = 8
    while first.num_computed_tokens < 40:
        _step(bm, first, 8)
    bm.free(first)
    other = Sequence("o", list(range(500, 540)), SamplingParams(max_tokens=4))
    bm.allocate(other)  # 10 blocks: the 6 never used, then the 4 oldest evictable ones (first's blocks 0-3)
    other.num_computed_tokens = 40
    bm.free(other)
    again = Sequence("a", first.token_ids + [7, 8], SamplingParams(max_tokens=4))
    assert bm.num_cached_tokens_on_allocate(again) == 40
    assert bm.num_blocks_to_allocate(again, 2) == 2  # a new block, and the cached block 9 out of the evictable ones
    bm.allocate(again, 2)
    assert again.block_table[:9] == [NULL_BLOCK] * 9 and again.num_computed_tokens == 40
    bm.check_invariants()
    bm.free(again)


def test_swap_out_and_in_keeps_the_released_entries_and_fork_shares_only_held_blocks():
    bm = BlockManager(32, 4, num_cpu_blocks=8, sliding_window=6)
    seq = _seq(30)
    bm.allocate(seq)
    seq.num_computed_tokens = 30
    bm.release_out_of_window(seq)
    held = len(seq.block_table) - num_released(seq.block_table)
    child = _seq(30)
    bm.fork(seq, child)
    assert bm.num_used_blocks == held and child.block_table == seq.block_table
    bm.free(child)
    moved = bm.swap_out(seq)
    assert len(moved) == held and bm.num_used_cpu_blocks == held
    bm.check_invariants()
    assert bm.num_blocks_to_swap_in(seq, 1) == held
    bm.swap_in(seq)
    assert num_released(seq.block_table) == 6 and len(seq.block_table) == 8
    bm.check_invariants()
    bm.free(seq)
    assert bm.num_free_blocks == 32 and bm.num_used_cpu_blocks == 0


def test_the_invariants_catch_a_block_released_while_its_window_still_reads_it():
    bm = BlockManager(16, 4, sliding_window=6)
    seq = _seq(10)
    bm.allocate(seq)
    seq.num_computed_tokens = 10  # the next query (position 10) reads keys 5.. : block 1 is still needed
    bm._release([seq.block_table[1]])
    seq.block_table[0:2] = [NULL_BLOCK, NULL_BLOCK]
    with pytest.raises(AssertionError, match="window still reads from block 1"):
        bm.check_invariants()


def _pool_with_poison(seq_lens, block_size, kv_heads, head_dim, gen):
    """A paged pool with one block of NaNs, for released entries: any kernel that loads a key it may not read (even
    one it would mask) turns its output into NaN. Returns (k_cache, v_cache, tables, per-sequence keys, poison)."""
    blocks = [-(-n // block_size) for n in seq_lens]
    k_cache = torch.randn(sum(blocks) + 1, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn_like(k_cache)
    poison = k_cache.shape[0] - 1
    k_cache[poison] = v_cache[poison] = float("nan")
    tables = torch.full((len(seq_lens), max(blocks)), -1, dtype=torch.int32)
    keys, start = [], 0
    for i, n in enumerate(seq_lens):
        ids = list(range(start, start + blocks[i]))
        start += blocks[i]
        keys.append((k_cache[ids].flatten(0, 1)[:n], v_cache[ids].flatten(0, 1)[:n]))
        tables[i, :len(ids)] = torch.tensor(ids)
    return k_cache, v_cache, tables, keys, poison


def _release(tables, q_lens, seq_lens, window, block_size, poison):
    """The tables as the engine leaves them before a step of q_lens new tokens: the blocks wholly before each first
    query's window given back (here: pointed at the poison block)."""
    tables = tables.clone()
    for i, (q_len, seq_len) in enumerate(zip(q_lens, seq_lens)):
        tables[i, :max(0, seq_len - q_len - window + 1) // block_size] = poison
    return tables


@pytest.mark.parametrize("window", [3, 21])
def test_no_attention_path_reads_a_released_block(window):
    gen = torch.Generator().manual_seed(window)
    q_lens, seq_lens = [9, 1, 4], [61, 50, 80]  # a chunk over context, a decode, a verify-sized chunk
    bs = 4
    k_cache, v_cache, clean, keys, poison = _pool_with_poison(seq_lens, bs, 2, 32, gen)
    tables = _release(clean, q_lens, seq_lens, window, bs, poison)
    q = torch.randn(sum(q_lens), 4, 32, generator=gen)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    out = paged_prefill_attention(q, k_cache, v_cache, tables, lens, cu, window=window, block_m=16, block_n=16)
    scale = 32 ** -0.5
    for i, (k, v) in enumerate(keys):
        rows = slice(cu[i], cu[i + 1])
        torch.testing.assert_close(out[rows], _banded_reference(q[rows], k, v, window, scale), atol=2e-5, rtol=1e-4)
        first = max(0, seq_lens[i] - q_lens[i] - window + 1)
        torch.testing.assert_close(gather_kv(k_cache, tables[i], seq_lens[i], first), k[first:])
    one = [1, 2]  # the decode and the verify-sized sequences as decode steps of q_len 1, then 4
    for q_len in (1, 4):
        rows = torch.cat([torch.arange(cu[i + 1] - q_len, cu[i + 1]) for i in one])
        tables = _release(clean[one], [q_len] * 2, [seq_lens[i] for i in one], window, bs, poison)
        args = (q[rows], k_cache, v_cache, tables, lens[one])
        dec = paged_decode_attention(*args, q_len=q_len, num_splits=2, window=window)
        torch_dec = padded_decode_attention(*args, max(seq_lens), q_len, scale, window=window)
        for j, i in enumerate(one):
            ref = _banded_reference(q[rows][j * q_len:(j + 1) * q_len], *keys[i], window, scale)
            torch.testing.assert_close(dec[j * q_len:(j + 1) * q_len], ref, atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(torch_dec[j * q_len:(j + 1) * q_len], ref, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("num_seqs", [1, 3])
def test_a_verify_step_just_past_the_window_masks_each_querys_lower_edge(num_seqs):
    """Window 6, four queries a sequence, 7 to 9 keys: every key lies in SOME query's window (window + q_len - 1
    >= seq_len), yet the first queries must not see the first keys. The torch path's plan for that case masked
    only the causal edge (a chunk of 7 over context gave other prompt log-probs than a whole prefill)."""
    gen = torch.Generator().manual_seed(num_seqs)
    window, q_len, seq_lens = 6, 4, [9, 8, 7][:num_seqs]
    k_cache, v_cache, tables, keys, _ = _pool_with_poison(seq_lens, 4, 2, 32, gen)
    q = torch.randn(num_seqs * q_len, 4, 32, generator=gen)
    args = (q, k_cache, v_cache, tables, torch.tensor(seq_lens, dtype=torch.int32))
    scale = 32 ** -0.5
    dec = paged_decode_attention(*args, q_len=q_len, num_splits=2, window=window)
    torch_dec = padded_decode_attention(*args, max(seq_lens), q_len, scale, window=window)
    for i in range(num_seqs):
        rows = slice(i * q_len, (i + 1) * q_len)
        ref = _banded_reference(q[rows], *keys[i], window, scale)
        torch.testing.assert_close(dec[rows], ref, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(torch_dec[rows], ref, atol=2e-5, rtol=1e-4)


# chunked prefill in all: a whole 80-token prefill (a recompute) would need 20 blocks in one step. The Triton
# path's kernels beside released blocks are tested above (and its engine in test_sliding_window.py, where release
# is on too: 16 s of the interpreter spared here)
ENGINES = {
    "torch_recompute": dict(attention_backend="torch", num_kv_blocks=10),  # preempted by recompute (11 times)
    "torch_large_pool": dict(attention_backend="torch"),  # 16 blocks: no preemption
    "prefix_swap": dict(attention_backend="torch", enable_prefix_caching=True, preemption_mode="swap",
                        swap_space=1 << 20, num_kv_blocks=9, max_num_batched_tokens=8),  # a swap-out, a prefix hit
}


def _greedy_without_cache(hf, prompt: list[int], max_tokens: int) -> list[int]:
    """transformers' greedy tokens, each from a full forward over everything so far (its generate's cached path
    rounds differently: on this tiny random model a near-tie, 0.4286 against 0.4283, once went the other way)."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(max_tokens):
            tokens.append(int(hf(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt):]


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_pool_smaller_than_the_context_serves_it_within_the_window(engine):
    """Window 9, blocks of 4, chunks of 16 (or 8): a sequence holds at most cdiv(8 + 16, 4) + 1 = 7 blocks. A pool
    of 9 to 16 blocks (36 to 64 slots) could not hold one 80-token context, yet serves three, token for token as
    transformers computes them, through preemptions, and gives every block back."""
    hf = _tiny_mistral(9)
    config, model = _ours(hf, 9)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (30, 12, 30)]
    prompts[2][:20] = prompts[0][:20]  # a shared prefix for the prefix cache
    max_tokens = 50
    want = [_greedy_without_cache(hf, p, max_tokens) for p in prompts]
    options = {"block_size": 4, "num_kv_blocks": 16, "max_model_len": 128, "enable_chunked_prefill": True,
               "max_num_batched_tokens": 16, **ENGINES[engine]}
    llm = LLMEngine(model, ByteTokenizer(), config, EngineConfig(**options))
    bm = llm.scheduler.block_manager
    assert bm.sliding_window == 9
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    ids = [llm.add_request(None, p, params) for p in prompts]
    done, released = {}, 0
    while llm.has_unfinished_requests():
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        llm.scheduler.check_invariants()
        released = max([released] + [num_released(s.block_table) for s in llm.scheduler.running])
    assert [done[i] for i in ids] == want
    assert llm.scheduler.num_preemptions > 0 or engine == "torch_large_pool"
    assert bm.prefix_cache_hits > 0 or bm.prefix_cache is None
    assert released >= 15  # an 80-token sequence: (79 - 9 + 1) // 4 = 17 blocks gone by its end
    assert bm.num_used_blocks == 0


def test_a_window_prefix_comes_back_from_the_cpu_tier_token_for_token():
    """Window 9, blocks of 4, one request at a time on 10 blocks with an 8-block CPU tier: the second prompt evicts
    the first's cached blocks to the tier, where the oldest are dropped in turn (the chain from block 0 is broken);
    the third (the first's 40 tokens, then 6 more) hits the blocks its window sees there, loaded instead of
    recomputed, and generates what transformers computes."""
    hf = _tiny_mistral(9)
    config, model = _ours(hf, 9)
    g = torch.Generator().manual_seed(5)
    first, second, tail = (torch.randint(0, 256, (n,), generator=g).tolist() for n in (40, 40, 6))
    prompts = [first, second, first + tail]
    options = dict(block_size=4, num_kv_blocks=10, max_model_len=128, enable_chunked_prefill=True,
                   max_num_batched_tokens=16, attention_backend="torch", enable_prefix_caching=True,
                   kv_offloading_size=2**-16, max_num_seqs=1)  # 8 blocks
    llm = LLMEngine(model, ByteTokenizer(), config, EngineConfig(**options))
    bm = llm.scheduler.block_manager
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    outputs = []
    for prompt in prompts:
        request_id = llm.add_request(None, prompt, params)
        while llm.has_unfinished_requests():
            outputs += [out for out in llm.step() if out.finished and out.request_id == request_id]
            llm.scheduler.check_invariants()
    assert [out.outputs[0].token_ids for out in outputs] == [_greedy_without_cache(hf, p, 8) for p in prompts]
    assert llm.cache_config.num_offload_blocks == 8
    assert outputs[2].num_cached_tokens == 40 and bm.offload_hits >= 8  # the window's blocks from the host
    assert bm.num_used_blocks == 0


def test_a_model_with_full_attention_layers_keeps_every_block():
    hf = _tiny_mistral(9, ["full_attention", "sliding_attention"])
    config, model = _ours(hf, 9, ["full_attention", "sliding_attention"])
    assert config.uniform_sliding_window is None
    llm = LLMEngine(model, ByteTokenizer(), config, EngineConfig(block_size=4, num_kv_blocks=16, max_model_len=128))
    assert llm.scheduler.block_manager.sliding_window is None
    with pytest.raises(ValueError, match="pool gives one sequence at most"):
        llm.add_request(None, list(range(70)), SamplingParams(max_tokens=1))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_on_a_gpu_no_kernel_reads_a_released_block():
    """The GPU's tiles (autotuned, wider than the interpreter's) beside poisoned released entries, in bf16."""
    gen = torch.Generator().manual_seed(6)
    q_lens, seq_lens, bs = [300, 1, 64], [1000, 700, 2100], 16
    k_cache, v_cache, clean, keys, poison = _pool_with_poison(seq_lens, bs, 2, 128, gen)
    q = torch.randn(sum(q_lens), 8, 128, generator=gen)
    cu = torch.tensor([0] + q_lens).cumsum(0).to(torch.int32)
    kb, vb = (t.cuda().bfloat16() for t in (k_cache, v_cache))
    lens = torch.tensor(seq_lens, dtype=torch.int32, device="cuda")
    for window in (33, 200):
        tables = _release(clean, q_lens, seq_lens, window, bs, poison).cuda()
        out = paged_prefill_attention(q.cuda().bfloat16(), kb, vb, tables, lens, cu.cuda(), window=window)
        last = q[cu[1:] - 1].cuda().bfloat16()
        dec_tables = _release(clean, [1] * 3, seq_lens, window, bs, poison).cuda()
        dec = paged_decode_attention(last, kb, vb, dec_tables, lens, window=window, num_splits=4)
        check_bf16_against_band(out, dec, q, cu, keys, window)
