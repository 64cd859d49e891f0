"""The gated activation of the Llama MLP (SwiGLU), chapter 1.

The MLP's gate and up projections are packed into one matmul (`gate_up_proj`, see linear.py), whose
output is [T, 2 * intermediate]: the gate half first, the up half second. `silu_and_mul` turns it into
[T, intermediate] = silu(gate) * up, the input of `down_proj`. Fusing the split, the SiLU and the product
into one pass is a classic first kernel (vLLM's `silu_and_mul`); this is the torch reference, and
`SiluAndMul` runs the Triton kernel minillm.kernels.fused.silu_and_mul with the "triton" backend ("auto" on a GPU).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from minillm.layers.backend import OperatorModule, use_triton


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2*I] -> [..., I]: silu(x[..., :I]) * x[..., I:]."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension (gate and up halves), got shape {tuple(x.shape)}")
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(OperatorModule):
    """`silu_and_mul` as a module that knows its operator backend (torch reference or the Triton kernel)."""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_triton(self.backend, x):
            from minillm.kernels.fused import silu_and_mul as silu_and_mul_kernel
            return silu_and_mul_kernel(x)
        return silu_and_mul(x)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"
