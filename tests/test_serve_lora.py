"""LoRA adapters over HTTP (chapter 10, minillm/serve/serving_models.py): `--enable-lora --lora-modules name=path`,
a request's `model` picks the adapter, /v1/models lists each one with its root and parent, an unknown model is
vLLM's 404. Every answer is checked against LLM.generate with the same LoRARequest on the same weights
(serve_tiny's seeded random model), so "the adapter was used" means "the tokens are the adapter's"."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import re

import httpx
import pytest

from minillm.llm import LLM
from minillm.lora import LoRARequest
from minillm.lora.adapter import random_adapter, save_adapter
from minillm.sampling_params import SamplingParams, choice_seed
from minillm.serve.cli import engine_options, register
from minillm.serve.server import ServerThread
from minillm.serve.serving_models import LoRAModulePath
from serve_tiny import CONFIG, MODEL, tiny_app, tiny_engine
from tiny import one_thread  # noqa: F401 (autouse fixture)

LORA = dict(enable_lora=True, max_loras=2, max_lora_rank=8)
PROMPTS = [[5, 9, 200], [17] * 7, [72, 105, 33, 10]]
NOT_FOUND = {"error": {"message": "The model `gpt-4` does not exist.", "type": "NotFoundError", "param": "model",
                       "code": 404}}


@pytest.fixture(scope="module")
def loras(tmp_path_factory) -> list[LoRARequest]:
    """Two PEFT adapters big enough (std 0.3) to change a greedy answer: all projections at rank 8, attention at 4."""
    root = tmp_path_factory.mktemp("adapters")
    save_adapter(random_adapter(CONFIG, 8, seed=1, std=0.3), root / "sql")
    save_adapter(random_adapter(CONFIG, 4, targets=("q_proj", "v_proj", "o_proj"), seed=2, std=0.3), root / "chat")
    return [LoRARequest("sql", 1, str(root / "sql")), LoRARequest("chat", 2, str(root / "chat"))]


@pytest.fixture(scope="module")
def url(loras):
    app, _ = tiny_app(tiny_engine(**LORA), lora_modules=[LoRAModulePath(r.lora_name, r.lora_path) for r in loras])
    with ServerThread(app) as srv:
        yield srv.url


@pytest.fixture(scope="module")
def offline():
    """The same weights driven by LLM.generate: the answers the server must give."""
    return LLM.from_engine(tiny_engine(**LORA))


def greedy(max_tokens: int = 8) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def post(url: str, path: str, **body) -> dict:
    response = httpx.post(url + path, json=body, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()


def completion_tokens(choice: dict) -> list[int]:
    """A completion choice's token ids (asked for with logprobs=0 and return_tokens_as_token_ids)."""
    return [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]


def test_models_lists_the_base_model_and_each_adapter(url, loras):
    cards = httpx.get(url + "/v1/models").json()["data"]
    assert [c["id"] for c in cards] == [MODEL, "sql", "chat"]  # the base model first: clients take data[0]
    assert cards[0]["parent"] is None and cards[0]["max_model_len"] == 64
    for card, lora in zip(cards[1:], loras):
        assert card["object"] == "model" and card["owned_by"] == "minillm"
        assert card["root"] == lora.lora_path and card["parent"] == MODEL
        assert httpx.get(url + f"/v1/models/{lora.lora_name}").json() == card
    missing = httpx.get(url + "/v1/models/gpt-4")
    assert missing.status_code == 404 and missing.json() == NOT_FOUND


def test_a_completion_with_an_adapter_is_llm_generate_with_it(url, loras, offline):
    """One batched request per model (three prompts): each choice's tokens are LLM.generate's with that model's
    LoRARequest; the adapters change the base model's answer."""
    answers = {}
    for model, lora in [(MODEL, None), *((r.lora_name, r) for r in loras)]:
        body = post(url, "/v1/completions", model=model, prompt=PROMPTS, max_tokens=8, temperature=0,
                    ignore_eos=True, logprobs=0, return_tokens_as_token_ids=True)
        assert body["model"] == model
        answers[model] = [completion_tokens(c) for c in sorted(body["choices"], key=lambda c: c["index"])]
        expected = [o.outputs[0].token_ids for o in offline.generate(PROMPTS, greedy(), lora_request=lora)]
        assert answers[model] == expected, model
    for lora in loras:
        assert answers[lora.lora_name] != answers[MODEL], f"adapter {lora.lora_name} changed nothing"


