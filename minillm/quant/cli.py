"""`minillm quantize [MODEL] --method ... --out DIR`: quantize a model once and save it (chapters 7-8).

    minillm quantize --method gptq --bits 4 --group-size 64 --out smollm2-gptq     # the bundled SmolLM2
    minillm quantize my-llama/ --method fp8 --out my-llama-fp8
    python -c "from minillm import LLM; print(LLM(model='smollm2-gptq').generate('Hi')[0].outputs[0].text)"

Calibrated methods (gptq, awq, smoothquant) read --calib-samples x --calib-seq-len tokens of the standard
library's docstrings (minillm.quant.calibration). minillm/cli.py owns the parser and calls `register` here.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

from minillm.quant.driver import CALIBRATED, METHODS


def _group_size(text: str) -> int:
    value = int(text)
    if value != -1 and value < 1:
        raise argparse.ArgumentTypeError(f"group size must be -1 (per channel) or positive, got {value}")
    return value


def _cmd_quantize(args: argparse.Namespace) -> int:
    import torch

    from minillm.engine.worker import build_model
    from minillm.loader import default_model_path, load_model
    from minillm.quant.calibration import calibration_texts, tokenize_to_sequences
    from minillm.quant.checkpoint import save_quantized
    from minillm.quant.driver import quantize_model

    try:
        path = args.model if args.model is not None else default_model_path()
        config, weights, tokenizer = load_model(path)
        if config.quantization is not None:
            raise ValueError(f"{path} is already quantized ({config.quantization}); quantize a dense checkpoint")
        device = torch.device(args.device)
        model = build_model(config, weights, device, torch.float32)
        calibration = None
        if args.method in CALIBRATED:
            texts = calibration_texts("calibration")
            calibration = tokenize_to_sequences(texts, tokenizer, args.calib_samples, args.calib_seq_len)
        start = time.perf_counter()
        qm = quantize_model(model, args.method, args.bits, args.group_size, calibration=calibration,
                            sym=args.sym, act_order=args.act_order, alpha=args.alpha)
        save_quantized(qm, args.out, tokenizer, source=path if os.path.isdir(path) else None)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"minillm quantize: error: {err}", file=sys.stderr)
        return 2
    size = sum(t.numel() * t.element_size() for t in qm.state.values())
    print(f"{args.method}: {qm.quantization_config} in {time.perf_counter() - start:.1f} s; "
          f"wrote {args.out} ({size / 1e6:.1f} MB of tensors)")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("quantize", help="quantize a model (rtn, gptq, awq, fp8, smoothquant, nf4, int8) "
                                               "and save it as safetensors + config.json")
    p.add_argument("model", nargs="?", default=None, help="GGUF file or HF directory (default: bundled SmolLM2-135M)")
    p.add_argument("--method", required=True, choices=METHODS)
    p.add_argument("--bits", type=int, default=None, help="rtn/gptq/awq: 2..8 (default 4); fixed for the others")
    p.add_argument("--group-size", type=_group_size, default=64,
                   help="input columns per scale, -1 = per channel (default 64: SmolLM2's 576 is not a multiple "
                        "of 128)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (rtn/gptq); default asymmetric")
    p.add_argument("--act-order", action="store_true", help="gptq: columns by decreasing activation (desc_act)")
    p.add_argument("--alpha", type=float, default=0.5, help="smoothquant migration strength (default 0.5)")
    p.add_argument("--calib-samples", type=int, default=128, help="calibration sequences (default 128)")
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sequence (default 512)")
    p.add_argument("--device", default="cpu", help="where to run the calibration: cpu (default) or cuda")
    p.add_argument("--out", required=True, help="output directory (created if missing)")
    p.set_defaults(func=_cmd_quantize)
