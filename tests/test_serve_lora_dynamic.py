"""Adapters loaded and unloaded while the server runs (vLLM's POST /v1/load_lora_adapter and /v1/unload_lora_adapter,
minillm/serve/serving_models.py): the routes exist only with the flag, a loaded adapter answers as LLM.generate with
it does, the refusals are vLLM's (status, type, message), ids are never reused, and unloading an adapter lets the
requests already running with it finish. The adapters, the offline LLM and the helpers are test_serve_lora's."""
from __future__ import annotations

import dataclasses
import json
from contextlib import contextmanager

import httpx
import pytest

from minillm.llm import LLM
from minillm.lora.adapter import random_adapter, save_adapter
from minillm.serve.server import ServerThread
from minillm.serve.serving_models import LoRAModulePath
from serve_tiny import CONFIG, MODEL, tiny_app, tiny_engine
from test_serve_lora import LORA, PROMPTS, _parse, completion_tokens, greedy, loras, offline, post  # noqa: F401
from tiny import one_thread  # noqa: F401 (autouse fixture)

LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"


@contextmanager
def serving(lora_modules=(), allow=True, **engine):
    """(url, the server's OpenAIServingModels) of a tiny LoRA server, runtime loading on unless allow=False."""
    app, _ = tiny_app(tiny_engine(**{**LORA, **engine}), lora_modules=list(lora_modules),
                      allow_runtime_lora_updating=allow)
    with ServerThread(app) as srv:
        yield srv.url, app.state.models


def load(url: str, name: str, path: str, **extra) -> httpx.Response:
    return httpx.post(url + LOAD, json={"lora_name": name, "lora_path": path, **extra}, timeout=60)


def unload(url: str, name: str) -> httpx.Response:
    return httpx.post(url + UNLOAD, json={"lora_name": name}, timeout=60)


def error(status: int, type_: str, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def not_found(model: str) -> dict:
    return error(404, "NotFoundError", f"The model `{model}` does not exist.", "model")


def complete(url: str, model: str, prompts=PROMPTS) -> list[list[int]]:
    body = post(url, "/v1/completions", model=model, prompt=prompts, max_tokens=8, temperature=0, ignore_eos=True,
                logprobs=0, return_tokens_as_token_ids=True)
    assert body["model"] == model
    return [completion_tokens(c) for c in sorted(body["choices"], key=lambda c: c["index"])]


def expected(offline, lora, prompts=PROMPTS) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in offline.generate(prompts, greedy(), lora_request=lora)]


def test_the_routes_exist_only_with_the_flag(loras):
    """As vLLM without VLLM_ALLOW_RUNTIME_LORA_UPDATING: the routes are not mounted (404, the adapter not read);
    the flag needs an engine with enable_lora."""
    with serving(allow=False) as (url, models):
        for path in (LOAD, UNLOAD):
            response = httpx.post(url + path, json={"lora_name": "sql", "lora_path": loras[0].lora_path})
            assert response.status_code == 404, response.text
        assert models.lora_requests == {}
    with pytest.raises(ValueError, match="allow_runtime_lora_updating needs an engine built with enable_lora=True"):
        tiny_app(tiny_engine(), allow_runtime_lora_updating=True)


def test_a_loaded_adapter_is_listed_and_answers_as_llm_generate(loras, offline):
    with serving() as (url, models):
        response = load(url, "sql", loras[0].lora_path)
        assert response.status_code == 200 and response.text == "Success: LoRA adapter 'sql' added successfully."
        assert response.headers["content-type"].startswith("text/plain")
        cards = httpx.get(url + "/v1/models").json()["data"]
        assert [c["id"] for c in cards] == [MODEL, "sql"]
        assert cards[1]["root"] == loras[0].lora_path and cards[1]["parent"] == MODEL
        assert httpx.get(url + "/v1/models/sql").json() == cards[1]
        assert models.lora_requests["sql"].lora_int_id == 1  # no --lora-modules: the first id
        answer = complete(url, "sql")
        assert answer == expected(offline, loras[0]) and answer != expected(offline, None)


