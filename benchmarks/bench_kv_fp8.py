"""FP8 KV cache on the GPU (issue 10): how many blocks the pool gets, and decode speed at long context, vs bf16.

    python benchmarks/bench_kv_fp8.py [--batch 32] [--context 4096] [--output-len 64] [--out results.json]
    python benchmarks/bench_kv_fp8.py --skip-engine --sweep      # only the per-part kernel table, plus fp8 tiles

Per part first (no model: one layer's pool of batch x context tokens, Llama-3-8B's 8 kv heads x 128, the
launches of 8 layers captured in a CUDA graph and replayed, so the times are what a graphed decode step sees):
  * store: writing the step's new K/V (one token per sequence): bf16; fp8 as before (quantize_kv in torch, 4
    ops per tensor, then a byte-moving store kernel); fp8 now (the store kernel quantises: one launch);
  * attention: the paged decode kernel over the whole context: bf16 (its tile rule); fp8 before (`k.to(bf16)`
    widening on bf16's tile: fp8_widen="cast"); fp8 now ("cvt": int32 words widened to fp16 with the hardware
    instruction, and "bits": the same with the bit trick), on the fp8 tile rule. --sweep adds fp8 tiles around
    the rule. Each fp8 output is first checked against the bf16 kernel reading the dequantised cache.
  The table prints microseconds per layer, the bytes it moves per second, the fraction of the copy bandwidth
  measured in the same run, and times the model's layers (32): the step's share of that part.
Then the engine (skipped with --skip-engine), for kv_cache_dtype "auto" (bf16, the baseline of the same run)
and "fp8":

* pool: the blocks num_device_blocks finds for gpu_memory_utilization=0.9 after profiling (fp8 should give 2x);
* decode: `batch` requests of a (context - output_len)-token prompt, greedy, output_len new tokens, CUDA graphs
  on (the default); the time per decode step after the prefill. A step reads every weight once (16.06 GB) and
  every cached key and value of every sequence (bf16: 128 KiB per token, fp8: 64 KiB), so at batch 32 x 4k tokens
  the KV reads (17 GB in bf16) outweigh the weights and fp8 should cut the step by about a third. The floor
  is those bytes / the copy bandwidth measured in the same run; the fraction of it is printed.
Needs CUDA; prints tables and writes the raw numbers as JSON. The part table takes ~30 s (~60 s with --sweep),
the engine ~90 s.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import sys
import time
from pathlib import Path

import torch

from bench_decode import build_model, copy_bandwidth, weight_bytes
from minillm.loader.no_tokenizer import NoTokenizer

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16  # Llama-3-8B's attention, the engine's block size
GRAPH_LAYERS = 8  # launches per captured graph


def graph_us(fn, launches: int = GRAPH_LAYERS) -> float:
    """Microseconds per call of fn, replayed from a CUDA graph of `launches` calls (after an eager warm-up)."""
    from minillm.bench.roofline import graph_us as replayed_us
    fn()
    torch.cuda.synchronize()
    return replayed_us(lambda i: fn(), launches)


def kernel_parts(batch: int, context: int, bandwidth: float, sweep: bool, num_layers: int) -> list[dict]:
    """The store and attention rows of the part table (see the module docstring)."""
    from minillm.kernels.fused import store_kvcache
    from minillm.kernels.decode_split_rule import choose_decode_config
    from minillm.kernels.paged_attention import paged_decode_attention
    from minillm.layers.kv_quant import FP8_KV_DTYPE, dequantize_kv, quantize_kv
    dev, sms = torch.device("cuda"), torch.cuda.get_device_properties(0).multi_processor_count
    gen = torch.Generator(device=dev).manual_seed(0)
    num_blocks = batch * (-(-context // BLOCK)) + 1
    k = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen) * 3
    v = torch.randn(num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen)
    # scales as calibration sets them (amax * 4 / 448 per kv head), then the cache and its dequantised copy
    k_scale = k.float().abs().amax(dim=(0, 1, 3)) * 4 / 448
    v_scale = v.float().abs().amax(dim=(0, 1, 3)) * 4 / 448
    kq = quantize_kv(k.flatten(0, 1), k_scale).view(k.shape)
    vq = quantize_kv(v.flatten(0, 1), v_scale).view(v.shape)
    kd = dequantize_kv(kq.flatten(0, 1), k_scale, torch.bfloat16).view(k.shape)
    vd = dequantize_kv(vq.flatten(0, 1), v_scale, torch.bfloat16).view(v.shape)
    del k, v
    tables = (torch.randperm(num_blocks - 1, device=dev, generator=gen)[:batch * (num_blocks // batch)] + 1)
    tables = tables.view(batch, -1).to(torch.int32)  # scattered blocks, as a busy pool hands them out
    seq_lens = torch.full((batch,), context, dtype=torch.int32, device=dev)
    q = torch.randn(batch, HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen)
    rows = []

    def row(part: str, variant: str, us: float, nbytes: int, **extra) -> None:
        rows.append(dict(part=part, variant=variant, us_per_layer=round(us, 2), bytes=nbytes,
                         GBps=round(nbytes / us / 1e3, 1), of_copy_bw=round(nbytes / (us * 1e-6) / bandwidth, 3),
                         ms_per_step=round(us * num_layers / 1e3, 3), **extra))

    # -- store: one new token per sequence into its slot
    new_k = torch.randn(batch, KV_HEADS, HEAD_DIM, device=dev, dtype=torch.bfloat16, generator=gen)
    new_v = torch.randn_like(new_k)
    slots = tables[:, -1].long() * BLOCK + 3
    row_bytes = batch * KV_HEADS * HEAD_DIM * 2  # one of K, V in bf16

    def fp8_store_before():
        store_kvcache(quantize_kv(new_k, k_scale).view(torch.uint8), quantize_kv(new_v, v_scale).view(torch.uint8),
                      kq.view(torch.uint8), vq.view(torch.uint8), slots)

    def written(cache):
        return cache.view(-1, KV_HEADS, HEAD_DIM)[slots].view(torch.uint8).clone()

    fp8_store_before()
    before = written(kq), written(vq)
    store_kvcache(new_k, new_v, kq, vq, slots, k_scale, v_scale)
    if not (torch.equal(written(kq), before[0]) and torch.equal(written(vq), before[1])):
        raise AssertionError("the fused fp8 store wrote other bytes than quantize_kv")
    # bytes the job must move: read K and V in bf16, write them in the cache's dtype
    row("store", "bf16", graph_us(lambda: store_kvcache(new_k, new_v, kd, vd, slots)), 4 * row_bytes)
    row("store", "fp8 before: torch quantize + byte store", graph_us(fp8_store_before), 3 * row_bytes)
    row("store", "fp8 now: quantised in the store kernel",
        graph_us(lambda: store_kvcache(new_k, new_v, kq, vq, slots, k_scale, v_scale)), 3 * row_bytes)
    for cache_d, cache_q, scale in ((kd, kq, k_scale), (vd, vq, v_scale)):  # the reference reads the same values
        cache_d.view(-1, KV_HEADS, HEAD_DIM)[slots] = dequantize_kv(cache_q.view(-1, KV_HEADS, HEAD_DIM)[slots],
                                                                    scale, torch.bfloat16)

    # -- attention over the whole context
    kv_elems = batch * context * KV_HEADS * HEAD_DIM * 2
    reference = paged_decode_attention(q, kd, vd, tables, seq_lens).float()
    bf16_rule = choose_decode_config(batch, KV_HEADS, tables.shape[1] * BLOCK, sms, kv_bytes=2)
    fp8_rule = choose_decode_config(batch, KV_HEADS, tables.shape[1] * BLOCK, sms, kv_bytes=1)

    def attention(variant: str, cache_k, cache_v, nbytes: int, **launch) -> None:
        scales = dict(k_scale=k_scale, v_scale=v_scale) if cache_k.dtype == FP8_KV_DTYPE else {}
        fn = lambda: paged_decode_attention(q, cache_k, cache_v, tables, seq_lens, **scales, **launch)  # noqa: E731
        err = float((fn().float() - reference).abs().max() / reference.abs().max())
        if err > 2e-2:  # bf16 rounding of the output and of p is ~4e-3
            raise AssertionError(f"{variant}: max error {err:.3g} of the output's range against the bf16 reference")
        row("attention", variant, graph_us(fn), nbytes, max_rel_err=round(err, 5),
            launch={k: v for k, v in launch.items() if k != "fp8_widen"})

    def tile(cfg) -> dict:
        return dict(num_splits=cfg.num_splits, block_n=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages)

    attention("bf16", kd, vd, kv_elems * 2, **tile(bf16_rule))
    attention("fp8 before: k.to(bf16) on bf16's tile", kq, vq, kv_elems, fp8_widen="cast", **tile(bf16_rule))
    attention("fp8 now: cvt to fp16, fp8 rule", kq, vq, kv_elems, fp8_widen="cvt", **tile(fp8_rule))
    attention("fp8 now: bit trick, fp8 rule", kq, vq, kv_elems, fp8_widen="bits", **tile(fp8_rule))
    if sweep:
        for block_n, warps, stages in [(32, 4, 2), (32, 8, 3), (64, 4, 2), (64, 8, 2), (64, 8, 3), (128, 8, 2),
                                       (128, 8, 3), (32, 4, 4)]:
            for splits in sorted({fp8_rule.num_splits, bf16_rule.num_splits, 2 * fp8_rule.num_splits}):
                attention(f"sweep cvt {block_n}/{warps}w/{stages}s/{splits} splits", kq, vq, kv_elems,
                          fp8_widen="cvt", num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
        # the bytes staged raw and widened to fp16 operands (fp8_widen="cast16"; nineteenth session: 128/4/2 best)
        for block_n, warps, stages in [(128, 4, 2), (128, 4, 3), (64, 4, 3), (128, 8, 2), (64, 4, 2)]:
            for splits in sorted({fp8_rule.num_splits, bf16_rule.num_splits}):
                attention(f"sweep cast16 {block_n}/{warps}w/{stages}s/{splits} splits", kq, vq, kv_elems,
                          fp8_widen="cast16", num_splits=splits, block_n=block_n, num_warps=warps, num_stages=stages)
    return rows


def print_parts(rows: list[dict]) -> None:
    print(f"{'part':9s} {'variant':46s} {'us/layer':>9s} {'GB/s':>7s} {'of copy':>7s} {'ms/step':>8s}")
    for r in rows:
        print(f"{r['part']:9s} {r['variant'][:46]:46s} {r['us_per_layer']:9.2f} {r['GBps']:7.0f} "
              f"{r['of_copy_bw']:7.2f} {r['ms_per_step']:8.3f}")


def make_engine(model, config, kv_cache_dtype: str, max_model_len: int, batch: int, num_kv_blocks: int | None):
    from minillm.config import EngineConfig
    from minillm.engine.llm_engine import LLMEngine
    engine_config = EngineConfig(max_model_len=max_model_len, max_num_seqs=batch, block_size=16,
                                 num_kv_blocks=num_kv_blocks, max_num_batched_tokens=max(8192, max_model_len),
                                 kv_cache_dtype=kv_cache_dtype)
    return LLMEngine(model, NoTokenizer(), config, engine_config, device="cuda", dtype=torch.bfloat16)


def time_decode(engine, config, batch: int, prompt_len: int, output_len: int) -> dict:
    from minillm.sampling_params import SamplingParams
    gen = torch.Generator().manual_seed(1)

    def generate(n_out: int) -> tuple[float, float]:
        """(seconds until every request has its first token, seconds per step while all `batch` decode)."""
        params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
        for _ in range(batch):
            engine.add_request(None, torch.randint(0, config.vocab_size, (prompt_len,), generator=gen).tolist(),
                               params)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        started: set[str] = set()
        while len(started) < batch:  # prefill steps (prompts in chunks of max_num_batched_tokens)
            started.update(o.request_id for o in engine.step() if o.outputs[0].token_ids)
        t1 = time.perf_counter()
        steps, finished = 0, False
        while not finished:  # full-batch decode steps: until the first request finishes
            finished = any(o.finished for o in engine.step())
            steps += 1
        t2 = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        return t1 - t0, (t2 - t1) / steps

    generate(4)  # warm-up: Triton JIT, autotuning, graphs already captured
    prefill_s, step_s = generate(output_len)
    return dict(prefill_s=round(prefill_s, 3), ms_per_decode_step=round(step_s * 1e3, 3),
                decode_tok_per_s=round(batch / step_s, 1))


def pool_size(model, config, kv_cache_dtype: str, max_model_len: int, batch: int) -> int:
    """The blocks the engine's profiling would give the pool at gpu_memory_utilization=0.9, without allocating
    it (a built engine's pool stays referenced by the model's attention layers until the next engine rebinds
    them, so building one only to read its size would hold 0.9 of the GPU)."""
    from minillm.config import EngineConfig
    from minillm.engine.cache_config import resolve_engine_config
    from minillm.engine.kv_cache import num_device_blocks
    engine_config = resolve_engine_config(
        EngineConfig(max_model_len=max_model_len, max_num_seqs=batch, block_size=16,
                     max_num_batched_tokens=max(8192, max_model_len), kv_cache_dtype=kv_cache_dtype),
        config, torch.device("cuda"))
    return num_device_blocks(engine_config, config, torch.bfloat16, torch.device("cuda"), model=model)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=4096, help="prompt + output tokens per request")
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--layers", type=int, default=32, help="fewer layers for a smoke test (not for figures)")
    parser.add_argument("--skip-engine", action="store_true", help="only the per-part kernel table")
    parser.add_argument("--sweep", action="store_true", help="also time fp8 decode tiles around the rule")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kv_fp8 needs CUDA", file=sys.stderr)
        return 1
    if not 1 <= args.output_len < args.context:
        parser.error(f"--output-len must be in [1, --context={args.context})")
    bandwidth = copy_bandwidth()
    parts = kernel_parts(args.batch, args.context, bandwidth, args.sweep, args.layers)
    print(f"per layer, {args.batch} sequences x {args.context} tokens; ms/step = x {args.layers} layers")
    print_parts(parts)
    result = dict(command=" ".join(["python", *sys.argv]), date=datetime.date.today().isoformat(),
                  device=torch.cuda.get_device_name(), torch=torch.__version__, copy_bandwidth_Bps=bandwidth,
                  batch=args.batch, context=args.context, output_len=args.output_len, layers=args.layers,
                  parts=parts)
    torch.cuda.empty_cache()
    if args.skip_engine:
        return _write(args.out, result)
    model, config = build_model(args.layers)
    max_model_len = -(-(args.context + 8) // 16) * 16
    blocks_needed = (args.batch + 1) * (max_model_len // 16)
    rows = []
    for kv_cache_dtype in ("auto", "fp8"):
        pool_blocks = pool_size(model, config, kv_cache_dtype, max_model_len, args.batch)
        engine = make_engine(model, config, kv_cache_dtype, max_model_len, args.batch, blocks_needed)
        kv_bytes_per_token = engine.runner.kv_cache.nbytes // (engine.runner.kv_cache.num_blocks * 16)
        timing = time_decode(engine, config, args.batch, args.context - args.output_len, args.output_len)
        mean_context = args.context - args.output_len / 2
        floor_s = (weight_bytes(model) + args.batch * mean_context * kv_bytes_per_token) / bandwidth
        rows.append(dict(kv_cache_dtype=kv_cache_dtype, pool_blocks=pool_blocks, kv_bytes_per_token=kv_bytes_per_token,
                         floor_ms=round(floor_s * 1e3, 3), **timing,
                         fraction_of_floor=round(floor_s * 1e3 / timing["ms_per_decode_step"], 3)))
        del engine
        for module in model.modules():  # the layers still hold views of the pool: drop them so it is freed
            if hasattr(module, "k_cache"):
                module.k_cache = module.v_cache = torch.tensor([])
        gc.collect()
        torch.cuda.empty_cache()
    base = rows[0]
    print(f"{'kv cache':8s} {'pool blocks':>11s} {'B/token':>8s} {'ms/step':>8s} {'floor ms':>8s} {'of floor':>8s} "
          f"{'tok/s':>8s}")
    for row in rows:
        print(f"{row['kv_cache_dtype']:8s} {row['pool_blocks']:11d} {row['kv_bytes_per_token']:8d} "
              f"{row['ms_per_decode_step']:8.2f} {row['floor_ms']:8.2f} {row['fraction_of_floor']:8.2f} "
              f"{row['decode_tok_per_s']:8.1f}")
    fp8 = rows[1]
    print(f"fp8 vs bf16 cache: {fp8['pool_blocks'] / base['pool_blocks']:.2f}x the blocks, "
          f"{base['ms_per_decode_step'] / fp8['ms_per_decode_step']:.2f}x decode speed")
    result["rows"] = rows
    return _write(args.out, result)


def _write(out: str | None, result: dict) -> int:
    if out:
        Path(out).write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
