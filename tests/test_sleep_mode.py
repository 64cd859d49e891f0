"""Sleep mode, vLLM's (minillm/engine/sleep_mode.py): sleep gives the weights' and the KV pool's memory back,
wake_up takes it again, and the engine then generates what it generated before (level 1) or what its reloaded or
updated weights generate (level 2); requests are refused while it sleeps; in one process, under tensor and
pipeline parallelism, disaggregated, and through the server's dev-mode endpoints."""
from __future__ import annotations

import asyncio
import os
import random

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.sleep_mode import EngineSleepingError, SleepingTensors
from minillm.llm import LLM
from minillm.sampling_params import SamplingParams
from test_engine_stress import K, SPEC_METHODS, head_dirs, model_and_config  # noqa: F401  (fixtures)
from test_update_weights import GREEDY, OPTIONS, PROMPTS, checkpoints, generate  # noqa: F401  (fixture)
from tiny import ByteTokenizer


def _device_bytes(llm: LLM) -> int:
    """Bytes the in-process worker's weights and KV pool hold now."""
    worker = llm.llm_engine.executor.driver_worker
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in (*worker.model.parameters(), worker.runner.kv_cache.storage)}
    return sum(storages.values())


def test_sleeping_tensors_keep_or_drop_each_storage_once():
    a = torch.arange(6.0)
    tied, view, dropped = a, a[2:4], torch.ones(3)
    sleeping = SleepingTensors()
    report = sleeping.put_to_sleep("weights", [tied, view], drop=[dropped, a])  # `a` is kept: keep wins
    assert report == (24 + 12, 24)
    assert a.untyped_storage().nbytes() == 0 and dropped.untyped_storage().nbytes() == 0
    with pytest.raises(RuntimeError, match="asleep already"):
        sleeping.put_to_sleep("weights", [a])
    sleeping.wake("weights")
    assert torch.equal(a, torch.arange(6.0)) and torch.equal(view, torch.tensor([2.0, 3.0]))
    assert torch.equal(dropped, torch.zeros(3))  # dropped: zeros, to be loaded


def test_level_1_gives_the_memory_back_and_wakes_to_the_same_outputs(checkpoints):
    old, _, _ = checkpoints
    llm = LLM(old, **OPTIONS)
    want = generate(llm)
    held = _device_bytes(llm)
    llm.sleep(level=1)
    assert llm.is_sleeping() and _device_bytes(llm) == 0
    assert llm.llm_engine.scheduler.block_manager.prefix_cache.entries() == {}  # its blocks went with the pool
    with pytest.raises(EngineSleepingError, match=r"asleep \(kv_cache, weights\)"):
        llm.generate(PROMPTS, GREEDY)
    with pytest.raises(RuntimeError, match="sleeps already"):
        llm.sleep()
    llm.wake_up(["weights"])  # in stages, as an RL loop does
    assert llm.is_sleeping() and 0 < _device_bytes(llm) < held
    with pytest.raises(EngineSleepingError, match=r"asleep \(kv_cache\)"):
        llm.generate(PROMPTS, GREEDY)
    llm.wake_up(["kv_cache"])
    assert not llm.is_sleeping() and _device_bytes(llm) == held
    assert generate(llm) == want


def test_level_2_drops_the_weights_until_they_are_loaded(checkpoints):
    old, new, weights = checkpoints
    llm = LLM(old, **OPTIONS)
    want = generate(llm)
    llm.sleep(level=2)
    llm.wake_up()
    with pytest.raises(EngineSleepingError, match="reload_weights"):
        llm.generate(PROMPTS, GREEDY)
    assert llm.reload_weights() == [len(list(llm.llm_engine.executor.driver_worker.model.parameters()))]
    assert generate(llm) == want
    # the RL loop: drop, wake the weights, send the trainer's (all of them), wake the KV pool
    llm.sleep(level=2)
    llm.wake_up(["weights"])
    with pytest.raises(ValueError, match="missing"):  # a subset would leave zeros: refused after level 2
        llm.update_weights(weights[:3])
    llm.wake_up(["kv_cache"])
    with pytest.raises(EngineSleepingError):  # still: the failed update loaded only three tensors
        llm.generate(PROMPTS, GREEDY)
    llm.update_weights(weights)
    assert generate(llm) == generate(LLM(new, **OPTIONS))


