"""Medusa, EAGLE and MTP heads (chapter 9): the hidden-state seam, self-distillation training, and the proposers
inside the engine.

On a tiny random Llama (tests/test_engine.py): heads trained a few steps on the target's own generations give,
for greedy requests, exactly the tokens of plain decoding, with plenty of KV blocks and under pressure (preemption),
and leave no block or proposer state behind; sampled requests draft from q and verify with the rejection rule, whose
output keeps the target's law (chi-square, as for the draft model). Shipped weights are found by the target's
fingerprint, or the error says how to train some.
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.scheduler_interface import ScheduledBatch
from minillm.engine.sequence import Sequence
from minillm.sampling_params import SamplingParams
from minillm.speculative import heads as heads_module
from minillm.speculative.head_kinds import load_heads, new_heads
from minillm.speculative.heads import HEAD_KINDS, HeadConfig, TargetParts, save_heads
from minillm.speculative.train_data import distill_data, record_features
from minillm.speculative.train_heads import HeadLoss, TrainOptions, feature_rms, initial_heads, train_heads
from test_engine import tiny_config, tiny_model
from test_speculative_engine import GREEDY, PROMPTS, SAMPLED, assert_nothing_held, pair_law_p_value, run
from tiny import ByteTokenizer, one_thread  # noqa: F401  (one_thread: autouse fixture)

K = 3


@pytest.fixture(scope="module")
def target():
    config = tiny_config(num_hidden_layers=3)
    return tiny_model(config), config


@pytest.fixture(scope="module")
def data(target):
    model, config = target
    return distill_data(model, ByteTokenizer(), config, num_prompts=6, max_new_tokens=24, seq_len=24,
                        device=torch.device("cpu"), dtype=torch.float32, max_prompt_tokens=40)


@pytest.fixture(scope="module")
def trained(target, data, tmp_path_factory):
    """kind -> (directory of heads trained 40 full-batch steps, loss history)."""
    model, config = target
    result = {}
    for kind in HEAD_KINDS:
        out = tmp_path_factory.mktemp(kind)
        history = train_heads(model, config, data, TrainOptions(kind, 40, num_heads=K, rows_per_step=64, lr=3e-3,
                                                                warmup=5), out)["history"]
        result[kind] = (out, history)
    return result


def spec(kind: str, directory, k: int = K) -> dict:
    return {"method": kind, "num_speculative_tokens": k, "model": str(directory)}


# -- the seam -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["medusa", "eagle"])  # post-norm, pre-norm
def test_runner_returns_hidden_states_only_when_asked(target, trained, kind):
    model, config = target
    engine = LLMEngine(model, ByteTokenizer(), config,
                       EngineConfig(block_size=4, num_kv_blocks=32, max_model_len=64, speculative_config=spec(
                           kind, trained[kind][0])))
    prompt = [7, 8, 9, 10, 11]
    seq = Sequence("a", prompt, SamplingParams(temperature=0, max_tokens=4))
    engine.scheduler.block_manager.allocate(seq)
    from minillm.engine.step_input import build_step_input
    step = build_step_input(ScheduledBatch([seq], [len(prompt)]), 4)
    assert engine.runner.execute_model(step).hidden_states is None  # not asked: nothing returned
    step.return_hidden_states = True
    rows = engine.runner.execute_model(step).hidden_states
    assert len(rows) == 1 and rows[0].shape == (len(prompt), config.hidden_size)
    pre_norm = record_features(model, torch.tensor([prompt]), torch.device("cpu"))[0]
    if kind == "eagle":  # the residual stream before the final norm, as the cache-less prefill records it
        torch.testing.assert_close(rows[0], pre_norm)
    else:  # what the LM head reads: the final norm of it
        torch.testing.assert_close(rows[0], model.model.norm(pre_norm))


# -- training -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_training_lowers_the_distillation_loss_and_saves_heads(target, data, trained, kind):
    model, config = target
    directory, history = trained[kind]
    heads, head_config = load_heads(kind, directory, config)
    loss = HeadLoss(kind, TargetParts(model), feature_rms(data))
    torch.manual_seed(0)  # EAGLE's feature noise
    with torch.no_grad():
        before = float(loss(initial_heads(head_config, model, feature_rms(data)), data.tokens, data.features)[0])
        torch.manual_seed(0)
        after = float(loss(heads, data.tokens, data.features)[0])
    assert after < 0.95 * before, (kind, before, after)  # on all the data, not one noisy batch
    saved = json.loads((directory / "config.json").read_text())
    assert saved["kind"] == kind and saved["target"] == {"hidden_size": 32, "num_hidden_layers": 3,
                                                         "vocab_size": 300}
    assert json.loads((directory / "loss.json").read_text())["history"][-1]["loss"] == history[-1]["loss"]
    assert head_config.num_heads == (1 if kind == "eagle" else K)
    agreement = saved["training"]["held_out_top1_agreement"]  # on the held-out tenth of the rows
    assert len(agreement) == (1 if kind == "eagle" else K) and all(0 <= a <= 1 for a in agreement)
    assert all(config.vocab_size not in p.shape for p in heads.parameters())  # no vocabulary matrix: the target's


def test_a_distilled_draft_keeps_only_its_own_weights_and_drafts_losslessly(target, data, tmp_path):
    """train-heads --kind draft saves the draft's layers and final norm, not the target's embedding and LM head;
    loading hands it the target's modules; in the engine it drafts and the tokens stay plain decoding's."""
    from safetensors import safe_open
    from minillm.speculative.draft_weights import WEIGHTS_FILE, load_draft
    model, config = target
    history = train_heads(model, config, data, TrainOptions("draft", 15, draft_num_layers=1, rows_per_step=64,
                                                            lr=3e-3, warmup=3), tmp_path)["history"]
    assert history[-1]["loss"] < history[0]["loss"]
    with pytest.raises(ValueError, match="draft_num_layers=4 exceeds the target's 3 layers"):
        train_heads(model, config, data, TrainOptions("draft", 1, draft_num_layers=4), tmp_path / "x")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["kind"] == "draft" and saved["num_layers"] == 1 and saved["training"]["steps"] == 15
    with safe_open(str(tmp_path / WEIGHTS_FILE), "pt") as f:
        names, norm = list(f.keys()), f.get_tensor("model.norm.weight")
    assert names and all(n.startswith(("model.layers.0.", "model.norm.")) for n in names)
    draft, draft_config = load_draft(tmp_path, model, config, "cpu", torch.float32)
    assert draft.model.embed_tokens is model.model.embed_tokens and draft.lm_head is model.lm_head
    assert draft_config.num_hidden_layers == 1 and torch.equal(draft.model.norm.weight, norm.float())
    assert heads_module.shipped_weights_dir("draft", config) is None  # any shipped draft is SmolLM2's
    plain, _ = run(target, None)
    outputs, engine = run(target, {"method": "draft_model", "num_speculative_tokens": K, "model": str(tmp_path)})
    assert {r: o.outputs[0].token_ids for r, o in outputs.items()} == \
        {r: o.outputs[0].token_ids for r, o in plain.items()}
    assert engine.speculative.metrics.num_verify_steps > 0
    assert_nothing_held(engine)
    other = tiny_config(num_hidden_layers=3, hidden_size=48)
    with pytest.raises(ValueError, match="a draft distilled from a target .* this target is"):
        load_draft(tmp_path, tiny_model(other), other, "cpu", torch.float32)


def test_the_draft_learns_only_where_it_will_draft(target):
    """draft_loss with `drafted`: the KL averaged over answer positions only; the target's law at a prompt
    position does not move it, at an answer position it does; no answer position gives 0, not nan."""
    from minillm.speculative.draft import independent_copy
    from minillm.speculative.train_losses import distill_kl, draft_loss
    model, config = target
    parts, draft = TargetParts(model), independent_copy(model, 1)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (2, 12), generator=g)
    features = torch.randn(2, 12, config.hidden_size, generator=g)
    drafted = torch.zeros(2, 12, dtype=torch.bool)
    drafted[:, 5:11] = True  # an answer from position 5 on, not the row's last position
    loss, _ = draft_loss(draft, parts, tokens, features, drafted)
    moved = features.clone()
    moved[:, 2] += 3.0  # a prompt position
    assert torch.allclose(draft_loss(draft, parts, tokens, moved, drafted)[0], loss)
    moved[:, 7] += 3.0  # an answer position
    assert not torch.allclose(draft_loss(draft, parts, tokens, moved, drafted)[0], loss)
    assert not torch.allclose(draft_loss(draft, parts, tokens, features)[0], loss)  # all positions: another mean
    logits, target_logits = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    per_row = torch.stack([distill_kl(logits[i:i + 1], target_logits[i:i + 1]) for i in range(3)])
    assert torch.allclose(distill_kl(logits, target_logits, torch.tensor([1.0, 0.0, 1.0])), per_row[[0, 2]].mean())
    assert distill_kl(logits, target_logits, torch.zeros(3)) == 0


def test_draft_model_takes_the_shipped_distilled_draft_unless_layers_are_named(target, tmp_path, monkeypatch):
    """{"method": "draft_model"} without model or draft_num_layers loads the shipped distilled draft when it was
    trained on this target; with draft_num_layers it copies that many of the target's layers (undistilled)."""
    from minillm.speculative import draft_weights
    from minillm.speculative.draft import independent_copy
    model, config = target
    draft_weights.save_draft(tmp_path / "draft", independent_copy(model, 1), config, {"steps": 0})
    monkeypatch.setattr(heads_module, "SHIPPED_DIR", tmp_path)
    _, shipped = run(target, {"method": "draft_model", "num_speculative_tokens": K})
    _, named = run(target, {"method": "draft_model", "num_speculative_tokens": K, "draft_num_layers": 2})
    assert len(shipped.speculative.proposer.model.model.layers) == 1  # the shipped one
    assert shipped.speculative.proposer.model.lm_head is model.lm_head  # borrowed, not copied
    assert len(named.speculative.proposer.model.model.layers) == 2
    assert named.speculative.proposer.model.model.layers[1] is not named.runner.model.model.layers[1]  # a copy


