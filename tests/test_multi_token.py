"""Multi-token steps on the real engine and its CUDA graphs: the seam speculative decoding plugs into.

A sequence with k draft tokens (`seq.spec_token_ids`) is scheduled for its uncomputed token plus the drafts; the
runner samples at the last k + 1 rows; an acceptance rule keeps drafts[:a] + [one sampled token]; postprocess
appends them and gives back the blocks that only rejected drafts used. What must hold: the same tokens as a run
that never drafted, the same blocks held after every step, and no rejected token ever in the prefix cache.

The engine test proposes drafts by setting `spec_token_ids` on the scheduler's running sequences before a step
and verifies them through the `LLMEngine.verify_drafts` hook (greedy: a draft is accepted while it equals the
model's own sample at its row). The scheduler, simulator and block-manager side (trimming, validation,
rollback with forks and the prefix cache) is tested without a model in test_multi_token_bookkeeping.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from minillm.bench.step_transfers import host_graphs  # DecodeCUDAGraphs whose "graphs" rerun the forward on a CPU
from minillm.config import EngineConfig
from minillm.engine.cuda_graph import DecodeCUDAGraphs
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.prefix_cache import chain_hashes
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.forward_context import AttentionMetadata, forward_context
from minillm.sampling_params import SamplingParams
from test_engine import tiny_config, tiny_model
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


def test_verify_steps_run_the_paged_kernel_with_several_queries(model_and_config, monkeypatch):
    """With the Triton backend (interpreted here), a verify step in which every sequence carries K drafts reads
    the cache with the paged decode kernel at q_len = K + 1, and the tokens are still the plain run's."""
    import minillm.kernels.paged_attention as paged

    model, _ = model_and_config
    kernel, q_lens = paged.paged_decode_attention, []

    def spy(*args, q_len: int = 1, **kwargs):
        q_lens.append(q_len)
        return kernel(*args, q_len=q_len, **kwargs)
    monkeypatch.setattr(paged, "paged_decode_attention", spy)
    params = SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)
    requests = {rid: (PROMPTS[rid], params) for rid in ("a", "c")}
    backend, model.attention_backend = model.attention_backend, "triton"
    try:
        plain, _ = run_plain(make_engine(model_and_config, False, requests))
        engine = make_engine(model_and_config, False, requests)
        engine.verify_drafts = greedy_verify
        outputs, steps = {}, 0
        while engine.has_unfinished_requests():
            steps += 1
            for seq in engine.scheduler.running:
                if not seq.is_prefill:
                    seq.spec_token_ids = drafts_for(seq, plain[seq.request_id], steps)
            outputs.update({out.request_id: out.outputs[0].token_ids for out in engine.step() if out.finished})
    finally:
        model.attention_backend = backend
    assert outputs == plain
    assert set(q_lens) == {1, K + 1}  # plain decode steps, then the verify steps


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


