"""The head proposers' cheap path (chapter 9): fixed-width windows kept padded per request, RoPE tables, K/V
written in place, and CUDA-graph replay of greedy proposals.

The drafts of the static-shape path (a batch of windows of different lengths, padded to one width, EAGLE's K/V in
a preallocated DraftKV) must equal the heads run from scratch on each request alone, the way training runs them
(no padding, no cache, every draft recomputed). On a GPU, a replayed graph must draft what the eager path drafts.
"""
from __future__ import annotations

import pytest
import torch

from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.sampling_params import SamplingParams
from minillm.speculative.head_kinds import KINDS, new_heads
from minillm.speculative.heads import (HEAD_KINDS, DraftBlock, FusedDraftBlock, HeadConfig, RopeTables, TargetParts,
                                      draft_attention_bias)
from test_engine import tiny_config, tiny_model
from tiny import one_thread  # noqa: F401  (one_thread: autouse fixture)

WIDTH, K = 6, 3


def random_proposer(kind: str, device: str = "cpu", cuda_graphs: bool = False, seed: int = 0):
    config = tiny_config(num_hidden_layers=2)
    with torch.device(device):
        model = tiny_model(config, seed=seed)
    head_config = HeadConfig.for_target(kind, config, K)
    torch.manual_seed(seed + 1)
    heads = new_heads(head_config)
    with torch.no_grad():  # random, not the identity start
        for p in heads.parameters():
            p.add_(0.3 * torch.randn_like(p))
    proposer_cls = KINDS[kind][1]
    options = {} if kind == "medusa" else {"window": WIDTH}
    return proposer_cls(heads.to(device), head_config, TargetParts(model), cuda_graphs=cuda_graphs, **options), config


def record(proposer, seq: Sequence, rows: torch.Tensor, start: int, drafts: list[int] = (), sampled=None) -> None:
    """One engine step's rows for `seq` from position `start` (drafts: the step verified them, keeping sampled)."""
    seq.num_computed_tokens, seq.spec_token_ids = start, list(drafts)
    proposer.record_hidden_states(ScheduledBatch([seq], [rows.shape[0]]), [rows], [sampled or []])
    seq.spec_token_ids = []


def windows_of(proposer, config, lengths, seed=3):
    """Sequences of these lengths, each with random features recorded for every position but the last."""
    g = torch.Generator().manual_seed(seed)
    seqs, features = [], []
    for i, length in enumerate(lengths):
        seq = Sequence(str(i), torch.randint(0, config.vocab_size, (length,), generator=g).tolist(),
                       SamplingParams(temperature=0))
        rows = torch.randn(length - 1, config.hidden_size, generator=g)
        record(proposer, seq, rows, 0)
        seqs.append(seq)
        features.append(rows)
    return seqs, features


def test_rope_tables_equal_the_angles_computed_directly_and_are_kept():
    rope = RopeTables(head_dim=8, theta=10000.0)
    x, positions = torch.randn(2, 5, 3, 8), torch.tensor([[0, 0, 1, 2, 3], [4, 5, 6, 7, 300]])
    inv_freq = 1.0 / 10000.0 ** (torch.arange(4, dtype=torch.float32) / 4)
    angles = positions.float()[..., None] * inv_freq
    half = x[..., :4], x[..., 4:]
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    expected = torch.cat([half[0] * cos - half[1] * sin, half[1] * cos + half[0] * sin], dim=-1)
    torch.testing.assert_close(rope(x, positions, 301), expected)
    first = rope.tables(10, x.device)[0]
    assert first.shape[0] == 512  # grown past 300 to a power of two
    assert rope.tables(400, x.device)[0] is first  # kept, not recomputed
    with torch.inference_mode():
        assert rope.tables(10, x.device)[0] is not first  # inference tensors live apart (autograd refuses them)


