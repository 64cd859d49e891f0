"""`minillm quantize [MODEL] --method ... --out DIR`: quantize a model once and save it (chapters 7-8).

    minillm quantize --method gptq --bits 4 --group-size 64 --out smollm2-gptq     # the bundled SmolLM2
    minillm quantize my-llama/ --method fp8 --out my-llama-fp8
    minillm quantize --method fp8 --smooth-alpha search --gptq --mse-scale --out smollm2-fp8    # calibrated fp8
    minillm quantize --method fp8_block --block-size 64 --out smollm2-fp8-block    # e4m3, 64 x 64 tile scales
    minillm quantize --method fp8_block --gptq --act-order --out smollm2-fp8-block-gptq   # + GPTQ onto the tiles
    python -c "from minillm import LLM; print(LLM(model='smollm2-gptq').generate('Hi')[0].outputs[0].text)"

    minillm quantize --method gguf-q4_k --out smollm2-q4_k.gguf    # one self-contained GGUF (quant/gguf_export.py)
    minillm quantize --method prune-wanda --sparsity 0.5 --out smollm2-wanda50    # pruning (quant/prune.py)
    minillm quantize --method prune-2:4 --prune-scores magnitude --out smollm2-2of4

Calibrated methods (gptq, awq, smoothquant, fp8 with any of --smooth-alpha/--gptq/--mse-scale (quant/fp8_calibrated.py),
fp8_block with --gptq,
prune-wanda, prune-2:4 with Wanda scores) read --calib-samples x
--calib-seq-len tokens of the standard library's docstrings (minillm.quant.calibration). GGUF output copies a
GGUF source's tokenizer and chat template, or converts an HF directory's tokenizer.json (quant/gguf_tokenizer.py).
Mixture-of-experts models (Mixtral, Qwen3-MoE) take rtn, gptq (each expert calibrated on the tokens routed to
it), fp8, fp8_block, nf4 and int8; the routers stay dense (minillm.quant.driver.MOE_METHODS).
minillm/cli.py owns the parser and calls `register`.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

from minillm.cli import check_output_path
from minillm.quant.driver import CALIBRATED, METHODS
from minillm.quant.gguf_export import GGUF_METHODS

PRUNE_METHODS = ("prune-magnitude", "prune-wanda", "prune-2:4")


def _group_size(text: str) -> int:
    try:
        value = int(text)
    except ValueError:  # argparse would name the function: "invalid _group_size value"
        raise argparse.ArgumentTypeError(f"group size must be -1 (per channel) or a positive integer, "
                                         f"got {text!r}") from None
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(f"group size must be -1 (per channel) or positive, got {value}")
    return value


def _cmd_gguf(args: argparse.Namespace, path: str) -> str:
    """Write the model as one GGUF file; returns the line to print."""
    from minillm.loader import GGUFFile, Tokenizer, load_gguf_model, load_hf_model
    from minillm.quant.gguf_export import write_gguf_model
    if os.path.isdir(path):  # an HF directory: its tokenizer.json is converted to GGUF metadata
        (config, weights), source = load_hf_model(path), Tokenizer.from_hf_dir(path)
    else:  # a GGUF: its metadata is copied
        source = GGUFFile(path)
        config, weights = load_gguf_model(source)
    if config.quantization is not None:
        raise ValueError(f"{path} is already quantized ({config.quantization}); write a GGUF from a dense checkpoint")
    write_gguf_model(args.out, config, dict(weights), GGUF_METHODS[args.method], source)
    return f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.1f} MB)"


def _cmd_prune(args: argparse.Namespace, model, tokenizer, path: str) -> str:
    """Prune the dense model and save it; returns the line to print."""
    from minillm.quant.calibration import calibration_texts, tokenize_to_sequences
    from minillm.quant.prune import linear_sparsity, prune_model, save_pruned
    scores = "magnitude" if args.method == "prune-magnitude" else "wanda"
    nm = None
    if args.method == "prune-2:4":
        scores, nm = args.prune_scores, (2, 4)
        if args.sparsity != 0.5:
            raise ValueError(f"prune-2:4 keeps 2 of every 4 weights (sparsity 0.5); got --sparsity {args.sparsity}")
    calibration = None
    if scores == "wanda":
        texts = calibration_texts("calibration")
        calibration = tokenize_to_sequences(texts, tokenizer, args.calib_samples, args.calib_seq_len)
    pruned = prune_model(model, scores, None if nm else args.sparsity, calibration, nm=nm,
                         granularity=args.granularity)
    save_pruned(pruned, args.out, tokenizer, source=path if os.path.isdir(path) else None)
    return f"wrote {args.out} ({linear_sparsity(pruned):.1%} of the decoder's linear weights are zero)"


def _smooth_alpha(text: str) -> float | str:
    if text == "search":
        return text
    try:
        value = float(text)
    except ValueError:
        value = math.nan  # refused below, with the allowed values
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"smooth alpha must be 'search' or a float in [0, 1], got {text}")
    return value


def _fp8_recipe(args: argparse.Namespace) -> dict:
    """quantize_model's fp8 recipe options from the flags (_check_method_options checked who may give them)."""
    given = args.smooth_alpha is not None or args.gptq or args.mse_scale
    return {"fp8_smooth_alpha": args.smooth_alpha, "fp8_gptq": args.gptq, "fp8_mse_scale": args.mse_scale} if given \
        else {}


