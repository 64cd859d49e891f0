"""The step path's host<->device budget (issue 14): one packed upload, one download, no other sync per step.

Counted on the CPU by minillm.bench.step_transfers (the engine on a virtual device whose tensors are followed by a
TorchFunctionMode), for every kind of step: prefill, plain decode (greedy, sampled, with logprobs), the speculative
verify step, and the decode and verify steps that replay CUDA graphs. Then the pieces: the packed upload and the
one-transfer download round-trip their values, a graph step laid out in the graph's static inputs replays to the
eager forward's hidden states with harmless padding rows, and the sampler's host hints change nothing.

Speculative steps of the head proposers (EAGLE chain and tree): as shipped the proposal is drafted when the engine
asks, before the scheduler, so the step adds to the budget one upload (the windows' tokens and lengths) and one
download of the drafts, both before the engine's own. With SpeculativeConfig.draft_ahead the proposal for step N+1
starts at the end of step N (minillm/speculative/draft_ahead.py): the same upload and a *non-blocking* download of
the drafts, started there and collected without waiting, so the host's one wait per step stays the verify step's
download.
"""
from __future__ import annotations

import pytest
import torch

from minillm.bench.step_transfers import (STEP_BUDGET, StepTransfers, VIRTUAL_DEVICE, count_scenario, host_graphs,
                                         tiny_llama)
from minillm.config import EngineConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.loader.no_tokenizer import NoTokenizer
from minillm.engine.model_runner import ModelRunner
from minillm.engine.prepared_batch import prepare_batch
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.engine.step_buffers import FieldLayout, UploadBuffer, download
from minillm.engine.step_input import SamplingSpec, StepInput
from minillm.layers.sampler import Sampler, _runs
from minillm.sampling_params import SamplingParams
from test_engine import tiny_config, tiny_model
from tiny import one_thread  # noqa: F401  (one_thread: autouse fixture)


@pytest.mark.parametrize("scenario", ["prefill", "decode", "decode_sampled", "decode_logprobs", "verify",
                                      "decode_graph", "verify_graph"])
def test_one_upload_one_download_per_step(scenario):
    counter = count_scenario(scenario)
    assert counter.counts() == STEP_BUDGET, f"{scenario} step:\n{counter.report()}"


