"""Held-out perplexity of SmolLM2-135M under every quantization method (chapter 8).

    .venv/bin/python benchmarks/quant_quality.py                          # 32 x 512 held-out tokens, all methods
    .venv/bin/python benchmarks/quant_quality.py --n-samples 16 --seq-len 256 --calib-samples 16 --awq-tokens 512 \
        --out benchmarks/results/quant_quality_cpu.json                   # the CPU-sized run

The text is the standard library's docstrings (minillm.quant.calibration): the calibration split feeds GPTQ,
AWQ and SmoothQuant, the held-out split is scored. Log-probabilities come from the model's own forward over
packed sequences (prefill_metadata, model(input_ids, positions), compute_logits): each sequence is scored on
its tokens 1..L-1 given the ones before, perplexity = exp(mean negative log-likelihood).

The gguf rows write our own GGUF file (minillm/quant/gguf_export.py) and read it back; the pruning rows
(minillm/quant/prune.py) keep dense fp32 storage, so their bits/weight is 32. On SmolLM2 "gguf q4_k" is mostly
Q5_0: only down_proj's 1536-wide rows fill Q4_K's 256-weight super-blocks, the 576-wide ones fall back to Q5_0
as in llama.cpp (5.25 bits/weight overall). Only some rows:

    .venv/bin/python benchmarks/quant_quality.py --n-samples 16 --seq-len 256 --calib-samples 16 \
        --only fp32 "gguf q8_0 (ours)" "gguf q4_k (ours)" "gguf q4_0 (ours)" "magnitude 50%" "2:4 magnitude" \
        "wanda 50%" "2:4 wanda" --out benchmarks/results/quant_quality_cpu_gguf_prune.json

AutoRound against the best GPTQ recipe, with the calibration split scored too (what tuning may look at):

    .venv/bin/python benchmarks/quant_quality.py --n-samples 16 --seq-len 256 --calib-samples 16 --calib-ppl \
        --only fp32 "gptq+ w4 g64" "autoround w4 g64"          # ~20 min of AutoRound on 2 CPU cores

Reference weights are the bundled GGUF dequantized to fp32 (they lie on Q4_1's grid: see rtn.py's docstring),
so "fp32" is the Q4_1 model itself. Group 64 because SmolLM2's hidden size 576 is not a multiple of 128.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time

import torch

from minillm.engine.worker import build_model
from minillm.forward_context import forward_context, prefill_metadata
from minillm.loader import load_model
from minillm.quant.calibration import calibration_texts, tokenize_to_sequences
from minillm.quant.checkpoint import load_time_quantization
from minillm.quant.driver import quantize_model
from minillm.quant.gguf_export import GGUF_METHODS, write_gguf_model
from minillm.quant.prune import prune_model
from minillm.quant.recipes import quantize_recipe

# (label, method, options): the comparison the chapter draws
RUNS = [  # cheapest first, so a run cut short still has most of the table
    ("fp32", None, {}),
    ("rtn w4 g64", "rtn", dict(bits=4, group_size=64)),
    ("rtn w3 g64", "rtn", dict(bits=3, group_size=64)),
    ("rtn w4 per-channel", "rtn", dict(bits=4, group_size=-1)),
    ("fp8 w8a8", "fp8", {}),
    # fp8_calibrated.py: the same e4m3 x e4m3 GEMMs, with smoothing searched per linear, activation-weighted
    # MSE row scales and GPTQ rounding onto the e4m3 grid (the LM head, the tied embedding, stays unquantized)
    ("fp8 w8a8 calibrated", "fp8", dict(fp8_smooth_alpha="search", fp8_gptq=True, fp8_mse_scale=True)),
    ("fp8 w8a8 gptq", "fp8", dict(fp8_gptq=True)),  # GPTQ alone: on the CPU as good as the full recipe
    # fp8_block.py: one e4m3 scale per 64 x 64 (or 32 x 32) weight tile and per token per 64 (32) channels
    # (DeepSeek-V3's fine-grained scheme; its 128 does not divide SmolLM2's 576)
    ("fp8_block w8a8 b64", "fp8_block", dict(weight_block_size=64)),
    ("fp8_block w8a8 b32", "fp8_block", dict(weight_block_size=32)),
    # the same tiles with GPTQ's rounding onto them (fp8_block.gptq_fp8_block), then with act-order too
    ("fp8_block w8a8 b64 gptq", "fp8_block", dict(weight_block_size=64, fp8_gptq=True)),
    ("fp8_block w8a8 b32 gptq", "fp8_block", dict(weight_block_size=32, fp8_gptq=True)),
    ("fp8_block w8a8 b64 gptq act-order", "fp8_block", dict(weight_block_size=64, fp8_gptq=True, act_order=True)),
    ("fp8_block w8a8 b32 gptq act-order", "fp8_block", dict(weight_block_size=32, fp8_gptq=True, act_order=True)),
    ("smoothquant w8a8", "smoothquant", dict(alpha=0.5)),
    ("nf4 (double quant)", "nf4", {}),
    ("int8 (LLM.int8)", "int8", {}),
    ("gptq w4 g64", "gptq", dict(bits=4, group_size=64)),
    ("gptq w3 g64", "gptq", dict(bits=3, group_size=64)),
    ("awq w4 g64", "awq", dict(bits=4, group_size=64)),
    ("awq w3 g64", "awq", dict(bits=3, group_size=64)),
    # minillm.quant.recipes: act-order, static groups and a searched grid range (gptq+); AWQ scored on block
    # outputs (awq+); AWQ's scales then GPTQ's rounding (awq+gptq)
    ("gptq w4 g64 act-order", "gptq", dict(bits=4, group_size=64, act_order=True)),
    ("gptq+ w4 g64", "recipe-gptq", dict(bits=4, group_size=64)),
    # the same GPTQ aimed at the unquantized model's outputs (asymmetric calibration, quant/gptq_asym.py)
    ("gptq+ asym w4 g64", "recipe-gptq", dict(bits=4, group_size=64, asym_calib=True)),
    ("awq+gptq asym w4 g64", "recipe-awq+gptq", dict(bits=4, group_size=64, asym_calib=True)),
    # AWQ's scales only (no clipping: GPTQ's rounding chooses the ranges), then asymmetric GPTQ
    ("awq+gptq asym noclip w4 g64", "recipe-awq+gptq", dict(bits=4, group_size=64, asym_calib=True,
                                                            awq_clip=False)),
    # llm-awq's own search, s = mean|x|^alpha without AutoAWQ's duo scaling: alpha = 0 is s = 1, so the search
    # can decline to scale a group of linears where scaling does not pay
    ("awq+gptq asym noduo w4 g64", "recipe-awq+gptq", dict(bits=4, group_size=64, asym_calib=True,
                                                           duo_scaling=False)),
    ("awq+ noduo w4 g64", "recipe-awq", dict(bits=4, group_size=64, duo_scaling=False)),
    ("awq+ w4 g64", "recipe-awq", dict(bits=4, group_size=64)),
    ("awq+gptq w4 g64", "recipe-awq+gptq", dict(bits=4, group_size=64)),
    ("awq+gptq w3 g64", "recipe-awq+gptq", dict(bits=3, group_size=64)),
    # AutoRound (quant/autoround.py): rounding offsets and clip factors learned per block by signed descent
    ("autoround w4 g64", "recipe-autoround", dict(bits=4, group_size=64)),
    ("autoround w3 g64", "recipe-autoround", dict(bits=3, group_size=64)),
    # round-to-nearest at load time (LLM(..., quantization="rtn")), then with the LM head (the tied embedding's
    # copy) rounded too: what lm_head=True costs in perplexity
    ("rtn w4 g64 at load", "load-rtn", dict(bits=4, group_size=64)),
    ("rtn w4 g64 at load + lm_head", "load-rtn", dict(bits=4, group_size=64, lm_head=True)),
    # our GGUF files (written, then read back as a user would) and pruning (dense weights with zeros)
    ("gguf q8_0 (ours)", "gguf-q8_0", {}),
    ("gguf q4_k (ours)", "gguf-q4_k", {}),
    ("gguf q4_0 (ours)", "gguf-q4_0", {}),
    ("magnitude 50%", "prune-magnitude", dict(sparsity=0.5)),
    ("2:4 magnitude", "prune-magnitude", dict(nm=(2, 4))),
    ("wanda 50%", "prune-wanda", dict(sparsity=0.5)),
    ("2:4 wanda", "prune-wanda", dict(nm=(2, 4))),
]


@torch.no_grad()
def perplexity(model: torch.nn.Module, ids: torch.Tensor, batch_size: int = 2) -> float:
    """exp(mean NLL) of ids [n, L], each row a sequence scored on tokens 1..L-1."""
    total, count = 0.0, 0
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start:start + batch_size]
        n, length = batch.shape
        with forward_context(prefill_metadata([length] * n, device=ids.device)):
            hidden = model(batch.flatten(), torch.arange(length, device=ids.device).repeat(n))
        logits = model.compute_logits(hidden).float().reshape(n, length, -1)
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
        total += float(nll.sum())
        count += nll.numel()
    return math.exp(total / count)


def linear_bits_per_weight(state: dict[str, torch.Tensor], n_weights: int) -> float:
    """Bits per weight of the decoder's linear layers as stored (codes + scales + zeros)."""
    linear = [t for name, t in state.items() if ".layers." in name and "norm" not in name]
    return 8 * sum(t.numel() * t.element_size() for t in linear) / n_weights


