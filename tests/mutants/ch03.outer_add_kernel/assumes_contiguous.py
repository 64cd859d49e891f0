"""Assumes a contiguous output (row pitch n_cols, column stride 1) instead of using the strides it is given."""


@triton.jit
def outer_add_kernel(X, Y, OUT, n_rows, n_cols, stride_om, stride_on, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x = tl.load(X + rows, mask=rows < n_rows, other=0.0)
    y = tl.load(Y + cols, mask=cols < n_cols, other=0.0)
    keep = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    tl.store(OUT + rows[:, None] * n_cols + cols[None, :], x[:, None] + y[None, :], mask=keep)