# -- CUDA graphs of verify steps (a fixed q_len per sequence) --------------------------------------------------
def bind_kv_caches(model, config, num_blocks: int, block_size: int, device) -> list[tuple[torch.Tensor, ...]]:
    """A paged K/V pool per layer, bound to the attention modules BEFORE capture: a real CUDA graph keeps the
    addresses it saw while recording, so later steps may change the caches' contents, never the tensors."""
    shape = (num_blocks, block_size, config.num_key_value_heads, config.hidden_size // config.num_attention_heads)
    layers = [m for m in model.modules() if hasattr(m, "k_cache")]
    for layer in layers:
        layer.k_cache = torch.zeros(shape, device=device)
        layer.v_cache = torch.zeros(shape, device=device)
    return [(layer.k_cache, layer.v_cache) for layer in layers]


def verify_step_inputs(config, caches, seq_lens: list[int], q_len: int, device):
    """Random contents for the bound caches, and one verify step's inputs: the last q_len tokens of each
    sequence, their slots, block tables (scattered blocks) and metadata."""
    g = torch.Generator().manual_seed(len(seq_lens) * 10 + q_len)
    num_blocks, block_size = caches[0][0].shape[:2]
    width = max(-(-n // block_size) for n in seq_lens)
    assert num_blocks >= width * len(seq_lens), "the pool must hold every sequence's blocks"
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
    for k, v in caches:
        k.copy_(torch.randn(k.shape, generator=g))
        v.copy_(torch.randn(v.shape, generator=g))
    return input_ids, torch.tensor(positions, device=device), meta


def replay_equals_eager(graphs: DecodeCUDAGraphs, model, config, caches, seq_lens, q_len, device,
                        torch_reference: bool = False):
    """One verify step eagerly and through `graphs`: the same hidden states, the same cache writes (and, with
    torch_reference, the same hidden states as the torch attention path, which gathers the cache instead)."""
    with torch.inference_mode():
        input_ids, positions, meta = verify_step_inputs(config, caches, seq_lens, q_len, device)
        snapshot = [(k.clone(), v.clone()) for k, v in caches]

        def restore() -> None:
            for (k, v), (k0, v0) in zip(caches, snapshot):
                k.copy_(k0)
                v.copy_(v0)
        if torch_reference:
            backend, model.attention_backend = model.attention_backend, "torch"
            with forward_context(dataclasses.replace(meta)):
                reference = model(input_ids, positions)
            model.attention_backend = backend
            restore()
        with forward_context(meta):
            eager = model(input_ids, positions)
        if torch_reference:  # the paged decode kernel with q_len > 1 computes what the torch path computes
            # on a GPU tl.dot takes fp32 operands as TF32 (10-bit mantissa): measured max |diff| 2.8e-3 on the
            # H200 for O(1) hidden states; the CPU interpreter computes in true fp32
            tol = 1e-2 if torch.device(device).type == "cuda" else 1e-4
            torch.testing.assert_close(eager, reference, rtol=tol, atol=tol)
        after_eager = [(k.clone(), v.clone()) for k, v in caches]
        restore()  # the same step again, through the graph
        assert graphs.can_run(meta)
        replayed = graphs.run(input_ids, positions, meta)
    assert replayed.shape == eager.shape == (len(seq_lens) * q_len, config.hidden_size)
    # the graph runs the padded bucket's batch, whose split-KV choice (and so the TF32 sums' order) may differ from
    # the eager step's: 4e-4 measured on the H200; on the CPU both are the same fp32 arithmetic
    tol = 1e-2 if torch.device(device).type == "cuda" else 1e-4
    torch.testing.assert_close(replayed, eager, rtol=tol, atol=tol)
    # the slots the step wrote hold what the eager step wrote (layers past the first see the attention output, so
    # the same TF32 tolerance); every slot it did not write is untouched: padding rows (slot -1) stored nothing
    for (k, v), (k1, v1), (k0, v0) in zip(caches, after_eager, snapshot):
        for now, eager_wrote, before in ((k, k1, k0), (v, v1, v0)):
            torch.testing.assert_close(now, eager_wrote, rtol=tol, atol=tol)
            slots = [t.flatten(0, 1).flatten(1) for t in (now, eager_wrote, before)]  # [blocks * block_size, -1]
            untouched = (slots[1] == slots[2]).all(dim=1)
            assert torch.equal(slots[0][untouched], slots[2][untouched])


def test_verify_step_graph_bookkeeping_on_cpu(model_and_config):
    model, config = model_and_config
    backend, model.attention_backend = model.attention_backend, "triton"  # the paged kernel, interpreted
    try:
        caches = bind_kv_caches(model, config, 24, BLOCK, "cpu")
        graphs = host_graphs(model, 4, 6, BLOCK, config.hidden_size, torch.float32, torch.device("cpu"),
                             query_lens=(3,))
        with torch.inference_mode():
            graphs.capture()
        assert sorted(graphs.graphs) == [1, 2, 4] and all(list(g) == [3] for g in graphs.graphs.values())
        # batch 3 replays the graph of 4 with one padding sequence; the 3 new tokens cross block boundaries
        replay_equals_eager(graphs, model, config, caches, [5, 13, 19], 3, "cpu", torch_reference=True)
        _, _, one_token = verify_step_inputs(config, caches, [5, 13, 19], 1, "cpu")
        assert not graphs.can_run(one_token)  # q_len 1 was not captured
    finally:
        model.attention_backend = backend
    with pytest.raises(ValueError, match="query_lens"):
        host_graphs(model, 4, 6, BLOCK, config.hidden_size, torch.float32, torch.device("cpu"), query_lens=(0,))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("batch", [1, 3, 8])
def test_gpu_verify_step_graph_replay_equals_eager(batch):
    device = torch.device("cuda")
    config = tiny_config(max_position_embeddings=256)
    with torch.device(device):
        model = tiny_model(config, seed=4)
    model.attention_backend = "triton"
    caches = bind_kv_caches(model, config, 128, 16, device)  # before capture: the graphs keep these addresses
    graphs = DecodeCUDAGraphs(model, 8, 16, 16, config.hidden_size, torch.float32, device, query_lens=(1, 3))
    graphs.capture()
    seq_lens = [3 + (37 * i) % 200 for i in range(batch)]
    replay_equals_eager(graphs, model, config, caches, seq_lens, 3, device, torch_reference=True)
    replay_equals_eager(graphs, model, config, caches, seq_lens, 1, device)
