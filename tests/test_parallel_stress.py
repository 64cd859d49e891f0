"""Randomized differential stress test of tensor and pipeline parallel workers (chapter 11): one engine per
configuration, random request streams through it, every request against the same request run alone in one process.

With tensor_parallel_size=2 or pipeline_parallel_size=2 the engine's executor is a MultiProcExecutor: two worker
processes over gloo, each holding its shard of the weights and of the KV pool (TP: half the heads; PP: half the
layers), every step broadcast to both and answered by the sampling rank. The scheduler and the output loop are
one engine's, so what this test hunts is the step's trip through the workers: block operations (swaps,
copy-on-write) applied on every rank, prefix-cache hits and chunked prefill read from sharded pools, micro-batches
cut across the pipeline, log-probs gathered from the vocabulary shards, seeded generators kept on the sampling
rank (and dropped there when the next step lists the request as finished), a step that raises in every rank
rerun one request at a time (step_isolation).

Starting the workers costs a few seconds, so each configuration builds ONE engine (per seed) from
tests/stress_helpers.py's draw_engine_options (block size, a pool small enough to preempt, prefix caching, chunked
prefill, recompute or swap, the priority policy, an fp8 KV cache under TP; refused here: async scheduling, and
fp8 under pipeline parallelism) and pushes STREAMS request streams through it (draw_requests:
shared prefixes, stops that fire, min_tokens, seeded sampling, log-probs, embedding requests (LAST / MEAN / CLS
pooling of the hidden states the sampling rank returns), a poisoned tokenizer or model
(PoisonedSource: each rank's forward raises on POISON_FORWARD, so every rank fails alike and the step is rerun one
request at a time), aborts at random steps). The checks after every step and the comparison at the end are
tests/test_engine_stress.py's (stress_helpers.drive): the same tokens, text, finish reason and log-probs (within
LP_TOL: the sharded all-reduce sums in another order) as the request run alone on an in-process LLMEngine over the
same weights (RandomWeights: each rank draws the full tensors and keeps its shard).

CI runs SEEDS seed per configuration, STREAMS streams each (about 7 s an engine, 5 of them starting and stopping
the workers). A longer hunt: MINILLM_PARALLEL_STRESS_SEEDS=20 (and MINILLM_PARALLEL_STRESS_FIRST=1000 to start
elsewhere, MINILLM_PARALLEL_STRESS_STREAMS=4 for longer-lived engines).
"""
from __future__ import annotations

import os
import random

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.cache_config import resolve_engine_config
from minillm.engine.executor import MultiProcExecutor
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.worker import RandomWeights
from stress_helpers import (ROUNDED_ACTIVATIONS, PoisonedSource, Reference, Scenario, describe, draw_engine_options,
                            draw_requests, drive, engine_tokenizer, quantized_config, stress_config)
from tiny import one_thread  # noqa: F401  (one_thread: autouse fixture)

SEEDS = 1
FIRST = int(os.environ.get("MINILLM_PARALLEL_STRESS_FIRST", 0))
NUM_SEEDS = int(os.environ.get("MINILLM_PARALLEL_STRESS_SEEDS", SEEDS))
STREAMS = int(os.environ.get("MINILLM_PARALLEL_STRESS_STREAMS", 2))
WEIGHTS = RandomWeights(seed=5)  # the same numbers in every rank (sharded) and here for the reference
PARALLEL = {"tp2": {"tensor_parallel_size": 2}, "pp2": {"pipeline_parallel_size": 2}}


@pytest.fixture(scope="module")
def reference():
    config = quantized_config(stress_config())  # MINILLM_STRESS_ARCH's shape (Llama's by default) and QUANT
    return Reference((WEIGHTS(config, torch.device("cpu"), torch.float32), config))


def build_engine(reference: Reference, options: dict, poison: str | None) -> LLMEngine:
    config = EngineConfig(**options)
    resolved = resolve_engine_config(config, reference.config, torch.device("cpu"))
    executor = MultiProcExecutor(dict(model_config=reference.config, engine_config=resolved,
                                      device=torch.device("cpu"), dtype=torch.float32, seed=0,
                                      model_source=PoisonedSource(WEIGHTS) if poison == "forward" else WEIGHTS))
    return LLMEngine(None, engine_tokenizer(poison), reference.config, config,
                     executor=executor)


@pytest.mark.parametrize("seed", range(FIRST, FIRST + NUM_SEEDS))
@pytest.mark.parametrize("parallel", list(PARALLEL))
def test_random_workloads_on_parallel_workers_match_requests_run_alone(reference, parallel, seed):
    if parallel == "tp2" and ROUNDED_ACTIVATIONS:
        pytest.skip("fp8 / fp8_block under TP: a row-parallel rank scales its half of each token's activations by "
                    "that half's range, so outputs move past ROUNDING from one process's (README, Parallelism)")
    rng = random.Random(seed)
    options = {**draw_engine_options(rng, random.Random(f"engine extras {seed}")), **PARALLEL[parallel]}
    options["async_scheduling"] = False  # refused with more than one rank
    if parallel == "pp2":  # refused: fp8 scales are calibrated by one forward of the whole model
        options.pop("kv_cache_dtype", None)
    fp8 = "kv_cache_dtype" in options or ROUNDED_ACTIVATIONS  # rounding that may part tokens from the run alone's
    poison = None if fp8 else rng.choice([None, "text", "forward"])
    engine = build_engine(reference, options, poison)
    scenario, stream = None, 0
    try:
        for stream in range(STREAMS):
            scenario = Scenario(options, None, poison=poison)
            draw_requests(rng, scenario, reference, seeded=not fp8,
                          priorities=options.get("scheduling_policy") == "priority", prefix=f"{stream}.",
                          embed_rng=random.Random(f"embed {seed} {stream}"),  # embedding requests
                          proc_rng=random.Random(f"processors {seed} {stream}"))
            drive(engine, scenario, reference)
    except AssertionError as err:
        raise AssertionError(f"{parallel} seed {seed} stream {stream}: {err}\n{describe(scenario)}") from err
    except Exception as err:
        raise RuntimeError(f"{parallel} seed {seed} stream {stream}: {type(err).__name__}: {err}\n"
                           f"{describe(scenario)}") from err
    finally:
        engine.shutdown()