def test_chat_and_streams_with_an_adapter(url, loras, offline):
    """Chat runs the rendered conversation with the adapter; a streamed answer (chat and completions) is the
    non-streamed one, and every chunk names the adapter."""
    lora = loras[0]
    messages = [{"role": "user", "content": "Hi"}]
    chat = post(url, "/v1/chat/completions", model="sql", messages=messages, max_tokens=8, temperature=0,
                ignore_eos=True, logprobs=True, return_tokens_as_token_ids=True)
    rendered = list("<user>Hi\n<assistant>".encode())  # serve_tiny's TEMPLATE, byte tokens
    assert chat["model"] == "sql" and chat["usage"]["prompt_tokens"] == len(rendered)
    tokens = [int(t["token"].removeprefix("token_id:")) for t in chat["choices"][0]["logprobs"]["content"]]
    assert tokens == offline.generate([rendered], greedy(), lora_request=lora)[0].outputs[0].token_ids
    for path, fields in [("/v1/chat/completions", {"messages": messages}), ("/v1/completions", {"prompt": "abc"})]:
        whole = post(url, path, model="sql", max_tokens=8, temperature=0, ignore_eos=True, **fields)["choices"][0]
        with httpx.stream("POST", url + path, timeout=60, json={"model": "sql", "max_tokens": 8, "temperature": 0,
                                                                  "ignore_eos": True, "stream": True, **fields}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
        assert events and all(e["model"] == "sql" for e in events)
        if path == "/v1/completions":
            assert "".join(e["choices"][0]["text"] for e in events) == whole["text"]
        else:
            pieces = [e["choices"][0]["delta"].get("content") or "" for e in events]
            assert "".join(pieces) == whole["message"]["content"]


def test_n_choices_and_beam_search_use_the_adapter(url, loras, offline):
    """n=2 sampled choices are the adapter's, seeds seed + i; a width-1 beam search with the adapter is its greedy
    answer (each beam step is an engine request with the adapter)."""
    lora = loras[1]
    body = post(url, "/v1/completions", model="chat", prompt=PROMPTS[0], max_tokens=6, temperature=1.0, seed=7, n=2,
                ignore_eos=True, logprobs=0, return_tokens_as_token_ids=True)
    got = [completion_tokens(c) for c in sorted(body["choices"], key=lambda c: c["index"])]
    params = [SamplingParams(temperature=1.0, seed=choice_seed(7, i), max_tokens=6, ignore_eos=True) for i in range(2)]
    expected = [o.outputs[0].token_ids for o in offline.generate([PROMPTS[0]] * 2, params, lora_request=lora)]
    assert got == expected and got[0] != got[1]
    for model, adapter in [("chat", lora), (MODEL, None)]:
        beam = post(url, "/v1/completions", model=model, prompt=PROMPTS[2], max_tokens=6, n=1, use_beam_search=True,
                    ignore_eos=True)
        assert beam["model"] == model
        expected_text = offline.generate([PROMPTS[2]], greedy(6), lora_request=adapter)[0].outputs[0].text
        assert beam["choices"][0]["text"] == expected_text, model


def test_an_unknown_model_is_vllms_404_and_the_base_model_still_answers(url):
    for path, fields in [("/v1/completions", {"prompt": "x"}),
                         ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})]:
        missing = httpx.post(url + path, json={"model": "gpt-4", "max_tokens": 2, **fields}, timeout=60)
        assert missing.status_code == 404 and missing.json() == NOT_FOUND
        for model in ({"model": MODEL}, {}):  # the base model by name, or no model at all
            assert post(url, path, max_tokens=2, **model, **fields)["model"] == MODEL


def test_async_llm_checks_the_adapter_before_queueing_and_runs_with_it(loras, offline, tmp_path):
    """AsyncLLM.generate(lora_request=...): a bad adapter is a ValueError before anything is queued (read in a
    thread, off the event loop); a good one gives LLM.generate's tokens."""
    from minillm.engine.async_llm import AsyncLLM

    async def main() -> list[int]:
        llm = AsyncLLM(tiny_engine(**LORA))
        await llm.start()
        try:
            with pytest.raises(ValueError, match="is not a PEFT adapter"):
                async for _ in llm.generate(PROMPTS[0], greedy(), lora_request=LoRARequest("x", 9, str(tmp_path))):
                    pass
            assert llm.num_in_flight == 0 and not llm._pending_adds
            outs = [out async for out in llm.generate(PROMPTS[1], greedy(), lora_request=loras[0])]
            return outs[-1].outputs[0].token_ids
        finally:
            await llm.shutdown()
    expected = offline.generate([PROMPTS[1]], greedy(), lora_request=loras[0])[0].outputs[0].token_ids
    assert asyncio.run(main()) == expected