def test_bad_calls_are_refused_and_leave_the_engine_usable(checkpoints):
    old, _, weights = checkpoints
    llm = LLM(old, **OPTIONS)
    for level in (0, 3, "1", True, None):
        with pytest.raises(ValueError, match="sleep level must be 1"):
            llm.sleep(level)
    for tags in ([], ["weights", "kv"], "gpu"):
        with pytest.raises(ValueError, match="wake_up tags must be"):
            llm.wake_up(tags)
    llm.llm_engine.add_request("running", PROMPTS[0], GREEDY)
    with pytest.raises(RuntimeError, match="1 request.*between requests"):
        llm.sleep()
    llm.llm_engine.abort("running")
    llm.sleep()
    with pytest.raises(RuntimeError, match="while the weights sleep"):
        llm.update_weights(weights)
    llm.wake_up()
    assert not llm.is_sleeping()
    llm.wake_up()  # awake already: nothing to do
    with pytest.raises(ValueError, match="dense weights"):
        LLM(old, quantization="int8", **OPTIONS).sleep(level=2)
    shared = llm.share_model(num_kv_blocks=16)
    for either in (llm, shared):
        with pytest.raises(ValueError, match="shared with another LLM"):
            either.sleep()
    assert generate(shared) == generate(llm)



@pytest.mark.parametrize("method", sorted(SPEC_METHODS))
def test_a_speculative_proposers_own_state_sleeps_too(model_and_config, head_dirs, method):
    """A draft model and its KV pool, Medusa / EAGLE / MTP heads and their packed copies go to host memory with
    the target; the engine then drafts and verifies exactly as before (greedy: the target's tokens)."""
    model, config = model_and_config
    spec = {"method": method, "num_speculative_tokens": K, **SPEC_METHODS[method](head_dirs)}
    engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(
        speculative_config=spec, scheduling="continuous", kv_layout="paged", block_size=4, num_kv_blocks=64,
        max_model_len=64))
    llm = LLM.from_engine(engine)
    want = generate(llm)
    holder = engine.speculative.proposer
    while hasattr(holder, "heads") and not isinstance(holder, torch.nn.Module):  # a tree proposer's head proposer
        holder = holder.heads
    own = list(holder.parameters() if isinstance(holder, torch.nn.Module) else
               getattr(holder, "model", torch.nn.Module()).parameters())
    assert bool(own) == (method not in ("ngram", "ngram_tree", "lookahead"))
    llm.sleep(level=1)
    assert all(p.untyped_storage().nbytes() == 0 for p in own)
    llm.wake_up()
    assert all(p.untyped_storage().nbytes() > 0 for p in own)
    assert generate(llm) == want
    assert engine.speculative.metrics.num_draft_tokens > 0


@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2},
                                      {"disaggregation": {}}], ids=["tp2", "pp2", "disagg"])
def test_every_worker_process_sleeps_and_wakes(checkpoints, parallel):
    old, _, _ = checkpoints
    want = generate(LLM(old, **OPTIONS))
    llm = LLM(old, **OPTIONS, **parallel)
    try:
        reports = llm.llm_engine.sleep(level=1)
        assert len(reports) == 2 and all(r.freed_bytes > r.host_bytes > 0 for r in reports)
        llm.wake_up()
        assert generate(llm) == want
        llm.sleep(level=2)
        llm.wake_up()
        assert llm.reload_weights()  # each worker reads the checkpoint again
        assert generate(llm) == want
    finally:
        llm.llm_engine.shutdown()


