"""The MoE MLP on the GPU: kernels/fused_moe.py's grouped GEMMs against the per-expert loop (minillm/layers/moe.py).

    python benchmarks/bench_fused_moe.py [--shape qwen3-30b-a3b|mixtral-8x7b] [--tokens 1 8 64 256 1024]
                                         [--weights bf16|int8|fp8|int4] [--int4-tile-dot] [--out F]

One MoE block's MLP (router output given: top-k weights and ids drawn from a random router) with random bf16
weights of the shape's sizes, or those weights as 8-bit codes with one scale per row (--weights int8: int8_rtn's
W8A16; fp8: fp8's W8A8, activation rows rounded to e4m3) or 4-bit g128 codes in GPTQ's layout (int4: rtn / gptq /
awq's W4A16), timed with triton.testing.do_bench (median, warm weights):

    loop    the engine's reference path: rows sorted by expert, then per expert a gather, gate_up, SiLU, down, and a
            scatter (run_experts), then the weighted sum over each token's k rows (one host sync for the counts);
            quantized, each expert's projections are its method's own call site (int8_weight_linear, fp8_linear,
            int4_linear)
    fused   moe_align + two grouped GEMMs + silu_and_mul + the k-row sum: a fixed number of launches, no sync
            (eager: the host's launches included, as an eager engine pays them)
    graph   the fused path recorded as one CUDA graph and replayed (its shapes do not depend on the routing): the
            GPU's time alone, as a decode step in the engine's CUDA graphs pays it

With --int4-tile-dot (int4 only) each row also times the graph with fused_moe.INT4_TILE_DOT on (one dot per K
tile, the codes joined in the operand's registers, instead of eight) in the same process: "tile us", its error too.

and the weight-read floor of the experts the batch touches (bytes of the distinct experts routed to / the copy
bandwidth measured in the same run). Both outputs are compared first (bf16, relative to the output's scale).
Needs CUDA; prints a table and writes the raw numbers to --out as JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys

SHAPES = {  # (experts, top_k, hidden, expert intermediate size)
    "qwen3-30b-a3b": (128, 8, 2048, 768),
    "mixtral-8x7b": (8, 2, 4096, 14336),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 256, 1024])
    parser.add_argument("--weights", choices=("bf16", "int8", "fp8", "int4"), default="bf16")
    parser.add_argument("--int4-tile-dot", action="store_true",
                        help="int4: also time the one-dot-per-tile kernel path (fused_moe.INT4_TILE_DOT) beside it")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if args.int4_tile_dot and args.weights != "int4":
        parser.error("--int4-tile-dot needs --weights int4")
    import torch
    if not torch.cuda.is_available():
        print("bench_fused_moe needs a CUDA GPU; nothing was measured.", file=sys.stderr)
        return 2
    import triton
    import triton.testing

    import minillm  # noqa: F401  (platform setup)
    import minillm.kernels.fused_moe as fused_moe_module
    from minillm.kernels.fused_moe import fused_moe
    from minillm.layers.moe import combine_expert_outputs, route, run_experts

    experts, top_k, hidden, inter = SHAPES[args.shape]
    gen = torch.Generator(device="cuda").manual_seed(0)
    w13 = torch.randn(experts, 2 * inter, hidden, device="cuda", generator=gen).mul_(hidden ** -0.5).bfloat16()
    w2 = torch.randn(experts, hidden, inter, device="cuda", generator=gen).mul_(inter ** -0.5).bfloat16()
    w13_scale = w2_scale = quantize_rows = None
    quant = {}
    if args.weights == "int4":  # rtn's 4-bit g128 codes in GPTQ's layout, as the engine stacks them
        from minillm.quant.int4 import gptq_tensors, int4_linear
        from minillm.quant.rtn import quantize

        def gptq_stack(w):
            parts = [gptq_tensors(quantize(w[e], 4, 128, False)) for e in range(experts)]
            return [torch.stack([p[name] for p in parts]) for name in ("qweight", "scales", "qzeros")]
        (w13, w13_scale, w13_zeros), (w2, w2_scale, w2_zeros) = gptq_stack(w13), gptq_stack(w2)
        w13_scale, w2_scale = w13_scale.bfloat16(), w2_scale.bfloat16()
        quant = dict(w13_zeros=w13_zeros, w2_zeros=w2_zeros, group_size=128)

        def project(rows, stack, scales, e):
            zeros = w13_zeros if stack is w13 else w2_zeros
            return int4_linear(rows, stack[e], scales[e], zeros[e], 128)
    elif args.weights != "bf16":  # 8-bit codes [E, N, K] with a scale per expert row, as the engine stacks them
        from minillm.quant.fp8 import fp8_linear, per_token_fp8, quantize_fp8
        from minillm.quant.int8_rtn import int8_weight_linear, quantize_per_channel_int8
        quantize = quantize_per_channel_int8 if args.weights == "int8" else quantize_fp8
        linear = int8_weight_linear if args.weights == "int8" else fp8_linear
        quantize_rows = per_token_fp8 if args.weights == "fp8" else None
        (w13, w13_scale), (w2, w2_scale) = (
            (torch.stack(codes), torch.stack(scales).to(torch.bfloat16 if args.weights == "int8" else torch.float32))
            for codes, scales in (zip(*[quantize(w[e]) for e in range(experts)]) for w in (w13, w2)))

        def project(rows, stack, scales, e):
            return linear(rows, stack[e], scales[e])
    else:
        def project(rows, stack, scales, e):
            return torch.nn.functional.linear(rows, stack[e])
    src = torch.empty(1 << 28, dtype=torch.bfloat16, device="cuda")
    copy_bw = 2 * src.numel() * 2 / (triton.testing.do_bench(lambda: src.clone()) * 1e-3)
    del src

    def loop(x, weights, ids):
        def expert(e):
            def run(rows):
                gate_up = project(rows, w13, w13_scale, e)
                return project(torch.nn.functional.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2, w2_scale, e)
            return run
        rows = x.repeat_interleave(top_k, dim=0)
        out, _, _ = run_experts(rows, ids.reshape(-1), [expert(e) for e in range(experts)])
        return combine_expert_outputs(out, weights)

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    command = "python benchmarks/bench_fused_moe.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results = dict(benchmark="fused MoE", date=now, device=torch.cuda.get_device_name(), torch=torch.__version__,
                   triton=triton.__version__, command=command,
                   shape=dict(name=args.shape, experts=experts, top_k=top_k, hidden=hidden, inter=inter),
                   weights=args.weights,
                   copy_bytes_per_s=round(copy_bw), rows=[])
    quant.update(w13_scale=w13_scale, w2_scale=w2_scale, quantize_rows=quantize_rows)
    print(f"{args.shape}, {args.weights}: {experts} experts, top-{top_k}, hidden {hidden}, expert FFN {inter}; copy "
          f"{copy_bw / 1e12:.2f} TB/s")
    print(f"{'tokens':>7}{'experts hit':>13}{'loop us':>10}{'fused us':>10}{'graph us':>10}{'speed-up':>10}"
          f"{'floor us':>10}{'of floor':>10}")
    for tokens in args.tokens:
        x = torch.randn(tokens, hidden, device="cuda", generator=gen).bfloat16()
        weights, ids = route(torch.randn(tokens, experts, device="cuda", generator=gen), top_k)
        fused_out = fused_moe(x, w13, w2, weights, ids, **quant)[0]
        ref = loop(x, weights, ids)
        err = float((fused_out.float() - ref.float()).abs().max() / ref.float().abs().max())
        t_loop = triton.testing.do_bench(lambda: loop(x, weights, ids)) * 1e3
        t_fused = triton.testing.do_bench(lambda: fused_moe(x, w13, w2, weights, ids, **quant)) * 1e3
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fused_moe(x, w13, w2, weights, ids, **quant)
        t_graph = triton.testing.do_bench(graph.replay) * 1e3
        if args.int4_tile_dot:  # the one-dot path, same operands, same process
            fused_moe_module.INT4_TILE_DOT = True
            try:
                tile_err = float((fused_moe(x, w13, w2, weights, ids, **quant)[0].float() - ref.float()).abs().max()
                                 / ref.float().abs().max())
                tile_graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(tile_graph):
                    fused_moe(x, w13, w2, weights, ids, **quant)
                t_tile = triton.testing.do_bench(tile_graph.replay) * 1e3
            finally:
                fused_moe_module.INT4_TILE_DOT = False
        hit = int(ids.unique().numel())
        floor = hit * (w13[0].numel() + w2[0].numel()) * w13.element_size() / copy_bw * 1e6  # (int4: 8 a word)
        row = dict(tokens=tokens, experts_hit=hit, loop_us=round(t_loop, 1), fused_us=round(t_fused, 1),
                   graph_us=round(t_graph, 1), speedup=round(t_loop / t_fused, 2), floor_us=round(floor, 1),
                   rel_err=err)
        if args.int4_tile_dot:
            row.update(tile_graph_us=round(t_tile, 1), tile_rel_err=tile_err)
        results["rows"].append(row)
        print(f"{tokens:>7}{hit:>13}{t_loop:>10.1f}{t_fused:>10.1f}{t_graph:>10.1f}{t_loop / t_fused:>9.2f}x"
              f"{floor:>10.1f}{floor / t_graph:>10.0%}   (max error {err:.1e} of the output's scale)"
              + (f"; tile us {t_tile:.1f} ({t_graph / t_tile:.2f}x, error {tile_err:.1e})"
                 if args.int4_tile_dot else ""))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
