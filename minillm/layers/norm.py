"""RMSNorm: the normalisation every Llama-family block applies before attention and before the MLP.

Chapter 1 builds `rms_norm` (exercise ch01.rms_norm). The `RMSNorm` module adds the trick vLLM uses on
every decoder layer: the residual add that precedes each norm is fused into the norm call, so a layer
hands `(hidden, residual)` along instead of adding and normalising in two passes over memory. With the
"triton" backend (chapter 4; "auto" on a GPU) that call is one kernel, minillm.kernels.fused.rms_norm, which
reads x and residual once and writes the sum and the normalised output; the torch backend calls the exercise
function (ch01.rms_norm) through `dispatch`, so a learner's version runs inside the engine (with no override
active, fp32 on a CPU takes torch.rms_norm: the same arithmetic, bit for bit, in one call).
"""
from __future__ import annotations

import torch
from torch import nn

from minillm.layers.backend import OperatorModule, use_triton
from minillm.hooks import dispatch


# >>> exercise ch01.rms_norm
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square normalisation over the last dimension, then a learned per-channel gain.

        y = x / sqrt(mean(x**2, dim=-1) + eps) * weight

    Unlike LayerNorm there is no mean subtraction and no bias: only the scale of each token's vector
    is normalised.

    Args:
        x: [..., hidden] activations (fp32, bf16 or fp16); typically [T, hidden] for T packed tokens.
        weight: [hidden] learned gain, of x's dtype (as in the model: the product then keeps that dtype).
        eps: small constant added to the mean square before the square root (1e-5 or 1e-6 in Llamas).

    Returns:
        [..., hidden], same dtype as `x`.

    Dtype advice: square and average in fp32 even when `x` is bf16 (a sum of hundreds of bf16 squares
    loses most of its digits), cast the normalised value back to x's dtype, *then* multiply by the
    weight, in that order, as the reference models do.
    """
    # >>> solution
    input_dtype = x.dtype
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(dim=-1, keepdim=True)
    normed = x32 * torch.rsqrt(variance + eps)
    return weight * normed.to(input_dtype)
    # <<< solution
# <<< exercise


class RMSNorm(OperatorModule):
    """RMSNorm with an optional fused residual add (vLLM's `fused_add_rms_norm` contract).

    forward(x)            -> rms_norm(x)
    forward(x, residual)  -> (rms_norm(x + residual), x + residual)

    The second form is what a decoder layer calls: the sum is both the input of this norm and the
    residual stream that the next sub-block adds back to.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, backend: str = "auto") -> None:
        super().__init__(backend)
        if hidden_size < 1:
            raise ValueError(f"RMSNorm hidden_size must be >= 1, got {hidden_size}")
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size))

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"RMSNorm expects last dimension {self.hidden_size}, got shape {tuple(x.shape)}")
        if use_triton(self.backend, x):
            from minillm.kernels.fused import rms_norm as rms_norm_kernel
            return rms_norm_kernel(x, self.weight, self.eps, residual)
        norm_fn = dispatch("ch01.rms_norm", rms_norm)
        if norm_fn is rms_norm and self.backend != "reference" and x.device.type == "cpu" \
                and x.dtype == torch.float32 == self.weight.dtype:
            norm_fn = self._fused_fp32  # no override active: the same formula in one call (see below)
        if residual is None:
            return norm_fn(x, self.weight, self.eps)
        residual = x + residual
        return norm_fn(residual, self.weight, self.eps), residual

    def inlinable(self, x: torch.Tensor) -> bool:
        """Whether a fused kernel may compute this norm in its own launch for input `x`: the norm would run the
        Triton kernel (whose arithmetic the fused kernels repeat) and no hook watches or replaces the module."""
        return use_triton(self.backend, x) and not self._forward_hooks and not self._forward_pre_hooks

    def _fused_fp32(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """`rms_norm` through torch's own `torch.rms_norm`: in fp32 on a CPU it is the same sequence of operations
        (square, mean, add eps, rsqrt, scale, gain) run from one call, bit for bit the same result (a test checks),
        without the Python dispatch of six small tensor ops per norm, sixty norms per step on the CPU path."""
        return torch.rms_norm(x, (self.hidden_size,), weight, eps)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, backend={self.backend!r}"