def _block_options(args: argparse.Namespace) -> dict:
    """quantize_model's weight_block_size from --block-size (fp8_block's only: _check_method_options)."""
    return {} if args.block_size is None else {"weight_block_size": args.block_size}


def _block_size(text: str) -> int | tuple[int, int]:
    """--block-size 64 (square tiles) or 128,64 (block_n, block_k)."""
    try:
        parts = [int(p) for p in text.split(",")]
    except ValueError:
        parts = []  # refused below, with the allowed values
    if len(parts) not in (1, 2) or any(p < 16 or p % 16 for p in parts):
        raise argparse.ArgumentTypeError(f"block size must be N or N,K, multiples of 16, got {text}")
    return parts[0] if len(parts) == 1 else (parts[0], parts[1])


def _check_out(args: argparse.Namespace) -> None:
    """--out, before any loading or calibration (minutes of GPTQ were lost to a bad path): a GGUF method writes
    FILE.gguf into a folder that exists; the others write a new or empty directory (save_quantized creates it)."""
    gguf = args.method in GGUF_METHODS
    if gguf and (os.path.isdir(args.out) or not args.out.endswith(".gguf")):
        raise ValueError(f"--method {args.method} writes one file: give --out FILE.gguf, got {args.out!r}")
    check_output_path(args.out, "--out", folder=not gguf)
    held = sorted(os.listdir(args.out)) if not gguf and os.path.isdir(args.out) else []
    if held:  # the source itself, an older checkpoint (its shards would outvote ours), "/": a model would be lost
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(f"--out {args.out} already holds files ({shown}); give a new or empty directory")


# flags that only some methods read, and those methods: another method given one of them (away from its default)
# is refused, not silently ignored (rtn --act-order wrote desc_act false and exited 0)
# (the GPTQ-only --static-groups / --grid-search / --asym-calib are quantize_model's own check)
FLAG_OWNERS = {"bits": ("rtn", "gptq", "awq"), "sym": ("rtn", "gptq"), "act_order": ("gptq", "fp8_block"),
               "alpha": ("smoothquant",), "smooth_alpha": ("fp8",), "gptq": ("fp8", "fp8_block"),
               "mse_scale": ("fp8",), "block_size": ("fp8_block",),
               "sparsity": PRUNE_METHODS,  # 2:4: checked to be 0.5
               "granularity": ("prune-magnitude", "prune-wanda"), "prune_scores": ("prune-2:4",)}


