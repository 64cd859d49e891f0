"""Tree graphs: token-tree verify steps replayed from CUDA graphs (minillm/engine/cuda_graph.py, chapter 9).

On a CPU `host_graphs` stands in for the graphs ("recording" keeps the forward, "replay" reruns it on what the static
inputs hold), so the bookkeeping a real replay depends on runs here: the packed rows, tree masks and cu_seqlens_q
written into a tree graph's inputs by the step's one upload, the padding rows and sequences, the buckets, the
fallback for a tree larger than the graph. The GPU tests replay real graphs.
"""
from __future__ import annotations

import pytest
import torch

from minillm.bench.step_transfers import host_graphs
from minillm.config import EngineConfig
from minillm.engine.cuda_graph import TREE_GRAPH_MAX_TOKENS, tree_graph_buckets
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.model_runner import ModelRunner
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.engine.prepared_batch import prepare_batch
from minillm.engine.step_buffers import UploadBuffer
from minillm.engine.step_input import SamplingSpec, StepInput, build_step_input
from minillm.sampling_params import SamplingParams
from minillm.speculative.config import tree_graph_batch
from minillm.speculative.tree_verify import host_token_tree
from test_eagle_tree import eagle_dir  # noqa: F401  (a fixture: a random EAGLE head for the tiny target)
from test_engine import tiny_config, tiny_model
from tiny import ByteTokenizer, one_thread  # noqa: F401  (autouse: one torch thread)

# the rows past a tree step's packed rows belong to no sequence: their attention output is whatever the buffer held,
# which the interpreter's numpy may overflow on (results thrown away, by design: cuda_graph.py's docstring)
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
BLOCK = 4
TREE_Q = 8  # the tree graphs' rows per sequence in the CPU tests


@pytest.fixture(scope="module")
def model_and_config():
    config = tiny_config(num_hidden_layers=3)  # test_eagle_tree's target: its eagle_dir heads fit
    return tiny_model(config), config


def test_tree_graph_batch_per_method():
    def q_and_batch(**spec):
        return tree_graph_batch(EngineConfig(speculative_config=spec))
    assert tree_graph_batch(EngineConfig()) == (None, None)
    assert q_and_batch(method="ngram", num_speculative_tokens=4) == (None, None)  # chains: verify_query_lens
    assert q_and_batch(method="eagle_tree", num_speculative_tokens=5) == (33, None)  # root + 32 nodes
    assert q_and_batch(method="eagle_tree", num_speculative_tokens=5, num_tree_nodes=10) == (11, None)
    assert q_and_batch(method="medusa_tree", num_speculative_tokens=4) == (17, None)  # 4 nodes per level
    assert q_and_batch(method="medusa_tree", num_speculative_tokens=16) == (64, None)  # at most 63 nodes
    assert q_and_batch(method="ngram_tree", num_speculative_tokens=4, disable_by_batch_size=6) == (32, 6)


def test_tree_graph_buckets_are_bounded():
    assert tree_graph_buckets(64, None) == []
    assert tree_graph_buckets(64, 33) == [b for b in (1, 2, 4, 8, 16, 24) if b * 33 <= TREE_GRAPH_MAX_TOKENS]
    assert tree_graph_buckets(64, 8, max_batch=5) == [1, 2, 4, 8]  # a step of 5 replays the bucket of 8
    assert tree_graph_buckets(6, 8) == [1, 2, 4, 6]
    for bad in (1, 65, True, 8.0):
        with pytest.raises(ValueError, match="tree_query_len"):
            tree_graph_buckets(8, bad)
    with pytest.raises(ValueError, match="max_batch"):
        tree_graph_buckets(8, 8, max_batch=0)