def test_fused_block_with_draft_kv_computes_what_the_training_block_computes():
    """A padded window, then one draft step: FusedDraftBlock (packed q|k|v and gate|up, folded GQA, additive mask,
    K/V written in place) against DraftBlock (separate projections, repeat_interleave, boolean mask, torch.cat)."""
    config = HeadConfig.for_target("eagle", tiny_config(), 1)
    torch.manual_seed(0)
    block = DraftBlock(config)
    with torch.no_grad():
        for p in (block.input_norm, block.post_attention_norm):
            p.add_(0.2 * torch.randn_like(p))
    fused = FusedDraftBlock(block, max_position=16)
    group = config.num_attention_heads // config.num_key_value_heads
    x, step = torch.randn(2, 5, 32), torch.randn(2, 1, 32)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])
    positions = torch.tensor([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    grown = torch.cat([mask, torch.ones(2, 1, dtype=torch.bool)], 1)
    with torch.no_grad():
        out, past = block(x, positions, mask)
        step_out, (all_k, all_v) = block(step, positions[:, -1:] + 1, grown, past)
        cache = fused.new_cache(2, 6, x)
        fused_out = fused(x, positions, draft_attention_bias(mask, 5, group, x.dtype), cache)
        fused_step = fused(step, positions[:, -1:] + 1, draft_attention_bias(grown, 1, group, x.dtype), cache)
    torch.testing.assert_close(fused_out, out)
    torch.testing.assert_close(fused_step, step_out)
    torch.testing.assert_close(cache.k, all_k)  # the keys as DraftBlock rotated them, in place
    torch.testing.assert_close(cache.v, all_v)
    assert cache.length == 6
    with pytest.raises(ValueError, match="DraftKV holds 6 positions; 6 \\+ 1 do not fit"):
        fused(step, positions[:, -1:] + 2, draft_attention_bias(torch.ones(2, 7, dtype=torch.bool), 1, group,
                                                                 x.dtype), cache)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the fused kernels' GPU path needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_block_on_the_gpu_computes_what_the_training_block_computes(dtype):
    """SmolLM2's head shapes on CUDA, where FusedDraftBlock runs the engine's Triton norm / RoPE / SiLU kernels (on
    the CPU it runs torch): a window, then two draft steps, against DraftBlock, the block training runs."""
    from minillm.config import ModelConfig
    target = ModelConfig(architecture="llama", vocab_size=512, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=2, num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5,
                         rope_theta=100000.0, max_position_embeddings=2048, tie_word_embeddings=True)
    config = HeadConfig.for_target("eagle", target, 1)
    torch.manual_seed(0)
    block = DraftBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.02 * torch.randn_like(p))
    block = block.to("cuda", dtype)
    fused = FusedDraftBlock(block, max_position=80)
    group = config.num_attention_heads // config.num_key_value_heads
    width = 64
    x = torch.randn(2, width, 576, device="cuda", dtype=dtype)
    mask = torch.ones(2, width, dtype=torch.bool, device="cuda")
    mask[0, :40] = False  # a left-padded window
    positions = (torch.arange(width, device="cuda")[None, :] - (~mask).sum(1, keepdim=True)).clamp(min=0)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-3, atol=1e-3)
    with torch.inference_mode():
        out, past = block(x, positions, mask)
        cache = fused.new_cache(2, width + 2, x)
        fused_out = fused(x, positions, draft_attention_bias(mask, width, group, dtype), cache)
        torch.testing.assert_close(fused_out[mask], out[mask], **tol)
        grown, position, last = mask, positions[:, -1:], out[:, -1:]
        for step in range(2):
            grown = torch.cat([grown, torch.ones(2, 1, dtype=torch.bool, device="cuda")], 1)
            position = position + 1
            step_out, past = block(last, position, grown, past)
            fused_step = fused(last, position, draft_attention_bias(grown, 1, group, dtype), cache)
            torch.testing.assert_close(fused_step, step_out, **tol)
            last = step_out


def test_stored_windows_follow_chunks_rejected_drafts_and_recomputation():
    proposer, config = random_proposer("eagle")
    seq = Sequence("a", list(range(1, 12)), SamplingParams(temperature=0))
    history = torch.randn(11, config.hidden_size)  # f_0 .. f_10
    record(proposer, seq, history[:4], 0)  # a prefill chunk
    record(proposer, seq, history[4:7], 4)  # the rest of the prompt
    record(proposer, seq, history[7:10], 7, drafts=[5, 6], sampled=[5, 9])  # a verify: draft 6 rejected
    end, length, stored = proposer._features["a"]
    assert (end, length) == (9, WIDTH) and stored.shape == (WIDTH, config.hidden_size)
    torch.testing.assert_close(stored, history[3:9])
    record(proposer, seq, history[:2], 0)  # preempted and recomputed from the start: the old rows go
    end, length, stored = proposer._features["a"]
    assert (end, length) == (2, 2)
    torch.testing.assert_close(stored, torch.cat([torch.zeros(WIDTH - 2, config.hidden_size), history[:2]]))


