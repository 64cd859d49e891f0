"""GPTQ: one-shot weight quantization with second-order error feedback (Frantar et al. 2022), chapters 7-8.

GPTQ ("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers") quantizes a linear
layer so that its *outputs* on calibration data move as little as possible, not its weights: it minimises
||X W^T - X Q^T||^2 over grids Q, where X [n_tokens, in] are the layer's real inputs. The objective's curvature
is the Hessian H = 2 X^T X [in, in], the only thing GPTQ keeps from the calibration data (HessianAccumulator
builds it in a streaming pass, so any number of tokens fits in memory).

Error feedback, in one paragraph. Quantize the columns of W one at a time, left to right. Column i rounds to
q_i with error w_i - q_i; instead of accepting it, push it onto the columns not yet quantized, which can
still move: the optimal correction (Optimal Brain Surgeon's formula) is W[:, i+1:] -= err * Hinv[i, i+1:] with
err = (w_i - q_i) / Hinv[i, i], where Hinv is the inverse Hessian of the remaining columns. Because those
inverses are rows of one upper Cholesky factor of H^-1, a single factorisation serves every step. Inputs that
are correlated let later columns absorb earlier rounding errors, so the layer output barely changes even
where the weights do. For speed the updates are *lazy*: inside a block of 128 columns they are applied
column by column, to the rest of the matrix once per block (one matmul instead of 128 rank-1 updates).

Details that matter in practice:
- dampening: H += percdamp * mean(diag H) * I keeps H invertible when calibration data is short or
  collinear (percdamp = 0.01 as in the paper); a failed Cholesky retries with 10x more.
- dead columns: an input channel that is always 0 has H[i, i] = 0; its weight cannot matter, so it is
  zeroed and H[i, i] set to 1.
- act-order (`act_order=True`): process columns in order of descending H[i, i], the most active inputs
  first while many columns remain to absorb their error. With groups, the default (static_groups=False)
  follows the reference implementation: groups are consecutive runs of the *permuted* order, their scales
  computed when the run starts, so `g_idx` [in] records each original column's group. static_groups=True
  computes every group's grid up front on the original contiguous columns (g_idx = j // group_size), which
  kernels that cannot gather scales by g_idx (e.g. ExLlama's fast path) prefer.
- calibration size: H has in_features^2 entries, so GPTQ needs many more tokens than in_features or it
  fits the calibration set and loses on new text. Measured on SmolLM2 layer 3 down_proj (in = 1536), 4-bit
  group 64, error on held-out text relative to RTN's: 1.09x with 1k tokens, 1.01x with 4k, 0.83x with 16k
  (the paper uses 128 x 2048). Larger percdamp regularises small sets (0.1: 0.94x at 1k tokens).
- groups are computed from the *current*, already error-corrected weights of the group when its first
  column comes up (groups never straddle a block: block_size must be a multiple of group_size).
- the grid's range (`clip_search=True`): min/max lets one large weight stretch a group's step for all the
  others; rtn.search_qparams shrinks each group's range to the one that rounds it best, weighting each
  column by H[j, j] (how much output error a rounding error there costs before feedback). Measured on
  SmolLM2-135M, 4-bit group 64, calibrated on 16 x 256 tokens, held-out perplexity (16 x 256) vs fp32:
  RTN +33.6%, GPTQ +20.3%, GPTQ act-order +12.5%, act-order + static groups + this search +5.8%
  (minillm.quant.recipes "gptq"; CPU, 2026-12-02).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tqdm.auto import tqdm

from minillm.hooks import dispatch
from minillm.quant.rtn import (QuantizedWeight, check_quant_args, compute_qparams, dequantize_codes,
                               quantize_to_codes, search_qparams)

__all__ = ["HessianAccumulator", "GPTQResult", "gptq_quantize", "gptq_quantize_layers"]


class HessianAccumulator:
    """Streams H = 2/N * sum_t x_t x_t^T over calibration batches for one linear layer with `in_features` inputs.

    `add(x)` takes any [..., in_features] activations (a forward hook's input); the running mean keeps H's scale
    independent of N, as the reference does, and fp64 accumulation keeps millions of tokens exact enough.
    """

    def __init__(self, in_features: int, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None):
        if not isinstance(in_features, int) or in_features < 1:
            raise ValueError(f"in_features must be a positive int, got {in_features!r}")
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"HessianAccumulator dtype must be torch.float32 or torch.float64, got {dtype}")
        self.in_features = in_features
        self.H = torch.zeros(in_features, in_features, dtype=dtype, device=device)
        self.n_samples = 0

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"activations have {x.shape[-1]} features, the layer has {self.in_features}")
        x = x.reshape(-1, self.in_features).to(self.H.dtype)
        n = x.shape[0]
        if n == 0:
            return
        self.H *= self.n_samples / (self.n_samples + n)
        self.n_samples += n
        x = x * (2.0 / self.n_samples) ** 0.5
        self.H += x.T @ x


@dataclass
class GPTQResult:
    """The quantized weight (original column order), its fp32 dequantization, the processing order `perm`
    (None without act-order) and the objective GPTQ minimised: sum_i (w_i - q_i)^2 / (2 Hinv[i, i])."""

    qweight: QuantizedWeight
    weight_dq: torch.Tensor
    perm: torch.Tensor | None
    loss: float


def _inverse_hessian_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1; retries with 10x dampening if H is not positive definite."""
    damp = percdamp * torch.diag(H).mean()
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for _ in range(4):
        L, info = torch.linalg.cholesky_ex(H + damp * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info) == 0:
                return U
        damp = damp * 10
    raise ValueError(f"the Hessian is not positive definite even with dampening {float(damp):.3g}; "
                     f"collect more calibration tokens or raise percdamp (got {percdamp})")


# >>> exercise ch08.gptq_column_update
def gptq_column_update(W1: torch.Tensor, U1: torch.Tensor, i: int, q: torch.Tensor) -> torch.Tensor:
    """GPTQ's error feedback for column i of a block: push its rounding error onto the columns after it.

    W1 [out, b]: the block's weights, columns < i already quantized, columns >= i still free to move.
    U1 [b, b]: the block's rows of the upper Cholesky factor of H^-1 (U1[i, i] > 0; U1[i, j] = 0 for j < i).
    q [out]: column i quantized (dequantized values). With d = U1[i, i] and err = (W1[:, i] - q) / d, update
    W1[:, i:] -= err[:, None] * U1[i, i:][None, :] IN PLACE (column i itself lands on q) and return err [out],
    which the caller keeps to update the later blocks in one matmul.
    """
    # >>> solution
    err = (W1[:, i] - q) / U1[i, i]
    W1[:, i:] -= err[:, None] * U1[i, i:][None, :]  # Optimal Brain Surgeon: the best correction of the rest
    return err
    # <<< solution
# <<< exercise


def gptq_quantize(weight: torch.Tensor, H: torch.Tensor, bits: int = 4, group_size: int = 128,
                  symmetric: bool = False, percdamp: float = 0.01, block_size: int = 128,
                  act_order: bool = False, static_groups: bool = False, clip_search: bool = False) -> GPTQResult:
    """Quantize W [out, in] with GPTQ given the layer's Hessian H [in, in] (HessianAccumulator.H).

    Returns codes/scales/zeros on rtn.py's grid (bits, group_size, symmetric as in rtn.quantize), with g_idx
    set when act-order permuted the groups, and the dequantized weight in the original column order.
    clip_search: each group's grid from rtn.search_qparams (the range shrunk to minimise the rounding error
    weighted by H's diagonal) instead of its min/max.
    """
    check_quant_args(weight, bits, group_size)
    out_f, in_f = weight.shape
    if H.shape != (in_f, in_f):
        raise ValueError(f"H must be [{in_f}, {in_f}] for a weight with in_features={in_f}, got {tuple(H.shape)}")
    if not 0 <= percdamp < 1:
        raise ValueError(f"percdamp must be in [0, 1), got {percdamp}")
    if not isinstance(block_size, int) or block_size < 1 or (group_size > 0 and block_size % group_size):
        raise ValueError(f"block_size must be a positive multiple of group_size={group_size}, got {block_size!r}")
    g = in_f if group_size == -1 else group_size
    n_groups = in_f // g
    W = weight.detach().to(torch.float32).clone()
    H = H.detach().to(device=W.device, dtype=torch.float32).clone()

    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    def group_grid(w: torch.Tensor, importance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if clip_search:  # H_jj = 2 E[x_j^2]: a weight's rounding error costs that much output error on its own
            return search_qparams(w, bits, symmetric, importance)
        return compute_qparams(w, bits, symmetric)

    # per channel, the one grid is fixed before any feedback (as the reference does): the static path
    static = static_groups or group_size == -1
    scales = torch.empty(out_f, n_groups, dtype=torch.float32, device=W.device)
    zeros = None if symmetric else torch.empty(out_f, n_groups, dtype=torch.int32, device=W.device)
    if static:  # every group's grid from the original, contiguous columns, before any error feedback
        s, z = group_grid(W.reshape(out_f, n_groups, g), torch.diag(H).reshape(n_groups, g))
        scales.copy_(s)
        if zeros is not None:
            zeros.copy_(z)

    perm = None
    if act_order:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W, H = W[:, perm], H[perm][:, perm]
    cols = perm if perm is not None else torch.arange(in_f, device=W.device)
    # group of the k-th processed column: contiguous in processing order, or fixed by the original position
    # (a Python list: reading a GPU tensor once per column would synchronise the device 10^4 times a layer)
    group_of = (cols // g).tolist() if static else [k // g for k in range(in_f)]

    h_diag = torch.diag(H)  # in processing order, before dampening: the data's own second moments
    U = _inverse_hessian_cholesky(H, percdamp)
    codes = torch.empty(out_f, in_f, dtype=torch.int8 if symmetric else torch.uint8, device=W.device)
    Q = torch.empty_like(W)
    loss = torch.zeros((), dtype=torch.float64, device=W.device)
    column_update = dispatch("ch08.gptq_column_update", gptq_column_update)
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.empty_like(W1)
        for i in range(i2 - i1):
            k = i1 + i
            if not static and k % g == 0:  # a new group starts: its grid from the corrected weights
                s, z = group_grid(W1[:, i:i + g], h_diag[k:k + g])
                scales[:, k // g] = s
                if zeros is not None:
                    zeros[:, k // g] = z
            gi = group_of[k]
            s = scales[:, gi]
            z = None if zeros is None else zeros[:, gi]
            w = W1[:, i]
            c = quantize_to_codes(w, s, z, bits)
            q = dequantize_codes(c, s, z)
            codes[:, k], Q[:, k] = c, q
            loss += ((w - q) ** 2).sum().double() / (2 * U1[i, i].double() ** 2)
            Err1[:, i] = column_update(W1, U1, i, q)  # error feedback inside the block
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]  # the lazy batch update for every later block

    g_idx = None
    if perm is not None:
        inv = torch.argsort(perm)
        codes, Q = codes[:, inv], Q[:, inv]
        if not static:
            g_idx = (inv // g).to(torch.int32)  # original column j was processed at position inv[j]
    qw = QuantizedWeight(codes, scales, zeros, bits, group_size, symmetric, g_idx=g_idx)
    return GPTQResult(qweight=qw, weight_dq=Q, perm=perm, loss=float(loss))


def gptq_quantize_layers(weights: dict[str, torch.Tensor], hessians: dict[str, torch.Tensor],
                         progress: bool = True, **kwargs) -> dict[str, GPTQResult]:
    """gptq_quantize for every named weight with the Hessian of the same name (q/k/v may share one tensor);
    kwargs as gptq_quantize. One layer at a time, with a progress bar: a 7B model has ~220 of them."""
    missing = sorted(set(weights) - set(hessians))
    if missing:
        raise ValueError(f"no Hessian for {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                         f"collect one with a HessianAccumulator per layer input")
    return {name: gptq_quantize(w, hessians[name], **kwargs)
            for name, w in tqdm(weights.items(), desc="GPTQ", unit="layer", disable=not progress)}
