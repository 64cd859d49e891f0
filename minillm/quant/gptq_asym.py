"""Asymmetric calibration for GPTQ: aim each layer at the unquantized model's outputs (chapter 8).

Sequential GPTQ (driver.py's walk) feeds every layer the outputs of the layers before it *already quantized*,
x, and minimises ||x W^T - x Q^T||: it makes the layer reproduce what the unquantized weights would compute on
the inputs it now receives. But the target is what the unquantized *model* computed, x~ W^T, where x~ are the
inputs the layer saw before anything was quantized. The two differ by the error that reached the layer, and plain
GPTQ leaves that error to grow layer after layer. GPTAQ (Li et al. 2025, "Efficient Finetuning-Free Quantization
for Asymmetric Calibration") minimises ||x~ W^T - x Q^T|| instead. It splits exactly:

    ||x~ W^T - x Q^T||^2 = ||x~ W^T - x W*^T||^2 + ||x W*^T - x Q^T||^2,   W* = the least-squares fit of x~ W^T on x

(the first term does not depend on Q: x W*^T is the projection of the target onto what x can express). So:
solve for W*, then run ordinary GPTQ on W* with the same Hessian. With H = x^T x and D = (x~ - x)^T x, both
[in, in] and accumulated over the calibration tokens like GPTQ's Hessian,

    W* = W + W D (H + lambda I)^-1      (lambda = percdamp * mean(diag H), as GPTQ damps)

which is W itself when nothing was quantized before (x~ = x, D = 0): the first linear of the first layer is
plain GPTQ. The cost is a second walk through the layers with unquantized weights (x~) in step with the first.

W* is a least-squares fit with in_features^2 unknowns per output row, so it wants more calibration tokens than
GPTQ does. Measured on SmolLM2-135M, 4-bit group 64, the "gptq" recipe (act-order, static groups, searched
ranges) with and without it, held-out perplexity (16 x 256 tokens) vs fp32 18.999 (CPU, 2026-12-03):
    16 x 256 calibration tokens:  +6.49% -> +8.83% (calibration perplexity +1.97% -> +0.07%: it fits them)
    64 x 256 calibration tokens:  +5.44% -> +3.41%
"""
from __future__ import annotations

import torch
from torch import nn

from minillm.forward_context import forward_context
from minillm.quant.gptq import HessianAccumulator

__all__ = ["PairedInputAccumulator", "asymmetric_target", "accumulate_paired_inputs"]


class PairedInputAccumulator:
    """H = 2/N sum x x^T (the quantized walk's inputs, HessianAccumulator's running mean) and, on the same scale,
    D = 2/N sum (x~ - x) x^T, from the same tokens' inputs in the unquantized walk (x~)."""

    def __init__(self, in_features: int, device: torch.device | str | None = None) -> None:
        self.hessian = HessianAccumulator(in_features, device=device)
        self.D = torch.zeros(in_features, in_features, dtype=torch.float64, device=device)

    @property
    def H(self) -> torch.Tensor:
        return self.hessian.H

    def add(self, x: torch.Tensor, x_fp: torch.Tensor) -> None:
        """x and x_fp: [..., in] inputs of the same tokens, in the quantized and the unquantized walk."""
        if x.shape != x_fp.shape:
            raise ValueError(f"paired inputs must have one shape, got {tuple(x.shape)} and {tuple(x_fp.shape)}")
        if x.numel() == 0:
            return
        n_before = self.hessian.n_samples
        self.hessian.add(x)
        x = x.reshape(-1, self.hessian.in_features).to(torch.float64)
        shift = x_fp.reshape(-1, self.hessian.in_features).to(torch.float64) - x
        self.D *= n_before / self.hessian.n_samples
        self.D += (shift.T @ x) * (2.0 / self.hessian.n_samples)


def asymmetric_target(weight: torch.Tensor, H: torch.Tensor, D: torch.Tensor, percdamp: float = 0.01
                      ) -> torch.Tensor:
    """W* = W + W D (H + lambda I)^-1 [out, in], fp32: the weights whose outputs on the quantized walk's inputs
    come closest to the unquantized model's outputs (the module docstring)."""
    in_f = weight.shape[1]
    if H.shape != (in_f, in_f) or D.shape != (in_f, in_f):
        raise ValueError(f"H and D must be [{in_f}, {in_f}], got {tuple(H.shape)} and {tuple(D.shape)}")
    if not 0 <= percdamp < 1:
        raise ValueError(f"percdamp must be in [0, 1), got {percdamp}")
    H = H.to(torch.float64)
    damp = percdamp * torch.diag(H).mean().clamp_min(1e-12)
    H_damped = H + damp * torch.eye(in_f, dtype=H.dtype, device=H.device)
    W = weight.to(device=H.device, dtype=torch.float64)
    correction = torch.linalg.solve(H_damped, (W @ D.to(H.dtype)).T).T  # W D H^-1 (H symmetric)
    return (W + correction).to(torch.float32)


@torch.no_grad()
def accumulate_paired_inputs(layer: nn.Module, fp_layer: nn.Module, linear: nn.Module, fp_linear: nn.Module,
                             batches: list, fp_batches: list, acc: PairedInputAccumulator) -> None:
    """Run `layer` over the quantized walk's batches and its unquantized twin `fp_layer` over the unquantized
    walk's, batch by batch (LayerRunner.batches: positions, metadata, hidden, residual), and add the inputs of
    `linear` / `fp_linear` for the same tokens to `acc`."""
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            seen[key] = inputs[0].detach()
        return hook

    handles = [linear.register_forward_hook(keep("x")), fp_linear.register_forward_hook(keep("x_fp"))]
    try:
        for (pos, meta, hidden, residual), (fp_pos, fp_meta, fp_hidden, fp_residual) in zip(batches, fp_batches):
            with forward_context(meta):
                layer(pos, hidden, residual)
            with forward_context(fp_meta):
                fp_layer(fp_pos, fp_hidden, fp_residual)
            acc.add(seen.pop("x"), seen.pop("x_fp"))
    finally:
        for h in handles:
            h.remove()