def test_a_deadline_shortens_training_to_the_steps_that_fit(target, data, tmp_path):
    import time
    from minillm.speculative.train_heads import TIMING_STEPS
    model, config = target
    result = train_heads(model, config, data, TrainOptions("medusa", 10_000, num_heads=2), tmp_path,
                         deadline=time.perf_counter())  # already past: only the timed steps and one more
    assert len(result["history"]) == TIMING_STEPS + 1
    assert json.loads((tmp_path / "config.json").read_text())["training"]["steps"] == TIMING_STEPS + 1


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_init_continues_from_the_saved_heads(target, data, trained, kind, tmp_path):
    """Fine-tuning a shipped head: one step at a negligible learning rate leaves the saved weights (not the fresh
    start of initial_heads), and config.json says where training continued from."""
    model, config = target
    directory, _ = trained[kind]
    options = TrainOptions(kind, 1, num_heads=K, rows_per_step=8, lr=1e-12, init=str(directory))
    train_heads(model, config, data, options, tmp_path)
    saved, head_config = load_heads(kind, directory, config)
    continued = dict(load_heads(kind, tmp_path, config)[0].named_parameters())
    fresh = dict(initial_heads(head_config, model, feature_rms(data)).named_parameters())
    assert all(torch.allclose(continued[n], p, atol=1e-6) for n, p in saved.named_parameters())
    assert any(not torch.allclose(fresh[n], p) for n, p in saved.named_parameters())  # a fresh start would fail
    assert json.loads((tmp_path / "config.json").read_text())["training"]["continued_from"] == str(directory)
    with pytest.raises(ValueError, match="init continues a head's training"):
        TrainOptions("draft", 1, init=str(directory))
    other = "eagle" if kind == "medusa" else "medusa"
    with pytest.raises(ValueError):  # a medusa directory cannot start an eagle head, nor the reverse
        train_heads(model, config, data, TrainOptions(other, 1, num_heads=K, init=str(directory)), tmp_path / "x")


