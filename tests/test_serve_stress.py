"""200 concurrent streaming requests, a third of whose clients vanish mid-stream or before the first byte:
afterwards no KV block is leaked, nothing is left in the queues, and the server still answers correctly."""
from __future__ import annotations

import asyncio
import json
import random
import time

import httpx
from prometheus_client.parser import text_string_to_metric_families

from minillm.serve.server import ServerThread
from serve_tiny import tiny_app, tiny_engine
from tiny import one_thread  # noqa: F401 (autouse fixture)

NUM_REQUESTS = 200


async def _one(client: httpx.AsyncClient, i: int, rng: random.Random) -> str:
    fate = rng.choice(("finish", "finish", "leave_mid_stream", "leave_early"))
    if fate == "finish":
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"request {i}"}],
                                              "max_tokens": rng.randint(2, 6)}
    else:  # long enough that only an abort ends it early
        path, body = "/v1/completions", {"prompt": f"r{i}", "max_tokens": 50, "ignore_eos": True}
    body.update(temperature=1.0, seed=i, stream=True)

    async def run() -> str:
        async with client.stream("POST", path, json=body) as response:
            assert response.status_code == 200, await response.aread()
            seen = 0
            async for line in response.aiter_lines():
                if not line:
                    continue
                if line == "data: [DONE]":
                    return "finished"
                json.loads(line.removeprefix("data: "))
                seen += 1
                if fate == "leave_mid_stream" and seen >= 2:
                    return "left_mid"  # leaving the block closes the connection mid-stream
        return "truncated"

    if fate == "leave_early":
        task = asyncio.ensure_future(run())
        await asyncio.sleep(rng.uniform(0, 0.05))
        task.cancel()  # the connection drops, maybe before the request reached the engine
        try:
            return await task
        except asyncio.CancelledError:
            return "left_early"
    return await run()


def test_200_concurrent_streams_with_disconnects_leak_nothing():
    engine = tiny_engine(max_num_seqs=32, num_kv_blocks=160)
    app, llm = tiny_app(engine)
    with ServerThread(app) as srv:
        reference = httpx.post(srv.url + "/v1/completions", json={"prompt": "after the storm", "max_tokens": 8,
                                                                   "temperature": 0, "ignore_eos": True}).json()

        async def storm():
            limits = httpx.Limits(max_connections=NUM_REQUESTS + 10, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=srv.url, limits=limits, timeout=60) as client:
                rng = random.Random(0)
                return await asyncio.gather(*(_one(client, i, rng) for i in range(NUM_REQUESTS)))
        outcomes = asyncio.run(storm())
        assert outcomes.count("finished") > 80 and outcomes.count("left_mid") > 20 and "truncated" not in outcomes

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # aborts land within a step; give the loop a moment
            state = httpx.get(srv.url + "/engine/state").json()
            if state["num_used_blocks"] == 0 and not state["running"] and not state["waiting"] \
                    and llm.num_in_flight == 0:
                break
            time.sleep(0.05)
        assert state["num_used_blocks"] == 0 and state["num_free_blocks"] == 160, state
        assert not state["running"] and not state["waiting"] and llm.num_in_flight == 0

        # every client that left mid-stream had its request aborted, not run to its 50 tokens
        families = text_string_to_metric_families(httpx.get(srv.url + "/metrics").text)
        reasons = {s.labels["finished_reason"]: s.value for f in families if f.name == "minillm:request_success"
                   for s in f.samples if s.name.endswith("_total")}
        assert reasons.get("abort", 0) >= outcomes.count("left_mid"), reasons
        assert reasons.get("length", 0) + reasons.get("stop", 0) >= outcomes.count("finished")

        after = httpx.post(srv.url + "/v1/completions", json={"prompt": "after the storm", "max_tokens": 8,
                                                               "temperature": 0, "ignore_eos": True}).json()
        assert after["choices"][0]["text"] == reference["choices"][0]["text"]
        assert after["usage"]["completion_tokens"] == 8
    assert engine.scheduler.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()
    engine.scheduler.block_manager.check_invariants()
