"""Command-line entry points of the bench package: `minillm demo`, `minillm estimate`, `minillm bench [serve]`.

minillm/cli.py owns the parser; it calls `register(subparsers)` here. Each subcommand stores its handler in
`args.func`, which takes the parsed arguments and returns an exit code. Run standalone with
`python -m minillm.bench.cli estimate --table`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys

from minillm.cli import check_output_path

_SUFFIX = {"": 1.0, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}


def parse_count(text: str) -> float:
    """'70e9', '70b', '135M', '6.74B' -> a number of parameters."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbt]?)\s*", text.lower())
    if not m:
        raise argparse.ArgumentTypeError(f"not a parameter count: {text!r}; write e.g. 70e9, 70b, 135m")
    return float(m.group(1)) * _SUFFIX[m.group(2)]


# `minillm estimate`'s flags and their defaults: --table refuses a flag not left at its default
ESTIMATE_DEFAULTS = {"model": None, "params": None, "layers": None, "kv_heads": None, "head_dim": None,
                     "dtype": "fp16", "kv_dtype": None, "context": 4096, "batch": 1, "gpu_gb": 80.0}


def _cmd_estimate(args: argparse.Namespace) -> int:
    from minillm.bench import estimate as est

    try:
        if args.table:  # a fixed table: a flag given with it was ignored (and a bad value never checked)
            given = [f"--{name.replace('_', '-')}" for name, default in ESTIMATE_DEFAULTS.items()
                     if getattr(args, name) != default]
            if given:
                raise ValueError(f"--table prints the fixed 70B table and reads no other flag; drop {', '.join(given)}")
            print("Weights of a 70B model (decimal GB = 1e9 bytes; weights only, no KV cache):")
            print(est.format_seed_table())
            return 0
        explicit = [args.layers, args.kv_heads, args.head_dim]
        if args.model is None and any(v is None for v in explicit + [args.params]):
            raise ValueError("give --model (one of: " + ", ".join(est.PRESETS) + ") or all of "
                             "--params, --layers, --kv-heads, --head-dim")
        if args.model is not None:
            shape = est.get_preset(args.model)
            if any(v is not None for v in explicit):
                raise ValueError("--layers/--kv-heads/--head-dim describe a custom model; drop --model to use them")
        else:
            shape = est.custom_shape(args.params, args.layers, args.kv_heads, args.head_dim)
        e = est.estimate(shape, args.dtype, args.context, args.batch, kv_dtype=args.kv_dtype, num_params=args.params)
        table = est.format_estimate(e, gpu_gb=args.gpu_gb)
    except ValueError as err:
        print(f"minillm estimate: error: {err}", file=sys.stderr)
        return 2
    print(table)
    if args.model is not None and args.params is None:
        print(f"(parameters counted from {e.model}'s shapes; nominal {est.get_preset(args.model).nominal_params / 1e9:g} B; "
              f"pass --params to override)")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from minillm.bench.demo import run_demo

    try:
        check_output_path(args.out, "--out", folder=True)  # the plot is saved last: not after a minute's demo
        run_demo(max_tokens=args.max_tokens, out_dir=args.out, model=args.model, device=args.device)
    except (ValueError, TypeError, OSError) as err:  # OSError: a model path that is not there
        print(f"minillm demo: error: {err}", file=sys.stderr)
        return 2
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from minillm.bench.workload import run_bench

    try:
        _check_output_file(args.json)
        result = run_bench(num_prompts=args.num_prompts, input_len=args.input_len, output_len=args.output_len,
                           model=args.model, device=args.device, dtype=args.dtype, seed=args.seed,
                           max_model_len=args.max_model_len)
    except (ValueError, TypeError, OSError) as err:  # OSError: a model path that is not there
        print(f"minillm bench: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        from minillm.bench.harness import to_dict
        _write_json(args.json, to_dict(result))
    return 0


def _write_json(path: str, data: dict | list) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"raw results written to {path}")


def _check_output_file(path: str | None) -> None:
    """A results file's folder must exist before the run, not after it (the measurements would be lost)."""
    if path is not None:
        check_output_path(path, "", folder=False)


def parse_rates(text: str) -> list[float]:
    """'1,2,4,inf' -> [1.0, 2.0, 4.0, inf] (requests per second; inf is a burst)."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of request rates: {text!r}; write e.g. 1,2,4,inf") from None
    if not rates or any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"request rates must be > 0 (inf for a burst), got {text!r}")
    return rates


def positive_ms(text: str) -> float:
    """An SLO in milliseconds: a finite number > 0 (goodput counts the requests within it; -1 or nan counted none)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a finite number of milliseconds > 0, got {text!r}")
    return value