def count_head_step(method: str, tmp_path, batch: int = 2, k: int = 3, ahead: bool = True) -> StepTransfers:
    """One verify step of an EAGLE engine (random heads over the tiny Llama), counted after two steps that record
    the features (and, ahead, start drafting ahead)."""
    from minillm.speculative.head_kinds import new_heads
    from minillm.speculative.heads import HeadConfig, save_heads
    model, config = tiny_llama()
    torch.manual_seed(0)
    head_config = HeadConfig.for_target("eagle", config, k)
    save_heads(tmp_path, new_heads(head_config), head_config)
    spec = {"method": method, "num_speculative_tokens": k, "model": str(tmp_path), "draft_ahead": ahead}
    with StepTransfers(model) as counter:
        engine = LLMEngine(model, NoTokenizer(), config,
                           EngineConfig(max_model_len=128, max_num_seqs=batch, block_size=16, num_kv_blocks=24,
                                        max_num_batched_tokens=128, speculative_config=spec),
                           device=VIRTUAL_DEVICE, dtype=torch.float32)
        eagle = engine.speculative.proposer
        eagle = getattr(eagle, "heads", eagle) if method == "eagle_tree" else eagle
        for module in (eagle.heads, eagle.fused):  # the heads' weights live on the device too
            counter.mark_device(*module.parameters(), *module.buffers(),
                                *(v for m in module.modules() for v in vars(m).values() if isinstance(v, torch.Tensor)))
        for i in range(batch):
            engine.add_request(str(i), [(7 * i + j) % 256 for j in range(9 + 3 * i)],
                               SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
        engine.step()  # the prefill records the prompts' features and drafts ahead
        engine.step()  # the first verify step
        verify_steps = engine.speculative.metrics.num_verify_steps
        counter.reset()
        engine.step()
        assert engine.speculative.metrics.num_verify_steps == verify_steps + batch
    return counter


@pytest.mark.parametrize("method", ["eagle", "eagle_tree"])
def test_a_head_proposer_step_waits_once_and_drafts_ahead(method, tmp_path):
    counter = count_head_step(method, tmp_path)
    speculative = [e for e in counter.events if e.where.startswith("minillm/speculative/") and not e.in_forward]
    engine = [e for e in counter.events if not e.where.startswith("minillm/speculative/") and not e.in_forward]
    # the proposer: the windows' upload and the drafts' non-blocking copy, both at the end of the step
    assert [(e.kind, e.where.split(":")[0]) for e in speculative] == [
        ("h2d", "minillm/speculative/head_proposer.py"), ("d2h", "minillm/speculative/draft_ahead.py")], \
        counter.report()
    assert counter.events.index(speculative[0]) > max(counter.events.index(e) for e in engine)
    # the engine: its step budget; a tree step may add the previous tree's KV slot moves (kv_cache.copy_slots)
    slot_moves = [e for e in engine if "copy_slots" in e.where]
    assert {k: sum(e.kind == k for e in engine if e not in slot_moves) for k in STEP_BUDGET} == STEP_BUDGET, \
        counter.report()
    assert method == "eagle_tree" or not slot_moves


@pytest.mark.parametrize("method", ["eagle", "eagle_tree"])
def test_a_head_proposer_step_drafts_when_asked_by_default(method, tmp_path):
    counter = count_head_step(method, tmp_path, ahead=False)
    speculative = [e for e in counter.events if e.where.startswith("minillm/speculative/") and not e.in_forward]
    engine = [e for e in counter.events if not e.where.startswith("minillm/speculative/") and not e.in_forward]
    # the proposer: the windows' upload and the drafts' download, both before the step's own transfers
    assert [(e.kind, e.where.split(":")[0]) for e in speculative] == [
        ("h2d", "minillm/speculative/head_proposer.py"), ("d2h", "minillm/speculative/" +
                                                          ("head_proposer.py" if method == "eagle" else "eagle.py"))], \
        counter.report()
    assert counter.events.index(speculative[-1]) < min(counter.events.index(e) for e in engine)
    slot_moves = [e for e in engine if "copy_slots" in e.where]
    assert {k: sum(e.kind == k for e in engine if e not in slot_moves) for k in STEP_BUDGET} == STEP_BUDGET, \
        counter.report()


def test_the_counter_sees_what_a_gpu_would_copy_or_wait_for():
    weight = torch.nn.Linear(4, 4)
    with StepTransfers(weight) as counter:
        x = torch.tensor([1.0, 2.0, 3.0, 4.0])  # host
        y = weight(x.to(VIRTUAL_DEVICE))  # one h2d; y on the device
        z = torch.tensor([0, 1], device=y.device)  # h2d: .device of a device tensor is the device
        y[[0, 1]]  # a Python index list is uploaded: h2d
        y[z].sum().item()  # d2h
        bool(y[0] > 0)  # d2h
        y.nonzero()  # sync
        x.tolist()  # host: nothing
        torch.arange(3, device=VIRTUAL_DEVICE) + 1  # created on the device: nothing
    assert counter.counts() == {"h2d": 3, "d2h": 2, "sync": 1}, counter.report()


def test_upload_and_download_round_trip():
    layout = FieldLayout()
    layout.add("ids", torch.int64, (5,))
    layout.add("lens", torch.int32, (3,))
    layout.add("table", torch.int32, (2, 3))
    layout.add("temps", torch.float32, (2,))
    assert all(offset % 8 == 0 for offset, _, _ in layout.fields.values())
    buffer = UploadBuffer(torch.device("cpu"), 16)  # too small: reserve grows it
    buffer.reserve(layout.end)
    values = {"ids": [5, -1, 2**40, 0, 7], "lens": [1, 2, 3], "table": [[4, 5, -1], [6, 7, 8]], "temps": [0.5, 0.0]}
    for name, v in values.items():
        buffer.host_view(*layout.fields[name])[:] = v
    buffer.upload(layout.end)
    views = buffer.views(layout)
    for name, v in values.items():
        assert views[name].tolist() == v and views[name].dtype == layout.fields[name][1]
    assert buffer.views(layout)["ids"] is views["ids"]  # cached: the same step shape makes no new views
    with pytest.raises(ValueError, match="fixed buffer holds"):
        UploadBuffer(torch.device("cpu"), 8, growable=False).reserve(64)
    parts = [torch.tensor([3, 1, 4]), torch.tensor([[-0.25, 1e-30]]), torch.tensor([7], dtype=torch.int32)]
    back = download(parts)
    assert [b.tolist() for b in back] == [p.tolist() for p in parts]
    assert [b.dtype for b in back] == [torch.int64, torch.float32, torch.int64]


def test_sampler_host_hints_and_runs():
    assert _runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (5, 7), (9, 10)] and _runs([]) == []
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(0))
    temps = torch.tensor([0.0, 0.7, 1.0, 0.0, 1.3])
    top_ks = torch.tensor([-1, 5, -1, 3, 10])
    top_ps = torch.tensor([1.0, 0.9, 0.8, 1.0, 1.0])
    gens = [None, torch.Generator().manual_seed(3), None, None, torch.Generator().manual_seed(4)]

    def draw(**hints):
        for g, seed in zip(gens, (None, 3, None, None, 4)):
            if g is not None:
                g.manual_seed(seed)
        return Sampler()(logits, temps, top_ks, top_ps, gens, torch.Generator().manual_seed(9), **hints)
    assert torch.equal(draw(), draw(all_greedy=False, use_top_k=True, use_top_p=True))
    greedy = Sampler()(logits, torch.zeros(5), top_ks, top_ps, all_greedy=True)
    assert torch.equal(greedy, logits.argmax(-1))


