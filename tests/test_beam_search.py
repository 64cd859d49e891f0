"""Beam search (minillm/beam_search.py, vLLM's LLM.beam_search): on a tiny random Llama with byte tokens, the beams
equal a by-hand beam search over full forwards (no KV cache), with and without EOS, through prefix caching; width 1
is greedy decoding; bad parameters are refused naming the field."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from minillm.beam_search import BeamSearchParams, beam_score
from minillm.llm import LLM
from minillm.sampling_params import ParamError, SamplingParams
from test_engine import make_engine, model_and_config  # noqa: F401  (fixture)
from tiny import EOS, one_thread  # noqa: F401  (one_thread: autouse fixture)

PROMPTS = [[5, 9, 200], [17] * 11, list(range(40, 59))]


def reference_beams(model, prompt: list[int], width: int, steps: int, eos: set[int], penalty: float):
    """The same rule by hand: every live beam's top 2 x width tokens of the raw log-softmax are candidates; EOS
    completes one; the best `width` live by log-probability go on; at the end complete and live ranked by score."""
    live, done = [([], 0.0)], []
    with torch.inference_mode():
        for _ in range(steps):
            found = []
            for tokens, total in live:
                ids = torch.tensor(prompt + tokens)
                logits = model.compute_logits(model(ids, torch.arange(len(ids)))[-1:])[0].float()
                top = torch.log_softmax(logits, -1).topk(2 * width)
                for lp, token in zip(top.values.tolist(), top.indices.tolist()):
                    (done if token in eos else found).append((tokens + [token], total + lp))
            live = sorted(found, key=lambda b: b[1], reverse=True)[:width]

    def score(beam):
        length = len(beam[0]) - (1 if beam[0] and beam[0][-1] in eos else 0)
        return beam[1] / max(length, 1) ** penalty
    return sorted(done + live, key=lambda b: (score(b), b[1]), reverse=True)[:width]


@pytest.mark.parametrize("ignore_eos, penalty", [(True, 1.0), (False, 0.0), (False, 1.5)])
def test_beams_equal_a_beam_search_by_hand(model_and_config, ignore_eos, penalty):
    model, config = model_and_config
    # a second EOS the model likes (greedy's second token after the first prompt), so that beams really complete
    likely = reference_beams(model, PROMPTS[0], 1, 2, set(), 0.0)[0][0][1]
    config = dataclasses.replace(config, eos_token_id=[EOS, likely])
    engine = make_engine((model, config), scheduling="continuous", kv_layout="paged", block_size=4,
                         enable_prefix_caching=True, max_num_seqs=8)
    llm = LLM.from_engine(engine)
    params = BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=ignore_eos, length_penalty=penalty)
    eos = set() if ignore_eos else {EOS, likely}
    for prompt, out in zip(PROMPTS, llm.beam_search(PROMPTS, params)):
        want = reference_beams(model, prompt, 3, 6, eos, penalty)
        assert [s.tokens for s in out.sequences] == [tokens for tokens, _ in want]
        for got, (_, total) in zip(out.sequences, want):
            assert got.cum_logprob == pytest.approx(total, abs=1e-4)
            assert got.score == pytest.approx(beam_score(got, eos, penalty))
            assert got.finish_reason == ("stop" if got.tokens[-1] in eos else "length")
            assert got.text == engine.tokenizer.decode(got.tokens[:-1] if got.finish_reason == "stop" else got.tokens)
    if not ignore_eos and penalty == 0:  # raw log-probability ranks a complete short beam first somewhere
        assert any(s.finish_reason == "stop" for out in llm.beam_search(PROMPTS, params) for s in out.sequences)
    assert not engine.has_unfinished_requests() and engine.scheduler.block_manager.num_used_blocks == 0


def test_width_one_is_greedy_decoding(model_and_config):
    engine = make_engine(model_and_config, scheduling="continuous", kv_layout="paged", block_size=4)
    llm = LLM.from_engine(engine)
    beams = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=1, max_tokens=7, ignore_eos=True))
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=7, ignore_eos=True))
    assert [b.sequences[0].tokens for b in beams] == [g.outputs[0].token_ids for g in greedy]


def test_beams_stop_at_the_context_and_bad_input_is_refused(model_and_config):
    llm = LLM.from_engine(make_engine(model_and_config))  # max_model_len 64
    out = llm.beam_search([list(range(1, 62))], BeamSearchParams(beam_width=2, max_tokens=10, ignore_eos=True))
    assert all(len(s.tokens) == 3 and s.finish_reason == "length" for s in out[0].sequences)
    for kw, param in [(dict(beam_width=0), "beam_width"), (dict(beam_width=11), "beam_width"),
                      (dict(max_tokens=0), "max_tokens"), (dict(ignore_eos=1), "ignore_eos"),
                      (dict(temperature=-1), "temperature"), (dict(length_penalty=float("nan")), "length_penalty")]:
        with pytest.raises(ParamError) as err:
            BeamSearchParams(**{"beam_width": 2, "max_tokens": 4, **kw})
        assert err.value.param == param
    with pytest.raises(ValueError, match="prompt 1"):
        llm.beam_search([[1, 2], list(range(64))], BeamSearchParams(beam_width=2, max_tokens=4))
    with pytest.raises(TypeError, match="BeamSearchParams"):
        llm.beam_search([[1, 2]], SamplingParams())


def test_beam_search_over_http_gives_the_offline_beams():
    """use_beam_search on /v1/completions and chat: the n choices are LLM.beam_search's beams, best first, for the
    same weights (serve_tiny's seeded random model); what beam search cannot honour is a 400 naming the field."""
    import httpx

    from minillm.beam_search import BeamSearchParams as Params
    from minillm.serve.server import ServerThread
    from serve_tiny import MODEL, tiny_app, tiny_engine

    offline = LLM.from_engine(tiny_engine(max_num_seqs=16)).beam_search(
        [[5, 9, 200]], Params(beam_width=3, max_tokens=5, length_penalty=0.5))[0].sequences
    app, _ = tiny_app(tiny_engine(max_num_seqs=16))
    with ServerThread(app) as srv:
        body = {"model": MODEL, "prompt": [5, 9, 200], "max_tokens": 5, "n": 3, "use_beam_search": True,
                "length_penalty": 0.5}
        response = httpx.post(srv.url + "/v1/completions", json=body, timeout=60)
        assert response.status_code == 200, response.text
        choices = response.json()["choices"]
        assert [(c["index"], c["text"], c["finish_reason"]) for c in choices] == \
            [(k, s.text, s.finish_reason) for k, s in enumerate(offline)]
        chat = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": [{"role": "user", "content": "x"}], "max_tokens": 4, "n": 2,
            "use_beam_search": True}).json()
        assert len(chat["choices"]) == 2 and all(isinstance(c["message"]["content"], str) for c in chat["choices"])
        for fields, param in [({"stream": True}, "stream"), ({"logprobs": 2}, "logprobs"), ({"n": 11}, "n"),
                              ({"stop": ["x"]}, "stop"), ({"guided_regex": "a+"}, "guided_regex"),
                              ({"use_beam_search": False}, "length_penalty")]:
            bad = httpx.post(srv.url + "/v1/completions", json={**body, **fields}, timeout=60)
            assert bad.status_code == 400 and bad.json()["error"]["param"] == param, (fields, bad.text)
