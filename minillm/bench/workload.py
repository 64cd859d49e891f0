"""`minillm bench`: an offline throughput run with prompts of an exact token length (chapter 1, reused in 2 and 6).

Like vLLM's `benchmark_throughput` with a fixed input/output length: every request arrives at once, the engine batches
them, EOS is ignored so each request produces exactly `output_len` tokens, and the harness turns the timestamps into
TTFT / TPOT / latency percentiles and throughput. Prompts are windows of real English text (the module docstrings of
Python's standard library, gathered deterministically), cut to exactly `input_len` tokens, so the tokenizer and the
attention see realistic ids rather than random ones.
"""
from __future__ import annotations

import importlib
import random
import time
from typing import Any

from minillm.bench.harness import BenchResult, format_percentiles, format_requests, run_workload, warm_up

_STDLIB_MODULES = ("argparse", "asyncio", "collections", "csv", "dataclasses", "decimal", "difflib", "email",
                   "functools", "heapq", "inspect", "json", "logging", "pathlib", "pickle", "random", "shutil",
                   "statistics", "string", "subprocess", "textwrap", "threading", "typing", "unittest", "zipfile")


def corpus_text() -> str:
    """The module docstrings of a fixed list of stdlib modules, joined in a fixed order."""
    docs = []
    for name in _STDLIB_MODULES:
        try:
            doc = importlib.import_module(name).__doc__
        except ImportError:  # a trimmed Python without one of them: skip it, the rest is plenty
            continue
        if doc:
            docs.append(doc.strip())
    return "\n\n".join(docs)


def synthetic_prompts(tokenizer: Any, num_prompts: int, input_len: int, seed: int = 0) -> list[list[int]]:
    """`num_prompts` lists of exactly `input_len` token ids, each a different window of the corpus."""
    if num_prompts < 1 or input_len < 1:
        raise ValueError(f"num_prompts and input_len must be >= 1, got {num_prompts} and {input_len}")
    ids = tokenizer.encode(corpus_text(), add_special_tokens=False)
    while len(ids) < input_len + num_prompts:  # tiny corpora: repeat until every window fits
        ids = ids + ids
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(ids) - input_len) for _ in range(num_prompts)]
    return [ids[s: s + input_len] for s in starts]


def check_lengths(input_len: int, output_len: int, max_model_len: int | None = None, model: str | None = None,
                  device: str | None = None, llm: Any = None) -> None:
    """ValueError unless every request (input_len + output_len tokens) fits the context the engine will have:
    `llm`'s, else max_model_len resolved as LLM() will resolve it (None: the model's context, capped on a CPU;
    an explicit one may not exceed the model's), from the model's config alone (GGUF metadata or config.json, no
    weights: about 0.1 s), so that an impossible run is refused before the seconds of loading and warm-up."""
    needed = input_len + output_len
    if max_model_len is not None and max_model_len < needed:  # the user's own number: the one to raise
        raise ValueError(f"max_model_len={max_model_len} cannot hold input_len + output_len = {needed} tokens; "
                         f"give at least that")
    if llm is not None:
        limit, why = llm.llm_engine.max_model_len, "this engine's"
    else:
        from minillm.config import EngineConfig
        from minillm.engine.cache_config import resolve_engine_config
        from minillm.loader import read_model_config
        from minillm.platform import resolve_device

        dev = resolve_device(device)  # None is auto; '' is refused (`device or "auto"` took it for auto)
        model_config = read_model_config(model)
        # raises when an explicit max_model_len exceeds the model's context
        limit = resolve_engine_config(EngineConfig(max_model_len=max_model_len), model_config, dev).max_model_len
        context = model_config.max_position_embeddings
        why = f"the default: the model's context of {context} tokens" + (
            f", capped at {limit} on {dev.type}" if limit < context else "")
    if limit < needed:
        lift = f" or max_model_len up to {context}" if llm is None and needed <= context else ""
        raise ValueError(f"input_len + output_len = {needed} tokens exceed max_model_len={limit} ({why}); give "
                         f"shorter lengths{lift}")


def run_bench(num_prompts: int = 8, input_len: int = 64, output_len: int = 32, model: str | None = None,
              device: str | None = None, dtype: str | None = None, seed: int = 0, llm: Any = None,
              verbose: bool = True, max_model_len: int | None = None) -> BenchResult:
    """Load the model (unless `llm` is given), send the batch, print and return the summary. Every size is
    checked before the model loads (or, with `llm`, before its warm-up): see check_lengths."""
    from minillm import LLM, SamplingParams

    if output_len < 1:
        raise ValueError(f"output_len must be >= 1, got {output_len}")
    if num_prompts < 1 or input_len < 1:
        raise ValueError(f"num_prompts and input_len must be >= 1, got {num_prompts} and {input_len}")
    check_lengths(input_len, output_len, max_model_len, model, device, llm)
    if llm is None:
        t0 = time.perf_counter()
        if verbose:
            print("loading the model ...", flush=True)
        llm = LLM(model=model, device=device, dtype=dtype, seed=seed, max_model_len=max_model_len)
        if verbose:
            print(f"loaded in {time.perf_counter() - t0:.1f} s on {llm.device}, {str(llm.dtype).replace('torch.', '')}")
    prompts = synthetic_prompts(llm.tokenizer, num_prompts, input_len, seed)
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    warm = warm_up(llm)  # one-time costs of the first steps, outside the timed run
    if verbose:
        print(f"warm-up {warm:.1f} s (first steps of each shape: layout timing, kernel builds; not timed)")
    _, result = run_workload(llm, prompts, params)
    if verbose:
        print(format_requests(result))
        print(format_percentiles(result))
    return result
