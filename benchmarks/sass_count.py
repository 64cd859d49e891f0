"""Registers and SASS instructions per weight of the INT4 GEMV's tiles (and of the one-dot tensor-core kernel's),
compiled for sm_90 on any machine, no GPU (issue 10, chapter 8).

    python benchmarks/sass_count.py [--json] [--keep DIR]

Triton compiles for the target it is given, not only for the GPU it runs on, and its wheel carries NVIDIA's ptxas
and cuobjdump. So a CPU machine can read what a kernel costs on a Hopper GPU before any GPU time is spent: for each
of the dispatcher's GEMV tiles (int4_dispatch.GEMV_TILES, the TMA kernel's GEMV_TMA_TILES and GEMV_ROW_TILES, several
activation rows per program; bf16 activations, g128 asymmetric weights, pointers and sizes 16-divisible as the
launcher specialises them) this prints the registers per thread (an SM holds 65,536: at 128 registers, 16 warps)
and the SASS instructions inside the K loop per weight a thread handles there (and per weight and row). Both
decided the INT4 GEMV's speed on the H200 (RESULTS.md, fourteenth session: 254 registers and 6.5 instructions per
weight before the rewrite, latency-bound at 1.7 warps per SM). The counts are Triton's and ptxas's of this
machine's versions (the H200 runs triton 3.6: close, not equal). --keep DIR writes each tile's SASS there.

It also compiles int4_mma.py's one-dot kernel at its dispatcher tiles (int4_dispatch.MMA_TILE_TILES, 16 rows, bf16)
and counts, inside its K loop's IR, the shared-memory buffers ("local_allocs") and layout conversions ("loop_converts",
each a trip through shared memory): one of each (the activations' buffer, the packed words' conversion, 4 bytes per
8 weights) while the unpacked weights stay in the tensor core's operand registers, more where Triton sends them
through shared memory.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0")  # the compiler, not the interpreter (before triton is imported)

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
POINTERS = dict(X="*bf16", QW="*i32", S="*bf16", QZ="*i32", BIAS="*bf16", Y="*bf16", WS="*fp32", CNT="*i32")
HALF = dict(POINTERS, X="*fp16", S="*fp16", BIAS="*fp16", Y="*fp16")  # an fp16 model's launch


def compile_gemv(block_n: int, block_k: int, num_warps: int, prefetch: bool = False, tma_stages: int = 0,
                 half: bool = False, block_m: int = 1, pdl: bool = False):
    """int4_gemv_kernel (or with tma_stages > 0 its TMA twin, pipelined that deep) compiled for sm_90 with the
    constants and 16-divisibility a real launch has; bf16 activations, or fp16 with `half`; block_m activation rows
    per program (the register kernel only: the TMA twin holds one); `pdl`: launched with programmatic dependent
    launch (kernels/pdl.py), as on a Hopper GPU."""
    from minillm.kernels.int4_gemv import int4_gemv_kernel, int4_gemv_tma_kernel

    fn = int4_gemv_tma_kernel if tma_stages else int4_gemv_kernel
    const = dict(GROUP_SIZE=128, HAS_ZEROS=True, HAS_BIAS=False, PACKED=True, BLOCK_N=block_n, BLOCK_K=block_k,
                 **(dict(STAGES=tma_stages) if tma_stages else dict(PREFETCH=prefetch, BLOCK_M=block_m)),
                 **(dict(PDL=True) if pdl else {}))
    signature, divisible = {}, []
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
            continue
        if name == "W_DESC":  # a host-side tensor descriptor of qweight's int32 words, one tile per load
            signature[name] = f"tensordesc<i32[{block_k // 8}, {block_n}]>"
            continue
        signature[name] = (HALF if half else POINTERS).get(name, "i32")
        if name in POINTERS or name in ("N", "K") or name.startswith("stride"):
            divisible.append(i)
    src = ASTSource(fn, signature=signature, constexprs=const,
                    attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32),
                          options=dict(num_warps=num_warps, num_stages=max(tma_stages, 1),
                                       **(dict(launch_pdl=True) if pdl else {})))


def sass_of(cubin: bytes, workdir: str, name: str) -> tuple[str, int]:
    """(SASS text, registers per thread) of a cubin, through cuobjdump."""
    path = os.path.join(workdir, f"{name}.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", path], capture_output=True, text=True,
                          check=True).stdout
    usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-res-usage", path], capture_output=True, text=True,
                           check=True).stdout
    return sass, int(re.search(r"REG:(\d+)", usage).group(1))


def loop_body(sass: str) -> collections.Counter:
    """Opcode counts of the largest loop: the instructions between a backward branch and its target."""
    rows = []
    for line in sass.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4})\*/\s+(@!?U?P\w+\s+)?([A-Z0-9_.]+)(.*?);", line)
        if m:
            rows.append((int(m.group(1), 16), m.group(3), m.group(4)))
    best = collections.Counter()
    for addr, op, rest in rows:
        target = re.search(r"0x([0-9a-f]+)", rest) if op.startswith("BRA") else None
        if target and int(target.group(1), 16) < addr:
            body = collections.Counter(o.split(".")[0] for a, o, _ in rows if int(target.group(1), 16) <= a <= addr)
            if sum(body.values()) > sum(best.values()):
                best = body
    return best


def loop_ir(ttgir: str) -> str:
    """The TTGIR of the outermost scf.for loop's body (the K loop), from its opening line to its scf.yield."""
    start = ttgir.index("scf.for")
    return ttgir[start:ttgir.index("scf.yield", start)]