@torch.no_grad()
def drafts_from_scratch(proposer, seq: Sequence, features: torch.Tensor, num_drafts: int) -> list[int]:
    """The heads on one request alone, as training runs them: the last <= window features, no padding, no
    cache, each draft recomputing the whole window."""
    heads, parts, width = proposer.heads, proposer.target, proposer.window
    feats = features[-width:][None]
    n, end = feats.shape[1], features.shape[0]
    expected: list[int] = []
    if proposer.method == "medusa":
        z = heads(feats[:, -1])
        return [int(parts.logits(z[k]).argmax()) for k in range(num_drafts)]
    if proposer.method == "eagle":
        tokens = torch.tensor(seq.token_ids[end - n + 1:end + 1])[None]
        for _ in range(num_drafts):
            m = feats.shape[1]
            g, _ = heads(feats, parts.embed(tokens), torch.arange(m)[None], torch.ones(1, m, dtype=torch.bool))
            expected.append(int(parts.logits(parts.final_norm(g[:, -1])).argmax()))
            feats, tokens = torch.cat([feats, g[:, -1:]], 1), torch.cat([tokens, torch.tensor([[expected[-1]]])], 1)
        return expected
    hidden = feats
    for k, module in enumerate(heads.mtp[:num_drafts], start=1):
        tokens = torch.tensor((seq.token_ids + expected)[end - n + k:end + k])[None]
        hidden = module(hidden, parts.embed(tokens), torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool))
        expected.append(int(parts.logits(module.normed(hidden[:, -1])).argmax()))
    return expected


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_batched_padded_drafts_equal_each_request_drafted_alone(kind):
    """Windows of 2, 6 (= the width) and 6 of 9 features in one batch; one request asks for fewer drafts."""
    proposer, config = random_proposer(kind)
    seqs, features = windows_of(proposer, config, [3, 7, 10])
    wanted = [K, K, 2]
    drafts = proposer.propose(seqs, wanted)
    assert drafts == [drafts_from_scratch(proposer, s, f, k) for s, f, k in zip(seqs, features, wanted)]
    with_graphs, _ = random_proposer(kind, cuda_graphs=True)  # on the CPU: asked for graphs, drafts eagerly
    for s, f in zip(seqs, features):
        record(with_graphs, s, f, 0)
    assert with_graphs.propose(seqs, wanted) == drafts and not with_graphs.graphs.graphs


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_graph_replay_drafts_what_the_eager_path_drafts(kind):
    """Batches of 3, 4 and 3 (one bucket of 4, one graph) with fresh windows each time: the static inputs are
    refilled before every replay; the drafts equal the eager path's, and each replay reads its drafts back once."""
    eager, config = random_proposer(kind, "cuda")
    graphs, _ = random_proposer(kind, "cuda", cuda_graphs=True)
    g = torch.Generator().manual_seed(5)
    for batch in (3, 4, 3):
        seqs = [Sequence(f"{batch}-{i}", torch.randint(0, config.vocab_size, (4 + 3 * i,), generator=g).tolist(),
                         SamplingParams(temperature=0)) for i in range(batch)]
        for seq in seqs:
            rows = torch.randn(seq.num_tokens - 1, config.hidden_size, generator=g).cuda()
            record(eager, seq, rows, 0)
            record(graphs, seq, rows, 0)
        assert graphs.propose(seqs, [K] * batch) == eager.propose(seqs, [K] * batch)
    assert list(graphs.graphs.graphs) == [(4, K)]


class ReplayOnCPU:
    """Stands in for a captured torch.cuda.CUDAGraph on the CPU: replay reruns the capture's function into the
    same output tensor(s), reading the same static inputs, as a real replay would."""

    def __init__(self, run, out) -> None:
        self.run, self.out = run, out

    def replay(self) -> None:
        outs, new = (self.out, self.run()) if isinstance(self.out, tuple) else ((self.out,), (self.run(),))
        for out, value in zip(outs, new):
            out.copy_(value)


def capture_on_cpu(self, bucket, key, like):
    """DraftGraphs._capture without a GPU: the bucket's static inputs, one run, a ReplayOnCPU of it."""
    width = self.proposer.window
    self.inputs.setdefault(bucket, (like.new_zeros(bucket, width, like.shape[-1]),
                                    torch.zeros(bucket * width + bucket, dtype=torch.int64)))
    out = self._run(bucket, key)
    return ReplayOnCPU(lambda: self._run(bucket, key), out), out