def test_tree_graph_inputs_are_rewritten_whatever_the_shared_buffer_held():
    """Every captured shape shares one input buffer: the upload of a tree step rewrites each number a tree graph's
    replay reads, padding included (rows past the packed ones: slot -1, mask -1; the padding sequence: no rows,
    one key in block 0), and the metadata's views are slices of the graph's inputs."""
    graphs = host_graphs(torch.nn.Identity(), 4, 6, BLOCK, 8, torch.float32, torch.device("cpu"),
                         tree_query_len=TREE_Q)
    graphs.tree_graphs = {4: None}  # plan_tree() only asks whether the graph exists; nothing is replayed here
    graphs.upload.host.fill_(0x7F)
    graphs.upload.device_bytes.fill_(0x7F)
    tables, seq_lens, q_lens = [[1, 2, 3], [4, 5], [7, 8, 9, 10, 11]], [10, 6, 20], [4, 1, 8]
    bits = [host_token_tree(p).row_bitmasks for p in ([-1, 0, 0, 1], [-1, 0, 1, 0, 3, 3, 1, 6])]
    slots = [t[p // BLOCK] * BLOCK + p % BLOCK for t, n, q in zip(tables, seq_lens, q_lens) for p in range(n - q, n)]
    step = StepInput(input_ids=list(range(13)), positions=list(range(13)), slot_mapping=slots, query_lens=q_lens,
                     seq_lens=seq_lens, block_tables=tables, num_sampled=q_lens,
                     sampling=[SamplingSpec(str(i), 0.0, -1, 1.0, None) for i in range(3)], block_size=BLOCK,
                     tree_masks=[bits[0], None, bits[1]])
    prepared = prepare_batch(step, UploadBuffer(torch.device("cpu"), 64), torch.arange(64), graphs)
    inputs = graphs.tree_inputs[4]
    assert prepared.graph == (4, TREE_Q) and prepared.graph_tree and prepared.all_rows_sampled
    assert prepared.input_ids.data_ptr() == inputs.input_ids.data_ptr()  # the upload IS the graph's input
    assert inputs.input_ids.tolist() == list(range(13)) + [0] * 19 and inputs.positions[13:].eq(0).all()
    assert inputs.slot_mapping.tolist() == slots + [-1] * 19
    assert inputs.tree_mask.tolist() == bits[0] + [-1] + bits[1] + [-1] * 19
    assert inputs.cu_seqlens_q.tolist() == [0, 4, 5, 13, 13] and inputs.seq_lens.tolist() == seq_lens + [1]
    assert inputs.block_tables[3, 0].item() == 0
    assert prepared.metadata.block_tables.tolist() == [[1, 2, 3, -1, -1], [4, 5, -1, -1, -1], tables[2]]
    assert prepared.metadata.tree_mask.tolist() == inputs.tree_mask[:13].tolist()
    # without tree graphs the same step packs the same masks into the eager layout
    eager = prepare_batch(step, UploadBuffer(torch.device("cpu"), 64), torch.arange(64), None)
    assert eager.graph is None and eager.metadata.tree_mask.tolist() == inputs.tree_mask[:13].tolist()


def _tree_step(seqs, trees):
    """A verify step of seqs (each carrying len(tree) - 1 drafts) whose rows are the trees' nodes, laid out as
    TreeVerifier.prepare_step lays them: positions root + depth, the rows' ancestor bitmasks (None: a chain)."""
    step = build_step_input(ScheduledBatch(seqs=seqs, num_new_tokens=[1 + len(s.spec_token_ids) for s in seqs]),
                            BLOCK)
    masks, offset = [], 0
    for n, parents in zip(step.query_lens, trees):
        if parents is None:
            masks.append(None)
        else:
            tree = host_token_tree(parents)
            root = step.positions[offset]
            step.positions[offset:offset + n] = [root + d for d in tree.depth_list]
            masks.append(tree.row_bitmasks)
        offset += n
    step.tree_masks = masks
    return step


def _replay_equals_eager(model, config, device: torch.device, graphs, tol: float) -> None:
    """Three sequences with trees of 4, 1 (no tree: a decode row) and 8 nodes replay the tree graph of bucket 4
    (one padding sequence, 32 - 13 padding rows): hidden states and the KV cache equal the eager tree step's."""
    runner = ModelRunner(model, config, 24, BLOCK, device, torch.float32)
    with torch.inference_mode():
        graphs.capture()
    assert sorted(graphs.tree_graphs) == [1, 2, 4] and graphs.tree_query_len == TREE_Q
    seqs = []
    for i, n in enumerate((5, 9, 6)):
        seq = Sequence(str(i), [(7 * i + j) % 300 for j in range(n)], SamplingParams(temperature=0))
        seq.block_table = [(6 * i + j) % 24 for j in range(6)]
        seqs.append(seq)
    with torch.inference_mode():
        runner.forward(runner.prepare(ScheduledBatch(seqs=seqs, num_new_tokens=[s.num_tokens for s in seqs])))
    for s in seqs:
        s.num_computed_tokens = s.num_tokens
        s.append_token(11, 0.0)  # the prefill's sample: the root of this step's tree
    seqs[0].spec_token_ids, seqs[2].spec_token_ids = [3, 4, 5], [8, 9, 10, 11, 12, 13, 14]
    trees = [[-1, 0, 0, 1], None, [-1, 0, 1, 0, 3, 3, 1, 6]]
    with torch.inference_mode():
        snapshot = runner.kv_cache.storage.clone()
        eager_step = runner.prepare(_tree_step(seqs, trees))
        assert eager_step.graph is None and eager_step.metadata.tree_mask is not None
        eager = runner.forward(eager_step).clone()
        after_eager = runner.kv_cache.storage.clone()
        runner.kv_cache.storage.copy_(snapshot)
        runner.cuda_graphs = graphs
        step = runner.prepare(_tree_step(seqs, trees))
        assert step.graph == (4, TREE_Q) and step.graph_tree
        assert step.metadata.cu_seqlens_q.tolist() == [0, 4, 5, 13]
        assert step.metadata.tree_mask.tolist() == eager_step.metadata.tree_mask.tolist()
        inputs = graphs.tree_inputs[4]
        assert inputs.cu_seqlens_q.tolist() == [0, 4, 5, 13, 13]  # the padding sequence owns no rows
        assert inputs.slot_mapping[13:].eq(-1).all() and inputs.tree_mask[13:].eq(-1).all()
        replayed = runner.forward(step)
    assert graphs.num_tree_replays == 1 and replayed.shape == eager.shape == (13, config.hidden_size)
    torch.testing.assert_close(replayed, eager, rtol=tol, atol=tol)
    torch.testing.assert_close(runner.kv_cache.storage, after_eager, rtol=tol, atol=tol)
    assert torch.equal(runner.kv_cache.storage == 0, after_eager == 0)  # padding rows stored nothing
    # a tree of more rows than the graph holds runs as it would without tree graphs
    seqs[2].spec_token_ids = list(range(20, 28))
    with torch.inference_mode():
        big = runner.prepare(_tree_step(seqs, [trees[0], None, [-1] + list(range(8))]))
    assert big.graph is None and not big.graph_tree


def test_a_tree_step_replays_its_graph_as_the_eager_step_computes(model_and_config):
    model, config = model_and_config
    model.attention_backend = "triton"  # what CUDA graphs run (the interpreter here)
    try:
        graphs = host_graphs(model, 6, 6, BLOCK, config.hidden_size, torch.float32, torch.device("cpu"),
                             tree_query_len=TREE_Q, tree_max_batch=4)
        _replay_equals_eager(model, config, torch.device("cpu"), graphs, 1e-5)
    finally:
        model.attention_backend = "torch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_gpu_tree_step_replays_its_graph_as_the_eager_step_computes():
    """The same with real CUDA graphs: the replayed tree step's hidden states (the features a head drafts from) and
    KV cache are the eager tree step's."""
    from minillm.engine.cuda_graph import DecodeCUDAGraphs
    config = tiny_config(num_hidden_layers=2)
    with torch.device("cuda"):
        model = tiny_model(config)
    device = torch.device("cuda")
    graphs = DecodeCUDAGraphs(model, 6, 6, BLOCK, config.hidden_size, torch.float32, device,
                              tree_query_len=TREE_Q, tree_max_batch=4)
    _replay_equals_eager(model, config, device, graphs, 2e-3)  # cuBLAS may tile 13 and 32 rows differently


def _engine(model, config, spec, tree_graphs: bool):
    engine = LLMEngine(model, ByteTokenizer(), config,
                       EngineConfig(block_size=BLOCK, num_kv_blocks=64, max_model_len=64, max_num_seqs=2,
                                    speculative_config=spec), device="cpu")
    if tree_graphs:  # what model_runner.configure captures on a GPU, as host graphs
        runner = engine.runner
        graphs = host_graphs(runner.model, 2, 64 // BLOCK, BLOCK, config.hidden_size, runner.dtype, runner.device,
                             tree_query_len=tree_graph_batch(engine.engine_config)[0], sample=True)
        with torch.inference_mode():
            graphs.capture()
        runner.cuda_graphs = graphs
    return engine


PROMPTS = [[5, 6, 7, 5, 6, 7, 5, 6], [40, 41, 40, 41, 40]]


def _generate(model, config, spec, tree_graphs: bool):
    """Greedy tokens of PROMPTS (8 each) through the Triton path (the interpreter), and the engine."""
    model.attention_backend = "triton"  # what CUDA graphs run
    try:
        engine = _engine(model, config, spec, tree_graphs)
        runner, replayed = engine.runner, [None]
        forward, sample = runner.forward, runner._sample_on_device
        runner.forward = lambda prepared: replayed.__setitem__(0, prepared.graph_tree) or forward(prepared)
        runner._sample_on_device = lambda logits, specs, sampling, *rest: engine.__dict__.setdefault(
            "samples_after_tree_replay", []).append(replayed[0]) or sample(logits, specs, sampling, *rest)
        for i, prompt in enumerate(PROMPTS):
            engine.add_request(str(i), prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
        done = {}
        while engine.has_unfinished_requests():
            done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        assert engine.scheduler.block_manager.num_used_blocks == 0
        return done, engine
    finally:
        model.attention_backend = "torch"


@pytest.fixture(scope="module")
def plain(model_and_config):
    return _generate(*model_and_config, None, tree_graphs=False)[0]


@pytest.fixture(scope="module")
def medusa_dir(model_and_config, tmp_path_factory):
    """Random (untrained, each head different) Medusa heads for the tiny target, saved as train-heads does."""
    from minillm.speculative.heads import HeadConfig, save_heads
    from minillm.speculative.train_heads import initial_heads
    model, config = model_and_config
    head_config = HeadConfig.for_target("medusa", config, 3)
    heads = initial_heads(head_config, model)
    with torch.no_grad():
        for p in heads.parameters():
            p.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
    return str(save_heads(tmp_path_factory.mktemp("heads") / "medusa", heads, head_config))


@pytest.mark.parametrize("method", ["ngram_tree", "eagle_tree", "medusa_tree"])
def test_tree_methods_through_tree_graphs_equal_plain(model_and_config, plain, eagle_dir, medusa_dir, method):
    """Greedy tree speculation with every tree step that fits laid out in (host) tree graphs: the tokens plain
    decoding gives. eagle_tree drafts from the features the replayed forward left (the pre-norm hook's rows)."""
    spec = {"method": method, "num_speculative_tokens": 3}
    if method != "ngram_tree":
        spec.update(model=eagle_dir if method == "eagle_tree" else medusa_dir, num_tree_nodes=7)
    outputs, engine = _generate(*model_and_config, spec, tree_graphs=True)
    assert outputs == plain
    assert engine.runner.cuda_graphs.tree_query_len == (32 if method == "ngram_tree" else 8)
    assert engine.runner.cuda_graphs.num_tree_replays > 0 and engine.speculative.tree.num_nodes_scored > 0
    # tree graphs of at most SAMPLED_VERIFY_MAX_ROWS rows record the LM head and argmax too (on one rank)
    q = engine.runner.cuda_graphs.tree_query_len
    assert {key for key in engine.runner.cuda_graphs.sampled if key[2]} == {(b, q, True) for b in (1, 2)}
    assert not any(engine.__dict__.get("samples_after_tree_replay", []))  # greedy: nothing sampled after a replay