def test_a_new_sample_seed_keeps_the_held_out_requests(target, data):
    """--sample-seed: new sampled answers for the same training prompts, the same greedy held-out requests."""
    model, config = target
    again = distill_data(model, ByteTokenizer(), config, num_prompts=6, max_new_tokens=24, seq_len=24,
                         device=torch.device("cpu"), dtype=torch.float32, max_prompt_tokens=40, sample_seed=7)
    assert torch.equal(again.held_out.tokens, data.held_out.tokens)
    assert not torch.equal(again.tokens, data.tokens)


def test_train_options_name_the_bad_value():
    with pytest.raises(ValueError, match="kind must be one of draft, medusa, eagle, mtp, got 'beam'"):
        TrainOptions("beam", 10)
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        TrainOptions("eagle", 0)


@pytest.mark.parametrize("lr", [float("inf"), float("nan"), 0.0, -1e-3, "1e-3", True])
def test_train_options_refuse_a_learning_rate_that_is_not_finite_and_positive(lr):
    """inf trained every weight to nan (only the CLI refused it); the rule lives in TrainOptions now."""
    with pytest.raises(ValueError, match=r"lr must be a finite number > 0, got "):
        TrainOptions("eagle", 10, lr=lr)


@pytest.mark.parametrize("kind, words", [("medusa", "num_heads"), ("mtp", "num_heads (mtp: the depth")])
def test_train_options_refuse_more_heads_than_the_engine_drafts(kind, words):
    """Medusa's K heads and MTP's D modules draft one token each: the engine verifies at most
    MAX_SPECULATIVE_TOKENS a step, so more could never be used (and were met only after the data was generated)."""
    from minillm.speculative.config import MAX_SPECULATIVE_TOKENS
    with pytest.raises(ValueError, match=rf"{re.escape(words)}.* must be an integer in \[1, {MAX_SPECULATIVE_TOKENS}\] "
                                         rf"\(MAX_SPECULATIVE_TOKENS.*\), got 1000"):
        TrainOptions(kind, 10, num_heads=1000)
    assert TrainOptions(kind, 10, num_heads=MAX_SPECULATIVE_TOKENS).num_heads == MAX_SPECULATIVE_TOKENS
    TrainOptions("eagle", 10, num_heads=1000)  # not read by eagle (one layer, run k times)


