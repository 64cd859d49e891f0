"""Leaves the kernel empty and the launcher's source as shipped, but rebinds the name `rms_norm` to a torch
version while the module imports (through globals(), which no syntax-tree check of the file sees): the
launcher that runs must be the one the file defines."""


@triton.jit
def rms_norm_kernel(X, RES, W, OUT, RES_OUT, stride_x, stride_r, stride_o, stride_ro, n_cols, eps,
                    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr):
    pass


def _rms_norm_in_torch(x, weight, eps, residual=None):
    h = x if residual is None else x + residual
    hf = h.float()
    out = (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)
    return out if residual is None else (out, h)


globals()["rms_norm"] = _rms_norm_in_torch
