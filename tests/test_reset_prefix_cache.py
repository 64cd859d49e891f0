"""reset_prefix_cache, vLLM's (LLMEngine, LLM, AsyncLLM, and the server's POST /reset_prefix_cache in dev mode):
after it no request reuses K/V cached before, outputs do not change, and requests in flight finish as they would
have. The block manager's side is tests/test_block_manager.py's; the disaggregated engine's, tests/test_disagg.py's."""
from __future__ import annotations

import asyncio

import httpx
import pytest

from minillm.llm import LLM
from minillm.sampling_params import SamplingParams
from minillm.serve.server import ServerThread
from serve_tiny import tiny_app, tiny_engine
from test_engine import make_engine, model_and_config  # noqa: F401  (fixture)
from tiny import one_thread  # noqa: F401  (autouse fixture)

PROMPT = list(range(40, 60))
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def test_llm_reset_prefix_cache(model_and_config):
    llm = LLM.from_engine(make_engine(model_and_config, scheduling="continuous", kv_layout="paged", block_size=4,
                                      enable_prefix_caching=True))
    block_manager = llm.llm_engine.scheduler.block_manager
    first = llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids
    assert llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids == first
    hits = block_manager.prefix_cache_hits
    assert hits > 0
    # a request in flight keeps its blocks and finishes as it would have; the cache is empty after the reset
    engine = llm.llm_engine
    engine.add_request("running", PROMPT, GREEDY)
    engine.step()
    assert llm.reset_prefix_cache() and block_manager.prefix_cache.entries() == {}
    done = {}
    while engine.has_unfinished_requests():
        done.update((o.request_id, o) for o in engine.step() if o.finished)
    assert done["running"].outputs[0].token_ids == first
    assert block_manager.prefix_cache_hits == hits + 19  # the request before the reset hit its whole prompt
    assert llm.generate([PROMPT], GREEDY)[0].outputs[0].token_ids == first
    assert block_manager.prefix_cache_hits == hits + 19  # after it, nothing: blocks cached since "running" only
    block_manager.check_invariants()


def test_an_engine_without_a_prefix_cache_says_so(model_and_config):
    assert not LLM.from_engine(make_engine(model_and_config)).reset_prefix_cache()  # static batching
    assert not make_engine(model_and_config, scheduling="continuous", kv_layout="paged").reset_prefix_cache()


def test_async_reset_runs_between_steps():
    app, llm = tiny_app(tiny_engine(enable_prefix_caching=True), dev_mode=True)

    async def main():
        await llm.start()
        try:
            params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
            streams = [llm.generate(PROMPT, params, request_id=f"r{i}") for i in range(3)]

            async def last(stream):
                out = None
                async for out in stream:
                    pass
                return out
            tasks = [asyncio.ensure_future(last(s)) for s in streams]
            await asyncio.sleep(0.01)
            assert await llm.reset_prefix_cache()
            outs = await asyncio.gather(*tasks)
            assert len({tuple(o.outputs[0].token_ids) for o in outs}) == 1
        finally:
            await llm.shutdown()
    asyncio.run(main())


def test_the_servers_endpoint_only_in_dev_mode():
    app, _ = tiny_app(tiny_engine(enable_prefix_caching=True), dev_mode=True)
    with ServerThread(app) as srv:
        assert httpx.post(srv.url + "/reset_prefix_cache").status_code == 200
    app, _ = tiny_app(tiny_engine(enable_prefix_caching=False), dev_mode=True)
    with ServerThread(app) as srv:
        response = httpx.post(srv.url + "/reset_prefix_cache")
        assert response.status_code == 400 and "--enable-prefix-caching" in response.json()["error"]["message"]
    app, _ = tiny_app(tiny_engine(enable_prefix_caching=True))
    with ServerThread(app) as srv:
        assert httpx.post(srv.url + "/reset_prefix_cache").status_code == 404


@pytest.mark.parametrize("value, on", [("1", True), ("true", True), ("0", False), ("", False)])
def test_dev_mode_reads_vllms_variable(monkeypatch, value, on):
    from minillm.serve.cli import dev_mode
    monkeypatch.delenv("MINILLM_SERVER_DEV_MODE", raising=False)
    monkeypatch.setenv("VLLM_SERVER_DEV_MODE", value)
    assert dev_mode() is on
