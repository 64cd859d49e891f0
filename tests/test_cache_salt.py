"""cache_salt (vLLM's): a request shares prefix-cache blocks only with requests of the same salt, through the engine,
LLM.generate's prompt dicts, AsyncLLM and the OpenAI server (minillm/engine/prefix_cache.py, sequence_salt)."""
from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from minillm.engine.prefix_cache import sequence_salt
from minillm.llm import LLM
from minillm.sampling_params import SamplingParams
from test_engine import make_engine, model_and_config  # noqa: F401  (fixture)
from tiny import one_thread  # noqa: F401  (autouse fixture)

GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
PROMPT = list(range(10, 34))  # six full blocks of 4


def paged(model_and_config):  # noqa: F811
    return make_engine(model_and_config, scheduling="continuous", kv_layout="paged", block_size=4,
                       num_kv_blocks=64, enable_prefix_caching=True)


def cached_tokens(engine, prompt, salt=None):
    """Run one request to its end; (its tokens, prompt tokens it found in the prefix cache)."""
    hits = engine.scheduler.block_manager.prefix_cache_hits
    request_id = engine.add_request(None, prompt, GREEDY, cache_salt=salt)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished and out.request_id == request_id:
                tokens = out.outputs[0].token_ids
    return tokens, engine.scheduler.block_manager.prefix_cache_hits - hits


def test_only_requests_of_the_same_salt_share_blocks(model_and_config):  # noqa: F811
    engine = paged(model_and_config)
    first, hits = cached_tokens(engine, PROMPT, "tenant-a")
    assert hits == 0
    assert cached_tokens(engine, PROMPT, "tenant-b") == (first, 0)  # same prompt, another tenant: computed anew
    assert cached_tokens(engine, PROMPT) == (first, 0)  # no salt is a salt of its own
    assert cached_tokens(engine, PROMPT, "tenant-a") == (first, 23)  # the last token is always recomputed
    assert cached_tokens(engine, PROMPT) == (first, 23)
    engine.scheduler.block_manager.check_invariants()


def test_the_salt_is_the_same_in_every_process_and_combines_with_an_adapter():
    """The digest, not Python's per-process string hash: another interpreter (another PYTHONHASHSEED) gets the same
    salt, so a prefix cache shared across processes (the CPU tier, disaggregation) keys it alike."""
    code = "from minillm.engine.prefix_cache import sequence_salt; print(sequence_salt(None, 'tenant-a'))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout.strip()
    assert int(other) == sequence_salt(None, "tenant-a") != sequence_salt(None, "tenant-b")
    assert sequence_salt(7, None) == 7 and sequence_salt(None, None) is None
    assert len({sequence_salt(7, "tenant-a"), sequence_salt(8, "tenant-a"), sequence_salt(None, "tenant-a"), 7}) == 4


@pytest.mark.parametrize("salt, error, message", [("", ValueError, "non-empty string"),
                                                  (5, TypeError, "got int: 5")])
def test_a_bad_salt_is_refused_by_name(model_and_config, salt, error, message):  # noqa: F811
    engine = paged(model_and_config)
    with pytest.raises(error, match=message):
        engine.add_request(None, PROMPT, GREEDY, cache_salt=salt)
    llm = LLM.from_engine(engine)
    with pytest.raises(error, match=f"prompt 1: cache_salt must be.*{message}"):
        llm.generate([{"prompt_token_ids": PROMPT}, {"prompt_token_ids": PROMPT, "cache_salt": salt}], GREEDY)
    assert not engine.has_unfinished_requests()  # nothing was queued


def test_llm_generate_and_embed_read_the_salt_from_prompt_dicts(model_and_config):  # noqa: F811
    engine = paged(model_and_config)
    llm = LLM.from_engine(engine)
    bm = engine.scheduler.block_manager
    llm.generate({"prompt_token_ids": PROMPT, "cache_salt": "a"}, GREEDY)
    llm.generate([{"prompt_token_ids": PROMPT, "cache_salt": "b"}, PROMPT], GREEDY)
    assert bm.prefix_cache_hits == 0
    out, = llm.generate([{"prompt_token_ids": PROMPT, "cache_salt": "b"}], GREEDY)
    assert bm.prefix_cache_hits == 23 == out.num_cached_tokens  # (vLLM's RequestOutput field)
    with pytest.raises(ValueError, match="cache_salt"):  # where nothing reads it, it is refused by name
        llm.beam_search([{"prompt_token_ids": PROMPT, "cache_salt": "a"}], None)