def test_the_servers_sleep_endpoints():
    import httpx  # (the server's packages: imported here, so that the GPU machine's image collects this file)
    from minillm.serve.server import ServerThread
    from serve_tiny import tiny_app, tiny_engine
    app, _ = tiny_app(tiny_engine(enable_prefix_caching=True), dev_mode=True)
    body = {"model": "tiny-random", "prompt": "hello", "max_tokens": 4, "temperature": 0}
    with ServerThread(app) as srv:
        want = httpx.post(srv.url + "/v1/completions", json=body).json()["choices"][0]["text"]
        assert httpx.post(srv.url + "/sleep", params={"level": 3}).status_code == 400
        assert httpx.post(srv.url + "/sleep", params={"level": 2}).status_code == 200
        assert httpx.get(srv.url + "/is_sleeping").json() == {"is_sleeping": True}
        scraped = httpx.get(srv.url + "/metrics").text
        assert 'minillm:engine_sleep_state{model_name="tiny-random",sleep_state="discard_all"} 1.0' in scraped
        assert 'sleep_state="awake"} 0.0' in scraped
        refused = httpx.post(srv.url + "/v1/completions", json=body)
        assert refused.status_code == 503 and "asleep" in refused.json()["error"]["message"]
        assert httpx.post(srv.url + "/sleep").status_code == 409  # asleep already
        assert httpx.post(srv.url + "/wake_up", params={"tags": "gpu"}).status_code == 400
        assert httpx.post(srv.url + "/wake_up", params=[("tags", "weights"), ("tags", "kv_cache")]).status_code == 200
        assert httpx.post(srv.url + "/v1/completions", json=body).status_code == 503  # level 2: weights to load
        assert httpx.get(srv.url + "/is_sleeping").json() == {"is_sleeping": False}
        assert 'sleep_state="awake"} 1.0' in httpx.get(srv.url + "/metrics").text
    app, llm = tiny_app(tiny_engine(enable_prefix_caching=True), dev_mode=True)

    async def reload_and_generate() -> str:  # (RandomWeights draws the same weights again)
        await llm.start()
        try:
            await llm.sleep(2)
            await llm.wake_up()
            await llm.reload_weights()
            out = None
            async for out in llm.generate("hello", SamplingParams(temperature=0, max_tokens=4)):
                pass
            return out.outputs[0].text
        finally:
            await llm.shutdown()
    assert asyncio.run(reload_and_generate()) == want
    app, _ = tiny_app(tiny_engine(), dev_mode=True)
    with ServerThread(app) as srv:
        assert httpx.post(srv.url + "/pause", params={"mode": "soon"}).status_code == 400
        assert httpx.post(srv.url + "/pause").status_code == 200
        assert httpx.get(srv.url + "/is_paused").json() == {"is_paused": True}
        assert httpx.post(srv.url + "/resume").status_code == 200
        assert httpx.post(srv.url + "/v1/completions", json=body).json()["choices"][0]["text"] == want
    app, _ = tiny_app(tiny_engine())
    with ServerThread(app) as srv:
        assert httpx.post(srv.url + "/sleep").status_code == httpx.post(srv.url + "/pause").status_code == 404


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("spec", [None, {"method": "draft_model", "draft_num_layers": 1, "num_speculative_tokens": 2}],
                         ids=["plain", "draft_model"])
def test_gpu_sleep_frees_device_memory_and_recaptures_the_graphs(checkpoints, spec):
    """On CUDA (bf16, CUDA graphs): level 1 hands the weights' and the pool's bytes back to the driver, wake_up
    captures the graphs again (a draft model's runner's too), and the engine generates what it did before."""
    old, _, _ = checkpoints
    llm = LLM(old, **dict(OPTIONS, device="cuda", dtype="bfloat16"), speculative_config=spec)
    draft = llm.llm_engine.speculative.proposer.runner if spec else None
    runner = llm.llm_engine.executor.driver_worker.runner
    want = generate(llm)
    held = _device_bytes(llm)
    torch.cuda.synchronize()
    allocated, reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    llm.sleep(level=1)
    assert runner.cuda_graphs is None and torch.cuda.memory_allocated() <= allocated - held
    assert torch.cuda.memory_reserved() < reserved  # the allocator's free segments went back to the driver
    assert draft is None or draft.cuda_graphs is None
    llm.wake_up()
    assert runner.cuda_graphs is not None and (draft is None or draft.cuda_graphs is not None)
    assert generate(llm) == want
    counts = dict(runner.forward_counts)
    assert generate(llm) == want and runner.forward_counts["graph"] > counts.get("graph", 0)


