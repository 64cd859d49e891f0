"""Token-tree verification inside the engine (chapter 9, minillm/speculative/tree_verify.py).

Greedy tree speculation is token-identical to plain decoding: with the "ngram_tree" proposer, with oracle trees whose
right continuation is never the first branch (so accepted nodes must move their K/V), on the torch and the Triton
paths, under KV pressure with preemption, over an fp8 cache, with Medusa's heads under a sparse tree; no block is
left held. A one-chain tree gives exactly chain verification's steps and metrics. Sampled requests keep the target's
distribution (chi-square on a vocabulary of 8); log-probs follow the accepted path, greedy and sampled; a
prefix-cache hit reads the moved K/V. Tree-masked attention itself: tests/test_tree_attention.py.
"""
from __future__ import annotations

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.sampling_params import SamplingParams
from minillm.speculative.config import verify_query_lens
from minillm.speculative.engine_hooks import SpeculativeDecoder
from minillm.speculative.proposer import NGramProposer
from minillm.speculative.tree import TokenTree
from minillm.speculative.tree_proposers import NGramTreeProposer, TopKTreeProposer, medusa_tree_paths, trie_draft
from minillm.speculative.tree_verify import TreeDraft, TreeProposer
from test_engine import tiny_config, tiny_model
from tiny import ByteTokenizer, one_thread  # noqa: F401  (autouse: one torch thread)

PROMPTS = [list(range(10, 20)) * 2, [5, 6, 7, 5, 6, 7, 5, 6], [99, 98, 97, 96, 95], [40, 41, 40, 41, 40]]
GREEDY = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (20, 14, 20, 9)]
K = 4


@pytest.fixture(scope="module")
def model_and_config():
    config = tiny_config(num_hidden_layers=3)
    return tiny_model(config), config


def run(model_and_config, spec, num_blocks=64, requests=None, proposer=None, backend="torch", device="cpu",
        engine_outputs=False, **engine_options):
    """(token ids by request id, the engine) after running `requests` (default: PROMPTS, greedy) to the end; a
    `proposer` replaces the one `spec` builds; engine_outputs: RequestOutputs instead of token ids."""
    model, config = model_and_config
    model.attention_backend = backend
    engine = LLMEngine(model, ByteTokenizer(), config,
                       EngineConfig(block_size=4, num_kv_blocks=num_blocks, max_model_len=64, max_num_seqs=4,
                                    speculative_config=spec, **engine_options), device=device)
    if proposer is not None:  # a proposer, or a function of the one the engine built (wrapping it)
        proposer = proposer if isinstance(proposer, TreeProposer) else proposer(engine.speculative.proposer)
        engine.speculative = SpeculativeDecoder(engine.speculative.config, proposer, config.vocab_size, 64)
    for i, (prompt, params) in enumerate(requests or list(zip(PROMPTS, GREEDY))):
        engine.add_request(str(i), prompt, params)
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out if engine_outputs else out.outputs[0].token_ids
        engine.scheduler.check_invariants()
    model.attention_backend = "auto"
    assert engine.scheduler.block_manager.num_used_blocks == 0  # rejected nodes' blocks all given back
    assert engine.speculative is None or engine.speculative.num_propose_errors == 0
    return outputs, engine


@pytest.fixture(scope="module")
def plain(model_and_config):
    return run(model_and_config, None)[0]


class OracleTreeProposer(TreeProposer):
    """Trees whose right continuation (plain decoding's) is never the first branch: a wrong branch, then one that
    is right for one token only, then the right one. The accepted path then sits at nodes n_d != d, so its KV
    entries must move; any mistake in moving them changes the next tokens."""

    method = "oracle_tree"

    def __init__(self, truth: dict[tuple, list[int]]) -> None:
        self.truth = truth
        self.num_trees = 0

    def propose_trees(self, seqs, max_depths):
        drafts = []
        for seq, depth in zip(seqs, max_depths):
            full = self.truth[tuple(seq.prompt_token_ids)]
            right = full[seq.num_tokens:seq.num_tokens + depth]
            if depth < 1 or not right:
                drafts.append(None)
                continue
            wrong = [(t + 1) % 256 for t in right]
            half = right[:1] + wrong[1:]
            drafts.append(trie_draft(seq.last_token_id, [wrong, half, right], 64))
            self.num_trees += 1
        return drafts


