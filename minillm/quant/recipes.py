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

Measured (CPU, 2026-12-02; SmolLM2-135M, 4-bit group 64, calibrated on 16 x 256 docstring tokens, held-out
perplexity on 16 x 256 vs fp32 18.999): RTN +33.6%, driver GPTQ +20.3% (act-order +12.5%), driver AWQ +15.3%,
"gptq" +5.8%, "awq+gptq" +9.3% (its AWQ search on 1024 tokens): on this model the scales (and the clipping
applied before GPTQ) cost more than they protect, and "gptq" alone is the better recipe. A smaller probe
(4 x 128 held out) put "awq" at +17.1% (RTN +40.1%, driver GPTQ +10.6%, "gptq" +7.3%).

The AWQ pass walks the layers with dense (scaled) weights, as AutoAWQ does; the GPTQ pass walks them with
quantized ones, as GPTQ's reference does (each layer calibrated on the outputs of the already quantized
layers before it, and inside a layer each linear after the ones before it are quantized). What comes out is
a GPTQ-format checkpoint (codes, fp16 scales, zeros; folded norms in the clear), loaded by the same path as
a file, so what perplexity measures is what would be saved.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
from torch import nn
from tqdm.auto import tqdm

from minillm.quant.awq_block import awq_scale_layer
from minillm.quant.driver import LayerRunner, QuantizedModel, _shards, _split_rows, hf_state_dict
from minillm.quant.gptq import HessianAccumulator, gptq_quantize
from minillm.quant.int4 import gptq_tensors
from minillm.quant.rtn import QuantizedWeight, quantize

__all__ = ["RECIPES", "quantize_recipe"]

RECIPES = ("gptq", "awq", "awq+gptq")


def _linears(layer: nn.Module) -> list[nn.Module]:
    """A decoder layer's linears in the order its forward reaches them (GPTQ's true-sequential order)."""
    return [layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj]


def _gptq_layer(layer: nn.Module, runner: LayerRunner, bits: int, group_size: int, gptq_options: dict
                ) -> dict[nn.Module, QuantizedWeight]:
    """GPTQ each linear in turn, its Hessian collected with the linears before it already quantized."""
    out = {}
    for lin in _linears(layer):
        acc = HessianAccumulator(lin.input_size, device=lin.weight.device)
        runner.run(layer, {lin: acc.add})
        block = 128 if group_size == -1 or 128 % group_size == 0 else group_size
        res = gptq_quantize(lin.weight.data, acc.H, bits, group_size, block_size=block, **gptq_options)
        lin.weight.data.copy_(res.weight_dq.to(lin.weight.dtype))
        out[lin] = res.qweight
    return out


def _export(model: nn.Module, qweights: dict[nn.Module, QuantizedWeight], config: dict) -> QuantizedModel:
    """The dense model's HF state with every quantized linear's weight replaced by GPTQ tensors."""
    state = hf_state_dict(model)
    for name, module in model.named_modules():
        if module not in qweights:
            continue
        shards = _shards(model, name, module)
        for (hf, rows), qw in zip(shards, _split_rows(qweights[module], [r.stop - r.start for _, r in shards])):
            del state[f"{hf}.weight"]
            tensors = gptq_tensors(qw, zero_offset=1)  # AutoGPTQ's "gptq" format stores zero - 1
            tensors["scales"] = tensors["scales"].half()  # what GPTQ files hold and the kernels read
            state.update({f"{hf}.{k}": t.contiguous() for k, t in tensors.items()})
    model_config = dataclasses.replace(model.config, quantization="gptq", quantization_config=config)
    return QuantizedModel(config=model_config, state=state)


@torch.no_grad()
def quantize_recipe(model: nn.Module, recipe: str, calibration: torch.Tensor, bits: int = 4, group_size: int = 64,
                    *, act_order: bool = True, static_groups: bool = True, clip_search: bool = True,
                    percdamp: float = 0.01, awq_clip: bool = True, duo_scaling: bool = True, n_grid: int = 20,
                    awq_tokens: int | None = None, batch_size: int = 4, progress: bool = True) -> QuantizedModel:
    """Quantize a dense LlamaForCausalLM with `recipe` (RECIPES) on calibration ids [n_samples, seq_len].

    bits 2..8, group_size -1 or a divisor of every in_features; act_order/static_groups/clip_search/percdamp:
    the GPTQ pass (gptq_quantize); awq_clip/duo_scaling/n_grid/awq_tokens (calibration tokens its block search
    reads, None: all): the AWQ pass (awq_block.awq_scale_layer). The model is left
    unchanged; the result is a GPTQ checkpoint in memory (asymmetric, no g_idx when static_groups).
    """
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; choose one of {', '.join(RECIPES)}")
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
    layers = model.model.layers
    for lin in (lin for layer in layers for lin in _linears(layer)):
        if type(lin.quant_method).__name__ != "UnquantizedLinearMethod":
            raise TypeError(f"quantize_recipe needs a dense model, got a {type(lin.quant_method).__name__} linear")
        if group_size != -1 and (group_size < 1 or lin.input_size % group_size):
            raise ValueError(f"group_size={group_size} must be -1 or divide every in_features "
                             f"({lin.input_size} does not divide); 64 for SmolLM2's 576")
    model = copy.deepcopy(model)  # scales are folded and weights rewritten as the walk goes
    layers = model.model.layers
    if recipe in ("awq", "awq+gptq"):
        runner = LayerRunner(model, calibration, batch_size)
        for layer in tqdm(layers, desc="AWQ scales", unit="layer", disable=not progress):
            awq_scale_layer(layer, runner.batches, bits, group_size, n_grid, duo_scaling, awq_clip,
                            max_tokens=awq_tokens)
            runner.run(layer, advance=True)  # the next layer's inputs, from this layer scaled (still dense)
    if recipe == "awq":
        qweights = {lin: quantize(lin.weight.data, bits, group_size, False) for layer in layers
                    for lin in _linears(layer)}
    else:
        options = dict(symmetric=False, percdamp=percdamp, act_order=act_order, static_groups=static_groups,
                       clip_search=clip_search)
        runner = LayerRunner(model, calibration, batch_size)
        qweights = {}
        for layer in tqdm(layers, desc="GPTQ", unit="layer", disable=not progress):
            qweights.update(_gptq_layer(layer, runner, bits, group_size, options))
            runner.run(layer, advance=True)  # quantized: the next layer corrects for what reaches it
    g_idx = act_order and not static_groups and recipe != "awq"
    config = {"quant_method": "gptq", "bits": bits, "group_size": group_size, "desc_act": g_idx, "sym": False,
              "checkpoint_format": "gptq", "minillm_method": recipe}
    return _export(model, qweights, config)
