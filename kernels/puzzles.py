"""Three small Triton kernels that climb to FlashAttention: masked tiles, a row softmax, a tiled matmul (chapter 3).

A Triton program handles one TILE of the output: it computes the offsets of its tile from `tl.program_id`,
loads blocks of the inputs with `tl.load(ptr + offsets, mask=...)`, computes on whole blocks in registers and
stores with `tl.store(..., mask=...)`. Block sizes are compile-time powers of two, so the last tile of a
dimension usually sticks out past the tensor's edge: the mask keeps those lanes from reading or writing memory
that is not ours. These three kernels are the ladder to chapter 3's FlashAttention kernel:

    outer_add_kernel   OUT[i, j] = x[i] + y[j]: a 2-D grid of tiles, masks in both dimensions
    softmax_kernel     one program per row: the max, the exp, the sum, all in registers (a masked lane is -inf)
    matmul_kernel      C = A @ B, one program per C tile, looping over K in blocks with tl.dot: the loop
                       FlashAttention runs over its key tiles

Each comes with its launcher (plain torch around the kernel). On a CPU they run through Triton's interpreter
(TRITON_INTERPRET=1, set by `import minillm`): keep sizes tiny and operands fp32 (the interpreter's bf16 tl.dot
is wrong). The engine calls none of these: they are the chapter's exercises and the kernels' smallest examples.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# >>> exercise ch03.outer_add_kernel
@triton.jit
def outer_add_kernel(X, Y, OUT, n_rows, n_cols, stride_om, stride_on, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """OUT[i, j] = X[i] + Y[j] for i < n_rows, j < n_cols, one BLOCK_M x BLOCK_N tile per program.

    The grid is 2-D: program (tl.program_id(0), tl.program_id(1)) owns rows pid_m*BLOCK_M ... +BLOCK_M-1 and
    columns pid_n*BLOCK_N ... +BLOCK_N-1. X has n_rows and Y n_cols contiguous entries; OUT[i, j] is at
    OUT + i * stride_om + j * stride_on. Mask every load and store: the last tiles stick out past n_rows and
    n_cols, and those lanes must neither read nor write.
    """
    # >>> solution
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x = tl.load(X + rows, mask=rows < n_rows, other=0.0)
    y = tl.load(Y + cols, mask=cols < n_cols, other=0.0)
    out = x[:, None] + y[None, :]  # broadcast a column against a row: a whole tile in registers
    keep = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(OUT + rows[:, None] * stride_om + cols[None, :] * stride_on, out, mask=keep)
    # <<< solution


def outer_add(x: torch.Tensor, y: torch.Tensor, block_m: int = 16, block_n: int = 16) -> torch.Tensor:
    """[n_rows] x [n_cols] -> [n_rows, n_cols] with OUT[i, j] = x[i] + y[j]; the launcher of outer_add_kernel."""
    if x.dtype != torch.float32 or y.dtype != torch.float32:
        raise TypeError(f"the puzzles run in float32, got {x.dtype}, {y.dtype}")
    if x.dim() != 1 or y.dim() != 1 or x.numel() == 0 or y.numel() == 0:
        raise ValueError(f"x and y must be non-empty 1-D tensors, got shapes {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.contiguous(), y.contiguous()
    out = torch.empty(x.numel(), y.numel(), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(x.numel(), block_m), triton.cdiv(y.numel(), block_n))
    outer_add_kernel[grid](x, y, out, x.numel(), y.numel(), out.stride(0), out.stride(1),
                           BLOCK_M=block_m, BLOCK_N=block_n)
    return out
# <<< exercise


# >>> exercise ch03.softmax_kernel
@triton.jit
def softmax_kernel(X, OUT, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    """OUT[row] = softmax(X[row]) over its n_cols contiguous entries, one program per row (tl.program_id(0)).

    BLOCK is the power of two >= n_cols: load the row masked, with the lanes past n_cols set to -inf so that
    they add exp(-inf) = 0 to the sum and never win the max. Subtract the row's max before tl.exp (exp of a
    large score overflows to inf), divide by the sum, store only the n_cols real lanes. Row r of X starts at
    X + r * stride_x, of OUT at OUT + r * stride_o.
    """
    # >>> solution
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=float("-inf"))
    z = x - tl.max(x, axis=0)  # the largest score becomes 0: exp never overflows
    num = tl.exp(z)  # masked lanes: exp(-inf) = 0
    tl.store(OUT + row * stride_o + cols, num / tl.sum(num, axis=0), mask=ok)
    # <<< solution


def softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension of a 2-D fp32 tensor; the launcher of softmax_kernel (one program per row)."""
    if x.dtype != torch.float32:
        raise TypeError(f"the puzzles run in float32, got {x.dtype}")
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"x must be 2-D with at least one column, got shape {tuple(x.shape)}")
    if x.shape[1] > 8192:
        raise ValueError(f"softmax holds a whole row in one block: at most 8192 columns, got {x.shape[1]}")
    x = x.contiguous()
    out = torch.empty_like(x)
    if x.shape[0] > 0:
        softmax_kernel[(x.shape[0],)](x, out, x.stride(0), out.stride(0), x.shape[1],
                                      BLOCK=triton.next_power_of_2(x.shape[1]))
    return out
# <<< exercise


# >>> exercise ch03.matmul_kernel
@triton.jit
def matmul_kernel(A, B, C, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C[M, N] = A[M, K] @ B[K, N] in fp32, one BLOCK_M x BLOCK_N tile of C per program (program_id 0: the tile
    row, 1: the tile column).

    Keep an fp32 accumulator [BLOCK_M, BLOCK_N]; walk K in steps of BLOCK_K: load the A tile [BLOCK_M, BLOCK_K]
    and the B tile [BLOCK_K, BLOCK_N] (masked on M / N AND on K: the last K step may stick out, and its
    lanes must load 0.0 so that they add nothing), accumulate with tl.dot. Store the tile, masked.
    Element (i, j) of A is at A + i * stride_am + j * stride_ak (likewise B, C): do not assume contiguity.
    """
    # >>> solution
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # this program's row panel of A meets its column panel of B, tile by tile
        k = k0 + ks
        a = tl.load(A + rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=(rows[:, None] < M) & (k[None, :] < K), other=0.0)
        b = tl.load(B + k[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask=(k[:, None] < K) & (cols[None, :] < N), other=0.0)
        acc = tl.dot(a, b, acc=acc)
    tl.store(C + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc,
             mask=(rows[:, None] < M) & (cols[None, :] < N))
    # <<< solution


def matmul(a: torch.Tensor, b: torch.Tensor, block_m: int = 16, block_n: int = 16, block_k: int = 16) -> torch.Tensor:
    """a [M, K] @ b [K, N] -> [M, N] in fp32; the launcher of matmul_kernel (any strides; blocks >= 16 for tl.dot)."""
    if a.dtype != torch.float32 or b.dtype != torch.float32:
        raise TypeError(f"the puzzles run in float32, got {a.dtype}, {b.dtype}")
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0] or 0 in (*a.shape, b.shape[1]):
        raise ValueError(f"need a [M, K] and b [K, N] with M, K, N >= 1, got {tuple(a.shape)} and {tuple(b.shape)}")
    if min(block_m, block_n, block_k) < 16:
        raise ValueError(f"tl.dot needs blocks of at least 16, got {block_m}, {block_n}, {block_k}")
    (m, k), n = a.shape, b.shape[1]
    c = torch.empty(m, n, dtype=torch.float32, device=a.device)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    matmul_kernel[grid](a, b, c, m, n, k, a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0),
                        c.stride(1), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return c
# <<< exercise