def test_cli_parses_train_heads():
    from minillm.cli import build_parser
    args = build_parser().parse_args(["train-heads", "--kind", "mtp", "--steps", "7", "--out", "x", "--tiny"])
    assert (args.kind, args.steps, args.out, args.tiny) == (["mtp"], 7, "x", True)
    assert build_parser().parse_args(["train-heads", "--kind", "medusa,eagle", "--out", "x"]).kind == \
        ["medusa", "eagle"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train-heads", "--kind", "medusa,beam", "--out", "x"])


def test_cli_trains_several_kinds_on_one_dataset(target, tmp_path, monkeypatch, capsys):
    """`minillm train-heads --kind medusa,eagle --tiny` end to end, the bundled model swapped for the tiny one."""
    import minillm.engine.worker
    import minillm.loader
    from minillm.cli import main
    model, config = target
    monkeypatch.setattr(minillm.loader, "load_model", lambda path: (config, iter(()), ByteTokenizer()))
    monkeypatch.setattr(minillm.engine.worker, "build_model", lambda *args, **kwargs: model)
    assert main(["train-heads", "--kind", "medusa,eagle", "--tiny", "--device", "cpu", "--time-budget", "600",
                 "--out", str(tmp_path)]) == 0
    for kind in ("medusa", "eagle"):
        assert json.loads((tmp_path / kind / "config.json").read_text())["training"]["steps"] == 4
    out = capsys.readouterr().out
    assert "medusa: 4 steps" in out and "eagle: 4 steps" in out
    assert all(p.requires_grad is False for p in model.parameters())  # the target stays frozen
    for p in model.parameters():
        p.requires_grad_(True)


@pytest.fixture
def tiny_cli(target, monkeypatch, capsys):
    """main(argv) -> (exit code, stderr) of `minillm train-heads` on the tiny target (config: 128 tokens of
    context), and a function writing untrained heads of a kind (and a size, a target) to a directory."""
    import minillm.engine.worker
    import minillm.loader
    from minillm.cli import main
    model, config = target
    monkeypatch.setattr(minillm.loader, "load_model", lambda path: (config, iter(()), ByteTokenizer()))
    monkeypatch.setattr(minillm.engine.worker, "build_model", lambda *args, **kwargs: model)

    def run(*argv):
        code = main(["train-heads", *argv, "--device", "cpu"])
        return code, capsys.readouterr().err

    def heads(directory, kind, num_heads=K, for_config=config):
        head_config = HeadConfig.for_target(kind, for_config, num_heads)
        return str(save_heads(directory, new_heads(head_config), head_config))
    return run, heads


def test_cli_checks_what_the_target_decides_before_generating(target, tiny_cli, tmp_path):
    """Each was a traceback (exit 1) after the generation, or after the training (--compare: the heads saved, the
    command 'failed'): now one line naming the flag, exit 2, before any data is generated."""
    run, heads = tiny_cli
    eagle, medusa = heads(tmp_path / "eagle", "eagle"), heads(tmp_path / "medusa", "medusa")
    other_target = heads(tmp_path / "other", "eagle", for_config=tiny_config(num_hidden_layers=2))
    out = str(tmp_path / "out")
    for argv, words in [
        (["--kind", "medusa", "--max-prompt-tokens", "32", "--max-new-tokens", "10000", "--num-prompts", "4"],
         "--max-new-tokens must be <= 96 (the model's context of 128 tokens less --max-prompt-tokens 32), "
         "got 10000"),
        (["--kind", "medusa", "--max-prompt-tokens", "500", "--max-new-tokens", "4", "--num-prompts", "4"],
         "--max-prompt-tokens must be <= 127 (the model's context of 128 tokens, less one for the answer), got 500"),
        (["--kind", "medusa", "--tiny", "--init", eagle], f"--init {eagle} holds eagle heads, medusa heads are "
                                                          f"needed here"),
        (["--kind", "eagle", "--tiny", "--compare", medusa], f"--compare {medusa} holds medusa heads, eagle heads"),
        (["--kind", "medusa", "--tiny", "--num-heads", "4", "--init", medusa],
         f"init={medusa} holds 3 medusa heads; num_heads must match it to continue them, got 4"),
        (["--kind", "eagle", "--tiny", "--init", other_target], "heads trained for a target with"),
        (["--kind", "eagle", "--tiny", "--compare", other_target], "heads trained for a target with"),
    ]:
        code, err = run(*argv, "--out", out)
        assert code == 2 and err.startswith("minillm train-heads: error: ") and words in err, (argv, err)
        assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists(), (argv, err)


def test_cli_turns_an_error_of_the_run_into_one_line(tiny_cli, tmp_path):
    """A refusal only the run can meet (here the time budget spent before a request was answered) is one line and
    exit 2, not a traceback."""
    run, _ = tiny_cli
    code, err = run("--kind", "medusa", "--tiny", "--time-budget", "1e-9", "--out", str(tmp_path))
    last = err.strip().splitlines()[-1]  # after the progress bars
    assert code == 2 and "Traceback" not in err, err
    assert last.startswith("minillm train-heads: error: generation answered 0 held-out and 0 training prompts"), err


# -- the engine -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("num_blocks", [64, 12])  # 12 blocks of 4 slots: the four requests preempt each other
def test_greedy_output_equals_plain_decoding(target, trained, kind, num_blocks):
    plain, _ = run(target, None, num_blocks)
    mixed = list(zip(PROMPTS, GREEDY)) + [(PROMPTS[1], SAMPLED)]
    outputs, engine = run(target, spec(kind, trained[kind][0]), num_blocks, requests=mixed)
    for rid, out in plain.items():
        assert outputs[rid].outputs[0].token_ids == out.outputs[0].token_ids, (kind, rid)
    assert len(outputs["4"].outputs[0].token_ids) == SAMPLED.max_tokens
    if num_blocks == 12:
        assert engine.scheduler.num_preemptions > 0
    assert_nothing_held(engine)
    metrics = engine.speculative.metrics
    assert metrics.num_verify_steps > 0 and metrics.num_draft_tokens > 0
    assert metrics.num_accepted_tokens > 0  # trained heads guess some of the target's tokens


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_drafting_ahead_equals_plain_decoding(target, trained, kind, monkeypatch):
    """SpeculativeConfig.draft_ahead (draft_ahead.py): proposals started at the end of the previous step, under
    preemption, give plain decoding's tokens, and proposals made ahead are used."""
    from minillm.speculative.draft_ahead import AheadProposal
    collected = []
    collect = AheadProposal.collect
    monkeypatch.setattr(AheadProposal, "collect", lambda self, ids: collected.append(ids) or collect(self, ids))
    plain, _ = run(target, None, 12)
    outputs, engine = run(target, {**spec(kind, trained[kind][0]), "draft_ahead": True}, 12)
    for rid, out in plain.items():
        assert outputs[rid].outputs[0].token_ids == out.outputs[0].token_ids, (kind, rid)
    assert_nothing_held(engine)
    assert engine.speculative.metrics.num_verify_steps > 0 and collected
    assert engine.speculative.proposer._landing.buffer is None  # a CPU: no pinned landing buffer


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_engine_drafts_are_what_the_training_forward_predicts(target, trained, kind):
    """The proposer's drafts after a prefill, from the features the engine recorded and its window, equal the heads
    run the way training runs them: over the whole recorded sequence, every draft recomputed from scratch (no K/V
    kept within the proposal). An off-by-one between a feature and its token would show here."""
    model, config = target
    _, engine = run(target, spec(kind, trained[kind][0]), requests=[])
    proposer, parts = engine.speculative.proposer, TargetParts(model)
    engine.add_request("r", [7, 8, 9, 10, 11, 12], SamplingParams(temperature=0, max_tokens=8))
    engine.step()  # the prefill: features f_0..f_5, and token x_6 sampled
    seq = engine.scheduler.running[0]
    drafts = proposer.propose([seq], [K])[0]
    x = torch.tensor(seq.token_ids)
    f = record_features(model, x[None, :-1], torch.device("cpu"))  # [1, 6, d]: f_p predicted x_{p+1}
    heads, expected = proposer.heads, []
    with torch.no_grad():
        if kind == "medusa":
            z = heads(parts.final_norm(f[:, -1]))
            expected = [int(parts.logits(z[k]).argmax()) for k in range(K)]
        elif kind == "eagle":
            feats, tokens = f, x[None, 1:]
            for _ in range(K):
                n = feats.shape[1]
                g, _ = heads(feats, parts.embed(tokens), torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool))
                expected.append(int(parts.logits(parts.final_norm(g[:, -1])).argmax()))
                feats = torch.cat([feats, g[:, -1:]], dim=1)
                tokens = torch.cat([tokens, torch.tensor([[expected[-1]]])], dim=1)
        else:
            hidden, n = f, f.shape[1]
            for k, module in enumerate(heads.mtp, start=1):
                tokens = torch.tensor(seq.token_ids[k:] + expected)[None]
                hidden = module(hidden, parts.embed(tokens), torch.arange(n)[None], torch.ones(1, n, dtype=torch.bool))
                expected.append(int(parts.logits(module.normed(hidden[:, -1])).argmax()))
    assert drafts == expected


