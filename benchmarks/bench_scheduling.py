"""Benchmark chapter 6's scheduling layer: continuous batching, prefix caching, and the whole engine vs HF.

    python benchmarks/bench_scheduling.py [--quick] [--parts p9,p8,p6] [--out results.json]
    python benchmarks/bench_scheduling.py --parts p6 --cuda-graphs --async-scheduling --hf-requests 1 --out p6.json

P9  Continuous vs static batching on output lengths of high variance (uniform 8..512, seeded, ignore_eos): output
    tokens per second of the same requests through `scheduling="continuous"` (paged) and `scheduling="static"`
    (contiguous), same model, same max_num_seqs, same KV memory. Static batching waits for the longest request of
    each batch; continuous batching refills a slot the step after it frees. A third run, "pool-bound", is not P9:
    the same KV bytes with max_num_seqs = every request, so the paged pool, not a slot count, decides how many run
    at once (what the paged KV buys on top of iteration-level scheduling: sequences hold their own length, not
    max_model_len).
P8  Time to first token with a shared 1,000-token prefix, prefix caching on vs off: one request warms the cache,
    then new requests sharing the prefix (each with its own suffix) arrive one at a time; mean TTFT and its %
    reduction.
P6  The whole engine against HF transformers `generate` (CUDA only): 256 requests, input and output lengths
    uniform in 100..1024, ignore_eos, a Llama-3-8B-shaped model in bf16 with random weights. HF runs static
    batches of 64 in arrival order (left padding, max_new_tokens = min_new_tokens = the batch's longest output);
    both sides are credited only with each request's own output tokens. Measured in the same run.
    `--async-scheduling` measures our engine twice, without and with EngineConfig(async_scheduling=True).

Which model: on CUDA a Llama-3-8B-shaped model with random bf16 weights (hidden 4096, 32 layers, 32/8 heads,
FFN 14336, vocab 128256; prompts are random token ids), as vLLM's benchmarks do with dummy weights. On CPU the
bundled SmolLM2-135M (fp32) with prompts cut from real text, and smaller P9/P8 (32 requests, outputs 8..256);
P6 is skipped with a line saying why. On a shared CPU run with OMP_NUM_THREADS=1 and read P9's process-time ratio
(the wall clock counts other people's jobs). On a fresh GPU machine run `pip install --no-deps -e .` first:
the Triton kernels import as `minillm.kernels` only through the installed package. Raw numbers go to --out as
JSON; a short table is printed last.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import sys
import time

import torch

from minillm import LLM, SamplingParams
from minillm.config import EngineConfig, ModelConfig
from minillm.engine.kv_cache import kv_bytes_per_block
from minillm.loader.no_tokenizer import NoTokenizer

LLAMA3_8B = dict(architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                 rope_theta=500000.0, max_position_embeddings=8192, tie_word_embeddings=False)


def random_llama(device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, ModelConfig]:
    """A Llama-3-8B-shaped model built directly on `device` with N(0, 0.02) weights and unit norms."""
    from minillm.models.llama import LlamaForCausalLM
    config = ModelConfig(**LLAMA3_8B)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 1:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval(), config


class Setup:
    """The model every part shares, and a way to build an LLM with any engine options around it."""

    def __init__(self, device: torch.device, enforce_eager: bool = True, piecewise: bool | None = None) -> None:
        self.device = device
        self.enforce_eager, self.piecewise = enforce_eager, piecewise
        self.cuda = device.type == "cuda"
        if self.cuda:
            self.model, self.model_config = random_llama(device, torch.bfloat16)
            self.dtype, self.tokenizer, self.base = torch.bfloat16, NoTokenizer(), None
            self.name = "Llama-3-8B-shaped, random bf16 weights"
        else:
            self.base = LLM(max_model_len=2048, max_num_seqs=1, scheduling="static", kv_layout="contiguous")
            engine = self.base.llm_engine
            self.model, self.model_config, self.tokenizer = engine.runner.model, engine.model_config, engine.tokenizer
            self.dtype, self.name = torch.float32, "SmolLM2-135M-Instruct (bundled GGUF, fp32)"
            from minillm.bench.workload import corpus_text
            self.corpus = self.tokenizer.encode(corpus_text(), add_special_tokens=False)

    def llm(self, **options) -> LLM:
        from minillm.engine.llm_engine import LLMEngine
        config = EngineConfig(enforce_eager=self.enforce_eager, piecewise_cuda_graphs=self.piecewise, **options)
        engine = LLMEngine(self.model, self.tokenizer, self.model_config, config, device=self.device,
                           dtype=self.dtype)
        return LLM.from_engine(engine)

    def prompt(self, rng: random.Random, n: int) -> list[int]:
        """n token ids: random on the random-weights model, a random window of real text on SmolLM2."""
        if self.cuda:
            return [rng.randrange(self.model_config.vocab_size) for _ in range(n)]
        start = rng.randrange(len(self.corpus) - n)
        return self.corpus[start:start + n]


def release(setup: "Setup | None" = None) -> None:
    """Free the KV pools of engines the caller has already `del`eted. The attention modules still point at the
    last engine's cache views (which keep its whole pool alive), so unbind them first."""
    if setup is not None and setup.model is not None:
        for module in setup.model.modules():
            if hasattr(module, "k_cache") and hasattr(module, "v_cache"):
                module.k_cache, module.v_cache = torch.tensor([]), torch.tensor([])
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def timed_generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams]
                   ) -> tuple[list, float, float]:
    """(outputs, wall seconds, CPU seconds of this process). On a shared CPU the process time is the fairer
    clock: it does not count the time other people's jobs held the cores."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    failed = [o.outputs[0].error for o in outs if o.outputs[0].finish_reason == "error"]
    if failed:  # the engine isolates a failing step: say why instead of timing nothing
        raise RuntimeError(f"{len(failed)} of {len(outs)} requests failed; the first: {failed[0]}")
    return outs, wall, cpu


# -- P9: continuous vs static ------------------------------------------------------------------------------
def bench_p9(setup: Setup, quick: bool) -> dict:
    if setup.cuda:
        n, out_range, in_range, max_num_seqs = (64, (8, 128), (32, 128), 32) if quick else (256, (8, 512),
                                                                                             (32, 256), 64)
    else:
        n, out_range, in_range, max_num_seqs = (8, (8, 48), (16, 48), 4) if quick else (32, (8, 256), (16, 64), 8)
    rng = random.Random(9)
    in_lens = [rng.randint(*in_range) for _ in range(n)]
    out_lens = [rng.randint(*out_range) for _ in range(n)]
    prompts = [setup.prompt(rng, k) for k in in_lens]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in out_lens]
    max_model_len = in_range[1] + out_range[1]
    # equal KV memory: static reserves max_model_len per slot; continuous gets the same bytes as paged blocks
    kv_memory = max_num_seqs * max_model_len * kv_bytes_per_block(setup.model_config, 1, setup.dtype)
    # warm-up: 16 requests through 4 slots, so prefills join running decodes (mixed steps) and every kernel is
    # compiled and autotuned before the clock starts, as a server does at start-up
    warm = setup.llm(max_model_len=max_model_len, max_num_seqs=4, num_kv_blocks=4 * -(-max_model_len // 16))
    warm.generate(prompts[:16], [SamplingParams(temperature=0, max_tokens=4 + 4 * (i % 4), ignore_eos=True)
                                 for i in range(len(prompts[:16]))])
    del warm
    release(setup)
    result = {"num_requests": n, "input_len_range": in_range, "output_len_range": out_range,
              "max_num_seqs": max_num_seqs, "max_model_len": max_model_len, "kv_cache_bytes": kv_memory,
              "total_output_tokens": sum(out_lens)}
    paged = dict(scheduling="continuous", kv_layout="paged", kv_cache_memory=kv_memory)
    for name, options in (("static", dict(scheduling="static", kv_layout="contiguous", max_num_seqs=max_num_seqs)),
                          ("continuous", dict(paged, max_num_seqs=max_num_seqs)),
                          ("pool_bound", dict(paged, max_num_seqs=n))):
        llm = setup.llm(max_model_len=max_model_len, **options)
        print(f"P9 {name}: {n} requests, outputs {out_range[0]}..{out_range[1]} ...", flush=True)
        outs, wall, cpu = timed_generate(llm, prompts, params)
        produced = sum(len(o.outputs[0].token_ids) for o in outs)
        assert produced == sum(out_lens), f"{name}: {produced} tokens, expected {sum(out_lens)}"
        result[name] = {"wall_s": wall, "output_tok_s": produced / wall, "cpu_s": cpu,
                        "output_tok_per_cpu_s": produced / cpu, "steps": llm.llm_engine.num_steps,
                        "preemptions": getattr(llm.llm_engine.scheduler, "num_preemptions", 0),
                        "max_running": max((r.num_running for r in getattr(llm.llm_engine.scheduler, "timeline", [])),
                                           default=max_num_seqs)}
        del llm, outs
        release(setup)
    result["speedup"] = result["continuous"]["output_tok_s"] / result["static"]["output_tok_s"]
    result["speedup_pool_bound"] = result["pool_bound"]["output_tok_s"] / result["static"]["output_tok_s"]
    result["speedup_cpu_time"] = result["continuous"]["output_tok_per_cpu_s"] / \
        result["static"]["output_tok_per_cpu_s"]
    return result


# -- P8: TTFT with a shared prefix -------------------------------------------------------------------------
def bench_p8(setup: Setup, quick: bool) -> dict:
    prefix_len = 200 if quick else 1000
    num_requests = 2 if quick else (8 if setup.cuda else 4)
    rng = random.Random(8)
    prefix = setup.prompt(rng, prefix_len)
    suffixes = [setup.prompt(rng, rng.randint(16, 32)) for _ in range(num_requests + 2)]
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    result = {"prefix_len": prefix_len, "num_requests": num_requests, "suffix_len_range": (16, 32)}
    for name, caching in (("uncached", False), ("cached", True)):
        llm = setup.llm(max_model_len=prefix_len + 64, max_num_seqs=4, enable_prefix_caching=caching,
                        num_kv_blocks=4 * -(-(prefix_len + 64) // 16))
        # warm-up: kernels, and (when caching) the prefix's blocks; the second request takes the cached-prefix
        # path once (its kernels compile and autotune before the clock starts)
        for suffix in suffixes[:2]:
            llm.generate(prefix + suffix, params)
        print(f"P8 {name}: {num_requests} requests with a {prefix_len}-token shared prefix ...", flush=True)
        ttfts = []
        for suffix in suffixes[2:]:  # one at a time: TTFT is the prefill alone, no queueing
            out = llm.generate(prefix + suffix, params)[0]
            ttfts.append(out.metrics.ttft)
        bm = getattr(llm.llm_engine.scheduler, "block_manager", None)
        result[name] = {"ttft_s": ttfts, "mean_ttft_s": sum(ttfts) / len(ttfts),
                        "prefix_cache_hit_tokens": bm.prefix_cache_hits if bm else 0}
        del llm, bm
        release(setup)
    result["ttft_reduction_pct"] = 100 * (1 - result["cached"]["mean_ttft_s"] / result["uncached"]["mean_ttft_s"])
    return result


# -- P6: the engine vs HF transformers ---------------------------------------------------------------------
def hf_static_generate(model_config: ModelConfig, prompts: list[list[int]], out_lens: list[int],
                       batch_size: int) -> float:
    """Wall seconds for HF `generate` over static batches (arrival order, left padding)."""
    import transformers
    config = transformers.LlamaConfig(
        vocab_size=model_config.vocab_size, hidden_size=model_config.hidden_size,
        intermediate_size=model_config.intermediate_size, num_hidden_layers=model_config.num_hidden_layers,
        num_attention_heads=model_config.num_attention_heads, num_key_value_heads=model_config.num_key_value_heads,
        rms_norm_eps=model_config.rms_norm_eps, rope_theta=model_config.rope_theta,
        max_position_embeddings=model_config.max_position_embeddings, tie_word_embeddings=False,
        pad_token_id=0, bos_token_id=None, eos_token_id=None)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build in bf16 (from_config's dtype keyword changed name in v5)
    try:
        with torch.device("cuda"):
            model = transformers.AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(previous)
    model = model.to(torch.bfloat16).eval()
    pad = 0
    torch.cuda.synchronize()
    start = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch, lens = prompts[first:first + batch_size], out_lens[first:first + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device="cuda")
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device="cuda")
        print(f"  HF batch {first // batch_size + 1}: {len(batch)} requests, {max(lens)} new tokens", flush=True)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(lens), min_new_tokens=max(lens),
                           do_sample=False, eos_token_id=None, pad_token_id=pad)
    torch.cuda.synchronize()
    wall = time.perf_counter() - start
    del model
    release()
    return wall


def _p6_minillm(setup: Setup, prompts: list[list[int]], params: list[SamplingParams], lo: int, hi: int,
                asynchronous: bool) -> dict:
    """One timed run of our engine on P6's requests (after a warm-up); its engine is dropped afterwards."""
    llm = setup.llm(max_model_len=2 * hi, max_num_seqs=256, async_scheduling=asynchronous)  # pool from profiling
    num_blocks = llm.llm_engine.scheduler.block_manager.num_blocks
    llm.generate(prompts[:16], [SamplingParams(temperature=0, max_tokens=4 + 4 * (i % 4), ignore_eos=True)
                                for i in range(len(prompts[:16]))])  # warm up: prefills, mixed steps, decodes
    print(f"P6 minillm{' (async scheduling)' if asynchronous else ''}: {len(prompts)} requests, lengths {lo}..{hi}, "
          f"KV pool {num_blocks} blocks ...", flush=True)
    outs, wall, _ = timed_generate(llm, prompts, params)
    produced = sum(len(o.outputs[0].token_ids) for o in outs)
    ours = {"wall_s": wall, "output_tok_s": produced / wall, "kv_blocks": num_blocks,
            "preemptions": llm.llm_engine.scheduler.num_preemptions, "steps": llm.llm_engine.num_steps}
    print(f"  {ours['output_tok_s']:,.0f} output tok/s, wall {wall:.2f} s", flush=True)
    del llm, outs
    release(setup)
    return ours


