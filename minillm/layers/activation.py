"""The gated activation of the Llama MLP (SwiGLU), chapter 1.

The MLP's gate and up projections are packed into one matmul (`gate_up_proj`, see linear.py), whose
output is [T, 2 * intermediate]: the gate half first, the up half second. `silu_and_mul` turns it into
[T, intermediate] = silu(gate) * up, the input of `down_proj`. Fusing the split, the SiLU and the product
into one pass is a classic first kernel (vLLM's `silu_and_mul`); this is the torch reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """[..., 2*I] -> [..., I]: silu(x[..., :I]) * x[..., I:]."""
    if x.shape[-1] % 2:
        raise ValueError(f"silu_and_mul needs an even last dimension (gate and up halves), got shape {tuple(x.shape)}")
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


class SiluAndMul(nn.Module):
    """Module wrapper of `silu_and_mul`, so a model can name its activation in `repr`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return silu_and_mul(x)
