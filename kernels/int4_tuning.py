"""Launch tuning for the INT4 weight-only GEMM kernels (int4_gemm.py, int4_mma.py): tile configs, split-K, workspace
(chapter 8).

At decode (M = 1..64 rows) a weight-only GEMM is a stream of weight bytes. What decides its speed is whether
enough bytes are in flight per SM to cover HBM's latency (a few tens of KB per SM on an H200) and whether the
unpacking keeps up. Two knobs matter most:
* the tile (BLOCK_N columns x BLOCK_K rows of K per program, num_warps) sets the bytes each program has in flight
  and the instructions per weight (wider tiles share each activation over more columns);
* split-K: with M = 1 and N = 4096 there are only 32 column tiles of 128 for 132 SMs, so SPLIT_K programs share
  each tile's K range and add their partial sums into an fp32 workspace (the last to arrive writes y).
int4_dispatch.py times a few candidates of each kernel on the first call per shape (for prefill-sized M: the
large-M tiles below and dequantise-then-cuBLAS). benchmarks/sweep_int4_gemm.py maps the whole space on a GPU.
"""
from __future__ import annotations

import torch
import triton

__all__ = ["LARGE_M_CONFIGS", "MAX_SPLIT_K", "SPLIT_K_MAX_M", "choose_split_k", "mma_applies", "split_k_workspace"]

# int4_gemm.py's tensor-core tiles for prefill-sized M (> SPLIT_K_MAX_M): (BLOCK_M, BLOCK_N, BLOCK_K, num_warps,
# num_stages), timed by int4_dispatch.py beside dequantise-then-cuBLAS (int4_dequant.py).
LARGE_M_CONFIGS = [(64, 128, 128, 8, 3), (128, 64, 128, 8, 3), (128, 128, 128, 8, 3)]
MAX_SPLIT_K = 32
SPLIT_K_MAX_M = 64  # above this there are enough output tiles to fill the GPU without splitting K




def choose_split_k(m: int, n: int, k: int, block_m: int, block_n: int, block_k: int, num_sms: int) -> int:
    """Split K (a power of two) until the grid has about two programs per SM, keeping >= 2 K tiles each."""
    if m > SPLIT_K_MAX_M:
        return 1
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    k_tiles = triton.cdiv(k, block_k)
    split = 1
    while tiles * split < 2 * num_sms and split * 2 <= min(MAX_SPLIT_K, k_tiles // 2):
        split *= 2
    return split


def _interpreter_config(m: int, group: int) -> dict:
    """One small config under the interpreter: CUDA-core path for a single row, tensor-core path otherwise."""
    if m == 1:
        return dict(BLOCK_M=1, BLOCK_N=32, BLOCK_K=min(64, group) if group % 8 == 0 else 64, USE_DOT=False)
    return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, USE_DOT=True)


# Split-K workspace per device: fp32 partial sums (>= M * N) and per-tile arrival counters, shared by every
# shape (the kernel leaves them zeroed, so calls on one stream can take turns). It only grows, and a grown-out
# buffer is kept alive: a CUDA graph captured earlier still replays into the addresses it recorded.
# Not safe for two split-K GEMMs running concurrently on different streams.
_SPLIT_K_WORKSPACES: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}


def split_k_workspace(device: torch.device, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The device's (partial sums, counters) pair, grown to hold at least M x N sums and their tiles' counters."""
    held = _SPLIT_K_WORKSPACES.setdefault(str(device), [])
    sums, tiles = m * n, m * triton.cdiv(n, 16)  # tiles: an upper bound for every BLOCK_M >= 1, BLOCK_N >= 16
    if not held or held[-1][0].numel() < sums or held[-1][1].numel() < tiles:
        old_sums, old_tiles = (held[-1][0].numel(), held[-1][1].numel()) if held else (0, 0)
        held.append((torch.zeros(max(sums, 2 * old_sums), dtype=torch.float32, device=device),
                     torch.zeros(max(tiles, 2 * old_tiles), dtype=torch.int32, device=device)))
    return held[-1]

def mma_applies(x: torch.Tensor, group: int, m: int) -> bool:
    """Whether int4_mma.py's kernel serves this call: bf16/fp16 activations (its codes are bf16/fp16 halves),
    whole 128-row K tiles inside a group (GROUP_SIZE % 128 == 0) and a decode-sized M."""
    return x.dtype in (torch.bfloat16, torch.float16) and group % 128 == 0 and m <= SPLIT_K_MAX_M
