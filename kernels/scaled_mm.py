"""W8A8 scaled matmul: C = (A_q @ B_q^T) * a_scale[:, None] * b_scale[None, :] (+ bias), the one GEMM behind
FP8 and INT8 "W8A8" layers (chapters 7-8). fp8_gemm.py and int8_gemm.py quantize the activations and call it.

    A_q      [M, K]  float8_e4m3fn or int8     activations, quantized per token (row) on the fly
    B_q      [N, K]  same dtype                weights as nn.Linear stores them (out, in): K contiguous
    a_scale  fp32 [M] or [1]                   per-token (or per-tensor) scale of A
    b_scale  fp32 [N] or [1]                   per-channel (or per-tensor) scale of B
    C        [M, N]  bf16 (or fp16 / fp32)

Both operands are K-major, the only layout Hopper's 8-bit tensor-core instructions (wgmma) accept. The K loop
is a plain tiled matmul, pipelined num_stages deep; all scaling happens once in the epilogue, because the
scales are constant along K: sum_k (a s_m)(b s_n) = s_m s_n sum_k a b. int8 accumulates in int32 (exact:
|sum| <= K 127^2 < 2^31 for K < 133,000); fp8 in fp32 through the tensor core's fast fp8 accumulator, which
Triton uses by default on sm_90 (torch._scaled_mm's use_fast_accum=True; its default promotes as it goes).
Programs walk the output tiles in GROUP_M-row bands so that neighbouring programs share A and B tiles in L2.

Two loaders, same math: `_scaled_mm_tma_kernel` reads tiles through tensor descriptors (Hopper's bulk copy
engine, TMA: no per-thread addresses, edges zero-filled), `_scaled_mm_kernel` through plain pointer loads
(any alignment, any Triton). The default is TMA where tma_supported() says it can run.

Under the interpreter (CPU) the kernels also take fp32 operands holding the 8-bit values: the fallback that
checks the indexing and scaling where an fp8 dtype is unavailable (Triton 3.9's interpreter does decode e4m3
exactly for tl.dot, so the CPU tests run both).
"""
from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl

from minillm.platform import triton_interpreted

try:  # host-side tensor descriptors (TMA): Triton >= 3.3
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover
    TensorDescriptor = None

__all__ = ["scaled_mm", "tma_supported"]