def _truth(plain):
    return {tuple(p): p + plain[str(i)] for i, p in enumerate(PROMPTS)}


@pytest.mark.parametrize("num_blocks", [64, 12])  # 12 blocks of 4 slots: the four requests preempt each other
def test_oracle_trees_accept_off_first_branch_and_equal_plain(model_and_config, plain, num_blocks):
    proposer = OracleTreeProposer(_truth(plain))
    outputs, engine = run(model_and_config, {"method": "ngram_tree", "num_speculative_tokens": K}, num_blocks,
                          proposer=proposer)
    assert outputs == plain
    metrics = engine.speculative.metrics
    assert proposer.num_trees > 0 and metrics.num_accepted_tokens > metrics.num_verify_steps  # paths > 1 deep
    if num_blocks == 12:
        assert engine.scheduler.num_preemptions > 0


def test_oracle_trees_on_the_triton_path(model_and_config, plain):
    """The same through the Triton kernels (the interpreter here): tree-masked paged attention in the engine."""
    short = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in (12, 8)]  # the interpreter is slow
    outputs, engine = run(model_and_config, {"method": "ngram_tree", "num_speculative_tokens": K}, 64,
                          requests=list(zip(PROMPTS, short)), proposer=OracleTreeProposer(_truth(plain)),
                          backend="triton")
    assert outputs == {"0": plain["0"][:12], "1": plain["1"][:8]}
    assert engine.speculative.metrics.num_accepted_tokens > engine.speculative.metrics.num_verify_steps


def test_oracle_trees_with_an_fp8_kv_cache(model_and_config, backend="torch"):
    """An fp8 cache: tree rows read dequantised keys and the moved entries are fp8 bytes; greedy output equals
    plain decoding over the same fp8 cache. (The Triton path: in the GPU test below; the interpreter is slow.)"""
    requests = list(zip(PROMPTS, GREEDY))[:2]
    fp8_plain, _ = run(model_and_config, None, requests=requests, backend=backend, kv_cache_dtype="fp8")
    truth = {tuple(p): p + fp8_plain[str(i)] for i, (p, _) in enumerate(requests)}
    outputs, engine = run(model_and_config, {"method": "ngram_tree", "num_speculative_tokens": K},
                          requests=requests, proposer=OracleTreeProposer(truth), backend=backend,
                          kv_cache_dtype="fp8")
    assert outputs == fp8_plain and engine.speculative.metrics.num_accepted_tokens > 0


@pytest.mark.parametrize("num_blocks", [64, 12])
def test_ngram_tree_method_equals_plain(model_and_config, plain, num_blocks):
    outputs, engine = run(model_and_config, {"method": "ngram_tree", "num_speculative_tokens": K}, num_blocks)
    assert outputs == plain
    assert engine.speculative.metrics.num_accepted_tokens > 0