def test_graph_runner_refills_its_static_inputs_for_every_batch(monkeypatch):
    """DraftGraphs' bookkeeping without a GPU: batches of 3 and 4 share the bucket-4 buffers and 'graph' (the
    padding row left stale); a batch of 2 asking for 2 drafts replays its bucket's K-draft graph and keeps the
    first 2, and a first batch of 1 asking for 2 captures a K-draft graph (the longest so far), so the end of a
    request (k trimmed) never captures a graph per k; every replay drafts what the eager path drafts."""
    from minillm.speculative.head_proposer import DraftGraphs
    graphs, config = random_proposer("eagle", cuda_graphs=True)
    eager, _ = random_proposer("eagle")

    monkeypatch.setattr(DraftGraphs, "_capture", capture_on_cpu)
    monkeypatch.setattr(DraftGraphs, "fits", lambda self, windows: True)
    g = torch.Generator().manual_seed(7)
    for batch, k in ((3, K), (2, K), (4, K), (2, 2), (1, 2), (1, K)):  # the last: (1, 2)'s graph drafts K
        seqs = [Sequence(f"{batch}-{k}-{i}", torch.randint(0, config.vocab_size, (3 + 2 * i,), generator=g).tolist(),
                         SamplingParams(temperature=0)) for i in range(batch)]
        for seq in seqs:
            rows = torch.randn(seq.num_tokens - 1, config.hidden_size, generator=g)
            record(eager, seq, rows, 0)
            record(graphs, seq, rows, 0)
        assert graphs.propose(seqs, [k] * batch) == eager.propose(seqs, [k] * batch)
    assert sorted(graphs.graphs.graphs) == [(1, K), (2, K), (4, K)]
    sampled = Sequence("s", [1, 2, 3], SamplingParams(temperature=0.8))
    record(graphs, sampled, torch.randn(2, config.hidden_size, generator=g), 0)
    assert len(graphs.propose([sampled], [K])[0]) == K  # a sampled request drafts eagerly: no new graph
    assert sorted(graphs.graphs.graphs) == [(1, K), (2, K), (4, K)]


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_drafts_made_ahead_are_the_drafts_propose_would_make(kind):
    """draft_ahead at the end of a verify step (features recorded, tokens not yet appended), then the engine's
    postprocess (the tokens appended): propose collects the drafts made ahead, which equal those of a proposer that
    drafts only when asked. A sequence whose window is not the one drafted from is drafted afresh."""
    ahead, config = random_proposer(kind)
    fresh, _ = random_proposer(kind)
    seqs, _ = windows_of(ahead, config, [4, 7, 9])
    windows_of(fresh, config, [4, 7, 9])
    g = torch.Generator().manual_seed(11)
    for step in range(3):
        new_tokens = [[int(t) for t in torch.randint(0, config.vocab_size, (n,), generator=g)] for n in (1, 2, 3)]
        for proposer in (ahead, fresh):  # a verify step of 3 drafts that accepted len(tokens) - 1 of them
            for seq, tokens in zip(seqs, new_tokens):
                rows = torch.randn(4, config.hidden_size, generator=torch.Generator().manual_seed(step + len(tokens)))
                record(proposer, seq, rows, seq.num_tokens - 1, drafts=[0, 0, 0], sampled=tokens)
        assert ahead.draft_ahead(seqs, new_tokens, [K, K, 2]) is None and ahead._ahead is not None
        assert ahead._ahead.num_drafts == min(K, ahead.max_drafts)
        if step == 2:  # the last sequence gains one token fewer than drafted for: its window ends elsewhere
            new_tokens[2] = new_tokens[2][:-1]
        for seq, tokens in zip(seqs, new_tokens):  # postprocess
            for t in tokens:
                seq.append_token(t, 0.0)
            seq.num_computed_tokens = seq.num_tokens - 1
        pending = ahead._ahead
        covered = pending.covers([s.request_id for s in seqs], [s.num_tokens - 1 for s in seqs], 2)
        assert covered == (step < 2)
        assert ahead.propose(seqs, [K, K, 2]) == fresh.propose(seqs, [K, K, 2])
        assert ahead._ahead is None and pending.ready is None  # used once (on a CPU the copy is done at once)
    ahead.draft_ahead(seqs, [[5, 6, 7, 8]] * 3, [K] * 3)  # no features for the tokens before these: no drafts
    assert ahead._ahead is None


def test_ahead_landing_copies_and_reuses_one_pinned_buffer():
    """AheadLanding: on a CPU a copy (the caller may reuse its tensor); on a GPU one pinned buffer, grown only when
    a proposal needs more, and one event, reused: the collected values are each proposal's own."""
    from minillm.speculative.draft_ahead import AheadLanding, AheadProposal
    landing = AheadLanding()
    result = torch.arange(6).view(2, 3)
    host, ready = landing.land(result)
    assert ready is None and torch.equal(host, result) and host.data_ptr() != result.data_ptr()
    if not torch.cuda.is_available():
        return
    first = AheadProposal.start({"a": (0, 4), "b": (1, 5)}, result.cuda(), 3, landing=landing)
    buffer = landing.buffer
    assert buffer.is_pinned() and first.ready is landing.event
    assert first.collect(["b", "a"]).tolist() == [[3, 4, 5], [0, 1, 2]]
    second = AheadProposal.start({"a": (0, 6)}, torch.tensor([[7, 8]], device="cuda"), 2, landing=landing)
    assert landing.buffer is buffer and second.collect(["a"]).tolist() == [[7, 8]]