@triton.jit
def _tile_coords(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's output tile, in grouped order: GROUP_M row-tiles advance together along N, so the
    programs running at the same time share their A and B tiles through L2."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    band = pid // (GROUP_M * num_n)
    first_m = band * GROUP_M
    band_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % band_rows
    pid_n = (pid % (GROUP_M * num_n)) // band_rows
    return pid_m, pid_n


@triton.jit
def _clamped_operand_ptrs(A, B, M, N, stride_am, stride_bn, pid_m, pid_n, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The first K tile's pointers of a GEMM tile: A [BLOCK_M, BLOCK_K] and B^T [BLOCK_K, BLOCK_N] (B is [N, K],
    K-major). Rows past M / N are clamped (they re-read a valid row) instead of masked, so the K loop's loads need
    no row mask; their results are never stored. Returns (offs_m, offs_n, a_rows, b_rows, a_ptrs, b_ptrs)."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_rows = tl.minimum(offs_m, M - 1).to(tl.int64)
    b_rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    a_ptrs = A + a_rows[:, None] * stride_am + offs_k[None, :]
    b_ptrs = B + b_rows[None, :] * stride_bn + offs_k[:, None]
    return offs_m, offs_n, a_rows, b_rows, a_ptrs, b_ptrs


@triton.jit
def _scaled_epilogue(acc, offs_m, offs_n, M, N, A_SCALE, B_SCALE, BIAS, C, stride_cm, PER_TOKEN: tl.constexpr,
                     PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr):
    """C = acc * a_scale (row) * b_scale (column) (+ bias), stored in C's dtype."""
    m_ok = offs_m < M
    n_ok = offs_n < N
    if PER_TOKEN:
        a_s = tl.load(A_SCALE + offs_m, mask=m_ok, other=0.0)[:, None]
    else:
        a_s = tl.load(A_SCALE)
    if PER_CHANNEL:
        b_s = tl.load(B_SCALE + offs_n, mask=n_ok, other=0.0)[None, :]
    else:
        b_s = tl.load(B_SCALE)
    out = acc.to(tl.float32) * a_s * b_s
    if HAS_BIAS:
        out += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = C + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, out.to(C.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@triton.jit
def _scaled_mm_kernel(A, B, A_SCALE, B_SCALE, BIAS, C, M, N, K, stride_am, stride_bn, stride_cm, M_BUCKET,
                      PER_TOKEN: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                      INT_ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Pointer loads (cp.async on Hopper): works for any strides and alignment."""
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_m, offs_n, a_rows, b_rows, a_ptrs, b_ptrs = _clamped_operand_ptrs(A, B, M, N, stride_am, stride_bn,
                                                                          pid_m, pid_n, BLOCK_M, BLOCK_N, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)  # K is masked: this kernel takes any K
    if INT_ACC:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if INT_ACC:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    _scaled_epilogue(acc, offs_m, offs_n, M, N, A_SCALE, B_SCALE, BIAS, C, stride_cm, PER_TOKEN, PER_CHANNEL,
                     HAS_BIAS)


@triton.jit
def _scaled_mm_tma_kernel(a_desc, b_desc, A_SCALE, B_SCALE, BIAS, C, M, N, K, stride_cm, M_BUCKET,
                          PER_TOKEN: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                          INT_ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Tensor-descriptor loads: Hopper's bulk tensor copy engine (TMA) moves whole tiles into shared memory,
    zero-filling past the edges, so the loop has no address arithmetic and no masks."""
    pid_m, pid_n = _tile_coords(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    off_m = pid_m * BLOCK_M
    off_n = pid_n * BLOCK_N
    if INT_ACC:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    else:
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = a_desc.load([off_m, k0])
        b = b_desc.load([off_n, k0])  # [BLOCK_N, BLOCK_K], K-major: .T is the B operand wgmma wants
        if INT_ACC:
            acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
        else:
            acc = tl.dot(a, b.T, acc, input_precision=DOT_PRECISION)
    _scaled_epilogue(acc, off_m + tl.arange(0, BLOCK_M), off_n + tl.arange(0, BLOCK_N), M, N, A_SCALE, B_SCALE,
                     BIAS, C, stride_cm, PER_TOKEN, PER_CHANNEL, HAS_BIAS)


# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages): Hopper candidates. Large tiles (128 x 256) keep
# two warpgroups of wgmma busy at 8192^3; 64-row tiles with more columns serve the small-M (decode) shapes.
_LARGE = [(128, 256, 128, 8, 8, 3), (128, 256, 128, 8, 8, 4), (256, 128, 128, 8, 8, 3), (128, 128, 128, 8, 4, 4)]
_SMALL = [(64, 64, 256, 8, 4, 4), (64, 128, 128, 8, 4, 4), (64, 256, 128, 8, 8, 3)]
INTERPRETER_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, num_warps=4, num_stages=1)


def _prune(configs, named_args, **kwargs):
    m_bucket = named_args.get("M_BUCKET", kwargs.get("M_BUCKET", 256))
    small = m_bucket <= 64
    kept = [c for c in configs if (c.kwargs["BLOCK_M"] == 64) == small]
    return kept or configs


def _set_tma_blocks(nargs) -> None:
    """Config pre-hook: a tensor descriptor's box is the tile the config loads."""
    nargs["a_desc"].block_shape = [nargs["BLOCK_M"], nargs["BLOCK_K"]]
    nargs["b_desc"].block_shape = [nargs["BLOCK_N"], nargs["BLOCK_K"]]


_autotuned: dict[str, object] = {}  # backend -> autotuned kernel, built on first use
_TMA_FAILED: list[str] = []  # the error that made "auto" fall back to pointer loads, if one did


def _autotuned_kernel(backend: str):
    if backend not in _autotuned:
        tma = backend == "tma"
        configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": g}, num_warps=w, num_stages=s,
                                 pre_hook=_set_tma_blocks if tma else None)
                   for m, n, k, g, w, s in _LARGE + _SMALL]
        _autotuned[backend] = triton.autotune(configs, key=["M_BUCKET", "N", "K", "INT_ACC"],
                                              prune_configs_by={"early_config_prune": _prune})(
            _scaled_mm_tma_kernel if tma else _scaled_mm_kernel)
    return _autotuned[backend]


def tma_supported(*tensors: torch.Tensor) -> bool:
    """Host tensor descriptors need Triton's TensorDescriptor, a Hopper-class GPU and 16-byte aligned rows."""
    if TensorDescriptor is None or triton_interpreted() or _TMA_FAILED:
        return False
    t0 = tensors[0]
    if t0.device.type != "cuda" or torch.cuda.get_device_capability(t0.device)[0] < 9:
        return False
    return all(t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in tensors)


def _scale_vector(scale: torch.Tensor, n: int, name: str, device: torch.device) -> torch.Tensor:
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(scale, 'dtype', type(scale))}")
    if scale.numel() not in (1, n):
        raise ValueError(f"{name} must hold 1 (per-tensor) or {n} values, got shape {tuple(scale.shape)}")
    if scale.device != device:
        raise ValueError(f"{name} is on {scale.device}, the operands on {device}")
    return scale.reshape(-1).to(torch.float32).contiguous()