def _check_method_options(args: argparse.Namespace, defaults: dict[str, object]) -> None:
    """Before loading: a flag the method does not read, and SmoothQuant's alpha out of [0, 1] (it was refused
    only once calibration had started)."""
    if args.method == "fp8_block" and (args.smooth_alpha is not None or args.mse_scale):
        raise ValueError("--method fp8_block takes --gptq only (not --smooth-alpha or --mse-scale)")
    for dest, methods in FLAG_OWNERS.items():
        if getattr(args, dest) != defaults[dest] and args.method not in methods:
            raise ValueError(f"--{dest.replace('_', '-')} belongs to --method {' / '.join(methods)}, got --method "
                             f"{args.method}")
    if args.method == "smoothquant" and not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha (SmoothQuant's migration strength) must be in [0, 1], got {args.alpha}")


def _cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from minillm.engine.worker import build_model
    from minillm.loader import default_model_path, load_model
    from minillm.platform import resolve_device
    from minillm.quant.calibration import calibration_texts, tokenize_to_sequences
    from minillm.quant.checkpoint import save_quantized
    from minillm.quant.driver import quantize_model

    try:
        _check_method_options(args, args.flag_defaults)
        _check_out(args)
        path = args.model if args.model is not None else default_model_path()
        start = time.perf_counter()
        if args.method in GGUF_METHODS:
            print(f"{args.method}: {_cmd_gguf(args, path)} in {time.perf_counter() - start:.1f} s")
            return 0
        device = resolve_device(args.device)
        config, weights, tokenizer = load_model(path)
        if config.quantization is not None:
            raise ValueError(f"{path} is already quantized ({config.quantization}); quantize a dense checkpoint")
        model = build_model(config, weights, device, torch.float32)
        if args.method in PRUNE_METHODS:
            print(f"{args.method}: {_cmd_prune(args, model, tokenizer, path)} in {time.perf_counter() - start:.1f} s")
            return 0
        recipe = _fp8_recipe(args)
        calibration = None
        if args.method in CALIBRATED or recipe:
            texts = calibration_texts("calibration")
            calibration = tokenize_to_sequences(texts, tokenizer, args.calib_samples, args.calib_seq_len)
        start = time.perf_counter()
        qm = quantize_model(model, args.method, args.bits, args.group_size, calibration=calibration,
                            sym=args.sym, act_order=args.act_order, static_groups=args.static_groups,
                            grid_search=args.grid_search, asym_calib=args.asym_calib, alpha=args.alpha, **recipe,
                            **_block_options(args))
        save_quantized(qm, args.out, tokenizer, source=path if os.path.isdir(path) else None)
    except (ValueError, TypeError, OSError) as err:  # OSError: a model path that is not there or not readable
        print(f"minillm quantize: error: {err}", file=sys.stderr)
        return 2
    size = sum(t.numel() * t.element_size() for t in qm.state.values())
    print(f"{args.method}: {qm.quantization_config} in {time.perf_counter() - start:.1f} s; "
          f"wrote {args.out} ({size / 1e6:.1f} MB of tensors)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="quantize a model (rtn, gptq, awq, fp8, fp8_block, smoothquant, nf4, "
                                               "int8) and save it as safetensors + config.json; or write a GGUF "
                                               "(gguf-q4_0, gguf-q4_k, gguf-q8_0); or prune it")
    p.add_argument("model", nargs="?", default=None, help="GGUF file or HF directory (default: bundled SmolLM2-135M)")
    p.add_argument("--method", required=True, choices=METHODS + tuple(GGUF_METHODS) + PRUNE_METHODS)
    p.add_argument("--bits", type=int, default=None, help="rtn/gptq/awq: 2..8 (default 4); fixed for the others")
    p.add_argument("--group-size", type=_group_size, default=64,
                   help="input columns per scale, -1 = per channel (default 64: SmolLM2's 576 is not a multiple "
                        "of 128)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (rtn/gptq); default asymmetric")
    p.add_argument("--act-order", action="store_true",
                   help="gptq, fp8_block --gptq: columns by decreasing activation (desc_act)")
    p.add_argument("--static-groups", action="store_true",
                   help="gptq: group grids from the original columns, fixed before act-order (no g_idx)")
    p.add_argument("--grid-search", action="store_true",
                   help="gptq: search each group's grid range (weighted by the Hessian's diagonal); with "
                        "--act-order --static-groups this is the best GPTQ here")
    p.add_argument("--asym-calib", action="store_true",
                   help="gptq: aim each layer at the unquantized model's outputs (GPTAQ's asymmetric calibration; "
                        "needs many calibration tokens: 16k+ on SmolLM2)")
    p.add_argument("--alpha", type=float, default=0.5, help="smoothquant migration strength (default 0.5)")
    p.add_argument("--smooth-alpha", type=_smooth_alpha, default=None,
                   help="fp8: SmoothQuant migration before e4m3, a float in [0, 1] or 'search' (per linear)")
    p.add_argument("--gptq", action="store_true", help="fp8, fp8_block: GPTQ error feedback onto the e4m3 grid")
    p.add_argument("--mse-scale", action="store_true",
                   help="fp8: per-channel weight scales that minimise the activation-weighted rounding error")
    p.add_argument("--block-size", type=_block_size, default=None,
                   help="fp8_block: weight tile and activation group, N (square) or BLOCK_N,BLOCK_K (default 64; "
                        "each must divide SmolLM2's 576-wide rows: 64 or 32)")
    p.add_argument("--sparsity", type=float, default=0.5, help="prune-*: fraction of weights set to zero (default 0.5)")
    p.add_argument("--granularity", choices=("row", "layer"), default="row",
                   help="prune-magnitude/wanda: compare scores per output row (default) or per matrix")
    p.add_argument("--prune-scores", choices=("magnitude", "wanda"), default="wanda",
                   help="prune-2:4: which score picks the 2 of 4 weights kept (default wanda)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--device", default="cpu", help="where to run the calibration: cpu (default) or cuda")
    p.add_argument("--out", required=True, help="output directory (created if missing); FILE.gguf for gguf-*")
    p.set_defaults(func=_cmd_quantize, flag_defaults={dest: p.get_default(dest) for dest in FLAG_OWNERS})
