"""Graded tests of chapter 11: the tensor-parallel split and its all-reduce, the MoE router, the KV transfer's pack
and unpack, and the pipeline's micro-batches.

Every test runs in one process: the ranks of a group are simulated by looping over rank indices, and a collective
by its arithmetic (an all-reduce is a sum over the ranks' partials). Besides comparisons with the solution on fresh
random inputs of awkward sizes (one rank, a prime number of ranks, one token, one block), each exercise also runs
inside the engine's own code through `dispatch`: the parallel layers' weight loaders, plan_all_reduces, the MoE
block, pack_kv_blocks / unpack_kv_blocks and split_step.
"""
from __future__ import annotations

import random

import pytest
import torch
from tiny_moe import TINY_MOE

from minillm.course.checks import (assert_close, assert_equal, assert_rejects, assert_scalar_close,
                                   assert_tensor, graded_seed)
from minillm.engine.step_input import StepInput
from minillm.engine.worker import RandomWeights
from minillm.hooks import overriding
from minillm.parallel.kv_transfer import pack_kv_blocks, unpack_kv_blocks
from minillm.parallel.runner import split_step
from minillm.parallel.state import ParallelState, init_parallel_state
from minillm.parallel.tensor import MergedColumnParallelLinear, RowParallelLinear, plan_all_reduces


def _gen(base: int) -> torch.Generator:
    return torch.Generator().manual_seed(graded_seed(base))


@pytest.fixture
def fake_rank():
    """Build layers as TP rank r of tp would (construction and loading need no communication); restore after."""
    def use(tp: int, rank: int) -> None:
        init_parallel_state(ParallelState(tp_size=tp, tp_rank=rank))
    yield use
    init_parallel_state(ParallelState())


# ---- ch11.split_linear ----------------------------------------------------------------------------------------
SPLIT_CASES = [(1, 5, 3), (2, 6, 4), (3, 9, 6), (5, 10, 15), (4, 4, 8)]  # (tp, out, in): one rank, primes, one row each


def _same_or_none(got, want, what: str) -> None:
    if want is None:
        assert got is None, f"{what}: expected None, got {type(got).__name__}"
    else:
        assert_equal(got, want, what)


@pytest.mark.exercise("ch11.split_linear")
@pytest.mark.points(1)
@pytest.mark.parametrize("tp,out,inp", SPLIT_CASES)
def test_split_linear_matches_solution(impl, ref, tp, out, inp):
    g = _gen(tp * 100 + out)
    weight, bias = torch.randn(out, inp, generator=g), torch.randn(out, generator=g)
    # a loader may hand the tensors over one at a time: a bias alone (weight None) is split like one with its weight
    pairs = [(weight, bias), (weight, None), (None, bias)]
    for rank in range(tp):
        for style, (w, b) in [(style, pair) for style in ("column", "row") for pair in pairs]:
            got, want = impl(w, b, rank, tp, style), ref(w, b, rank, tp, style)
            assert isinstance(got, tuple) and len(got) == 2, "split_linear must return (weight shard, bias shard)"
            what = f"split_linear({f'W {tuple(weight.shape)}' if w is not None else 'None'}, " \
                   f"{'b' if b is not None else 'None'}, rank {rank}, tp {tp}, {style!r})"
            _same_or_none(got[0], want[0], f"{what} weight shard")
            _same_or_none(got[1], want[1], f"{what} bias shard")