def compile_mma_tile(block_n: int, num_warps: int, block_m: int = 16):
    """int4_mma_tile_kernel compiled for sm_90 as the dispatcher launches it on a real layer (EVEN tiles, g128
    asymmetric, bf16 activations, BLOCK_K 128, one pipeline stage)."""
    import torch

    from minillm.kernels.int4_mma import code_constants, int4_mma_tile_kernel

    fn = int4_mma_tile_kernel
    const = dict(GROUP_SIZE=128, HAS_ZEROS=True, HAS_BIAS=False, **code_constants(torch.bfloat16), UPCAST=False,
                 DOT_PRECISION="tf32", BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=128, EVEN=True)
    signature, divisible = {}, []
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
            continue
        signature[name] = POINTERS.get(name, "i32")
        if name in POINTERS or name in ("N", "K") or name.startswith("stride"):
            divisible.append(i)
    src = ASTSource(fn, signature=signature, constexprs=const,
                    attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=1))


def measure(keep: str | None = None) -> list[dict]:
    from minillm.kernels.int4_dispatch import GEMV_ROW_TILES, GEMV_TILES, GEMV_TMA_TILES, MMA_TILE_TILES

    tiles = [(f"gemv_N{n}_K{k}_w{w}{'_prefetch' if pf else ''}{'_fp16' if half else ''}", "gemv",
              (n, k, w, pf, 0, half, 1)) for half in (False, True) for n, k, w, pf in GEMV_TILES]
    tiles += [(f"gemv_tma_N{n}_K{k}_w{w}_stages{st}", "gemv_tma", (n, k, w, False, st, False, 1))
              for n, k, w, st in GEMV_TMA_TILES]
    tiles += [(f"gemv_M{m}_N{n}_K{k}_w{w}{'_prefetch' if pf else ''}", "gemv", (n, k, w, pf, 0, False, m))
              for m, row_tiles in GEMV_ROW_TILES.items() for n, k, w, pf in row_tiles]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind, (block_n, block_k, warps, prefetch, stages, half, rows) in tiles:
            compiled = compile_gemv(block_n, block_k, warps, prefetch, stages, half, rows)
            sass, regs = sass_of(compiled.asm["cubin"], keep or tmp, name)
            body = loop_body(sass)
            weights = block_n * block_k // (32 * warps)  # per thread per K tile
            out.append(dict(tile=name, kernel=kind, rows=rows, registers=regs, loop_instructions=sum(body.values()),
                            per_weight=round(sum(body.values()) / weights, 2),
                            per_weight_row=round(sum(body.values()) / weights / rows, 2), tma_loads="UTMALDG" in sass,
                            spills="STL" in sass, shared_bytes=compiled.metadata.shared, top=dict(body.most_common(6))))
        for block_n, warps in MMA_TILE_TILES:
            name = f"mma_tile_M16_N{block_n}_K128_w{warps}"
            compiled = compile_mma_tile(block_n, warps)
            sass, regs = sass_of(compiled.asm["cubin"], keep or tmp, name)
            body = loop_body(sass)
            weights = block_n * 128 // (32 * warps)
            out.append(dict(tile=name, kernel="mma_tile", rows=16, registers=regs,
                            loop_instructions=sum(body.values()), per_weight=round(sum(body.values()) / weights, 2),
                            per_weight_row=round(sum(body.values()) / weights / 16, 2), tma_loads="UTMALDG" in sass,
                            spills="STL" in sass, shared_bytes=compiled.metadata.shared,
                            local_allocs=loop_ir(compiled.asm["ttgir"]).count("ttg.local_alloc"),
                            loop_converts=loop_ir(compiled.asm["ttgir"]).count("ttg.convert_layout"),
                            top=dict(body.most_common(6))))
    return out


def require_tools(keep: str | None) -> None:
    """Exit with the reason unless Triton compiles for real here and its wheel carries cuobjdump; make `keep`."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 replaces the compiler: run with it unset (or 0)")
    if not os.path.exists(os.path.join(TOOLS, "cuobjdump")):
        raise SystemExit(f"no cuobjdump in {TOOLS}: this Triton wheel has no NVIDIA tools")
    if keep:
        os.makedirs(keep, exist_ok=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--keep", default=None, help="write each tile's cubin and SASS into this directory")
    args = parser.parse_args()
    require_tools(args.keep)
    rows = measure(args.keep)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"triton {triton.__version__}, sm_90: the INT4 GEMV's tiles (int4_dispatch.GEMV_TILES, GEMV_TMA_TILES, "
          "GEMV_ROW_TILES)")
    for r in rows:
        print(f"  {r['tile']:32s} {r['registers']:4d} registers, {r['shared_bytes']:6d} B shared, "
              f"{r['loop_instructions']:5d} instructions in the K loop, {r['per_weight']:.2f} per weight"
              + (f" ({r['per_weight_row']:.2f} per weight and row)" if r["rows"] > 1 else "")
              + (f", in the loop {r['local_allocs']} shared-memory buffer(s) and {r['loop_converts']} layout "
                 f"conversion(s)" if "local_allocs" in r else "")
              + f"{', TMA loads' if r['tma_loads'] else ''}{', SPILLS' if r['spills'] else ''}; most: {r['top']}")


if __name__ == "__main__":
    main()