def p6_lengths(quick: bool = False) -> tuple[random.Random, list[int], list[int]]:
    """P6's requests: (the seeded generator, positioned to draw the prompts next; input lengths; output lengths),
    both uniform in 100..1024 for 256 requests (100..256 for 32 when quick). benchmarks/p6_bound.py reads them too."""
    n, lo, hi = (32, 100, 256) if quick else (256, 100, 1024)
    rng = random.Random(6)
    in_lens = [rng.randint(lo, hi) for _ in range(n)]
    return rng, in_lens, [rng.randint(lo, hi) for _ in range(n)]


def bench_p6(setup: Setup, quick: bool, hf_requests: int | None = None, async_scheduling: bool = False) -> dict:
    """Our engine on all n requests; HF generate on the first `hf_requests` of them (default: all).
    `async_scheduling`: our engine runs twice, with synchronous steps and then with EngineConfig(async_scheduling=
    True); the second run's numbers are under minillm.async_scheduling.

    HF's static batches cost about the same per token whatever their number, so its throughput on a prefix of
    the request list (whole batches) is a fair baseline when device time is short; the JSON says which was used."""
    n, lo, hi, hf_batch = (32, 100, 256, 16) if quick else (256, 100, 1024, 64)
    rng, in_lens, out_lens = p6_lengths(quick)
    prompts = [setup.prompt(rng, k) for k in in_lens]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in out_lens]
    ours = None
    for asynchronous in ((False, True) if async_scheduling else (False,)):
        result = _p6_minillm(setup, prompts, params, lo, hi, asynchronous)
        if ours is None:
            ours = result
        else:
            ours["async_scheduling"] = result
    # HF needs the GPU memory our KV pool and weights held
    model_config, setup.model = setup.model_config, None
    release()
    print(f"  GPU memory still allocated after dropping our engine: {torch.cuda.memory_allocated() / 2**30:.2f} GiB")
    print(f"P6 HF transformers {__import__('transformers').__version__}: static batches of {hf_batch} ...",
          flush=True)
    m = n if hf_requests is None else max(1, min(n, hf_requests))
    hf_wall = hf_static_generate(model_config, prompts[:m], out_lens[:m], hf_batch)
    hf = {"wall_s": hf_wall, "output_tok_s": sum(out_lens[:m]) / hf_wall, "batch_size": hf_batch,
          "num_requests": m, "output_tokens": sum(out_lens[:m])}
    return {"num_requests": n, "len_range": (lo, hi), "total_output_tokens": sum(out_lens), "minillm": ours,
            "hf": hf, "speedup": ours["output_tok_s"] / hf["output_tok_s"]}