SLEEP_SEEDS = range(int(os.environ.get("MINILLM_SLEEP_STRESS_FIRST", "0")),
                    int(os.environ.get("MINILLM_SLEEP_STRESS_FIRST", "0")) + int(
                        os.environ.get("MINILLM_SLEEP_STRESS_SEEDS", "6")))


@pytest.mark.parametrize("seed", SLEEP_SEEDS)
def test_random_engines_wake_to_the_same_answers(seed):
    """A random engine of the stress tests' kind (prefix caching, chunked prefill, preemption by swap or
    recompute, async scheduling, priorities, fp8 KV) answers a random batch, sleeps at a random level, wakes its
    tags in a random order (reloading dropped weights), refuses a request in between, and answers the batch again
    token for token (the prefix cache starts cold both times, so the steps are the same)."""
    from minillm.engine.cache_config import resolve_engine_config
    from minillm.engine.executor import UniProcExecutor
    from minillm.engine.worker import RandomWeights, Worker
    from stress_helpers import draw_engine_options
    from test_engine import tiny_config
    rng = random.Random(seed)
    options, config = draw_engine_options(rng), tiny_config()
    engine_config = resolve_engine_config(EngineConfig(**options), config, torch.device("cpu"))
    worker = Worker(config, engine_config, torch.device("cpu"), torch.float32, RandomWeights(seed=seed))
    engine = LLMEngine(None, ByteTokenizer(), config, EngineConfig(**options), executor=UniProcExecutor(worker))
    llm = LLM.from_engine(engine)
    prompts = [[rng.randrange(256) for _ in range(rng.randint(1, 20))] for _ in range(rng.randint(2, 6))]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 12), ignore_eos=True) for _ in prompts]

    def answers() -> list[list[int]]:
        return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]
    want = answers()
    level = 1 if "kv_cache_dtype" in options else rng.choice([1, 2])  # (an fp8 pool's scales need the weights)
    llm.sleep(level)
    with pytest.raises(EngineSleepingError):
        llm.generate(prompts[:1], params[0])
    tags = rng.choice([None, ["weights", "kv_cache"], ["kv_cache", "weights"]])
    for tag in tags or [None]:
        llm.wake_up(None if tag is None else [tag])
    if level == 2:
        llm.reload_weights()
    assert not engine.has_unfinished_requests() and answers() == want, (seed, options, level, tags)
    block_manager = getattr(engine.scheduler, "block_manager", None)
    if block_manager is not None:
        block_manager.check_invariants()


def test_pause_generation_lets_requests_wait_through_a_sleep():
    """AsyncLLM.pause_generation (vLLM's, for RL loops): "wait" lets the running requests finish, "abort" ends
    them; requests sent while paused wait (not refused) through a sleep and a wake, and run after resume."""
    from serve_tiny import tiny_app, tiny_engine
    _, llm = tiny_app(tiny_engine())
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)

    async def last(stream):
        out = None
        async for out in stream:
            pass
        return out

    async def main():
        await llm.start()
        try:
            running = [asyncio.ensure_future(last(llm.generate([5, 6, 7], params))) for _ in range(3)]
            await asyncio.sleep(0.01)
            await llm.pause_generation("wait")
            assert all(t.done() and t.result().outputs[0].finish_reason == "length" for t in running)
            assert llm.is_paused and not llm.engine.has_unfinished_requests()
            queued = asyncio.ensure_future(last(llm.generate([5, 6, 7], params)))
            await asyncio.sleep(0.05)
            assert not queued.done() and not llm.engine.has_unfinished_requests()
            await llm.sleep(1)
            later = asyncio.ensure_future(last(llm.generate([8, 9], params)))  # while asleep: waits too
            await llm.wake_up()
            await llm.resume_generation()
            assert (await queued).outputs[0].token_ids == running[0].result().outputs[0].token_ids
            assert (await later).outputs[0].finish_reason == "length"
            aborted = asyncio.ensure_future(last(llm.generate([5, 6, 7], params)))
            await asyncio.sleep(0.01)
            await llm.pause_generation("abort")
            assert (await aborted).outputs[0].finish_reason == "abort"
            await llm.resume_generation()
            with pytest.raises(ValueError, match="pause mode must be"):
                await llm.pause_generation("later")
        finally:
            await llm.shutdown()
    asyncio.run(main())