def test_graph_step_is_laid_out_in_the_static_inputs_and_replays_the_eager_forward():
    config = tiny_config()
    model = tiny_model(config)
    block_size, num_blocks = 4, 24
    runner = ModelRunner(model, config, num_blocks, block_size, torch.device("cpu"), torch.float32)
    seqs = []
    for i, n in enumerate((3, 9, 6)):  # batch 3 replays the graph of 4 with one padding row
        seq = Sequence(str(i), [(7 * i + j) % 300 for j in range(n)], SamplingParams())
        seq.block_table = [(5 * i + j) % num_blocks for j in range(3)]
        seqs.append(seq)
    with torch.inference_mode():
        runner.forward(runner.prepare(ScheduledBatch(seqs=seqs, num_new_tokens=[s.num_tokens for s in seqs])))
        # decode through the graph path's kernels (the interpreter on a CPU); the torch path would read the
        # Python lengths a graph freezes at capture
        model.attention_backend = "triton"
        for s in seqs:
            s.num_computed_tokens = s.num_tokens
            s.append_token(11, 0.0)
        decode = ScheduledBatch(seqs=seqs, num_new_tokens=[1, 1, 1])
        snapshot = runner.kv_cache.storage.clone()
        eager = runner.forward(runner.prepare(decode)).clone()
        runner.kv_cache.storage.copy_(snapshot)
        graphs = host_graphs(model, 4, 8, block_size, config.hidden_size, torch.float32, torch.device("cpu"))
        graphs.buckets = [4]  # capture only the graph this step replays (the interpreter is slow)
        graphs.capture()
        runner.cuda_graphs = graphs
        prepared = runner.prepare(decode)
        assert prepared.graph == (4, 1) and prepared.all_rows_sampled
        inputs = graphs.inputs[4, 1]
        assert prepared.input_ids.data_ptr() == inputs.input_ids.data_ptr()  # the upload IS the graph's input
        assert inputs.slot_mapping[3].item() == -1 and inputs.seq_lens[3].item() == 1  # the padding row
        assert inputs.block_tables[3, 0].item() == 0
        assert prepared.metadata.block_tables.tolist() == [s.block_table for s in seqs]
        replayed = runner.forward(prepared)
    torch.testing.assert_close(replayed, eager, rtol=1e-5, atol=1e-5)