# -- driver ------------------------------------------------------------------------------------------------
def table(results: dict) -> str:
    rows = ["part | what | value", "---|---|---"]
    if "p9" in results:
        r = results["p9"]
        rows += [f"P9 | static batching, output tok/s | {r['static']['output_tok_s']:.1f}",
                 f"P9 | continuous batching, output tok/s | {r['continuous']['output_tok_s']:.1f}",
                 f"P9 | continuous / static (wall clock) | {r['speedup']:.2f}x",
                 f"P9 | continuous / static (process CPU time) | {r['speedup_cpu_time']:.2f}x",
                 f"P9 | steps static / continuous | {r['static']['steps']} / {r['continuous']['steps']}",
                 f"(not P9) | pool-bound continuous, output tok/s (at most {r['pool_bound']['max_running']} running, "
                 f"{r['pool_bound']['preemptions']} preemptions) | {r['pool_bound']['output_tok_s']:.1f}",
                 f"(not P9) | pool-bound continuous / static | {r['speedup_pool_bound']:.2f}x"]
    if "p8" in results:
        r = results["p8"]
        rows += [f"P8 | mean TTFT, {r['prefix_len']}-token shared prefix, uncached | "
                 f"{1000 * r['uncached']['mean_ttft_s']:.0f} ms",
                 f"P8 | mean TTFT, prefix cached | {1000 * r['cached']['mean_ttft_s']:.0f} ms",
                 f"P8 | TTFT reduction | {r['ttft_reduction_pct']:.1f}%"]
    if "p6" in results:
        r = results["p6"]
        rows += [f"P6 | minillm output tok/s | {r['minillm']['output_tok_s']:.0f}",
                 f"P6 | HF generate ({r['hf'].get('num_requests', r['num_requests'])} requests, static batches of "
                 f"{r['hf']['batch_size']}) output tok/s | "
                 f"{r['hf']['output_tok_s']:.0f}", f"P6 | minillm / HF | {r['speedup']:.2f}x"]
        if "async_scheduling" in r["minillm"]:
            a = r["minillm"]["async_scheduling"]
            rows += [f"P6 | minillm, async scheduling, output tok/s | {a['output_tok_s']:.0f}",
                     f"P6 | async / sync | {a['output_tok_s'] / r['minillm']['output_tok_s']:.2f}x"]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke test of the script)")
    parser.add_argument("--parts", default="p9,p8,p6", help="comma-separated subset of p9,p8,p6")
    parser.add_argument("--out", default=None, help="write the raw results as JSON here")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="our engine replays CUDA graphs for decode steps (enforce_eager=False)")
    parser.add_argument("--piecewise", action=argparse.BooleanOptionalAction, default=None,
                        help="with --cuda-graphs: steps with prefill tokens replay piecewise graphs too (default: "
                             "the engine's default, on wherever decode graphs are; --no-piecewise turns them off)")
    parser.add_argument("--async-scheduling", action="store_true",
                        help="P6: run our engine with synchronous steps and with async_scheduling=True, one after "
                             "the other (P9 and P8 are unchanged)")
    parser.add_argument("--hf-requests", type=int, default=None,
                        help="P6: time HF generate on the first N requests only (whole static batches)")
    args = parser.parse_args(argv)
    parts = [p.strip().lower() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - {"p9", "p8", "p6"})
    if unknown:
        parser.error(f"unknown part(s) {', '.join(unknown)}; choose from p9, p8, p6")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and "p6" in parts:
        print("P6 skipped: it needs CUDA (an 8B-shaped model in bf16 against HF generate); P9 and P8 run on CPU")
        parts.remove("p6")
    if args.piecewise is not None and not args.cuda_graphs:
        parser.error("--piecewise needs --cuda-graphs (the piecewise graphs complement the decode graphs)")
    setup = Setup(device, enforce_eager=not args.cuda_graphs, piecewise=args.piecewise)
    device_name = torch.cuda.get_device_name() if setup.cuda else \
        f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
    print(f"device: {device_name}; model: {setup.name}", flush=True)
    results: dict = {}
    for part in ("p9", "p8", "p6"):  # P6 last: it gives the GPU to HF and drops our model
        if part in parts:
            if part == "p6":
                results[part] = bench_p6(setup, args.quick, args.hf_requests, args.async_scheduling)
            else:
                results[part] = {"p9": bench_p9, "p8": bench_p8}[part](setup, args.quick)
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record = {"benchmark": "bench_scheduling", "date": date, "device": device_name, "model": setup.name,
        "quick": args.quick, "cuda_graphs": args.cuda_graphs,
        "piecewise": args.cuda_graphs and args.piecewise is not False,
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "torch": torch.__version__,
        "python": platform.python_version(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "results": results}
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(record, f, indent=2)
        print(f"wrote {args.out}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
