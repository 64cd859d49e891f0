"""Steps every row pointer by X's row stride: right only while x, residual and the outputs share one stride
(contiguous inputs); a row-strided x (a slice of a wider tensor) writes its outputs at the wrong rows."""


@triton.jit
def rms_norm_kernel(X, RES, W, OUT, RES_OUT, stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    ok = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x = x + tl.load(RES + row * stride_x + cols, mask=ok, other=0.0).to(tl.float32)
        x = x.to(RES_OUT.dtype.element_ty).to(tl.float32)
        tl.store(RES_OUT + row * stride_x + cols, x.to(RES_OUT.dtype.element_ty), mask=ok)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, 0) / n_cols + eps)
    w = tl.load(W + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + row * stride_x + cols, (x * inv_rms * w).to(OUT.dtype.element_ty), mask=ok)