def _cmd_bench_serve(args: argparse.Namespace) -> int:
    import httpx

    from minillm.bench import serve as bs

    try:
        _check_output_file(args.json)
        _check_output_file(args.plot)
        prompts = bs.docstring_prompts(args.num_prompts, args.max_prompt_chars, args.seed)
        for rate in args.request_rate:  # every rate of a sweep, before the first is run
            bs.check_rate(len(prompts), rate, args.arrival, "--request-rate")
        results = []
        for rate in args.request_rate:
            result = bs.bench_serve(args.base_url, prompts, rate, args.arrival, args.output_len, args.model,
                                    args.slo_ttft_ms, args.slo_tpot_ms, args.seed, args.api_key)
            if not result.completed:  # a table of nan and exit 0 read as a benchmark that worked
                first = " ".join(str(result.errors[0] if result.errors else "none reported").split())
                print(f"minillm bench serve: error: no request succeeded at --request-rate {rate:g} "
                      f"({result.num_requests} sent); the first error: {first}", file=sys.stderr)
                return 1
            results.append(result)
            print(bs.format_result(result), flush=True)
    except ValueError as err:
        print(f"minillm bench serve: error: {err}", file=sys.stderr)
        return 2
    except (httpx.HTTPError, KeyError, IndexError) as err:  # no server there, or not an OpenAI-compatible one
        print(f"minillm bench serve: error: {type(err).__name__}: {err} (is a server running at {args.base_url}?)",
              file=sys.stderr)
        return 2
    if args.json:
        with open(args.json, "w") as f:
            f.write(bs.to_json(results))
        print(f"raw results written to {args.json}")
    if args.plot:
        from minillm.bench.plots import save_figure
        print(f"latency against request rate plotted to {save_figure(bs.plot_latency_vs_rate(results), args.plot)}")
    return 0


def _cmd_bench_stack(args: argparse.Namespace) -> int:
    from minillm.bench.stack import format_stack, run_stack, to_dict

    try:
        _check_output_file(args.json)
        _check_output_file(args.plot)
        rows = run_stack(model=args.model, device=args.device, dtype=args.dtype, num_prompts=args.num_prompts,
                         batch=args.batch, prefix_len=args.prefix_len, suffix_len=args.suffix_len,
                         output_len=args.output_len, seed=args.seed)
    except (ValueError, TypeError, OSError) as err:
        print(f"minillm bench stack: error: {err}", file=sys.stderr)
        return 2
    print(format_stack(rows))
    if args.json:
        _write_json(args.json, to_dict(rows))
    if args.plot:
        from matplotlib.figure import Figure

        from minillm.bench.plots import plot_stack, save_figure
        fig = Figure(figsize=(9, 4), layout="constrained")
        plot_stack(rows, fig.subplots())
        print(f"plotted to {save_figure(fig, args.plot)}")
    return 0


def _cmd_bench_latency(args: argparse.Namespace) -> int:
    from minillm.bench.latency import run_latency, to_dict

    try:
        _check_output_file(args.json)
        result = run_latency(batch_size=args.batch_size, input_len=args.input_len, output_len=args.output_len,
                             num_iters=args.num_iters, num_iters_warmup=args.num_iters_warmup, model=args.model,
                             device=args.device, dtype=args.dtype, seed=args.seed, max_model_len=args.max_model_len,
                             load_format=args.load_format)
    except (ValueError, TypeError, OSError) as err:
        print(f"minillm bench latency: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        _write_json(args.json, to_dict(result))
    return 0


def _add_bench_latency(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency", help="one batch timed from submission to its last token, over several "
                                       "iterations: mean and percentiles (vLLM's benchmark_latency)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--input-len", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=128, help="generated tokens per request (EOS ignored)")
    p.add_argument("--num-iters-warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--num-iters", type=int, default=10, help="timed iterations")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: bundled SmolLM2-135M)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--load-format", choices=("auto", "dummy"), default="auto",
                   help="dummy: random weights of the model's shapes (a directory with config.json and a tokenizer "
                        "is enough)")
    p.add_argument("--json", default=None, help="also write the result here")
    p.set_defaults(func=_cmd_bench_latency)