def test_refused_loads_are_vllms_errors_and_change_nothing(loras, tmp_path):
    """Name problems are 400 InvalidUserInput; a directory without an adapter is vLLM's 404 NotFoundError ("No
    adapter found for"); an adapter this model cannot run is a 400 BadRequestError with the reason."""
    wide = tmp_path / "wide"
    save_adapter(random_adapter(dataclasses.replace(CONFIG, hidden_size=64), 4, targets=("o_proj",)), wide)
    sql, chat = loras[0].lora_path, loras[1].lora_path
    with serving(lora_modules=[LoRAModulePath("chat", chat)], max_lora_rank=4) as (url, models):
        cases = [
            (("chat", sql), 400, "InvalidUserInput", "The lora adapter 'chat' has already been loaded."),
            ((MODEL, sql), 400, "InvalidUserInput",
             f"The lora adapter '{MODEL}' cannot be loaded: it is the name of the base model this server serves."),
            (("", sql), 400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided."),
            (("x", ""), 400, "InvalidUserInput", "Both 'lora_name' and 'lora_path' must be provided."),
            (("x", str(tmp_path / "nope")), 404, "NotFoundError",
             f"Loading lora x failed: No adapter found for {tmp_path / 'nope'} ("),
            (("x", str(tmp_path)), 404, "NotFoundError",
             f"Loading lora x failed: No adapter found for {tmp_path} ('{tmp_path}' is not a PEFT adapter: "
             f"adapter_config.json is missing"),
            (("x", str(wide)), 400, "BadRequestError", "Loading lora x failed: LoRA adapter 'x' "),
            (("x", sql), 400, "BadRequestError", "rank 8 is above max_lora_rank=4"),
        ]
        for (name, path), status, type_, words in cases:
            response = load(url, name, path)
            assert response.status_code == status, (name, path, response.text)
            err = response.json()["error"]
            assert err["type"] == type_ and err["code"] == status and words in err["message"], err
        assert "trained for another model" in load(url, "x", str(wide)).json()["error"]["message"]
        inplace = load(url, "chat", chat, load_inplace=True)
        assert inplace.status_code == 400 and "load_inplace=true is not supported" in inplace.text
        missing = httpx.post(url + LOAD, json={"lora_name": "x"})
        assert missing.status_code == 400 and "lora_path" in missing.json()["error"]["message"]
        assert [c["id"] for c in httpx.get(url + "/v1/models").json()["data"]] == [MODEL, "chat"]
        assert list(models.lora_requests) == ["chat"]


def test_unloading_makes_the_name_unknown(loras, offline):
    """An adapter given at startup unloads too (as in vLLM); then its name is the unknown model's 404 everywhere,
    and a second unload, or one of a name never served, is vLLM's 404."""
    with serving(lora_modules=[LoRAModulePath(r.lora_name, r.lora_path) for r in loras]) as (url, _):
        response = unload(url, "sql")
        assert response.status_code == 200 and response.text == "Success: LoRA adapter 'sql' removed successfully."
        assert [c["id"] for c in httpx.get(url + "/v1/models").json()["data"]] == [MODEL, "chat"]
        for path, fields in [("/v1/completions", {"prompt": "x"}),
                             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})]:
            gone = httpx.post(url + path, json={"model": "sql", "max_tokens": 2, **fields})
            assert gone.status_code == 404 and gone.json() == not_found("sql")
        assert httpx.get(url + "/v1/models/sql").json() == not_found("sql")
        for name in ("sql", "gpt-4"):
            again = unload(url, name)
            assert again.status_code == 404
            assert again.json() == error(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
        assert complete(url, "chat") == expected(offline, loras[1])  # the other adapter is untouched


def test_ids_are_never_reused(loras, offline):
    """load x (sql's weights), run it (an engine slot and prefix-cache blocks now hold id 1's), unload x, load x
    again from chat's directory and y from sql's: each gets a new id, and x answers with chat's weights, not
    the slot's or the prefix cache's stale ones."""
    with serving(enable_prefix_caching=True) as (url, models):
        ids = []
        for name, lora in [("x", loras[0]), ("x", loras[1]), ("y", loras[0])]:
            if name in models.lora_requests:
                assert unload(url, name).status_code == 200
            assert load(url, name, lora.lora_path).status_code == 200
            ids.append(models.lora_requests[name].lora_int_id)
            assert complete(url, name) == expected(offline, lora), (name, lora.lora_name)
        assert ids == [1, 2, 3]
        assert expected(offline, loras[0]) != expected(offline, loras[1])


def test_concurrent_loads_of_one_name_register_it_once(loras, offline):
    """Four loads of one name at once (each reads the adapter in a thread, then registers it under the lock): one
    wins, the others are the duplicate's 400; /v1/models lists it once while other names load beside it. The
    engine's check is slowed so every load is past the first look at the name before any registers."""
    import time
    from concurrent.futures import ThreadPoolExecutor
    with serving() as (url, models):
        check = models.engine.check_lora_request
        models.engine.check_lora_request = lambda request: (time.sleep(0.1), check(request))[1]
        jobs = [("same", loras[i % 2].lora_path) for i in range(4)] + [(f"other{i}", loras[0].lora_path)
                                                                        for i in range(2)]
        with ThreadPoolExecutor(len(jobs)) as pool:
            codes = list(pool.map(lambda job: load(url, *job).status_code, jobs))
        assert sorted(codes[:4]) == [200] + [400] * 3 and codes[4:] == [200] * 2
        ids = [c["id"] for c in httpx.get(url + "/v1/models").json()["data"]]
        assert ids.count("same") == 1 and sorted(ids[1:]) == ["other0", "other1", "same"]
        lora = next(r for r in loras if r.lora_path == models.lora_requests["same"].lora_path)
        assert complete(url, "same") == expected(offline, lora)


def test_a_stream_running_with_an_adapter_finishes_after_it_is_unloaded(loras, offline):
    """Unloading stops new requests only: the stream started before it keeps its LoRARequest and ends as
    LLM.generate with the adapter would, while a new request naming it is already a 404."""
    prompt, max_tokens = PROMPTS[0], 40
    with serving(step_delay=0.01) as (url, _):
        assert load(url, "sql", loras[0].lora_path).status_code == 200
        body = {"model": "sql", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                "stream": True}
        texts, after_unload = [], 0
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                assert event["model"] == "sql"
                texts.append(event["choices"][0]["text"])
                if len(texts) == 1:
                    assert unload(url, "sql").status_code == 200
                    gone = httpx.post(url + "/v1/completions", json={**body, "stream": False})
                    assert gone.status_code == 404 and gone.json() == not_found("sql")
                else:
                    after_unload += 1
        assert after_unload > 5, "the stream ended before the unload: nothing was tested"
        whole = offline.generate([prompt], greedy(max_tokens), lora_request=loras[0])[0].outputs[0]
        assert "".join(texts) == whole.text


# -- the flag and the environment variables ------------------------------------------------------------------------
@pytest.fixture
def no_env(monkeypatch):
    for name in ("MINILLM_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize("argv, env, on", [
    ((), {}, None),
    (("--allow-runtime-lora-updating",), {}, "--allow-runtime-lora-updating"),
    ((), {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}, "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"),
    ((), {"MINILLM_ALLOW_RUNTIME_LORA_UPDATING": "1"}, "MINILLM_ALLOW_RUNTIME_LORA_UPDATING=1"),
    ((), {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "0", "MINILLM_ALLOW_RUNTIME_LORA_UPDATING": "no"}, None),
    (("--no-allow-runtime-lora-updating",), {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true"}, None),
])
def test_the_flag_and_the_environment(argv, env, on, no_env):
    from minillm.serve.cli import runtime_lora_updating
    for name, value in env.items():
        no_env.setenv(name, value)
    assert runtime_lora_updating(_parse(*argv)) == on


@pytest.mark.parametrize("via", ["flag", "env"])
def test_runtime_updating_without_enable_lora_stops_the_server_before_the_model_loads(via, no_env, capsys):
    import minillm.llm

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags were checked")
    no_env.setattr(minillm.llm, "LLM", no_load)
    if via == "env":
        no_env.setenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    args = _parse("--port", "0", *(["--allow-runtime-lora-updating"] if via == "flag" else []))
    assert args.func(args) == 2
    err = capsys.readouterr().err
    words = {"flag": "--allow-runtime-lora-updating (runtime LoRA loading) needs --enable-lora",
             "env": "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (runtime LoRA loading) needs --enable-lora"}[via]
    assert "minillm serve: error:" in err and words in err, err
    assert via == "flag" or "--no-allow-runtime-lora-updating" in err


def test_minillm_serve_mounts_the_routes_with_the_flag(no_env, capsys):
    """`minillm serve --enable-lora --allow-runtime-lora-updating` reaches build_app (a tiny engine in the model's
    place, the server's run() replaced by a look at the app's routes)."""
    import minillm.llm
    import minillm.serve.server
    routes = {}
    no_env.setattr(minillm.llm, "LLM", lambda *args, **kwargs: LLM.from_engine(tiny_engine(**LORA)))
    no_env.setattr(minillm.serve.server, "run",
                   lambda app, *args, **kwargs: routes.update({r.path: r for r in app.routes}))
    for flag, mounted in [("--allow-runtime-lora-updating", True), ("--no-allow-runtime-lora-updating", False)]:
        routes.clear()
        args = _parse("--port", "0", "--enable-lora", flag)
        assert args.func(args) == 0
        assert (LOAD in routes and UNLOAD in routes) == mounted, sorted(routes)
        assert ("/v1/unload_lora_adapter are on" in capsys.readouterr().err) == mounted
