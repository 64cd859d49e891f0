"""Launch tuning for the INT4 weight-only GEMM kernels (int4_gemm.py, int4_mma.py): tile configs, split-K, workspace.

At decode (M = 1..64 rows) a weight-only GEMM is a stream of weight bytes. What decides its speed is whether
enough bytes are in flight per SM to cover HBM's latency (a few tens of KB per SM on an H200) and whether the
unpacking keeps up. Two knobs matter most:
* the tile (BLOCK_N columns x BLOCK_K rows of K per program, num_warps) sets the bytes each program has in flight
  and the instructions per weight (wider tiles share each activation over more columns);
* split-K: with M = 1 and N = 4096 there are only 32 column tiles of 128 for 132 SMs, so SPLIT_K programs share
  each tile's K range and add their partial sums into an fp32 workspace (the last to arrive writes y).
The autotuner times each candidate on the first call per (M bucket, N, K, group) key; benchmarks/sweep_int4_gemm.py
maps the whole space on a GPU.
"""
from __future__ import annotations

import torch
import triton

__all__ = ["MAX_SPLIT_K", "SPLIT_K_MAX_M", "choose_split_k", "num_sms", "split_k_workspace"]

# (BLOCK_M, BLOCK_N, BLOCK_K, USE_DOT, num_warps, num_stages). CUDA-core configs serve M <= 4 (one row per
# program, the weight tile re-read from L2 by the few rows); tensor-core configs pad M to BLOCK_M >= 16.
_FMA_CONFIGS = [(1, 128, 128, False, 4, 3), (1, 256, 64, False, 4, 4), (1, 256, 128, False, 8, 3)]
_DOT_CONFIGS = [(16, 128, 128, True, 4, 3), (16, 256, 128, True, 8, 3), (16, 64, 256, True, 4, 4),
                (32, 128, 128, True, 4, 3), (64, 128, 128, True, 8, 3),
                (128, 64, 128, True, 8, 3), (128, 128, 128, True, 8, 3)]
MAX_SPLIT_K = 32
SPLIT_K_MAX_M = 64  # above this there are enough output tiles to fill the GPU without splitting K


def _block_m_range(m_bucket: int) -> tuple[int, int]:
    """The BLOCK_M sizes worth trying for a batch of about m_bucket rows (tensor-core path)."""
    if m_bucket <= 16:
        return 16, 16
    if m_bucket <= 64:
        return 16, m_bucket
    return 64, 128


def _prune(configs, named_args, **kwargs):
    m_bucket = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 16))
    group = kwargs.get("GROUP_SIZE", named_args.get("GROUP_SIZE", 128))
    lo, hi = _block_m_range(m_bucket)
    kept = []
    for c in configs:
        bm, bk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]
        if not c.kwargs["USE_DOT"]:
            if m_bucket > 4:
                continue
            if group < bk and group % 32 == 0:  # keep the cheap scale-per-tile path for groups of 32 / 64
                c = triton.Config(dict(c.kwargs, BLOCK_K=group), num_warps=c.num_warps, num_stages=c.num_stages)
        elif not lo <= bm <= hi:
            continue
        kept.append(c)
    return kept or configs


_NUM_SMS: dict[int, int] = {}


def num_sms(device: torch.device) -> int:
    """The device's SM count (4 off CUDA: the interpreter's grids stay small)."""
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _NUM_SMS:
        _NUM_SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _NUM_SMS[idx]


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


def _split_k_heuristic(a) -> int:
    return choose_split_k(a["M"], a["N"], a["K"], a["BLOCK_M"], a["BLOCK_N"], a["BLOCK_K"], num_sms(a["X"].device))


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
    held = _SPLIT_K_WORKSPACES.setdefault(str(device), [])
    sums, tiles = m * n, m * triton.cdiv(n, 16)  # tiles: an upper bound for every BLOCK_M >= 1, BLOCK_N >= 16
    if not held or held[-1][0].numel() < sums or held[-1][1].numel() < tiles:
        old_sums, old_tiles = (held[-1][0].numel(), held[-1][1].numel()) if held else (0, 0)
        held.append((torch.zeros(max(sums, 2 * old_sums), dtype=torch.float32, device=device),
                     torch.zeros(max(tiles, 2 * old_tiles), dtype=torch.int32, device=device)))
    return held[-1]




# ---------------------------------------------------------------------------------------------- int4_mma.py
# (BLOCK_N, num_warps, num_stages) x SPLIT_K; BLOCK_K = 128 (one g128 group per tile), BLOCK_M from the M bucket.
MMA_TILES = [(64, 4, 3), (128, 4, 3), (128, 8, 3), (256, 8, 3), (256, 4, 3)]
MMA_SPLITS = (1, 2, 4, 8, 16, 32)
MMA_MAX_M = SPLIT_K_MAX_M  # above this int4_gemm.py's large-M tensor-core configs take over


def mma_applies(x: torch.Tensor, group: int, m: int) -> bool:
    """Whether int4_mma.py's kernel serves this call: bf16/fp16 activations (its codes are bf16/fp16 halves),
    whole 128-row K tiles inside a group (GROUP_SIZE % 128 == 0) and a decode-sized M."""
    return x.dtype in (torch.bfloat16, torch.float16) and group % 128 == 0 and m <= MMA_MAX_M


def mma_configs() -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": 128, "SPLIT_K": sk}, num_warps=w, num_stages=st)
            for bm in (16, 32, 64) for bn, w, st in MMA_TILES for sk in MMA_SPLITS]


def prune_mma(configs, named_args, **kwargs):
    """Keep BLOCK_M = the M bucket (16 at least) and the splits that leave >= 1 K tile per program and put
    between half a program and 16 programs on each SM (1 is always kept)."""
    m_bucket = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 16))
    n, k = named_args.get("N", kwargs.get("N")), named_args.get("K", kwargs.get("K"))
    sms = num_sms(named_args["X"].device) if "X" in named_args else 132
    kept = []
    for c in configs:
        bm, bn, sk = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["SPLIT_K"]
        if bm != max(16, m_bucket):
            continue
        programs = triton.cdiv(m_bucket, bm) * triton.cdiv(n, bn) * sk
        if sk == 1 or (sk <= triton.cdiv(k, 128) and sms // 2 <= programs <= 16 * sms):
            kept.append(c)
    return kept or configs