def scaled_mm(a: torch.Tensor, b: torch.Tensor, a_scale: torch.Tensor, b_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16, *,
              operand_dtype: torch.dtype | None = None, backend: str | None = None,
              config: dict | None = None) -> torch.Tensor:
    """C [M, N] = (a [M, K] @ b [N, K]^T) * a_scale * b_scale (+ bias), accumulated in int32 for int8
    operands and fp32 otherwise.

    operand_dtype: if given, the dtype both operands must have (fp8_gemm / int8_gemm pin theirs).
    backend: "tma" (tensor-descriptor loads), "pointer" (plain loads), or None: TMA where tma_supported(),
    falling back to pointer loads for good (with a warning) if the TMA kernel fails to build.
    config (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages) pins the tiles instead of autotuning.
    """
    if backend not in (None, "tma", "pointer"):
        raise ValueError(f"backend must be None, 'tma' or 'pointer', got {backend!r}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1] or a.shape[1] == 0:
        raise ValueError(f"need a [M, K] and b [N, K] with the same K > 0, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype or (operand_dtype is not None and a.dtype != operand_dtype):
        raise TypeError(f"a and b (activations and weights) must both be {operand_dtype or 'one dtype'}, got "
                        f"{a.dtype} and {b.dtype}")
    allowed = (torch.int8, torch.float8_e4m3fn, torch.float16, torch.float32)
    if a.dtype not in allowed:
        raise TypeError(f"operands must be one of {allowed}, got {a.dtype}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device}, b on {b.device}")
    (m, k), n = a.shape, b.shape[0]
    a_scale = _scale_vector(a_scale, m, "a_scale", a.device)
    b_scale = _scale_vector(b_scale, n, "b_scale", a.device)
    if bias is not None and (bias.shape != (n,) or bias.device != a.device):
        raise ValueError(f"bias must be [N] = [{n}] on {a.device}, got {tuple(bias.shape)} on {bias.device}")
    a = a if a.stride(1) == 1 else a.contiguous()
    b = b if b.stride(1) == 1 else b.contiguous()
    c = torch.empty(m, n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    tail = (a_scale, b_scale, bias if bias is not None else a_scale, c, m, n, k)
    m_bucket = min(triton.next_power_of_2(m), 256)
    consts = dict(PER_TOKEN=a_scale.numel() == m and m > 1, PER_CHANNEL=b_scale.numel() == n and n > 1,
                  HAS_BIAS=bias is not None, INT_ACC=a.dtype == torch.int8,
                  DOT_PRECISION="ieee" if a.dtype == torch.float32 else "tf32")
    cfg = None if config is None and not triton_interpreted() else dict(config or INTERPRETER_CONFIG)
    use_tma = backend == "tma" or (backend is None and tma_supported(a, b))
    if use_tma:
        if TensorDescriptor is None:
            raise ValueError("backend='tma' needs triton.tools.tensor_descriptor (Triton >= 3.3)")
        bm, bn, bk = (cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]) if cfg else (64, 64, 64)  # boxes reset per config
        args = (TensorDescriptor.from_tensor(a, [bm, bk]), TensorDescriptor.from_tensor(b, [bn, bk])) + tail + (
            c.stride(0), m_bucket)
        try:
            _launch(_scaled_mm_tma_kernel, "tma", args, consts, cfg, m, n)
            return c
        except Exception as exc:  # noqa: BLE001  (auto mode only: keep serving on the pointer kernel)
            if backend == "tma":
                raise
            _TMA_FAILED.append(f"{type(exc).__name__}: {exc}")
            warnings.warn(f"scaled_mm: TMA kernel failed ({_TMA_FAILED[0][:200]}); using pointer loads from now on")
    args = (a, b) + tail + (a.stride(0), b.stride(0), c.stride(0), m_bucket)
    _launch(_scaled_mm_kernel, "pointer", args, consts, cfg, m, n)
    return c


def _launch(kernel, backend: str, args: tuple, consts: dict, cfg: dict | None, m: int, n: int) -> None:
    if cfg is None:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
        _autotuned_kernel(backend)[grid](*args, **consts)
    else:
        kernel[(triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)](*args, **consts, **cfg)