def _add_bench_stack(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("stack", help="the course's optimizations stacked row by row on one workload, each "
                                     "measured here: tok/s, TTFT, TPOT")
    p.add_argument("--num-prompts", type=int, default=None, help="requests (default 8 on a CPU, 32 on a GPU)")
    p.add_argument("--batch", type=int, default=None,
                   help="sequences per step from the batching rows on (default 4 on a CPU, 16 on a GPU)")
    p.add_argument("--prefix-len", type=int, default=None,
                   help="tokens of the system prompt every request shares (default 96 / 256)")
    p.add_argument("--suffix-len", type=int, default=None, help="tokens of each request's own part (default 32 / 64)")
    p.add_argument("--output-len", type=int, default=None,
                   help="longest answer, lengths drawn from [output_len // 4, output_len] (default 32 / 128)")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: bundled SmolLM2-135M)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--plot", default=None, help="also draw the rows here (PNG)")
    p.set_defaults(func=_cmd_bench_stack)


def _add_bench_serve(bench: argparse.ArgumentParser) -> None:
    sub = bench.add_subparsers(dest="bench_command", metavar="{serve,stack,latency}")
    _add_bench_stack(sub)
    _add_bench_latency(sub)
    p = sub.add_parser("serve", help="load a running server with docstring prompts at a request rate: "
                                     "TTFT/TPOT/ITL/E2E, throughput, goodput")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default=None, help="model id (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--num-prompts", type=int, default=50)
    p.add_argument("--request-rate", type=parse_rates, default=[math.inf],
                   help="requests/s, one or a comma list to sweep (inf: all at once); default inf")
    p.add_argument("--arrival", choices=("poisson", "burst"), default="poisson")
    p.add_argument("--output-len", type=int, default=64, help="tokens per answer (EOS ignored)")
    p.add_argument("--max-prompt-chars", type=int, default=400, help="docstring prompts are cut to this length")
    p.add_argument("--slo-ttft-ms", type=positive_ms, default=1000.0, help="goodput: TTFT at most this")
    p.add_argument("--slo-tpot-ms", type=positive_ms, default=200.0, help="goodput: TPOT at most this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the raw results here")
    p.add_argument("--plot", default=None, help="save latency against request rate here (PNG)")
    p.set_defaults(func=_cmd_bench_serve)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("demo", help="load the bundled model, answer 8 chat prompts, print TTFT/TPOT/throughput")
    p.add_argument("--max-tokens", type=int, default=None, help="tokens per answer (default 48 on CPU, 128 on GPU)")
    p.add_argument("--out", default="out", help="folder for the plot (default: out/)")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: bundled SmolLM2-135M)")
    p.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    p.set_defaults(func=_cmd_demo)

    p = subparsers.add_parser("estimate", help="memory for weights + KV cache of a model size, dtype, context, batch")
    p.add_argument("--model", help="preset: llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, llama-3-70b, "
                                   "smollm2-135m")
    p.add_argument("--params", type=parse_count, help="parameter count (70e9, 70b); overrides the preset's")
    p.add_argument("--layers", type=int, help="custom model: number of layers")
    p.add_argument("--kv-heads", type=int, help="custom model: key/value heads per layer")
    p.add_argument("--head-dim", type=int, help="custom model: dimension of each head")
    p.add_argument("--dtype", help="weights: fp32, fp16, bf16, fp8, int8, int4 (default fp16)")
    p.add_argument("--kv-dtype", help="KV cache dtype (default: the weights' float dtype, fp16 for int)")
    p.add_argument("--context", type=int, help="tokens per sequence (default 4096)")
    p.add_argument("--batch", type=int, help="sequences held at once (default 1)")
    p.add_argument("--gpu-gb", type=float, help="memory of one GPU, to count GPUs (default 80)")
    p.set_defaults(**ESTIMATE_DEFAULTS)
    p.add_argument("--table", action="store_true", help="print the seed's 70B table (140 / 70 / 35 GB) and exit")
    p.set_defaults(func=_cmd_estimate)

    p = subparsers.add_parser("bench", help="offline throughput run: N prompts at once, TTFT/TPOT percentiles")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=32, help="generated tokens per request (EOS ignored)")
    p.add_argument("--model", default=None, help="GGUF file or HF directory (default: bundled SmolLM2-135M)")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context reserved per sequence (default: the engine's; a contiguous cache reserves all of it)")
    p.add_argument("--json", default=None, help="also write the raw results here")
    p.set_defaults(func=_cmd_bench)
    _add_bench_serve(p)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="minillm")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
