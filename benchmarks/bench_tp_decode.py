"""Issue 15: decode speed with tensor parallelism, TP = 1 against TP = 2, and what the all-reduces cost (chapter 11).

    python benchmarks/bench_tp_decode.py [--tp 1 2] [--pp 2] [--batches 1 64] [--output-len 64] [--out results.json]
    python benchmarks/bench_tp_decode.py --cpu          # a smoke run: tiny model, gloo, 2 CPU processes

Each run: an engine on random weights of the Llama-3-8B shape (bf16; vLLM's "dummy" load: speed does not depend
on the values), `batch` requests of --prompt-len random tokens, --output-len new tokens each, greedy; decode
tok/s over the steps after the prefill. TP = 1 runs in-process twice, with CUDA graphs (the engine's default) and
eagerly; TP >= 2 runs in worker processes (LLM(tensor_parallel_size=N)'s executor: one GPU per rank, NCCL), eagerly
(minillm/parallel/runner.py captures no graphs), so the like-for-like ratio is TP = 2 eager over TP = 1 eager, and
TP = 1 with graphs is what a single GPU gives today. --pp N adds a pipeline-parallel run of N stages (eager, its
steps cut into micro-batches), for its tokens and speed beside the others.

All-reduce time per step: every decoder layer all-reduces its attention output and its MLP output ([batch,
hidden] each), and the embedding adds one more: 2 x layers + 1 per step. Each rank times one all-reduce of that
size on the engine's own TP group (Worker.time_all_reduce, CUDA events, median of 20) after the run; the product is
the figure. Greedy tokens: request 0's tokens under TP = N against TP = 1 eager (same weights), reported as the
first position where they part, if any (bf16 sums in a different order can flip a near-tie).
Needs 2 GPUs for TP = 2 (status lends them only at times); NCCL_NVLS_ENABLE=0 is set as issue 15 asks.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import sys
import time

os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
os.environ.setdefault("NVSHMEM_DISABLE_NVLS", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from bench_decode import LLAMA3_8B  # noqa: E402
from minillm.loader.no_tokenizer import NoTokenizer  # noqa: E402


_MODELS: dict = {}


def build_engine(config, tp: int, pp: int, batch: int, max_model_len: int, eager: bool, device: torch.device,
                 dtype: torch.dtype):
    """(engine, executor or None): one rank in this process, tp x pp ranks over worker processes."""
    from minillm.config import EngineConfig
    from minillm.engine.cache_config import resolve_engine_config
    from minillm.engine.executor import MultiProcExecutor
    from minillm.engine.llm_engine import LLMEngine
    from minillm.engine.worker import RandomWeights

    blocks = (batch + 1) * -(-max_model_len // 16)
    options = dict(max_model_len=max_model_len, max_num_seqs=batch, block_size=16, num_kv_blocks=blocks,
                   max_num_batched_tokens=max(max_model_len, batch * 128), enforce_eager=eager,
                   tensor_parallel_size=tp, pipeline_parallel_size=pp)
    if tp * pp == 1:  # the one-rank engines share one model (drawing 8B random numbers takes a while)
        key = (id(config), device, dtype)
        if key not in _MODELS:
            _MODELS.clear()
            _MODELS[key] = RandomWeights(seed=0)(config, device, dtype)
        return LLMEngine(_MODELS[key], NoTokenizer(), config, EngineConfig(**options), device=device,
                         dtype=dtype), None
    engine_config = resolve_engine_config(EngineConfig(**options), config, device)
    executor = MultiProcExecutor(dict(model_config=config, engine_config=engine_config, device=device, dtype=dtype,
                                      model_source=RandomWeights(seed=0), seed=0))
    engine = LLMEngine(None, NoTokenizer(), config, EngineConfig(**options), device=device, dtype=dtype,
                       executor=executor)
    return engine, executor


def decode_run(engine, batch: int, prompt_len: int, output_len: int, vocab: int) -> dict:
    """Warm up, then time one batch: decode tok/s after the prefill step, and request 0's tokens."""
    from minillm.sampling_params import SamplingParams

    gen = torch.Generator().manual_seed(1)

    def generate(n_out: int) -> tuple[float, list[int]]:
        params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
        ids = [engine.add_request(None, torch.randint(0, vocab, (prompt_len,), generator=gen).tolist(), params)
               for _ in range(batch)]
        engine.step()  # the prefill
        start, done = time.perf_counter(), {}
        while engine.has_unfinished_requests():
            done.update((o.request_id, o.outputs[0].token_ids) for o in engine.step() if o.finished)
        return time.perf_counter() - start, done[ids[0]]

    generate(4)  # compile, autotune, capture
    gen.manual_seed(2)  # the same prompts in every run
    seconds, tokens = generate(output_len)
    return dict(decode_tok_per_s=round(batch * (output_len - 1) / seconds, 2),
                ms_per_step=round(1e3 * seconds / (output_len - 1), 3), tokens=tokens)


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--pp", type=int, nargs="*", default=[], help="pipeline-parallel runs (stages)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None, help="fewer layers (a smoke test, not a figure)")
    parser.add_argument("--cpu", action="store_true", help="smoke run on the CPU: tiny model, fp32, gloo")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if any(t < 1 for t in args.tp + args.batches) or any(p < 2 for p in args.pp) or args.prompt_len < 1 \
            or args.output_len < 2:
        parser.error("--tp and --batches must be >= 1, --pp >= 2, --prompt-len >= 1, --output-len >= 2")
    if 1 not in args.tp:
        parser.error("--tp must include 1: the baseline and the tokens' reference")
    from minillm.config import ModelConfig
    cuda = torch.cuda.is_available() and not args.cpu
    if not cuda and not args.cpu:
        parser.error("no CUDA here: pass --cpu for the smoke run")
    if cuda and max(args.tp + args.pp) > torch.cuda.device_count():
        parser.error(f"--tp / --pp {max(args.tp + args.pp)} needs as many GPUs; this machine has "
                     f"{torch.cuda.device_count()}")
    shape = dict(LLAMA3_8B, num_hidden_layers=args.layers or LLAMA3_8B["num_hidden_layers"])
    if args.cpu:
        shape.update(vocab_size=256, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                     num_key_value_heads=2, num_hidden_layers=args.layers or 2)
    config = ModelConfig(**shape)
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    max_model_len = -(-(args.prompt_len + args.output_len + 8) // 16) * 16
    runs, reference = [], {}
    # (tp, pp, eager): one rank eagerly first (every other run's tokens are compared with its), with graphs, then
    # the parallel runs (eager: minillm/parallel/runner.py captures no graphs). Each engine serves every batch size.
    plans = [(1, 1, True)] + ([(1, 1, False)] if cuda else [])
    plans += [(tp, 1, True) for tp in sorted(args.tp) if tp > 1] + [(1, pp, True) for pp in sorted(args.pp)]
    for tp, pp, eager in plans:
        engine, executor = build_engine(config, tp, pp, max(args.batches), max_model_len, eager, device, dtype)
        try:
            for batch in args.batches:
                run = decode_run(engine, batch, args.prompt_len, args.output_len, config.vocab_size)
                per_all_reduce = max(executor.collective_rpc("time_all_reduce", batch)) if executor else 0.0
                tokens = run.pop("tokens")
                reference.setdefault(batch, tokens)  # the first plan's: one rank, eager
                run.update(batch=batch, tp=tp, pp=pp, cuda_graphs=not eager,
                           all_reduce_ms_per_step=round((2 * config.num_hidden_layers + 1) * per_all_reduce, 3),
                           tokens_part_from_tp1_at=first_difference(tokens, reference[batch]))
                runs.append(run)
                print(json.dumps(run), flush=True)
        finally:
            if executor is not None:
                executor.shutdown()
            del engine
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    runs.sort(key=lambda r: (r["batch"], r["tp"] * r["pp"], r["pp"], r["cuda_graphs"]))
    print(f"\ndecode, {config.num_hidden_layers} layers of hidden {config.hidden_size}, {dtype}, "
          f"prompt {args.prompt_len}, {args.output_len} new tokens")
    print(f"{'batch':>6}{'tp':>4}{'pp':>4}{'graphs':>8}{'tok/s':>11}{'ms/step':>9}{'all-reduce ms':>15}"
          f"{'tokens part at':>16}")
    for r in runs:
        part = "-" if r["tokens_part_from_tp1_at"] is None else str(r["tokens_part_from_tp1_at"])
        print(f"{r['batch']:>6}{r['tp']:>4}{r['pp']:>4}{str(r['cuda_graphs']):>8}{r['decode_tok_per_s']:>11.1f}"
              f"{r['ms_per_step']:>9.2f}{r['all_reduce_ms_per_step']:>15.3f}{part:>16}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(benchmark="issue 15 TP decode", device=torch.cuda.get_device_name() if cuda else "cpu",
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           torch=torch.__version__, command="python benchmarks/bench_tp_decode.py "
                           + " ".join(argv if argv is not None else sys.argv[1:]),
                           model=dict(shape, dtype=str(dtype), weights="random"), runs=runs), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
