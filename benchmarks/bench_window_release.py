"""What giving back the blocks behind a sliding window buys the engine: long prompts on a fixed KV pool.

    python benchmarks/bench_window_release.py --out window_release_h200.json
    python benchmarks/bench_window_release.py --smoke    # a tiny model on this machine's device (CPU: seconds)

Mistral 7B v0.1's shape (every layer slides, window 4096; 32 layers, 8 kv heads of 128: 128 KB of K/V a token),
random bf16 weights, `--requests` prompts of `--prompt-len` random tokens each generating `--output-len` greedy
tokens (ignore_eos) on a pool of `--kv-gib` GiB, chunked prefill, the device's defaults (CUDA graphs, async
scheduling). The same engine runs the same requests twice:

* release (the default, minillm/engine/block_window.py): each step gives back the blocks wholly before every
  running sequence's window, so a sequence holds about window + one chunk of blocks, whatever its length;
* held: the block manager keeps every block (`sliding_window = None` on it, what the engine did before the
  release): the attention kernels still read only the window, but a 16k-token prompt holds 16k tokens of pool.

Reported per mode: wall seconds, output tokens per second, the most sequences running at once, preemptions, and
how many requests' greedy tokens agree between the modes. The release changes which blocks are kept, never which
keys are read, so on a CPU (fp32) the tokens must be equal and a difference raises. On a GPU they need not be:
the modes batch different numbers of sequences together, bf16 GEMMs round differently at different batch sizes,
and random weights give nearly tied logits whose argmax such rounding flips; the GPU tests hold the kernels and
the engine to exactness there (tests/test_window_blocks.py, tests/test_sliding_window.py).
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time

MISTRAL_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                  num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5, rope_theta=10000.0,
                  max_position_embeddings=32768, tie_word_embeddings=False, sliding_window=4096)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=1024,
            tie_word_embeddings=False, sliding_window=48)
TINY_KV_BYTES = 2 * 2 * 2 * 16 * 4  # K and V x 2 layers x 2 kv heads x head_dim 16 x fp32: bytes a token


def build_engine(shape: dict, device: str, kv_bytes: int, max_model_len: int, chunk: int, max_num_seqs: int):
    import torch
    from minillm.config import EngineConfig
    from minillm.engine.llm_engine import LLMEngine
    from minillm.loader.no_tokenizer import NoTokenizer
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    from bench_decode import build_model

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, config = build_model(shape["num_hidden_layers"], shape=shape, dtype=str(dtype).removeprefix("torch."),
                                device=device)
    engine_config = EngineConfig(max_model_len=max_model_len, max_num_seqs=max_num_seqs, kv_cache_memory=kv_bytes,
                                 enable_chunked_prefill=True, max_num_batched_tokens=chunk)
    return LLMEngine(model, NoTokenizer(), config, engine_config, device=device, dtype=dtype), config


def run_mode(engine, prompts: list[list[int]], output_len: int, release: bool, device: str) -> dict:
    import torch
    from minillm.sampling_params import SamplingParams

    bm = engine.scheduler.block_manager
    bm.sliding_window = engine.model_config.sliding_window if release else None
    scheduler = engine.scheduler
    preemptions, steps = scheduler.num_preemptions, len(scheduler.timeline)
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    ids = [engine.add_request(None, p, params) for p in prompts]
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    done: dict[str, list[int]] = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    if device == "cuda":
        torch.cuda.synchronize()
    wall = time.perf_counter() - start
    if bm.num_used_blocks:
        raise RuntimeError(f"{bm.num_used_blocks} blocks still held after every request finished")
    tokens = [done[i] for i in ids]
    records = scheduler.timeline[steps:]
    return dict(mode="release" if release else "held", wall_s=round(wall, 3),
                output_tok_per_s=round(sum(map(len, tokens)) / wall, 1), steps=len(records),
                max_running=max(r.num_running for r in records), preemptions=scheduler.num_preemptions - preemptions,
                tokens=tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, help="default 16 (smoke: 6)")
    parser.add_argument("--prompt-len", type=int, help="default 16384 (smoke: 200)")
    parser.add_argument("--output-len", type=int, help="default 128 (smoke: 8)")
    parser.add_argument("--kv-gib", type=float, help="default 16 (smoke: 480 tokens of the tiny model's K/V)")
    parser.add_argument("--chunk", type=int, help="max_num_batched_tokens, default 8192 (smoke: 64)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and lengths on this machine's device")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    defaults = (dict(requests=6, prompt_len=200, output_len=8, chunk=64, kv_gib=480 * TINY_KV_BYTES / 2**30)
                if args.smoke else dict(requests=16, prompt_len=16384, output_len=128, chunk=8192, kv_gib=16.0))
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)

    import torch
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = TINY if args.smoke else MISTRAL_7B
    window = shape["sliding_window"]
    if args.prompt_len <= window:
        raise ValueError(f"--prompt-len {args.prompt_len} must exceed the window ({window}) to show anything")
    max_model_len = args.prompt_len + args.output_len
    engine, config = build_engine(shape, device, int(args.kv_gib * 2**30), max_model_len, args.chunk, args.requests)
    gen = torch.Generator().manual_seed(1)

    def prompts(n: int, length: int) -> list[list[int]]:
        return [torch.randint(0, config.vocab_size, (length,), generator=gen).tolist() for _ in range(n)]

    bm = engine.scheduler.block_manager
    print(f"{device}: pool {bm.num_blocks} blocks of {bm.block_size} ({args.kv_gib:.2f} GiB), window {window}, "
          f"{args.requests} x {args.prompt_len} prompt + {args.output_len} output tokens, chunk {args.chunk}")
    warm = prompts(2, window + args.chunk // 2)
    for release in (True, False):  # warm-up: Triton JIT, autotuning, graphs for both modes' batch shapes
        run_mode(engine, warm, 4, release, device)
    work = prompts(args.requests, args.prompt_len)
    rows = [run_mode(engine, work, args.output_len, release, device) for release in (True, False)]
    agree = sum(a == b for a, b in zip(rows[0]["tokens"], rows[1]["tokens"]))
    if device == "cpu" and agree != len(work):
        raise RuntimeError("the release changed the greedy tokens: it must change only which blocks are kept")
    for row in rows:
        print(f"{row['mode']:>8}: {row['wall_s']:8.2f} s  {row['output_tok_per_s']:9.1f} output tok/s  "
              f"{row['steps']:5d} steps  at most {row['max_running']:3d} running  {row['preemptions']} preemptions")
    print(f"release / held: {rows[1]['wall_s'] / rows[0]['wall_s']:.2f}x faster; {agree} of {len(work)} requests' "
          f"greedy tokens the same in both modes")
    if args.out:
        result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      device=torch.cuda.get_device_name() if device == "cuda" else "cpu", torch=torch.__version__,
                      args=vars(args), rows=[{k: v for k, v in r.items() if k != "tokens"} for r in rows],
                      requests_with_equal_tokens=agree, first_tokens=rows[0]["tokens"][0][:8])
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