@pytest.mark.exercise("ch11.split_linear")
@pytest.mark.points(2)
@pytest.mark.parametrize("tp,out,inp", [(3, 9, 6)])
def test_split_linear_ranks_reproduce_the_layer(impl, tp, out, inp):
    """Column: the ranks' outputs side by side are y. Row: the ranks' partials (each with its bias shard), summed as
    the all-reduce sums them, are y; x is cut into the slices the column layer before would hand each rank."""
    g = _gen(7 * tp + inp)
    weight, bias, x = torch.randn(out, inp, generator=g), torch.randn(out, generator=g), torch.randn(3, inp, generator=g)
    want = x @ weight.T + bias
    outs = []
    for rank in range(tp):
        w, b = impl(weight, bias, rank, tp, "column")
        assert_tensor(w, f"column rank {rank} weight", (out // tp, inp))
        outs.append(x @ w.T + b)
    assert_close(torch.cat(outs, dim=-1), want, f"column-parallel outputs of {tp} ranks side by side")
    total = torch.zeros_like(want)
    for rank, x_r in enumerate(x.chunk(tp, dim=-1)):
        w, b = impl(weight, bias, rank, tp, "row")
        assert_tensor(w, f"row rank {rank} weight", (out, inp // tp))
        total += x_r @ w.T + (0 if b is None else b)
    assert_close(total, want, f"the all-reduce (sum) of {tp} row-parallel partials, bias shards included")


@pytest.mark.exercise("ch11.split_linear")
@pytest.mark.points(1)
def test_split_linear_rejects_bad_input(impl, ref):
    w, b = torch.zeros(6, 4), torch.zeros(6)
    valid = (torch.arange(24.0).reshape(6, 4), torch.arange(6.0), 1, 2, "column")
    assert_rejects(impl, valid, ref(*valid), [(w, b, 0, 2, "diagonal"), (w, b, 2, 2, "column"), (w, b, -1, 2, "row"),
                                              (w, b, 0, 4, "column"), (w, b, 0, 3, "row"),
                                              (None, b, 0, 4, "column")], "split_linear")


@pytest.mark.exercise("ch11.split_linear")
@pytest.mark.points(1)
@pytest.mark.parametrize("tp", [2, 3])
def test_split_linear_loads_the_engines_parallel_layers(impl, fake_rank, tp):
    """gate_up_proj (column-parallel, two shards) and down_proj (row-parallel, with a bias) built as each rank,
    loaded through their weight_loaders with your split: the ranks' partials summed give the full MLP's matmuls."""
    g = _gen(300 + tp)
    hidden, inter = 5, 6
    gate, up = torch.randn(inter, hidden, generator=g), torch.randn(inter, hidden, generator=g)
    down_w, down_b = torch.randn(hidden, inter, generator=g), torch.randn(hidden, generator=g)
    x = torch.randn(4, hidden, generator=g)
    act = torch.nn.functional.silu(x @ gate.T) * (x @ up.T)
    want = act @ down_w.T + down_b
    total = torch.zeros_like(want)
    with overriding({"ch11.split_linear": impl}):
        for rank in range(tp):
            fake_rank(tp, rank)
            gate_up = MergedColumnParallelLinear(hidden, [inter, inter], dtype=torch.float32)
            down = RowParallelLinear(inter, hidden, bias=True, dtype=torch.float32)
            gate_up.weight_loader(gate_up.weight, gate, 0)
            gate_up.weight_loader(gate_up.weight, up, 1)
            down.weight_loader(down.weight, down_w)
            down.weight_loader(down.bias, down_b)
            g_r, u_r = gate_up.quant_method.apply(gate_up, x, None).chunk(2, dim=-1)
            total += down.quant_method.apply(down, torch.nn.functional.silu(g_r) * u_r, down.bias)
    assert_close(total, want, f"an MLP split over {tp} ranks by the engine's loaders (summed partials)")


# ---- ch11.allreduce_placement ---------------------------------------------------------------------------------
CHAINS = [["column", "row"], ["row"], ["replicated"], ["column", "row", "replicated", "column", "row"],
          ["row", "row"], ["replicated", "column", "row"], []]


@pytest.mark.exercise("ch11.allreduce_placement")
@pytest.mark.points(2)
def test_allreduce_placement_matches_solution(impl, ref):
    for tp, chain in [(tp, chain) for tp in (1, 2, 3, 8) for chain in CHAINS]:
        got, want = impl(list(chain), tp), ref(list(chain), tp)
        assert isinstance(got, list) and [bool(v) for v in got] == want, \
            f"allreduce_placement({chain}, tp_size={tp}): got {got}, expected {want}"


@pytest.mark.exercise("ch11.allreduce_placement")
@pytest.mark.points(1)
def test_allreduce_placement_rejects_chains_that_need_more_than_an_all_reduce(impl, ref):
    valid = (["column", "row"], 2)
    assert_rejects(impl, valid, ref(*valid), [(["column"], 2), (["column", "column", "row"], 2),
                                              (["column", "replicated"], 4), (["row", "column"], 2),
                                              (["diagonal"], 2), (["row"], 0), (["column"], 1)], "allreduce_placement")


@pytest.mark.exercise("ch11.allreduce_placement")
@pytest.mark.points(1)
@pytest.mark.parametrize("tp", [1, 2])
def test_allreduce_placement_plans_the_engines_mlp(impl, fake_rank, tp):
    """plan_all_reduces asks your function at construction; the layers' forward all-reduces where it says."""
    fake_rank(tp, 0)
    gate_up = MergedColumnParallelLinear(8, [6, 6], dtype=torch.float32)
    down = RowParallelLinear(6, 8, dtype=torch.float32)
    with overriding({"ch11.allreduce_placement": impl}):
        plan_all_reduces(gate_up, down)
    got = [gate_up.reduce_output, down.reduce_output]
    assert got == [False, tp > 1], f"gate_up_proj -> down_proj at tp={tp}: all-reduce after each = {got}"


# ---- ch11.moe_route -------------------------------------------------------------------------------------------
@pytest.mark.exercise("ch11.moe_route")
@pytest.mark.points(1)
@pytest.mark.parametrize("tokens,experts,k", [(1, 4, 1), (7, 8, 2), (33, 5, 3), (6, 6, 6), (5, 3, 2)])
def test_moe_route_matches_solution(impl, ref, tokens, experts, k):
    logits = torch.randn(tokens, experts, generator=_gen(tokens * 10 + experts)) * 2
    (w, ids), (w_ref, ids_ref) = impl(logits.clone(), k), ref(logits.clone(), k)
    assert_equal(ids, ids_ref, f"expert_ids of {tokens} tokens, {experts} experts, top_k {k}")
    assert_close(w, w_ref, f"weights of {tokens} tokens, {experts} experts, top_k {k}")


@pytest.mark.exercise("ch11.moe_route")
@pytest.mark.points(2)
def test_moe_route_properties(impl):
    logits = (torch.randn(9, 8, generator=_gen(40)) * 3).to(torch.bfloat16)
    w, ids = impl(logits, 2)
    assert_tensor(w, "weights", (9, 2), torch.float32)
    assert_tensor(ids, "expert_ids", (9, 2), torch.int64)
    assert_close(w.sum(-1), torch.ones(9), "each token's weights must sum to 1 (renormalised over its k experts)")
    assert bool((w[:, 0] >= w[:, 1]).all()), "the best expert comes first"
    assert bool((ids[:, 0] != ids[:, 1]).all()), "a token's k experts are distinct"
    kept = logits.float().gather(1, ids)
    assert_close(w, torch.softmax(kept, -1), "weights must equal a softmax over the kept experts' logits")
    everything, _ = impl(logits, 8)
    assert_close(everything, torch.softmax(logits.float(), -1).sort(-1, descending=True).values,
                 "with top_k = every expert the weights are the router's softmax")
    big = torch.tensor([[300.0, 290.0, -50.0, 0.0], [-300.0, -310.0, -290.0, -400.0]])
    w_big, ids_big = impl(big, 2)
    assert_close(w_big, torch.softmax(torch.tensor([[300.0, 290.0], [-290.0, -300.0]]), -1),
                 "weights of router logits near +-300 (exp overflows fp32 past 88.7 and is 0 below -104: subtract "
                 "each token's max first, as torch.softmax does)")
    assert_equal(ids_big, torch.tensor([[0, 1], [2, 0]]), "expert_ids of router logits near +-300")


@pytest.mark.exercise("ch11.moe_route")
@pytest.mark.points(3)
def test_moe_route_inside_the_mixtral_block(impl, ref):
    """The engine's MoE block (router, experts, combine) on 13 tokens with your router: the reference's output."""
    torch.manual_seed(graded_seed(41))
    model = RandomWeights(seed=graded_seed(41))(TINY_MOE, torch.device("cpu"), torch.float32)
    block = model.model.layers[0].mlp
    x = torch.randn(13, TINY_MOE.hidden_size, generator=_gen(42))
    with torch.no_grad():
        with overriding({"ch11.moe_route": ref}):
            want = block(x)
        with overriding({"ch11.moe_route": impl}):
            got = block(x)
    assert_close(got, want, "the Mixtral block's output with your router")


# ---- ch11.pack_kv_blocks / ch11.unpack_kv_blocks --------------------------------------------------------------
def _pool(base: int, num_blocks: int = 11) -> torch.Tensor:
    return torch.randn(2, 3, num_blocks, 4, 2, 5, generator=_gen(base))  # [2, layers, blocks, block, heads, dim]


BLOCK_TABLES = [[7], [3, 0], [10, 2, 9, 4, 1], list(range(11))[::-1], [5, 6, 7]]


@pytest.mark.exercise("ch11.pack_kv_blocks")
@pytest.mark.points(3)
def test_pack_matches_solution_and_leaves_the_pool(impl, ref):
    for table in BLOCK_TABLES:
        pool = _pool(50 + len(table))
        before = pool.clone()
        ids = torch.tensor(table, dtype=torch.int64)
        got = impl(pool, ids)
        assert_equal(pool, before, "the pool after packing (it must not change)")
        assert_equal(got, ref(before.clone(), ids), f"packed blocks {table}")
        for j, b in enumerate(table):
            assert_equal(got[:, :, j], before[:, :, b], f"logical block {j} must be physical block {b}")


@pytest.mark.exercise("ch11.pack_kv_blocks")
@pytest.mark.points(2)
def test_pack_through_the_engines_pack_kv_blocks(impl):
    """pack_kv_blocks (the prefill worker's entry) with your gather, an fp32 and an fp8 pool (moved as bytes)."""
    pool = _pool(60)
    with overriding({"ch11.pack_kv_blocks": impl}):
        packed = pack_kv_blocks(pool, [9, 1, 4])
        fp8 = pack_kv_blocks(pool.to(torch.float8_e4m3fn), [2, 8])
    assert_equal(packed, pool[:, :, [9, 1, 4]], "pack_kv_blocks(pool, [9, 1, 4])")
    assert_equal(fp8.view(torch.uint8), pool.to(torch.float8_e4m3fn)[:, :, [2, 8]].view(torch.uint8),
                 "pack_kv_blocks of an fp8 pool (its bytes)")


@pytest.mark.exercise("ch11.unpack_kv_blocks")
@pytest.mark.points(3)
def test_unpack_matches_solution_and_touches_only_its_blocks(impl, ref):
    for table in BLOCK_TABLES:
        pool, packed = _pool(70), _pool(71, len(table))
        want = pool.clone()
        ref(want, torch.tensor(table, dtype=torch.int64), packed.clone())
        impl(pool, torch.tensor(table, dtype=torch.int64), packed)
        assert_equal(pool, want, f"the pool after unpacking into blocks {table} (in place)")


@pytest.mark.exercise("ch11.unpack_kv_blocks")
@pytest.mark.points(2)
def test_unpack_round_trip_through_the_engine(impl):
    """A request moves from blocks [4, 0, 7] of one pool to blocks [1, 6, 2] of another, as disaggregation moves it."""
    sender, receiver = _pool(80, 8), torch.zeros(2, 3, 8, 4, 2, 5)
    with overriding({"ch11.unpack_kv_blocks": impl}):
        unpack_kv_blocks(receiver, [1, 6, 2], pack_kv_blocks(sender, [4, 0, 7]))
    for src, dst in zip([4, 0, 7], [1, 6, 2]):
        assert_equal(receiver[:, :, dst], sender[:, :, src], f"receiver block {dst} (sender block {src})")
    untouched = [b for b in range(8) if b not in (1, 6, 2)]
    assert_equal(receiver[:, :, untouched], torch.zeros(2, 3, 5, 4, 2, 5), "the receiver's other blocks")


# ---- ch11.pipeline_schedule -----------------------------------------------------------------------------------
@pytest.mark.exercise("ch11.pipeline_schedule")
@pytest.mark.points(1)
@pytest.mark.parametrize("num_seqs", [1, 2, 5, 9, 17])
def test_micro_batch_bounds_match_solution(impl, ref, num_seqs):
    rng = random.Random(graded_seed(90 + num_seqs))
    for _ in range(6):
        # decode rows (1 token) mixed with prompts and an occasional long one
        lens = [rng.choice([1, 1, 1, rng.randint(2, 40), rng.randint(100, 300)]) for _ in range(num_seqs)]
        for m in (1, 2, 3, 4, 8):
            got, want = impl(list(lens), m), ref(list(lens), m)
            assert got == want, f"micro_batch_bounds({lens}, {m}): got {got}, expected {want}"


@pytest.mark.exercise("ch11.pipeline_schedule")
@pytest.mark.points(2)
def test_micro_batch_bounds_properties(impl):
    for lens, m in [([5, 17, 1, 3], 2), ([1] * 7, 3), ([4], 3), ([2, 2, 2], 5), ([100, 1, 1, 1], 2)]:
        bounds = impl(list(lens), m)
        n = min(m, len(lens))
        assert bounds[0] == 0 and bounds[-1] == len(lens), f"{lens}, {m}: {bounds} must run from 0 to {len(lens)}"
        assert len(bounds) == n + 1, f"{lens}, {m}: {bounds} must make {n} micro-batches"
        assert all(a < b for a, b in zip(bounds, bounds[1:])), f"{lens}, {m}: {bounds} has an empty micro-batch"
    assert impl([1] * 7, 3) == [0, 3, 5, 7], "seven 1-token rows in 3 micro-batches: 3, 2, 2 (remainder kept)"
    got = impl([1] * 58, 14)  # micro-batch 7 closes at exactly 7/14 of 58 tokens: 29, which floats miss
    assert got == [0, 5, 9, 13, 17, 21, 25, 29, 34, 38, 42, 46, 50, 54, 58], \
        f"58 one-token rows in 14 micro-batches: got {got}; the 7th closes at row 29, where the count is exactly " \
        f"7/14 of the 58 tokens. Compare count * n >= total * g in integers: 58 / 14 * 7 is 29.000000000000004"
    assert_rejects(impl, ([1] * 7, 3), [0, 3, 5, 7], [([1, 2], 0), ([], 2)], "micro_batch_bounds")


@pytest.mark.exercise("ch11.pipeline_schedule")
@pytest.mark.points(3)
def test_micro_batches_through_split_step(impl):
    """split_step (the pipeline runner's cut) with your bounds: every token and row kept, in order."""
    lens = [3, 1, 9, 1, 1, 4, 2]
    step = StepInput(input_ids=list(range(sum(lens))), positions=list(range(sum(lens))),
                     slot_mapping=list(range(sum(lens))), query_lens=lens, seq_lens=lens,
                     block_tables=[[i] for i in range(len(lens))], num_sampled=[1] * len(lens),
                     sampling=[None] * len(lens), block_size=16)
    with overriding({"ch11.pipeline_schedule": impl}):
        parts = split_step(step, 3)
    assert [p.query_lens for p in parts] == [[3, 1, 9], [1], [1, 4, 2]], \
        f"micro-batches of {lens} over 3 stages: {[p.query_lens for p in parts]}"
    assert sum((p.input_ids for p in parts), []) == step.input_ids, "every token, once, in order"


# ---- ch11.ring_allreduce_bytes -----------------------------------------------------------------------

def _ring_allreduce(tensors: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[int]]:
    """Run a ring all-reduce step by step over simulated ranks: (each rank's result, bytes each rank sent)."""
    n = len(tensors)
    chunks = [list(t.clone().chunk(n)) for t in tensors]
    sent = [0] * n
    for step in range(n - 1):  # reduce-scatter: rank r sends chunk (r - step) to r + 1, which adds it
        msgs = [(r, (r - step) % n, chunks[r][(r - step) % n].clone()) for r in range(n)]
        for r, c, data in msgs:
            sent[r] += data.numel() * data.element_size()
            chunks[(r + 1) % n][c] += data
    for step in range(n - 1):  # all-gather: rank r sends its complete chunk (r + 1 - step) to r + 1
        msgs = [(r, (r + 1 - step) % n, chunks[r][(r + 1 - step) % n].clone()) for r in range(n)]
        for r, c, data in msgs:
            sent[r] += data.numel() * data.element_size()
            chunks[(r + 1) % n][c] = data
    return [torch.cat(c) for c in chunks], sent


@pytest.mark.exercise("ch11.ring_allreduce_bytes")
@pytest.mark.points(2)
def test_ring_allreduce_bytes_matches_solution(impl, ref):
    r = random.Random(graded_seed(1101))
    cases = [(16384.0, 8), (1.0, 1), (0.0, 4)] + [(float(r.randint(1, 10**7)), r.randint(1, 64)) for _ in range(10)]
    for args in cases:
        assert_scalar_close(impl(*args), ref(*args), f"ring_allreduce_bytes{args!r}", rtol=1e-9)


@pytest.mark.exercise("ch11.ring_allreduce_bytes")
@pytest.mark.points(2)
def test_ring_allreduce_bytes_counts_a_simulated_ring(impl):
    """A ring all-reduce run chunk by chunk over simulated ranks: every rank ends with the sum, and the bytes each
    rank sent are what the function says."""
    g = _gen(1102)
    for world in (1, 2, 3, 5, 8):
        tensors = [torch.randn(world * 6, generator=g) for _ in range(world)]
        results, sent = _ring_allreduce(tensors)
        for rank_result in results:
            assert_close(rank_result, torch.stack(tensors).sum(0), "the simulated ring's result")
        payload = tensors[0].numel() * tensors[0].element_size()
        for rank, nbytes in enumerate(sent):
            assert_scalar_close(impl(float(payload), world), float(nbytes),
                                f"ring_allreduce_bytes({payload}, {world}) against rank {rank}'s sends", rtol=1e-9)


@pytest.mark.exercise("ch11.ring_allreduce_bytes")
@pytest.mark.points(1)
def test_ring_allreduce_bytes_rejects_bad_input(impl, ref):
    valid = (16384.0, 8)
    assert_rejects(impl, valid, ref(*valid), [(-1.0, 8), (16384.0, 0), (16384.0, 2.5)], "ring_allreduce_bytes")
