"""What serving LoRA adapters costs: the SGMV kernels against the base GEMM, and decode with adapters in the engine.

    python benchmarks/bench_lora.py [--shape smollm2-135m|llama3-8b] [--batch 1 16 64] [--rank 16]
                                    [--max-loras 4] [--output-len 64] [--skip-kernels] [--variants WORD ...]
                                    [--out results.json]

Part 1, kernels (minillm.kernels.lora): for a 4096 -> N projection at rank R, and for the four adapted layers of
--shape (qkv, o, gate_up, down at their stacked ranks 3R, R, 2R, R), the shrink (x A^T) and expand (y += s B^T) of
a batch whose M rows are spread over four adapter slots, and the same in one launch (lora_fused, with whether
lora_fused_pays picks it), timed with triton.testing.do_bench beside the base projection itself (F.linear, bf16),
and also a single 2,048-token segment (a prefill). The LoRA product reads A and B once per segment tile, so at
decode it costs the launches and a few KB; the figures are its share of the base projection's time.

Part 2, the engine (random bf16 weights of the shape; random adapters on all seven projections, std 0.01): decode
output tokens/s for a batch of 128-token prompts (and the whole run's time, prefill included), five ways:

    base            enable_lora=False (CUDA graphs, the defaults)
    lora, no use    enable_lora=True, no request names an adapter: must match `base` (the same graphs)
    1 adapter       every request with the same adapter (the LoRA sets of decode and piecewise graphs)
    4 adapters      requests spread over max_loras adapters
    eager base      enable_lora=False, enforce_eager=True: the steps without any graph, for scale

Needs CUDA. Prints a table and writes the raw numbers to --out as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, rope_theta=500000.0,
                      max_position_embeddings=8192, tie_word_embeddings=False),
}


def time_kernels(rank: int, shape: str, slots: int = 4) -> list[dict]:
    import torch
    import torch.nn.functional as F
    import triton
    from minillm.kernels.lora import lora_expand, lora_fused, lora_fused_pays, lora_shrink
    cfg = SHAPES[shape]
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    head_dim = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * head_dim, cfg["num_key_value_heads"] * head_dim
    layers = [("4096->4096", 4096, 4096, rank), ("4096->14336", 4096, 14336, rank),
              (f"{shape} qkv", h, q + 2 * kv, 3 * rank), (f"{shape} o", q, h, rank),
              (f"{shape} gate_up", h, 2 * inter, 2 * rank), (f"{shape} down", inter, h, rank)]
    rows = []
    for name, k, n, r in layers:
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        a = torch.randn(slots, r, k, dtype=torch.bfloat16, device="cuda") * 0.02
        b = torch.randn(slots, n, r, dtype=torch.bfloat16, device="cuda") * 0.02
        for m, seg in ((1, 1), (8, 1), (32, 1), (128, 1), (2048, 2048)):
            x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
            starts = torch.arange(0, m, seg, dtype=torch.int32, device="cuda")
            lens = torch.full_like(starts, seg)
            slot_ids = torch.arange(starts.numel(), dtype=torch.int32, device="cuda") % slots
            y = F.linear(x, w)
            base_us = triton.testing.do_bench(lambda: F.linear(x, w), warmup=25, rep=200) * 1e3

            def lora():
                s = lora_shrink(x, a, starts, lens, slot_ids, seg)
                lora_expand(s, b, starts, lens, slot_ids, seg, y)

            lora_us = triton.testing.do_bench(lora, warmup=25, rep=200) * 1e3
            fused_us = triton.testing.do_bench(lambda: lora_fused(x, a, b, starts, lens, slot_ids, seg, y),
                                               warmup=25, rep=200) * 1e3
            pays = lora_fused_pays(starts.numel(), seg, k, n, r)
            rows.append(dict(layer=name, k=k, n=n, m=m, segment=seg, rank=r, base_us=round(base_us, 2),
                             lora_us=round(lora_us, 2), fused_us=round(fused_us, 2), fused_pays=pays,
                             lora_share=round(lora_us / base_us, 3), fused_share=round(fused_us / base_us, 3)))
            print(f"{name:24s} {k:5d}->{n:5d} R={r:3d} M={m:5d} seg={seg:4d}: F.linear {base_us:8.1f} us, "
                  f"shrink+expand {lora_us:7.1f} us ({lora_us / base_us:.0%}), fused {fused_us:7.1f} us "
                  f"({fused_us / base_us:.0%}){' <- picked' if pays else ''}", flush=True)
    return rows


def time_engine(shape: str, batches: list[int], rank: int, max_loras: int, output_len: int,
                only: list[str] | None = None) -> list[dict]:
    import torch
    from minillm.config import EngineConfig, ModelConfig
    from minillm.engine.llm_engine import LLMEngine
    from minillm.engine.worker import RandomWeights
    from minillm.lora import LoRARequest
    from minillm.lora.adapter import random_adapter, save_adapter
    from minillm.sampling_params import SamplingParams

    from minillm.loader.no_tokenizer import NoTokenizer

    config = ModelConfig(**SHAPES[shape])
    model = RandomWeights(seed=0, std_embed=0.02)(config, torch.device("cuda"), torch.bfloat16)
    root = tempfile.mkdtemp(prefix="bench_lora_")
    requests = []
    for i in range(max_loras):
        save_adapter(random_adapter(config, rank, seed=i, std=0.01), f"{root}/a{i}")
        requests.append(LoRARequest(f"a{i}", i + 1, f"{root}/a{i}"))
    prompt_len, rows = 128, []
    gen = torch.Generator().manual_seed(1)
    for batch in batches:
        blocks = (batch + 1) * -(-(prompt_len + output_len + 16) // 16)
        variants = [("base", {}, lambda i: None), ("lora, no use", dict(enable_lora=True), lambda i: None),
                    ("1 adapter", dict(enable_lora=True), lambda i: requests[0]),
                    (f"{max_loras} adapters", dict(enable_lora=True), lambda i: requests[i % max_loras]),
                    ("eager base", dict(enforce_eager=True), lambda i: None)]
        for name, options, lora_of in variants:
            if only and name.split()[0] not in only:  # --variants base lora 1 4 eager: by first word
                continue
            engine = LLMEngine(model, NoTokenizer(), config, EngineConfig(
                max_model_len=prompt_len + output_len + 16, max_num_seqs=batch, block_size=16, num_kv_blocks=blocks,
                max_num_batched_tokens=max(2048, batch * prompt_len), max_loras=max_loras, max_lora_rank=rank,
                **options), device="cuda", dtype=torch.bfloat16)

            def generate(n_out):
                params = SamplingParams(temperature=0.0, max_tokens=n_out, ignore_eos=True)
                for i in range(batch):
                    engine.add_request(None, torch.randint(0, config.vocab_size, (prompt_len,),
                                                           generator=gen).tolist(), params, lora_request=lora_of(i))
                torch.cuda.synchronize()
                first = time.perf_counter()
                engine.step()  # the prefill (launched only, under async scheduling)
                torch.cuda.synchronize()
                start = time.perf_counter()
                steps = 0
                while engine.has_unfinished_requests():
                    engine.step()
                    steps += 1
                torch.cuda.synchronize()
                end = time.perf_counter()
                return end - start, steps, end - first

            generate(8)
            seconds, steps, total = generate(output_len)
            row = dict(shape=shape, batch=batch, variant=name, rank=rank, decode_s=round(seconds, 4),
                       total_s=round(total, 4), tok_per_s=round(batch * (output_len - 1) / seconds, 1),
                       ms_per_step=round(seconds / steps * 1e3, 3), forwards=dict(engine.runner.forward_counts))
            rows.append(row)
            print(f"{shape} batch {batch:4d} {name:12s}: {row['tok_per_s']:9.1f} tok/s, {row['ms_per_step']:7.3f} "
                  f"ms/step, {total * 1e3:8.1f} ms in all  {row['forwards']}", flush=True)
            engine.shutdown()
            del engine
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--max-loras", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--skip-kernels", action="store_true")
    parser.add_argument("--variants", nargs="+", default=None, metavar="WORD",
                        help="only the engine variants whose name starts with these words (base, lora, 1, 4, ...)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    import torch
    if not torch.cuda.is_available():
        print("bench_lora.py needs a CUDA device", file=sys.stderr)
        return 2
    result = dict(device=torch.cuda.get_device_name(), date=datetime.datetime.utcnow().isoformat(timespec="seconds"),
                  torch=torch.__version__, args=vars(args))
    if not args.skip_kernels:
        result["kernels"] = time_kernels(args.rank, args.shape)
    result["engine"] = time_engine(args.shape, args.batch, args.rank, args.max_loras, args.output_len, args.variants)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