def test_medusa_heads_drive_a_sparse_tree(model_and_config, plain, tmp_path):
    """Medusa's proposer (propose_candidates: each head's top-k) under a sparse tree of 10 nodes: greedy output
    equals plain decoding, and the head proposer still receives the accepted rows' features (path order)."""
    from minillm.speculative.heads import HeadConfig, save_heads
    from minillm.speculative.train_heads import initial_heads
    from minillm.speculative.tree import sparse_tree_paths
    model, config = model_and_config
    head_config = HeadConfig.for_target("medusa", config, K)
    heads = initial_heads(head_config, model)
    with torch.no_grad():  # untrained but not all alike: each head's top-k differs
        for p in heads.parameters():
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    directory = save_heads(tmp_path / "medusa", heads, head_config)
    paths = sparse_tree_paths([[0.6, 0.2, 0.1], [0.4, 0.2, 0.1], [0.3, 0.2, 0.1]], num_nodes=10)
    spec = {"method": "medusa", "num_speculative_tokens": K, "model": str(directory)}
    seen = []

    def tree_over(medusa):
        record = medusa.record_hidden_states
        medusa.record_hidden_states = lambda *args: (seen.append(1), record(*args))
        return TopKTreeProposer(medusa, paths)
    outputs, engine = run(model_and_config, spec, 12, proposer=tree_over)
    assert outputs == plain and seen
    assert engine.speculative.tree is not None and engine.speculative.tree.num_nodes_scored > 0
    assert engine.speculative.metrics.num_accepted_tokens > 0
    outputs, engine = run(model_and_config, dict(spec, method="medusa_tree"), 12)  # the method builds the same
    assert outputs == plain and isinstance(engine.speculative.proposer, TopKTreeProposer)
    assert engine.speculative.proposer.tree.num_nodes == 4 * K + 1  # NODES_PER_LEVEL per level, and the root
    assert medusa_tree_paths([0.6, 0.3], 4) == [(0,), (1,), (0, 0), (0, 1)]  # 0.6, 0.24, 0.18, 0.126


class BrokenTree(TreeProposer):
    method = "broken_tree"

    def propose_trees(self, seqs, max_depths):  # rooted at the wrong token: the engine must refuse it
        return [trie_draft(seq.last_token_id + 1, [[1, 2]], 64) for seq in seqs]


def test_a_failing_tree_proposer_costs_drafts_not_requests(model_and_config, plain, caplog):
    spec = {"method": "ngram_tree", "num_speculative_tokens": K}
    with caplog.at_level("ERROR"):
        model, config = model_and_config
        engine = LLMEngine(model, ByteTokenizer(), config,
                           EngineConfig(block_size=4, num_kv_blocks=64, max_model_len=64, max_num_seqs=4,
                                        speculative_config=spec))
        engine.speculative = SpeculativeDecoder(engine.speculative.config, BrokenTree(), config.vocab_size, 64)
        for i, (prompt, params) in enumerate(zip(PROMPTS, GREEDY)):
            engine.add_request(str(i), prompt, params)
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    assert done == plain and engine.speculative.num_propose_errors > 0
    assert "rooted at" in caplog.text and engine.scheduler.block_manager.num_used_blocks == 0
    assert verify_query_lens(EngineConfig(speculative_config=spec)) == (1,)  # trees: tree graphs (tree_graph_batch)


class ChainAsTree(TreeProposer):
    """Prompt lookup's chain, handed over as a one-branch tree."""

    method = "chain_tree"

    def __init__(self) -> None:
        self.chain = NGramProposer(3, 1)

    def propose_trees(self, seqs, max_depths):
        return [trie_draft(seq.last_token_id, [chain], 64) if chain else None
                for seq, chain in zip(seqs, self.chain.propose(seqs, max_depths))]


def test_a_one_chain_tree_equals_chain_verification(model_and_config, plain):
    chain_out, chain = run(model_and_config, {"method": "ngram", "num_speculative_tokens": K, "prompt_lookup_min": 1})
    tree_out, tree = run(model_and_config, {"method": "ngram_tree", "num_speculative_tokens": K},
                         proposer=ChainAsTree())
    assert chain_out == tree_out == plain
    assert tree.speculative.metrics.as_dict() == chain.speculative.metrics.as_dict()
    assert tree.num_steps == chain.num_steps


def test_sampled_requests_verify_on_the_target_distribution(model_and_config, plain):
    """Sampled requests go through verify_tree_sampling; a seeded request repeats itself; greedy ones next to
    them still equal plain decoding."""
    sampled = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, ignore_eos=True, seed=3)
    requests = list(zip(PROMPTS, GREEDY)) + [(PROMPTS[1], sampled)]
    spec = {"method": "ngram_tree", "num_speculative_tokens": K}
    first, engine = run(model_and_config, spec, requests=requests, proposer=OracleTreeProposer(_truth(plain)))
    second, _ = run(model_and_config, spec, requests=requests, proposer=OracleTreeProposer(_truth(plain)))
    assert first == second and len(first["4"]) == 12
    assert {rid: first[rid] for rid in plain} == plain