def test_async_llm_passes_the_salt_on(model_and_config):  # noqa: F811
    from minillm.engine.async_llm import AsyncLLM
    engine = paged(model_and_config)

    async def main():
        llm = AsyncLLM(engine)
        await llm.start()
        try:
            for salt in ("x", "y", "x"):
                async for _ in llm.generate(PROMPT, GREEDY, cache_salt=salt):
                    pass
            with pytest.raises(ValueError, match="non-empty"):
                async for _ in llm.generate(PROMPT, GREEDY, cache_salt=""):
                    pass
        finally:
            await llm.shutdown()
    asyncio.run(main())
    assert engine.scheduler.block_manager.prefix_cache_hits == 23  # the third request only


def test_the_server_takes_cache_salt_on_completions_and_chat():
    import httpx
    from serve_tiny import tiny_app, tiny_engine
    engine = tiny_engine(enable_prefix_caching=True)
    app, _ = tiny_app(engine)
    transport = httpx.ASGITransport(app=app)
    prompt = "a prompt long enough to fill blocks"

    async def main():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                bodies = [{"prompt": prompt, "max_tokens": 2, "cache_salt": s} for s in ("t1", "t2", "t1")]
                answers = [await c.post("/v1/completions", json=b) for b in bodies]
                chat = await c.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "cache_salt": "t1"})
                empty = await c.post("/v1/completions", json={"prompt": prompt, "cache_salt": ""})
                number = await c.post("/v1/completions", json={"prompt": prompt, "cache_salt": 3})
                return answers, chat, empty, number
    answers, chat, empty, number = asyncio.run(main())
    assert [a.status_code for a in answers] == [200, 200, 200] and chat.status_code == 200
    assert empty.status_code == 400 and "cache_salt must be a non-empty string" in empty.json()["error"]["message"]
    assert number.status_code == 400 and "cache_salt" in number.json()["error"]["message"]
    hits = engine.scheduler.block_manager.prefix_cache_hits
    assert hits == (len(prompt) - 1) // 4 * 4  # only the third completion found the first's blocks


def test_usage_reports_cached_prompt_tokens_when_asked():
    """--enable-prompt-tokens-details: usage.prompt_tokens_details.cached_tokens (OpenAI's field), streamed too."""
    import json
    import httpx
    from serve_tiny import tiny_app, tiny_engine
    prompt = "a prompt long enough to fill blocks"
    for details in (False, True):
        app, _ = tiny_app(tiny_engine(enable_prefix_caching=True), enable_prompt_tokens_details=details)
        transport = httpx.ASGITransport(app=app)

        async def main():
            async with app.router.lifespan_context(app):
                async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                    body = {"prompt": prompt, "max_tokens": 2}
                    first, again = [(await c.post("/v1/completions", json=body)).json() for _ in range(2)]
                    stream = await c.post("/v1/completions", json={**body, "stream": True,
                                                                   "stream_options": {"include_usage": True}})
                    return first, again, stream.text
        first, again, stream = asyncio.run(main())
        if not details:
            assert "prompt_tokens_details" not in again["usage"]
            continue
        tokens = first["usage"]["prompt_tokens"]
        assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": (tokens - 1) // 4 * 4}
        last = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: {")][-1]
        assert last["usage"]["prompt_tokens_details"] == {"cached_tokens": (tokens - 1) // 4 * 4}


def test_the_responses_api_reports_cached_input_tokens():
    """/v1/responses: usage.input_tokens_details.cached_tokens always carries the prefix cache's hits (OpenAI's
    field), streamed or not."""
    import json
    import httpx
    from serve_tiny import tiny_app, tiny_engine
    app, _ = tiny_app(tiny_engine(enable_prefix_caching=True))
    transport = httpx.ASGITransport(app=app)
    body = {"input": "tell me a story about a long prompt", "max_output_tokens": 2}

    async def main():
        async with app.router.lifespan_context(app):
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as c:
                first, again = [(await c.post("/v1/responses", json=body)).json() for _ in range(2)]
                stream = await c.post("/v1/responses", json={**body, "stream": True})
                return first, again, stream.text
    first, again, stream = asyncio.run(main())
    assert first["usage"]["input_tokens_details"] == {"cached_tokens": 0}
    cached = again["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached == (first["usage"]["input_tokens"] - 1) // 4 * 4 > 0
    done = [json.loads(line[6:]) for line in stream.splitlines() if line.startswith("data: ")][-1]
    assert done["response"]["usage"]["input_tokens_details"] == {"cached_tokens": cached}