def test_graph_padding_rows_are_valid_whatever_the_shared_buffer_held():
    """Every captured shape shares one input buffer, so a padding row's bytes may hold another layout's numbers:
    the upload must rewrite each one a replay reads (slot -1, seq_len q_len, block 0 for every block its q_len
    keys span; here q_len 8 over blocks of 4: two)."""
    graphs = host_graphs(torch.nn.Identity(), 4, 6, 4, 8, torch.float32, torch.device("cpu"), query_lens=(1, 8))
    graphs.graphs = {4: {8: None}}  # plan() only asks whether the graph exists; nothing is replayed here
    graphs.upload.host.fill_(0x7F)
    graphs.upload.device_bytes.fill_(0x7F)
    tables = [[1, 2, 3], [4, 5, 6], [7, 8, 9, 10, 11]]
    seq_lens = [10, 12, 20]
    positions = [p for n in seq_lens for p in range(n - 8, n)]
    slots = [t[p // 4] * 4 + p % 4 for t, n in zip(tables, seq_lens) for p in range(n - 8, n)]
    step = StepInput(input_ids=list(range(24)), positions=positions, slot_mapping=slots, query_lens=[8, 8, 8],
                     seq_lens=seq_lens, block_tables=tables, num_sampled=[8, 8, 8],
                     sampling=[SamplingSpec(str(i), 0.0, -1, 1.0, None) for i in range(3)], block_size=4)
    prepared = prepare_batch(step, UploadBuffer(torch.device("cpu"), 64), torch.arange(64), graphs)
    inputs = graphs.inputs[4, 8]
    assert prepared.graph == (4, 8) and prepared.input_ids.tolist() == list(range(24))
    assert inputs.slot_mapping.tolist() == slots + [-1] * 8 and inputs.seq_lens.tolist() == seq_lens + [8]
    assert inputs.input_ids[24:].tolist() == [0] * 8 and inputs.positions[24:].tolist() == [0] * 8
    assert inputs.block_tables[3, :2].tolist() == [0, 0]
    assert prepared.metadata.block_tables.tolist() == [[1, 2, 3, -1, -1], [4, 5, 6, -1, -1], tables[2]]


def test_verify_graphs_sample_in_the_replay_and_match_the_eager_engine():
    """A chain verify step (q_len 1 + k, every row sampled) replayed by a graph of the host stand-in takes its
    logits and greedy tokens from the replay, as a decode graph does: the runner samples nothing after it, and the
    greedy outputs are the eager engine's."""
    from minillm.bench.step_transfers import attach_host_graphs, build_engine, force_drafts
    model, config = tiny_llama()
    model.attention_backend = "triton"  # (interpreted) kernels read lengths from tensors, as a replay needs
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompts = [[(5 * i + j) % 200 for j in range(7 + 4 * i)] for i in range(3)]

    def generate(graphs: bool):
        engine = build_engine(model, config, torch.device("cpu"), max_num_seqs=4, num_speculative_tokens=3,
                              enforce_eager=not graphs)
        if graphs:
            attach_host_graphs(engine)
            shapes = engine.runner.cuda_graphs.sampling_shapes
            assert {(1, 4, False), (2, 4, False), (4, 4, False), (4, 1, False)} <= shapes  # decode and verify
        force_drafts(engine)
        runner, eager_samples, replayed = engine.runner, [], [None]
        sample, forward = runner._sample_on_device, runner.forward
        runner.forward = lambda prepared: replayed.__setitem__(0, prepared.graph) or forward(prepared)
        runner._sample_on_device = lambda logits, specs, sampling, *rest: eager_samples.append(replayed[0]) or \
            sample(logits, specs, sampling, *rest)
        for i, prompt in enumerate(prompts):
            engine.add_request(str(i), prompt, params)
        done = {}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
        assert engine.speculative.metrics.num_verify_steps > 0
        return done, eager_samples, runner.forward_counts["graph"]

    eager, eager_samples, _ = generate(graphs=False)
    replayed, graph_samples, graph_steps = generate(graphs=True)
    assert replayed == eager
    assert graph_steps > 0 and any(graph is None for graph in eager_samples)
    # after a graph replay (decode or verify) the runner sampled nothing: only eager steps (prefills) are left
    assert graph_samples and all(graph is None for graph in graph_samples), graph_samples
