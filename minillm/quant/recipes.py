"""4-bit recipes the field combines: GPTQ with its quality options, AWQ with block-output search, AWQ + GPTQ.

    from minillm.quant.recipes import quantize_recipe
    qm = quantize_recipe(model, "awq+gptq", calibration=ids, bits=4, group_size=64)
    quantized = qm.build()                 # a GPTQ checkpoint in memory, as quantize_model returns

The recipes (chapters 7-8 explain each piece):

    gptq       true-sequential GPTQ (driver.py's walk) with the options that buy quality: act-order with
               static groups (every group's grid fixed from the original columns, so no g_idx), and each
               group's grid range searched (rtn.search_qparams, weighted by the Hessian's diagonal) rather
               than min/max
    awq        AWQ as its reference code does it (awq_block.py): scales searched on each block's output with
               duo scaling, folded into the norms / up_proj, weights clipped; then round-to-nearest
    awq+gptq   the AWQ pass (scales and, by default, clipping), then GPTQ's rounding on the scaled model: the
               scales protect the salient input channels, GPTQ's error feedback spends the rest of the
               rounding error where the Hessian says it costs least (AutoAWQ's "scales only" export fed to
               GPTQ, as the field combines them)
    autoround  AutoRound / SignRound (autoround.py): each block's rounding offsets and group clip factors
               learned by signed gradient descent on the block's output, against the unquantized model's
               (Cheng et al. 2023); GPTQ's checkpoint format, asymmetric, no g_idx

Measured (CPU, 2026-12-02; SmolLM2-135M, 4-bit group 64, calibrated on 16 x 256 docstring tokens, held-out
perplexity on 16 x 256 vs fp32 18.999): RTN +33.6%, driver GPTQ +20.3% (act-order +12.5%), driver AWQ +15.3%,
"gptq" +5.8%, "awq+gptq" +9.3% (its AWQ search on 1024 tokens): on this model the scales (and the clipping
applied before GPTQ) cost more than they protect, and "gptq" alone is the better recipe. "autoround" (same
eval, 2026-12-03, when "gptq" read +6.5%): +6.4% held out but +0.2% on the calibration text itself ("gptq"
+2.4%): it fits the 4096 calibration tokens and ties "gptq" on new text (autoround.py's docstring). A
smaller probe (4 x 128 held out) put "awq" at +17.1% (RTN +40.1%, driver GPTQ +10.6%, "gptq" +7.3%).
"gptq" with asym_calib=True (gptq_asym.py: aimed at the unquantized model's outputs), same eval: +8.8% with 16 x
256 calibration tokens (it fits them), +3.4% with 64 x 256 (where "gptq" reads +5.4%).

The AWQ pass walks the layers with dense (scaled) weights, as AutoAWQ does; the GPTQ pass walks them with
quantized ones, as GPTQ's reference does (each layer calibrated on the outputs of the already quantized
layers before it, and inside a layer each linear after the ones before it are quantized). What comes out is
a GPTQ-format checkpoint (codes, fp16 scales, zeros; folded norms in the clear), loaded by the same path as
a file, so what perplexity measures is what would be saved. The rounding pass is the driver's own
(quantize_model "gptq" with act_order / static_groups / grid_search, or "rtn"): a recipe adds the AWQ pass
before it, nothing else.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from tqdm.auto import tqdm

from minillm.quant.autoround import quantize_autoround
from minillm.quant.awq_block import awq_scale_layer
from minillm.quant.driver import LayerRunner, QuantizedModel, _decoder_linears, check_no_experts, quantize_model

__all__ = ["RECIPES", "quantize_recipe"]

RECIPES = ("gptq", "awq", "awq+gptq", "autoround")


@torch.no_grad()
def quantize_recipe(model: nn.Module, recipe: str, calibration: torch.Tensor, bits: int = 4, group_size: int = 64,
                    *, act_order: bool = True, static_groups: bool = True, clip_search: bool = True,
                    percdamp: float = 0.01, asym_calib: bool = False, awq_clip: bool = True, duo_scaling: bool = True, n_grid: int = 20,
                    awq_tokens: int | None = None, batch_size: int = 4, iters: int = 200, lr: float | None = None,
                    seed: int = 0, progress: bool = True) -> QuantizedModel:
    """Quantize a dense LlamaForCausalLM with `recipe` (RECIPES) on calibration ids [n_samples, seq_len].

    bits 2..8, group_size -1 or a divisor of every in_features; act_order/static_groups/clip_search/percdamp:
    the GPTQ pass (gptq_quantize); awq_clip/duo_scaling/n_grid/awq_tokens (calibration tokens its block search
    reads, None: all): the AWQ pass (awq_block.awq_scale_layer); asym_calib: the GPTQ pass aimed at the
    unquantized model's outputs (gptq_asym.py); iters/lr/seed: AutoRound's signed descent
    (autoround.quantize_autoround, a minibatch of batch_size sequences an iteration). The model is left
    unchanged; the result is a GPTQ checkpoint in memory (asymmetric, no g_idx when static_groups).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
    check_no_experts(model, f"quantize_recipe ({recipe!r})")  # (quantize_model's gptq takes experts)
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    if not isinstance(calibration, torch.Tensor) or calibration.dim() != 2 or calibration.numel() == 0 \
            or calibration.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"calibration must be token ids [n_samples, seq_len] (int64), got "
                         f"{getattr(calibration, 'shape', calibration)!r}")
    if int(calibration.min()) < 0 or int(calibration.max()) >= model.config.vocab_size:
        raise ValueError(f"calibration ids must lie in [0, {model.config.vocab_size}), got "
                         f"[{int(calibration.min())}, {int(calibration.max())}]")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    for lin in _decoder_linears(model).values():
        if type(lin.quant_method).__name__ != "UnquantizedLinearMethod":
            raise TypeError(f"quantize_recipe needs a dense model, got a {type(lin.quant_method).__name__} linear")
        if group_size != -1 and (group_size < 1 or lin.input_size % group_size):
            raise ValueError(f"group_size={group_size} must be -1 or divide every in_features "
                             f"({lin.input_size} does not divide); 64 for SmolLM2's 576")
    if recipe == "autoround":
        return quantize_autoround(model, calibration, bits, group_size, iters, lr, batch_size, seed, progress)
    if recipe in ("awq", "awq+gptq"):
        model = copy.deepcopy(model)  # the scales are folded into the norms and up_proj as the walk goes
        runner = LayerRunner(model, calibration, batch_size)
        for layer in tqdm(model.model.layers, desc="AWQ scales", unit="layer", disable=not progress):
            awq_scale_layer(layer, runner.batches, bits, group_size, n_grid, duo_scaling, awq_clip,
                            max_tokens=awq_tokens)
            runner.run(layer, advance=True)  # the next layer's inputs, from this layer scaled (still dense)
    # the rounding: the driver's walk (GPTQ true-sequential on the quantized outputs; or round-to-nearest)
    common = dict(bits=bits, group_size=group_size, batch_size=batch_size, progress=progress)
    if recipe == "awq":
        qm = quantize_model(model, "rtn", **common)
    else:
        qm = quantize_model(model, "gptq", calibration=calibration, act_order=act_order,
                            static_groups=static_groups, grid_search=clip_search, percdamp=percdamp,
                            asym_calib=asym_calib, **common)
    config = dict(qm.config.quantization_config, minillm_method=recipe)
    return dataclasses.replace(qm, config=dataclasses.replace(qm.config, quantization_config=config))
