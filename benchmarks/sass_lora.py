"""Registers, spills and shared memory of the LoRA kernels (kernels/lora.py) compiled for sm_90 on any machine, no GPU,
as sass_count.py does for the INT4 GEMV (Triton's compiler with a GPUTarget, the wheel's ptxas and cuobjdump).

    python benchmarks/sass_lora.py [--json] [--keep DIR]

For each (K, N, R_total) below, a decode launch (one segment per row, max_seg_len 1) in bf16 with contiguous
tensors, compiled with the block sizes and the specialisation a real launch gets (pointers and multiples of 16
16-divisible, unit strides constant): the fused kernel (lora_fused), and shrink (K unsplit) and expand for
comparison. The shapes: SmolLM2-135M's qkv at rank 16 (576 -> 960, R 48), Llama-3-8B's qkv at rank 16
(4096 -> 6144, R 48) and a 14,336-wide gate_up at rank 16 (4096 -> 28,672, R 32). An SM holds 65,536 registers:
at 4 warps a program of 128 registers or fewer leaves room for four programs per SM.
"""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "0")  # the compiler, not the interpreter (before triton is imported)

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from sass_count import require_tools, sass_of  # noqa: E402

SHAPES = [(576, 960, 48), (4096, 6144, 48), (4096, 14336 * 2, 32)]  # (K, N, R_total)


def compile_lora(kernel: str, k: int, n: int, rank: int, max_seg_len: int = 1, dtype: str = "bf16"):
    """One of the LoRA kernels ("fused", "shrink", "expand") compiled for sm_90 as lora_fused / lora_shrink /
    lora_expand would launch it for contiguous x [T, K], lora_a [L, R, K], lora_b [L, N, R], y [T, N]."""
    from minillm.kernels import lora

    block_m, block_k, block_n, block_r = lora._fused_blocks(max_seg_len, k, n, rank)
    # the integer arguments' values in a real launch (strides of contiguous tensors; L = 4 slots)
    ints = dict(K=k, N=n, R=rank, K_PER_SPLIT=triton.cdiv(k, block_k) * block_k,
                stride_xm=k, stride_xk=1, stride_al=rank * k, stride_ar=k, stride_ak=1, stride_bl=n * rank,
                stride_bn=rank, stride_br=1, stride_ym=n, stride_yn=1, stride_sm=rank, stride_sr=1)
    pointers = dict(X=f"*{dtype}", A=f"*{dtype}", B=f"*{dtype}", Y=f"*{dtype}", S_OUT="*fp32", S_IN="*fp32",
                    SEG_STARTS="*i32", SEG_LENS="*i32", SEG_SLOTS="*i32")
    if kernel == "fused":
        fn, const = lora._lora_fused_kernel, dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_N=block_n,
                                                  BLOCK_R=block_r, SHRINK_PRECISION="tf32", EXPAND_PRECISION="tf32")
    elif kernel == "shrink":
        fn, const = lora._lora_shrink_kernel, dict(BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_R=block_r, SPLIT_K=1,
                                                   ZERO_SKIPPED=True, DOT_PRECISION="tf32")
    else:  # lora_expand's own tiles
        bm = 16 if max_seg_len <= 16 else 32 if max_seg_len <= 32 else 64
        fn, const = lora._lora_expand_kernel, dict(
            BLOCK_M=bm, BLOCK_N=max(16, min(128 if bm <= 32 else 64, triton.next_power_of_2(n))),
            BLOCK_R=max(16, min(64, triton.next_power_of_2(rank))), DOT_PRECISION="tf32")
    signature, divisible = {}, []
    for i, name in enumerate(fn.arg_names):
        if name in const:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
            divisible.append(i)
        elif ints[name] == 1:  # Triton specialises an int argument equal to 1 into a constant
            signature[name] = "constexpr"
            const[name] = 1
        else:
            signature[name] = "i32"
            if ints[name] % 16 == 0:
                divisible.append(i)
    src = ASTSource(fn, signature=signature, constexprs=const,
                    attrs={(i,): [["tt.divisibility", 16]] for i in divisible})
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
    return compiled, (block_m, block_k, block_n, block_r)


def measure(keep: str | None = None) -> list[dict]:
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, n, rank in SHAPES:
            for kernel in ("fused", "shrink", "expand"):
                compiled, blocks = compile_lora(kernel, k, n, rank)
                name = f"{kernel}_K{k}_N{n}_R{rank}"
                sass, regs = sass_of(compiled.asm["cubin"], keep or tmp, name)
                out.append(dict(kernel=kernel, k=k, n=n, rank=rank, blocks=dict(zip("MKNR", blocks)),
                                registers=regs, spills="STL" in sass or "LDL" in sass,
                                shared_bytes=compiled.metadata.shared))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--keep", default=None, help="write each kernel's cubin and SASS into this directory")
    args = parser.parse_args()
    require_tools(args.keep)
    rows = measure(args.keep)
    if args.json:
        print(json.dumps(rows))
        return
    print(f"triton {triton.__version__}, sm_90, bf16, decode (max_seg_len 1), 4 warps:")
    for r in rows:
        blocks = " ".join(f"{k}{v}" for k, v in r["blocks"].items()) if r["kernel"] != "expand" else "(expand's)"
        print(f"  {r['kernel']:6s} K={r['k']:5d} N={r['n']:5d} R={r['rank']:3d} {blocks:24s} {r['registers']:4d} "
              f"registers, {r['shared_bytes']:6d} B shared{', SPILLS' if r['spills'] else ''}")


if __name__ == "__main__":
    main()