def test_medusa_candidates_are_each_heads_top_k(target, trained):
    outputs, engine = run(target, spec("medusa", trained["medusa"][0]), requests=[])
    proposer = engine.speculative.proposer
    prompt = [7, 8, 9, 10, 11]
    engine.add_request("c", prompt, SamplingParams(temperature=0, max_tokens=8))
    engine.step()  # the prefill: its rows' features are recorded
    seq = engine.scheduler.running[0]
    (ids, probs), = proposer.propose_candidates([seq], topk=5)
    assert ids.shape == probs.shape == (K, 5)
    assert torch.all(probs[:, :-1] >= probs[:, 1:]) and torch.all(probs <= 1)
    assert ids[:, 0].tolist() == proposer.propose([seq], [K])[0]  # the chain drafts each head's top-1
    fresh = Sequence("new", [1, 2, 3], SamplingParams(temperature=0))
    assert proposer.propose_candidates([fresh], topk=2) == [None]  # no features recorded for it yet
    with pytest.raises(ValueError, match="topk must be an integer in"):
        proposer.propose_candidates([seq], topk=0)


@pytest.mark.parametrize("kind", HEAD_KINDS)
def test_sampled_drafts_keep_the_target_distribution(kind, tmp_path):
    """Random heads on a vocabulary-8 target at temperature 0.4: the 2nd and 3rd tokens (a verify step's) follow
    the target's exact pair law; the drafts came with their q (the rejection rule, not sample-and-match)."""
    vocab, n, temperature = 8, 400, 0.4
    config = tiny_config(vocab_size=vocab, num_hidden_layers=2)
    model = tiny_model(config, seed=5)
    head_config = HeadConfig.for_target(kind, config, 2)
    torch.manual_seed(1)
    head = new_heads(head_config)
    with torch.no_grad():  # random, not the identity start: q differs from p
        for p in head.parameters():
            p.add_(0.3 * torch.randn_like(p))
    save_heads(tmp_path, head, head_config)
    engine = LLMEngine(model, ByteTokenizer(), config,
                       EngineConfig(block_size=4, num_kv_blocks=4 * n, max_model_len=16, max_num_seqs=n,
                                    speculative_config=spec(kind, tmp_path, 2)), seed=11)
    params = SamplingParams(temperature=temperature, max_tokens=3, ignore_eos=True)
    prompt = [1, 2, 3]
    for i in range(n):
        engine.add_request(str(i), prompt, params)
    decoder, with_q = engine.speculative, []
    needs_logits = decoder.needs_logits

    def counting(batch):  # after propose, before the forward: how many sequences drafted with a q
        with_q.append(len(decoder._draft_probs))
        return needs_logits(batch)
    decoder.needs_logits = counting
    tokens = []
    while engine.has_unfinished_requests():
        tokens += [o.outputs[0].token_ids for o in engine.step() if o.finished]
    assert sum(with_q) > 0
    tokens = torch.tensor(tokens)

    assert pair_law_p_value(model, prompt, tokens, temperature) > 1e-3
    assert 0.05 < engine.speculative.metrics.acceptance_rate < 0.95  # accept and residual branches both ran
    assert_nothing_held(engine)