def test_logprobs_follow_the_accepted_path(model_and_config, plain):
    """The accepted rows are reordered into path order, so each token keeps the log-probs of the row that
    sampled it: the same as plain decoding's."""
    params = [SamplingParams(temperature=0, max_tokens=p.max_tokens, ignore_eos=True, logprobs=2) for p in GREEDY]
    requests = list(zip(PROMPTS, params))
    spec = {"method": "ngram_tree", "num_speculative_tokens": K}
    runs = [run(model_and_config, None, requests=requests, engine_outputs=True)[0],
            run(model_and_config, spec, requests=requests, engine_outputs=True,
                proposer=OracleTreeProposer(_truth(plain)))[0]]
    for rid in plain:
        ref, tree = (r[rid].outputs[0] for r in runs)
        assert tree.token_ids == ref.token_ids == plain[rid]
        for a, b in zip(ref.logprobs, tree.logprobs):
            assert a.keys() == b.keys()
            for token in a:
                assert abs(a[token].logprob - b[token].logprob) < 1e-4 and a[token].rank == b[token].rank


def test_a_prefix_cache_hit_reads_the_moved_kv(model_and_config, plain):
    """A finished tree request's blocks enter the prefix cache; a later request whose prompt is that request's
    text reuses them, which is right only if the accepted nodes' K/V were moved where the tokens are."""
    model, config = model_and_config
    model.attention_backend = "torch"
    engine = LLMEngine(model, ByteTokenizer(), config,
                       EngineConfig(block_size=4, num_kv_blocks=64, max_model_len=64, max_num_seqs=4,
                                    enable_prefix_caching=True,
                                    speculative_config={"method": "ngram_tree", "num_speculative_tokens": K}))
    engine.speculative = SpeculativeDecoder(engine.speculative.config, OracleTreeProposer(_truth(plain)),
                                            config.vocab_size, 64)
    finished = {}

    def drain():
        while engine.has_unfinished_requests():
            finished.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    engine.add_request("a", PROMPTS[0], GREEDY[0])
    drain()
    assert finished["a"] == plain["0"] and engine.speculative.metrics.num_accepted_tokens > 0
    cont = PROMPTS[0] + plain["0"][:-1]  # every token of "a" whose K/V is cached
    engine.speculative = None  # the reader decodes plainly: only the cached K/V can make it differ
    hits = engine.scheduler.block_manager.prefix_cache_hits
    engine.add_request("b", cont, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    drain()
    model.attention_backend = "auto"
    reference, _ = run(model_and_config, None, requests=[(cont, SamplingParams(temperature=0, max_tokens=6,
                                                                               ignore_eos=True))])
    assert engine.scheduler.block_manager.prefix_cache_hits > hits  # "b" read "a"'s blocks
    assert finished["b"] == reference["0"]


class FixedTree(TreeProposer):
    """The same tree below every sequence's last token: three children, two grandchildren each."""

    method = "fixed_tree"

    def propose_trees(self, seqs, max_depths):
        branches = [[a, b] for a in (0, 1, 2) for b in (0, 1)]
        return [trie_draft(seq.last_token_id, [c[:d] for c in branches], 64) if d else None
                for seq, d in zip(seqs, max_depths)]


def test_sampled_tree_verification_keeps_the_target_distribution():
    """Vocabulary 8, temperature 0.4, 1000 requests of 4 tokens: the first verify step scores a two-level tree and
    emits the 2nd and 3rd tokens; their joint law (over the 1st) must be the target's, computed by full forwards."""
    from test_speculative_core import _chi_square_p_value
    vocab, n, temperature, prompt = 8, 1000, 0.4, [1, 2, 3]
    config = tiny_config(vocab_size=vocab, num_hidden_layers=2)
    model = tiny_model(config, seed=5)
    engine = LLMEngine(model, ByteTokenizer(), config,
                       EngineConfig(block_size=4, num_kv_blocks=5 * n, max_model_len=16, max_num_seqs=n,
                                    speculative_config={"method": "ngram_tree", "num_speculative_tokens": 2}),
                       seed=11)
    engine.speculative = SpeculativeDecoder(engine.speculative.config, FixedTree(), vocab, 16)
    for i in range(n):
        engine.add_request(str(i), prompt, SamplingParams(temperature=temperature, max_tokens=4, ignore_eos=True))
    tokens = []
    while engine.has_unfinished_requests():
        tokens += [o.outputs[0].token_ids for o in engine.step() if o.finished]
    tokens = torch.tensor(tokens)

    @torch.no_grad()
    def law(prefix: list[int]) -> torch.Tensor:  # no forward context: one causal sequence, no cache
        hidden = model(torch.tensor(prefix), torch.arange(len(prefix)))
        return torch.softmax(model.compute_logits(hidden[-1:]).double() / temperature, -1)[0]

    first = law(prompt)
    pair = torch.zeros(vocab, vocab, dtype=torch.float64)  # P(2nd = b, 3rd = c), summed over the 1st
    for a in range(vocab):
        second = law(prompt + [a])
        for b in range(vocab):
            pair[b] += first[a] * second[b] * law(prompt + [a, b])
    pair = pair.flatten()
    counts = torch.bincount(tokens[:, 1] * vocab + tokens[:, 2], minlength=vocab * vocab).double()
    keep = pair * n >= 5  # chi-square wants >= 5 expected per cell: the rare pairs pooled into one
    counts = torch.cat([counts[keep], counts[~keep].sum(0, keepdim=True)])
    expected = torch.cat([pair[keep], pair[~keep].sum(0, keepdim=True)]) * n
    assert _chi_square_p_value(counts, expected) > 1e-3
    by_depth = engine.speculative.metrics.acceptance_by_position
    assert 0.05 < by_depth[0] < 0.95 and 0 < by_depth[1] < 0.95  # both levels accepted and rejected
    assert engine.scheduler.block_manager.num_used_blocks == 0


def test_tree_proposers_build_valid_trees():
    draft = trie_draft(7, [[1, 2, 3], [1, 2, 4], [5], [1, 6]], max_nodes=6)
    assert draft.token_ids == [7, 1, 2, 3, 4, 5] and draft.tree.parents.tolist() == [-1, 0, 1, 2, 2, 0]
    assert draft.prefix(3).token_ids == [7, 1, 2] and draft.prefix(3).tree.num_nodes == 3
    proposer = NGramTreeProposer(prompt_lookup_max=2, num_branches=3)
    tokens = [1, 2, 3, 9, 1, 2, 4, 8, 1, 2, 5, 1, 2]
    assert proposer.continuations(tokens, 2) == [[5, 1], [4, 8], [3, 9]]
    assert NGramTreeProposer().propose([_Seq(tokens)], [2]) == [[5, 1]]  # the first branch, as a chain

    class Heads:  # Medusa's propose_candidates: per head its top-k ids (and probabilities)
        def propose_candidates(self, seqs, topk):
            return [(torch.tensor([[10, 11], [20, 21]])[:, :topk], torch.ones(2, topk))] * len(seqs)

    topk = TopKTreeProposer(Heads(), [(0,), (1,), (0, 0), (0, 1), (1, 0)])
    (full,), (shallow,) = topk.propose_trees([_Seq([3])], [2]), topk.propose_trees([_Seq([3])], [1])
    assert full.token_ids == [3, 10, 11, 20, 21, 20] and shallow.token_ids == [3, 10, 11]
    with pytest.raises(ValueError, match="1..64 nodes"):
        TreeDraft(TokenTree.from_parents([-1] + [0] * 64), [0] * 65)


def test_ngram_tree_index_finds_what_a_rescan_finds():
    """The per-request index of n-gram occurrences, extended step by step, gives the continuations a scan of the
    whole sequence gives (random short alphabets: many repeats, overlaps, a search window that cuts)."""
    import random
    rng = random.Random(1)

    def scan(p, tokens, depth):
        found, low = [], max(0, len(tokens) - 1 - p.search_window)
        for n in range(min(p.max_n, len(tokens) - 1), p.min_n - 1, -1):
            for end in range(len(tokens) - 1, max(n, low) - 1, -1):
                c = tokens[end:end + depth]
                if tokens[end - n:end] == tokens[-n:] and c and c not in found:
                    found.append(c)
                    if len(found) == p.num_branches:
                        return found
        return found
    for trial in range(60):
        max_n = rng.randint(1, 4)
        p = NGramTreeProposer(max_n, rng.randint(1, max_n), num_branches=rng.randint(1, 5),
                              search_window=rng.randint(1, 40))
        tokens = [rng.randrange(4) for _ in range(rng.randint(1, 10))]
        for step in range(8):
            tokens += [rng.randrange(4) for _ in range(rng.randint(1, 3))]
            depth = rng.randint(1, 4)
            assert p.continuations(tokens, depth, "r") == scan(p, tokens, depth), (trial, step)
        assert p.active_requests() == {"r"}
        p.free("r")
        assert p.active_requests() == set()


class _Seq:
    def __init__(self, tokens):
        self.token_ids, self.request_id = list(tokens), "r"

    @property
    def last_token_id(self):
        return self.token_ids[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_tree_verification_next_to_cuda_graphs_equals_plain():
    """On the GPU: plain decode steps replay CUDA graphs, tree steps replay tree graphs (the tree-masked kernel
    reading the static tree masks); greedy output unchanged, accepted KV moved on the device, no block held."""
    config = tiny_config(num_hidden_layers=3, max_position_embeddings=256)
    with torch.device("cuda"):
        model_and_config = tiny_model(config), config
    plain = run(model_and_config, None, backend="auto", device="cuda")[0]
    spec = {"method": "ngram_tree", "num_speculative_tokens": K}
    ngram, engine = run(model_and_config, spec, backend="auto", device="cuda")
    oracle, _ = run(model_and_config, spec, backend="auto", device="cuda", proposer=OracleTreeProposer(_truth(plain)))
    assert ngram == plain and oracle == plain
    assert engine.runner.cuda_graphs is not None and engine.speculative.metrics.num_accepted_tokens > 0
    assert engine.runner.cuda_graphs.num_tree_replays > 0  # ngram_tree: trees of <= 32 rows, buckets 1, 2, 4
    fp8_plain = run(model_and_config, None, backend="auto", device="cuda", kv_cache_dtype="fp8")[0]
    fp8_truth = {tuple(p): p + fp8_plain[str(i)] for i, p in enumerate(PROMPTS)}
    fp8_tree, _ = run(model_and_config, spec, backend="auto", device="cuda", kv_cache_dtype="fp8",
                      proposer=OracleTreeProposer(fp8_truth))
    assert fp8_tree == fp8_plain


def test_sampled_tree_steps_report_the_logprobs_of_the_row_that_sampled(model_and_config, plain):
    """Sampled token trees (temperature > 0) whose accepted path leaves the first branch: the step's logits are
    reordered into path order with its tokens, so each emitted token's log-prob is read from the row that sampled
    it (a resampled token included) and equals a full forward's over the output."""
    from test_logprobs import reference_logprobs
    params = [SamplingParams(temperature=0.5, max_tokens=p.max_tokens, ignore_eos=True, seed=i, logprobs=1)
              for i, p in enumerate(GREEDY)]
    proposer = OracleTreeProposer(_truth(plain))
    outputs, _ = run(model_and_config, {"method": "ngram_tree", "num_speculative_tokens": K},
                     requests=list(zip(PROMPTS, params)), engine_outputs=True, proposer=proposer)
    assert proposer.num_trees > 0
    for i, prompt in enumerate(PROMPTS):
        done = outputs[str(i)].outputs[0]
        ref = reference_logprobs(model_and_config[0], prompt + done.token_ids)
        for j, (token, entry) in enumerate(zip(done.token_ids, done.logprobs)):
            assert entry[token].logprob == pytest.approx(float(ref[len(prompt) - 1 + j, token]), abs=1e-4), \
                f"request {i}, output token {j}"
