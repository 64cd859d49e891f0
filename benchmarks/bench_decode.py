"""P5: single-stream decode speed of the engine on a Llama-3-8B-shaped model, with and without CUDA graphs.

    python benchmarks/bench_decode.py [--quick] [--out results.json] [--no-hf] [--gemv auto|on|off] [--gemv-ab]
                                      [--async-scheduling] [--shape llama3-8b|smollm2-135m|qwen3-8b]
                                      [--max-model-len N] [--qk-norm-ab]

The model has Llama-3-8B's shapes (hidden 4096, 32 layers, 32 heads, 8 kv heads, FFN 14336, vocab 128256)
and random bf16 weights drawn on the GPU (std 0.02, so activations stay finite), as vLLM's dummy-weight
benchmarks do: speed does not depend on the values. Each run: a 128-token prompt, 256 output tokens,
temperature 0, ignore_eos, batch 1, through LLMEngine (continuous scheduler, paged KV, Triton kernels).

Why decode at batch 1 is a memory benchmark: every step multiplies one token's activations by every weight,
so it must read all 16.06 GB of bf16 weights once per token. The floor is weight bytes / copy bandwidth, the
bandwidth measured in the same run (a device-to-device copy, bytes read + written): on the H200 (~4.25 TB/s)
about 3.8 ms per token, i.e. at most ~265 tok/s; the fraction of that floor is the figure of merit. Between
eager and CUDA graphs the difference is launch overhead: ~15 kernels per layer x 32 layers, each a few
microseconds of host time, which graphs replace by a single launch.

The dense linears and the LM head run the decode GEMV (minillm.kernels.gemv) where it measured faster than
cuBLAS on its first call (--gemv auto, the default; `on` forces it, `off` is cuBLAS only, as MINILLM_GEMV=0).
--gemv-ab adds CUDA-graph runs under the other two policies, in the same process, for the A/B; the choices made per
(N, K, M) are listed in the JSON under "gemv_decisions".

--shape qwen3-8b times Qwen3-8B's (36 layers, per-head q/k norms before RoPE, computed inside the fused RoPE +
KV-store launch; --qk-norm-ab adds a run with them as launches of their own, for the A/B).
--shape smollm2-135m times the bundled model's shapes instead (30 layers of hidden 576: small GEMMs, so attention
and launch costs weigh more). --max-model-len sets the engine's context limit (default: just enough for the request,
as above); a serving engine keeps it at thousands of tokens, and a decode CUDA graph sizes its attention's split-KV
choice for that length.

Baseline in the same run: Hugging Face transformers `generate` (greedy, min_new_tokens = max_new_tokens) on a
LlamaForCausalLM of the same shape with random weights (our model is freed first, so both never share memory).
Needs CUDA; prints a table and writes the raw numbers to --out as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=500000.0,
                 max_position_embeddings=8192, tie_word_embeddings=False)
SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, rms_norm_eps=1e-5, rope_theta=100000.0,
                    max_position_embeddings=8192, tie_word_embeddings=True)
# Qwen3-8B: 36 layers, head_dim 128 with per-head q/k norms (ModelConfig.qk_norm), a 151,936-token vocabulary
QWEN3_8B = dict(architecture="qwen3", qk_norm=True, vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                rope_theta=1000000.0, max_position_embeddings=8192, tie_word_embeddings=False)
SHAPES = {"llama3-8b": LLAMA3_8B, "smollm2-135m": SMOLLM2_135M, "qwen3-8b": QWEN3_8B}
INIT_STD = 0.02


def build_model(num_layers: int, quantization: str | None = None, options: dict | None = None,
                shape: dict = LLAMA3_8B, dtype: str = "bfloat16", device: str = "cuda"):
    """The Llama-3-8B-shaped model (or another of SHAPES) with random weights in `dtype` (bf16 by default); with
    `quantization` (a load-time method such as "rtn", options like {"bits": 4, "group_size": 128}) its decoder
    linears are quantized from those weights at load. device="cpu" (torch attention) only smoke-tests a script."""
    import torch
    from minillm.config import ModelConfig
    from minillm.models.llama import LlamaForCausalLM
    from minillm.quant.checkpoint import load_time_quantization

    config = load_time_quantization(ModelConfig(**{**shape, "num_hidden_layers": num_layers}), quantization,
                                    options)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config, backend="triton" if device == "cuda" else "torch")
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            elif param.is_floating_point():
                param.normal_(0.0, INIT_STD, generator=gen)
    if quantization is not None:
        model.process_weights_after_loading()  # the load-time method rounds and packs each staged weight here
    return model.eval(), config


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _sync(device: str) -> None:
    import torch
    if device == "cuda":
        torch.cuda.synchronize()


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + written), median of do_bench."""
    import torch
    import triton
    src = torch.empty(1 << 29, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=200)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def run_engine(model, config, prompt_len: int, output_len: int, batch: int, enforce_eager: bool | None,
               device: str = "cuda", async_scheduling: bool | None = False, max_model_len: int | None = None) -> dict:
    """Warm up, then time one batch of requests through LLMEngine. (device="cpu" only to smoke-test this code
    on a tiny model: the figures are GPU figures.) enforce_eager / async_scheduling None: the engine's defaults
    for the device (on CUDA: graphs, and async scheduling with decode graphs that sample)."""
    import torch
    from minillm.config import EngineConfig
    from minillm.engine.llm_engine import LLMEngine
    from minillm.loader.no_tokenizer import NoTokenizer
    from minillm.sampling_params import SamplingParams

    block_size = 16
    needed = -(-(prompt_len + output_len + 8) // block_size) * block_size
    if max_model_len is not None and max_model_len < needed:
        raise ValueError(f"max_model_len={max_model_len} is below the {needed} tokens one request needs")
    max_model_len = max_model_len or needed
    engine_config = EngineConfig(max_model_len=max_model_len, max_num_seqs=batch, scheduling="continuous",
                                 kv_layout="paged", block_size=block_size,
                                 num_kv_blocks=(batch + 1) * (needed // block_size),
                                 max_num_batched_tokens=max(max_model_len, batch * prompt_len),
                                 enforce_eager=enforce_eager,  # None: the default for the device
                                 async_scheduling=async_scheduling)
    start = time.perf_counter()
    dtype = next(model.parameters()).dtype
    engine = LLMEngine(model, NoTokenizer(), config, engine_config, device=device, dtype=dtype)
    setup_s = time.perf_counter() - start
    graphs = engine.runner.cuda_graphs is not None
    async_scheduling = engine.async_steps is not None  # as resolved (None: the default for the device)
    if device == "cuda" and enforce_eager is not None and graphs == enforce_eager:
        raise RuntimeError(f"expected CUDA graphs={not enforce_eager}, the runner has graphs={graphs}")
    gen = torch.Generator().manual_seed(1)

    def generate(n_out: int) -> tuple[float, float, list[list[int]]]:
        params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
        ids = [engine.add_request(None, torch.randint(0, config.vocab_size, (prompt_len,), generator=gen).tolist(),
                                  params) for _ in range(batch)]
        _sync(device)
        t0 = time.perf_counter()
        engine.step()  # the prefill step (samples the first token)
        t1 = time.perf_counter()
        done = {}
        while engine.has_unfinished_requests():
            for out in engine.step():  # each step ends in .tolist() of the sampled ids: a device sync
                if out.finished:
                    done[out.request_id] = out.outputs[0].token_ids
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1, [done[i] for i in ids]

    generate(8)  # warm-up: Triton JIT and flash-attention autotuning for these shapes
    prefill_s, decode_s, tokens = generate(output_len)
    if any(len(t) != output_len for t in tokens):
        raise RuntimeError(f"expected {output_len} tokens per request, got {[len(t) for t in tokens]}")
    decode_tokens = batch * (output_len - 1)
    # with async scheduling the first step() only launches the prefill (its token comes back one call later):
    # no TTFT, and the prefill's GPU time counts in decode_s (pessimistic by one prefill, ~0.5%)
    result = dict(cuda_graphs=graphs, async_scheduling=async_scheduling, setup_s=round(setup_s, 3),
                  ttft_ms=None if async_scheduling else round(prefill_s * 1e3, 3),
                  decode_s=round(decode_s, 4), decode_tok_per_s=round(decode_tokens / decode_s, 2),
                  ms_per_step=round(decode_s / (output_len - 1) * 1e3, 3), first_tokens=tokens[0][:8])
    del engine
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def run_hf(num_layers: int, prompt_len: int, output_len: int, batch: int, shape: dict = LLAMA3_8B) -> dict:
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    qwen3 = shape.get("architecture") == "qwen3"
    fields = {k: v for k, v in shape.items() if k not in ("architecture", "qk_norm")}
    cfg = (Qwen3Config if qwen3 else LlamaConfig)(**{**fields, "num_hidden_layers": num_layers},
                                                  initializer_range=INIT_STD, pad_token_id=0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = (Qwen3ForCausalLM if qwen3 else LlamaForCausalLM)(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt_len), generator=gen).cuda()
    mask = torch.ones_like(ids)

    def timed(n_new: int) -> float:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_new, min_new_tokens=n_new,
                                 do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        if out.shape[1] != prompt_len + n_new:
            raise RuntimeError(f"HF generated {out.shape[1] - prompt_len} tokens, expected {n_new}")
        return time.perf_counter() - t0

    timed(8)  # warm-up
    prefill_s = min(timed(1) for _ in range(3))
    total_s = timed(output_len)
    decode_s = total_s - prefill_s
    result = dict(transformers=transformers.__version__, ttft_ms=round(prefill_s * 1e3, 3),
                  decode_s=round(decode_s, 4), decode_tok_per_s=round(batch * (output_len - 1) / decode_s, 2),
                  ms_per_step=round(decode_s / (output_len - 1) * 1e3, 3))
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 output tokens instead of 256")
    parser.add_argument("--out", default=None, help="write the raw results here as JSON")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=None)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=None,
                        help="fewer layers for a smoke test (not for figures); default: the shape's")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    parser.add_argument("--max-model-len", type=int, default=None,
                        help="the engine's context limit (default: prompt + output, rounded up to a block)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--gemv", choices=["auto", "on", "off"], default="auto",
                        help="decode GEMV policy of the engine runs (default auto: timed against cuBLAS per shape)")
    parser.add_argument("--async-scheduling", action="store_true",
                        help="add a CUDA-graph run with async scheduling (the host prepares step N+1 while the GPU "
                             "runs step N) for an A/B in the same run")
    parser.add_argument("--gemv-ab", action="store_true",
                        help="add CUDA-graph runs under the other two GEMV policies (off = cuBLAS only, on, auto) "
                             "for an A/B in the same run")
    parser.add_argument("--qk-norm-ab", action="store_true",
                        help="(a shape with q/k norms: qwen3-8b) add a graphs + async run with the norms as their own "
                             "launches (a hook on each keeps it out of the fused RoPE + KV-store kernel)")
    args = parser.parse_args(argv)
    output_len = args.output_len or (64 if args.quick else 256)
    shape = SHAPES[args.shape]
    if args.qk_norm_ab and not shape.get("qk_norm"):
        parser.error(f"--qk-norm-ab needs a shape with q/k norms (qwen3-8b), not {args.shape}")
    args.layers = args.layers or shape["num_hidden_layers"]
    if args.prompt_len < 1 or output_len < 2 or args.batch < 1 or args.layers < 1:
        parser.error("need --prompt-len >= 1, --output-len >= 2, --batch >= 1, --layers >= 1")
    if args.max_model_len is not None and args.max_model_len < args.prompt_len + output_len + 8:
        parser.error(f"--max-model-len {args.max_model_len} is below --prompt-len + output + 8 "
                     f"({args.prompt_len + output_len + 8})")

    import torch
    if not torch.cuda.is_available():
        print("bench_decode needs a CUDA GPU (an 8B-shaped model through the Triton interpreter would take days); "
              "nothing was measured.", file=sys.stderr)
        return 2
    import triton

    import minillm  # noqa: F401  (platform setup)
    from minillm.layers import gemv_dispatch

    model, config = build_model(args.layers, shape=shape)
    nbytes = weight_bytes(model)
    peak_bytes_per_s = copy_bandwidth()
    floor_steps = peak_bytes_per_s / nbytes  # decode steps per second if only the weights had to be read
    results: dict = dict(
        benchmark="P5 decode", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        command="python benchmarks/bench_decode.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        model=dict(shape, name=args.shape, num_hidden_layers=args.layers, dtype="bfloat16", weights="random"),
        max_model_len=args.max_model_len,
        weight_gb=round(nbytes / 1e9, 3), copy_bytes_per_s=round(peak_bytes_per_s),
        weight_read_floor_tok_per_s=round(floor_steps * args.batch, 2),
        prompt_len=args.prompt_len, output_len=output_len, batch=args.batch, gemv=args.gemv, runs={})
    plan = [("engine_eager", True, args.gemv), ("engine_cuda_graphs", False, args.gemv),
            ("engine_default", None, args.gemv)]
    if args.gemv_ab:  # the other two policies, with graphs, in the same process
        others = {"off": "engine_cuda_graphs_no_gemv", "on": "engine_cuda_graphs_gemv_on", "auto": "engine_cuda_graphs_auto"}
        for mode in ("off", "on", "auto"):
            if mode != args.gemv:
                plan.insert(1, (others[mode], False, mode))
    # the first two are the synchronous baselines; "engine_default" takes every engine default (async included)
    plan = [(name, eager, gemv, None if name == "engine_default" else False) for name, eager, gemv in plan]
    if args.async_scheduling:
        plan.append(("engine_cuda_graphs_async", False, args.gemv, True))
    if args.qk_norm_ab:
        plan.append(("engine_async_qk_norm_unfused", False, args.gemv, True))
    for name, eager, gemv, overlap in plan:
        gemv_dispatch.set_gemv_mode(gemv)  # before the engine captures its graphs
        hooks = [m.register_forward_pre_hook(lambda module, inputs: None) for n, m in model.named_modules()
                 if n.endswith(("q_norm", "k_norm"))] if name.endswith("qk_norm_unfused") else []
        try:
            run = run_engine(model, config, args.prompt_len, output_len, args.batch, enforce_eager=eager,
                             async_scheduling=overlap, max_model_len=args.max_model_len)
            run["fraction_of_floor"] = round(run["decode_tok_per_s"] / (floor_steps * args.batch), 4)
            run["gemv"] = gemv
        except Exception as err:  # keep the other measurements
            run = dict(error=f"{type(err).__name__}: {err}")
        finally:
            for hook in hooks:
                hook.remove()
        results["runs"][name] = run
        print(name, json.dumps(run), flush=True)
    # what the last run chose per (N, K, M): a GemvConfig, or cuBLAS
    results["gemv_decisions"] = [dict(n=key[2], k=key[3], m=key[4], choice=repr(cfg) if cfg else "cuBLAS")
                                 for key, cfg in gemv_dispatch._GEMV_DECISIONS.items()]
    for d in results["gemv_decisions"]:
        print(f"gemv decision N={d['n']} K={d['k']} M={d['m']}: {d['choice']}")
    del model
    gc.collect()
    torch.cuda.empty_cache()
    if not args.no_hf:
        try:
            run = run_hf(args.layers, args.prompt_len, output_len, args.batch, shape)
            run["fraction_of_floor"] = round(run["decode_tok_per_s"] / (floor_steps * args.batch), 4)
        except Exception as err:
            run = dict(error=f"{type(err).__name__}: {err}")
        results["runs"]["hf_generate"] = run
        print("hf_generate", json.dumps(run), flush=True)
    hf = results["runs"].get("hf_generate", {}).get("decode_tok_per_s")
    print(f"\nP5 decode, batch {args.batch}, prompt {args.prompt_len}, {output_len} new tokens, "
          f"{results['weight_gb']} GB weights, floor {results['weight_read_floor_tok_per_s']} tok/s")
    print(f"{'run':<22}{'tok/s':>10}{'ms/step':>10}{'TTFT ms':>10}{'of floor':>10}{'vs HF':>8}")
    for name, run in results["runs"].items():
        if "error" in run:
            print(f"{name:<22}  error: {run['error']}")
            continue
        ratio = f"{run['decode_tok_per_s'] / hf:.2f}x" if hf else "-"
        ttft = f"{run['ttft_ms']:>10.1f}" if run['ttft_ms'] is not None else f"{'-':>10}"
        print(f"{name:<22}{run['decode_tok_per_s']:>10.1f}{run['ms_per_step']:>10.2f}{ttft}"
              f"{run['fraction_of_floor']:>10.1%}{ratio:>8}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0 if all("error" not in r for r in results["runs"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
