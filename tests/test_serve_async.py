"""AsyncLLM (chapter 10): one loop steps the engine, coroutines stream, a cancelled one frees its blocks at once."""
from __future__ import annotations

import asyncio

import pytest

from minillm.engine.async_llm import AsyncLLM, EngineDeadError
from minillm.llm import LLM
from minillm.sampling_params import SamplingParams
from serve_tiny import tiny_engine
from tiny import one_thread  # noqa: F401 (autouse fixture)

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _sync_tokens(prompts: list[list[int]], params: SamplingParams) -> list[list[int]]:
    outputs = LLM.from_engine(tiny_engine()).generate(prompts, params)
    return [out.outputs[0].token_ids for out in outputs]


def test_concurrent_streams_match_the_synchronous_engine():
    prompts = [[5, 6, 7], list(range(40, 57)), [100]]

    async def main():
        llm = AsyncLLM(tiny_engine())
        await llm.start()

        async def consume(prompt):
            seen = []
            async for out in llm.generate(prompt, GREEDY):
                seen.append(out)
            return seen
        results = await asyncio.gather(*(consume(p) for p in prompts))
        await llm.shutdown()
        return results, llm
    results, llm = asyncio.run(main())
    expected = _sync_tokens(prompts, GREEDY)
    for seen, want in zip(results, expected):
        # one cumulative output per step, growing by one token, the last one finished
        assert [len(o.outputs[0].token_ids) for o in seen] == list(range(1, 7))
        assert seen[-1].finished and seen[-1].outputs[0].finish_reason == "length"
        assert seen[-1].outputs[0].token_ids == want
    assert llm.engine.scheduler.block_manager.num_used_blocks == 0 and llm.num_in_flight == 0


def test_cancelled_coroutine_aborts_and_frees_its_blocks():
    async def main():
        llm = AsyncLLM(tiny_engine())
        await llm.start()
        got = asyncio.Event()

        async def consume():
            async for out in llm.generate(list(range(30, 50)), SamplingParams(temperature=0, max_tokens=40)):
                got.set()
        task = asyncio.ensure_future(consume())
        await got.wait()
        used_while_running = llm.snapshot().num_used_blocks
        task.cancel()
        for _ in range(100):  # the abort lands before the next step: a few loop turns at most
            await asyncio.sleep(0.005)
            if llm.snapshot().num_used_blocks == 0:
                break
        snap = llm.snapshot()
        await llm.shutdown()
        return used_while_running, snap, llm
    used_while_running, snap, llm = asyncio.run(main())
    assert used_while_running >= 5  # 20 prompt tokens in blocks of 4
    assert snap.num_used_blocks == 0 and not snap.running and not snap.waiting
    assert not llm.engine.has_unfinished_requests()


def test_shutdown_aborts_in_flight_and_refuses_new_requests():
    async def main():
        llm = AsyncLLM(tiny_engine())
        await llm.start()
        outs = []

        async def consume():
            async for out in llm.generate([1, 2, 3], SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)):
                outs.append(out)
        task = asyncio.ensure_future(consume())
        while not outs:
            await asyncio.sleep(0.001)
        await llm.shutdown(timeout=0)
        await task
        with pytest.raises(EngineDeadError):
            async for _ in llm.generate([1], GREEDY):
                pass
        return outs, llm
    outs, llm = asyncio.run(main())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(outs[-1].outputs[0].token_ids) < 50
    assert llm.engine.scheduler.block_manager.num_used_blocks == 0


def test_bad_requests_raise_before_anything_is_queued():
    async def main():
        llm = AsyncLLM(tiny_engine())
        await llm.start()
        errors = []
        late = SamplingParams(temperature=0, max_tokens=6)
        late.seed = 2**70  # assigned after construction: checked again here, not in the middle of a step
        for prompt, params in (([], GREEDY), ([1000], GREEDY), (list(range(65)), GREEDY), ([1], "greedy"),
                               ([1], late)):
            try:
                async for _ in llm.generate(prompt, params):
                    pass
            except (ValueError, TypeError) as err:
                errors.append(str(err))
        in_flight = llm.num_in_flight
        await llm.shutdown()
        return errors, in_flight
    errors, in_flight = asyncio.run(main())
    assert len(errors) == 5 and in_flight == 0
    assert "empty" in errors[0] and "vocabulary" in errors[1] and "max_model_len" in errors[2]
    assert errors[4].startswith("seed must be an integer in [-2**63, 2**64 - 1]")
    with pytest.raises(TypeError, match="LLMEngine"):
        AsyncLLM(object())