def test_engine_state_names_each_requests_adapter():
    from minillm.engine.async_llm import EngineSnapshot, SeqView
    from minillm.serve.app import state_json
    snap = EngineSnapshot(running=[SeqView("a", 3, 1, [0], "sql"), SeqView("b", 2, 0, [1])])
    assert [s["lora_name"] for s in state_json(snap, [], MODEL)["running"]] == ["sql", None]


# -- startup: the CLI's flags and build_app's checks ----------------------------------------------------------------
def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_lora_modules_flag_takes_both_of_vllms_forms():
    args = _parse("--enable-lora", "--max-loras", "2", "--max-lora-rank", "8", "--lora-modules", "sql=/a/sql",
                  '{"name": "chat", "path": "/a/chat", "base_model_name": "llama"}', "x=/p=q")
    assert args.lora_modules == [LoRAModulePath("sql", "/a/sql"), LoRAModulePath("chat", "/a/chat", "llama"),
                                 LoRAModulePath("x", "/p=q")]  # the path is everything after the first '='
    assert engine_options(args) == LORA
    assert _parse().lora_modules is None


@pytest.mark.parametrize("spec, words", [
    ("sql", "expected name=path (or a JSON object), got 'sql'"), ("=/a", "name must be a non-empty string"),
    ("sql=", "path must be a directory"), ('{"name": "sql"}', 'expected {"name": str, "path": str}'),
    ('{"name": "a", "path": "/a", "rank": 8}', 'optionally "base_model_name"'), ("{oops", "expected a JSON object"),
])
def test_a_bad_lora_module_spec_is_refused_by_the_parser(spec, words, capsys):
    with pytest.raises(SystemExit):
        _parse("--enable-lora", "--lora-modules", spec)
    err = capsys.readouterr().err
    assert "argument --lora-modules:" in err and words in err, err


@pytest.mark.parametrize("case", ["no --enable-lora", "twice", "served name", "not an adapter", "no directory"])
def test_lora_modules_fail_before_the_model_loads(case, loras, tmp_path, capsys, monkeypatch):
    import minillm.llm

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before --lora-modules was checked")
    monkeypatch.setattr(minillm.llm, "LLM", no_load)
    sql = f"sql={loras[0].lora_path}"
    argv, words = {
        "no --enable-lora": (["--lora-modules", sql], "--lora-modules needs --enable-lora"),
        "twice": (["--enable-lora", "--lora-modules", sql, f"sql={loras[1].lora_path}"], "'sql' is given twice"),
        "served name": (["--enable-lora", "--served-model-name", "sql", "--lora-modules", sql],
                        "'sql' is the --served-model-name of the base model"),
        "not an adapter": (["--enable-lora", "--lora-modules", f"x={tmp_path}"],
                           f"--lora-modules x={tmp_path}: '{tmp_path}' is not a PEFT adapter: adapter_config.json is "
                           f"missing"),
        "no directory": (["--enable-lora", "--lora-modules", f"x={tmp_path}/nope"], "does not exist"),
    }[case]
    args = _parse("--port", "0", *argv)
    assert args.func(args) == 2
    err = capsys.readouterr().err
    assert "minillm serve: error:" in err and words in err, err


def test_build_app_checks_each_adapter_against_the_model(loras, tmp_path):
    """What only the loaded model can tell: an adapter of another shape, a rank above max_lora_rank, an engine
    without enable_lora, an adapter named like the base model."""
    wide = dataclasses.replace(CONFIG, hidden_size=64)
    save_adapter(random_adapter(wide, 4, targets=("o_proj",)), tmp_path / "wide")
    cases = [
        (LORA, [LoRAModulePath("wide", str(tmp_path / "wide"))],
         re.escape(f"LoRA module wide={tmp_path / 'wide'}: ") + ".*trained for another model"),
        ({**LORA, "max_lora_rank": 4}, [LoRAModulePath("sql", loras[0].lora_path)], "rank 8 is above max_lora_rank=4"),
        ({}, [LoRAModulePath("sql", loras[0].lora_path)], "without enable_lora=True .*add --enable-lora"),
        (LORA, [LoRAModulePath(MODEL, loras[0].lora_path)], f"'{MODEL}' is the served base model's name"),
    ]
    for options, modules, words in cases:
        with pytest.raises(ValueError, match=words):
            tiny_app(tiny_engine(**options), lora_modules=modules)