def gguf_round_trip(model_path: str | None, method: str, device: torch.device) -> tuple[torch.nn.Module, float]:
    """Write the model as our GGUF in a temporary folder and load it back: (model, bits per decoder-linear weight)."""
    import tempfile

    from minillm.loader import GGUFFile, default_model_path, load_gguf_model
    source = GGUFFile(model_path or default_model_path())
    config, weights = load_gguf_model(source)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_gguf_model(os.path.join(tmp, "model.gguf"), config, dict(weights), GGUF_METHODS[method], source)
        written = GGUFFile(path)
        linear = [t for t in written.tensors.values() if t.name.startswith("blk.") and len(t.shape) == 2]
        bits = 8 * sum(t.nbytes for t in linear) / sum(t.num_elements for t in linear)
        config, weights = load_gguf_model(written)
        model = build_model(config, weights, device, torch.float32)
    return model, bits


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="GGUF or HF directory (default: bundled SmolLM2-135M)")
    parser.add_argument("--n-samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--calib-samples", type=int, default=128)
    parser.add_argument("--calib-seq-len", type=int, default=None, help="default: --seq-len")
    parser.add_argument("--awq-tokens", type=int, default=4096,
                        help="calibration tokens AWQ's scale search uses per linear (its cost grows with them)")
    parser.add_argument("--autoround-iters", type=int, default=200, help="AutoRound's iterations per block")
    parser.add_argument("--calib-ppl", action="store_true",
                        help="also score the calibration split (what tuning may look at: no held-out leakage)")
    parser.add_argument("--only", nargs="*", default=None, help="labels to run (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda: where to quantize and score")
    parser.add_argument("--batch-size", type=int, default=2, help="sequences per scoring forward")
    parser.add_argument("--out", default="benchmarks/results/quant_quality.json")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    config, weights, tokenizer = load_model(args.model)
    device = torch.device(args.device)
    dense = build_model(config, weights, device, torch.float32)
    held_out = tokenize_to_sequences(calibration_texts("held_out"), tokenizer, args.n_samples, args.seq_len)
    calib = tokenize_to_sequences(calibration_texts("calibration"), tokenizer, args.calib_samples,
                                  args.calib_seq_len or args.seq_len)
    n_weights = sum(m.input_size * m.output_size for n, m in dense.named_modules()
                    if hasattr(m, "quant_method") and ".layers." in n)
    rows = []
    for label, method, options in RUNS:
        if args.only and label not in args.only:
            continue
        start = time.perf_counter()
        if method is None:
            model, bits = dense, 32.0
        elif method in GGUF_METHODS:
            model, bits = gguf_round_trip(args.model, method, device)
        elif method.startswith("load-"):
            _, fresh_weights, _ = load_model(args.model)
            qconfig = load_time_quantization(config, method.removeprefix("load-"), options)
            model = build_model(qconfig, fresh_weights, device, torch.float32)
            bits = linear_bits_per_weight(model.state_dict(), n_weights)  # the codes, scales and zeros it holds
        elif method.startswith("prune-"):
            scores = method.removeprefix("prune-")
            model = prune_model(dense, scores, options.get("sparsity"), calib if scores == "wanda" else None,
                                nm=options.get("nm"))
            bits = 32.0  # dense storage: the zeros pay off only with sparse kernels (2:4 on tensor cores)
        elif method.startswith("recipe-"):
            recipe = method.removeprefix("recipe-")
            extra = {"awq_tokens": args.awq_tokens} if recipe.startswith("awq") else \
                {"iters": args.autoround_iters} if recipe == "autoround" else {}
            qm = quantize_recipe(dense, recipe, calib, **options, **extra)
            model, bits = qm.build(device), linear_bits_per_weight(qm.state, n_weights)
        else:
            extra = {"max_tokens": args.awq_tokens} if method == "awq" else {}
            qm = quantize_model(dense, method, calibration=calib, progress=True, **options, **extra)
            model, bits = qm.build(device), linear_bits_per_weight(qm.state, n_weights)
        seconds = time.perf_counter() - start
        ppl = perplexity(model, held_out.to(device), args.batch_size)
        rows.append({"label": label, "method": method or "fp32", **options, "perplexity": round(ppl, 4),
                     "bits_per_weight": round(bits, 3), "quantize_seconds": round(seconds, 1)})
        if args.calib_ppl:
            rows[-1]["calibration_perplexity"] = round(perplexity(model, calib.to(device), args.batch_size), 4)
        print(f"{label:22s} ppl {ppl:9.4f}  {bits:6.2f} bits/weight  ({seconds:.0f} s)"
              + (f"  calibration ppl {rows[-1]['calibration_perplexity']:.4f}" if args.calib_ppl else ""), flush=True)
        _write(args, argv, rows)  # after every run: a long run cut short keeps what it measured
    base = next((r["perplexity"] for r in rows if r["method"] == "fp32"), None)
    print("\n| method | bits/weight (linears) | held-out ppl | vs fp32 |\n|---|---|---|---|")
    for r in rows:
        delta = f"{r['perplexity'] - base:+.3f}" if base else ""
        print(f"| {r['label']} | {r['bits_per_weight']:.2f} | {r['perplexity']:.3f} | {delta} |")
    print(f"wrote {args.out}")
    return 0


def _write(args: argparse.Namespace, argv: list[str] | None, rows: list[dict]) -> None:
    result = {"command": " ".join([os.path.basename(sys.argv[0])] + (argv if argv is not None else sys.argv[1:])),
              "device": (torch.cuda.get_device_name() if args.device.startswith("cuda") else
                         f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "model": args.model or "SmolLM2-135M-Instruct Q4_1 GGUF (dequantized to fp32)",
              "held_out_tokens": [args.n_samples, args.seq_len],
              "calibration_tokens": [args.calib_samples, args.calib_seq_len or args.seq_len],
              "awq_search_tokens": args.awq_tokens, "autoround_iters": args.autoround_iters, "runs": rows}
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