# -- weights: shipped, given, wrong -----------------------------------------------------------------------------
def test_without_model_the_shipped_weights_load_or_the_error_says_how_to_train(target, trained, tmp_path,
                                                                                 monkeypatch):
    model, config = target
    monkeypatch.setattr(heads_module, "SHIPPED_DIR", tmp_path)
    options = EngineConfig(block_size=4, num_kv_blocks=32, max_model_len=64,
                           speculative_config={"method": "eagle", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="minillm train-heads --kind eagle --out DIR"):
        LLMEngine(model, ByteTokenizer(), config, options)
    (tmp_path / "eagle").mkdir()
    for name in ("config.json", "heads.safetensors"):
        (tmp_path / "eagle" / name).write_bytes((trained["eagle"][0] / name).read_bytes())
    engine = LLMEngine(model, ByteTokenizer(), config, options)  # found by the target's fingerprint
    assert engine.speculative.proposer.method == "eagle"
    other = tiny_config(num_hidden_layers=2)  # another target: the shipped heads are not for it
    with pytest.raises(ValueError, match="no shipped eagle heads for this target"):
        LLMEngine(tiny_model(other), ByteTokenizer(), other, options)


def test_heads_for_another_target_or_kind_are_refused(target, trained):
    _, config = target
    with pytest.raises(ValueError, match="trained for a target with"):
        load_heads("eagle", trained["eagle"][0], tiny_config(num_hidden_layers=2))
    with pytest.raises(ValueError, match="holds 'mtp' heads, but speculative method 'medusa'"):
        load_heads("medusa", trained["mtp"][0], config)
    with pytest.raises(FileNotFoundError, match="no trained heads here"):
        load_heads("medusa", trained["mtp"][0] / "missing", config)


def test_the_shipped_draft_is_the_bundled_models_one_layer():
    """weights/draft: found for SmolLM2-135M by its fingerprint (no directory named), and holds one decoder layer and
    the final norm of its width, nothing of the vocabulary (the embedding and LM head are borrowed at load)."""
    import dataclasses
    from safetensors import safe_open
    bundled = dataclasses.replace(tiny_config(), vocab_size=49152, hidden_size=576, num_hidden_layers=30)
    directory = heads_module.shipped_weights_dir("draft", bundled)
    assert directory is not None and json.loads((directory / "config.json").read_text())["num_layers"] == 1
    with safe_open(str(directory / "draft.safetensors"), "pt") as tensors:
        names = set(tensors.keys())
        assert tensors.get_slice("model.norm.weight").get_shape() == [576]
    assert "model.norm.weight" in names and all(n.startswith(("model.layers.0.", "model.norm.")) for n in names)
    assert any(n.endswith("mlp.down_proj.weight") for n in names)


def test_shipped_weights_stay_under_40_mb():
    files = [p for p in heads_module.SHIPPED_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 40 * 2 ** 20
    for kind_dir in (p for p in heads_module.SHIPPED_DIR.glob("*") if p.is_dir()):
        assert kind_dir.name in (*HEAD_KINDS, "draft") and (kind_dir / "config.json").is_file()


# -- GPU: CUDA graphs capture the hidden-state buffer ------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("kind", [*HEAD_KINDS, "eagle_tree"])
def test_cuda_graph_steps_give_the_same_tokens_and_features(target, trained, kind):
    """On the GPU, verify steps replay CUDA graphs (token trees: tree graphs) and prefills piecewise ones, whose
    captured forwards also copy the pre-norm hidden states into a static buffer: greedy output equals plain
    decoding, and the drafts (hence acceptance: drafted from those features) match eager mode."""
    _, config = target
    with torch.device("cuda"):
        model = tiny_model(config)  # the same weights as the CPU target the heads were trained on

    def go(speculative_config, eager):
        engine = LLMEngine(model, ByteTokenizer(), config,
                           EngineConfig(block_size=16, num_kv_blocks=64, max_model_len=64, max_num_seqs=4,
                                        enforce_eager=eager, speculative_config=speculative_config), device="cuda")
        assert (engine.runner.cuda_graphs is None) == eager
        # prefills replay piecewise graphs, whose last piece records the pre-norm copy the heads read
        assert (engine.runner.piecewise_graphs is None) == eager
        for i, (prompt, params) in enumerate(zip(PROMPTS, GREEDY)):
            engine.add_request(str(i), prompt, params)
        outputs = {}
        while engine.has_unfinished_requests():
            outputs.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        rate = None if engine.speculative is None else engine.speculative.metrics.acceptance_rate
        if not eager and kind.endswith("_tree") and speculative_config is not None:
            assert engine.runner.cuda_graphs.num_tree_replays > 0  # tree verify steps replay tree graphs
        return outputs, rate

    heads = trained[kind.removesuffix("_tree")][0]  # eagle_tree: the EAGLE head's tree search, in a graph too
    plain, _ = go(None, False)
    eager, eager_rate = go(spec(kind, heads), True)
    graphs, graph_rate = go(spec(kind, heads), False)
    assert eager == plain and graphs == plain
    assert abs(eager_rate - graph_rate) < 0.05  # TF32 in the kernels may flip a near-tie draft, no more


def test_a_draft_model_with_a_shorter_context_than_max_model_len_is_refused(tmp_path):
    """A draft file whose context ends before max_model_len used to be accepted: once any sequence passed the
    draft's last position every proposal raised, and each failed step dropped the drafts of the whole batch
    (speculation silently stopped for every request). LLM refuses it, naming both numbers."""
    import shutil
    from minillm import LLM
    from tiny import tiny_qwen2_checkpoint
    target, draft = tmp_path / "target", tmp_path / "draft"
    target.mkdir()
    tiny_qwen2_checkpoint(target)
    shutil.copytree(target, draft)
    config = json.loads((draft / "config.json").read_text())
    (draft / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 16}))
    spec = {"method": "draft_model", "num_speculative_tokens": 2, "model": str(draft)}
    with pytest.raises(ValueError, match=r"draft model .* reads at most 16 positions \(max_position_embeddings\), "
                                         r"below max_model_len=64: set max_model_len <= 16"):
        LLM(str(target), max_model_len=64, speculative_config=spec)
    llm = LLM(str(target), max_model_len=16, speculative_config=spec)  # within the draft's context: accepted
    out = llm.generate([[3, 4, 5, 6]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4
