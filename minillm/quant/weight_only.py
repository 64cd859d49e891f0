"""Weight-only integer quantization behind the Linear seam: "rtn", "gptq" and "awq" (chapters 7-8).

All three end in the same place: 2..8-bit integer codes on a per-group grid (rtn.py) in GPTQ's layout
(int4.py), and one matmul, `int4_linear`. They differ in where the codes come from:

    rtn    a dense checkpoint, rounded to nearest at load time (`LLM(model, quantization="rtn")`); no data needed
    gptq   a GPTQ checkpoint (qweight/qzeros/scales[/g_idx]), written by `minillm quantize --method gptq`
           (or rtn: RTN is GPTQ without error feedback, so it is stored the same way) or by AutoGPTQ
    awq    an AutoAWQ "gemm" checkpoint (4-bit, packed along the output dim); repacked to GPTQ's layout on load

Activations stay in the model's dtype (W4A16): the win is memory, and speed in the memory-bound decode phase
once a fused kernel reads the 4-bit weight directly (chapters 7-8 measures both).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minillm.quant.base import (LinearMethod, SkipListQuantizationConfig, add_bias, add_parameter,
                                parse_modules_to_not_convert, require_checkpoint)
from minillm.quant.int4 import gptq_tensors, int4_linear, pack_bits, sort_act_order, unpack_awq, unpack_bits
from minillm.quant.loading import add_packed_parameter, replace_parameters
from minillm.quant.rtn import quantize


def _bits(config: dict[str, Any], method: str, default: int | None, allowed: range | tuple = range(2, 9)) -> int:
    bits = config.get("bits", config.get("w_bit", default))
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in allowed:
        raise ValueError(f"{method}: bits must be one of {list(allowed)}, got {bits!r}")
    return bits


def _group_size(config: dict[str, Any], method: str, default: int | None) -> int:
    g = config.get("group_size", config.get("q_group_size", default))
    if isinstance(g, bool) or not isinstance(g, int) or (g != -1 and g < 1):
        raise ValueError(f"{method}: group_size must be -1 (per channel) or a positive int, got {g!r}")
    return g


class WeightOnlyLinearMethod(LinearMethod):
    """Codes + scales + zeros in GPTQ's layout at run time; `fmt` says what the checkpoint holds:
    "dense" (quantize at load time with RTN), "gptq" or "awq" (already quantized)."""

    def __init__(self, bits: int, group_size: int, symmetric: bool, fmt: str, zero_offset: int = 0,
                 act_order: bool = False) -> None:
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.fmt, self.zero_offset, self.act_order = fmt, zero_offset, act_order
        # 4-bit codes enter kernels/fused_moe.py as experts, act-order's with their input permutation (act_perm:
        # groups made contiguous at load); 2/3/5..8-bit streams keep the per-expert loop
        self.expert_operands = (("qweight", "scales", "qzeros") + (("act_perm",) if act_order else ())
                                if bits == 4 else None)

    def _groups(self, input_size: int) -> int:
        if self.group_size != -1 and input_size % self.group_size:
            raise ValueError(f"in_features={input_size} is not divisible by group_size={self.group_size}; use a "
                             f"group size that divides it, or -1 for per-channel scales")
        return 1 if self.group_size == -1 else input_size // self.group_size

    def shapes(self, output_size: int, input_size: int) -> dict[str, tuple[int, ...]]:
        """The checkpoint's tensors for this layer (suffix -> shape)."""
        n_groups, b = self._groups(input_size), self.bits
        if self.fmt == "awq":
            return {"qweight": (input_size, output_size // 8), "qzeros": (n_groups, output_size // 8),
                    "scales": (n_groups, output_size)}
        shapes = {"qweight": (input_size * b // 32, output_size), "qzeros": (n_groups, output_size * b // 32),
                  "scales": (n_groups, output_size)}
        if self.act_order:
            shapes["g_idx"] = (input_size,)
        return shapes

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int, bias: bool,
                       dtype: torch.dtype | None) -> None:
        layer.quant_bits, layer.quant_group_size = self.bits, self.group_size
        tp = getattr(layer, "tp_size", 1)
        try:
            self._groups(input_size)
        except ValueError as err:
            if getattr(layer, "parallel_style", None) == "row" and tp > 1:  # say where the odd size comes from
                raise ValueError(f"{err} (in_features={input_size} is this rank's share of {input_size * tp} "
                                 f"under tensor_parallel_size={tp})") from None
            raise
        if self.fmt == "dense":  # staging: the loaders fill a dense weight, process_weights_after_loading rounds it
            add_parameter(layer, "weight", torch.empty(output_size, input_size, dtype=dtype))
        else:
            shapes = self.shapes(output_size, input_size)
            if (input_size * self.bits) % 32 or (output_size * self.bits) % 32:
                raise ValueError(f"{self.fmt}: in={input_size} and out={output_size} must fill whole int32 words "
                                 f"of {self.bits}-bit codes")
            packed_qweight = self.bits if self.fmt == "awq" else None  # AWQ packs along out, GPTQ along in
            add_packed_parameter(layer, "qweight", torch.zeros(shapes["qweight"], dtype=torch.int32), 1,
                                 bits=packed_qweight)
            # act-order under row parallelism: this rank's input columns belong to groups spread over the whole
            # input, so it keeps every group's scales and zeros (vLLM does the same) and its slice of g_idx
            spread = "g_idx" in shapes and getattr(layer, "parallel_style", None) == "row" and \
                getattr(layer, "tp_size", 1) > 1 and self.group_size != -1
            groups = input_size * layer.tp_size // self.group_size if spread else shapes["scales"][0]
            zeros = add_packed_parameter(layer, "qzeros", torch.zeros(groups, shapes["qzeros"][1], dtype=torch.int32),
                                         1, bits=self.bits)
            scales = add_parameter(layer, "scales", torch.empty(groups, output_size, dtype=dtype), output_dim=1)
            if spread:
                zeros.input_dim = scales.input_dim = None  # RowParallelLinear.tp_slice: keep them whole
            if "g_idx" in shapes:  # along the input: whole on a column-parallel rank, narrowed on a row-parallel one
                g_idx = add_packed_parameter(layer, "g_idx", torch.zeros(shapes["g_idx"], dtype=torch.int32), None,
                                             shared=True)
                g_idx.input_dim = 0
        add_bias(layer, output_size, bias, dtype)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        if getattr(layer, "quant_ready", False):  # a second call is a no-op
            return
        p = layer._parameters
        if self.fmt == "dense":
            dense = p["weight"]
            tensors = gptq_tensors(quantize(dense.data, self.bits, self.group_size, self.symmetric))
            tensors["scales"] = tensors["scales"].to(dense.dtype)
        elif self.fmt == "awq":  # AWQ's out-packed, interleaved words -> GPTQ's in-packed layout
            out = layer.output_size
            codes, zeros = unpack_awq(p["qweight"].data, out), unpack_awq(p["qzeros"].data, out)
            tensors = {"qweight": pack_bits(codes, 4, dim=0), "qzeros": pack_bits(zeros, 4, dim=1),
                       "scales": p["scales"].data}
        else:
            tensors = {name: p[name].data for name in ("qweight", "qzeros", "scales", "g_idx") if name in p}
            if self.zero_offset:  # AutoGPTQ stores zero - 1: add it back (mod 2^bits, as it was written)
                zeros = unpack_bits(tensors["qzeros"], self.bits, layer.output_size, dim=1)
                tensors["qzeros"] = pack_bits((zeros + self.zero_offset) % (1 << self.bits), self.bits, dim=1)
            if "g_idx" in tensors:  # act-order: groups made contiguous once, x[..., perm] at run time
                ordered = sort_act_order(tensors["qweight"], tensors["g_idx"], self.bits, self.group_size)
                if ordered is not None:
                    tensors["qweight"], tensors["act_perm"] = ordered
                    del tensors["g_idx"]
        replace_parameters(layer, tensors)  # keeps the bias
        layer.quant_ready = True

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not getattr(layer, "quant_ready", False):
            raise RuntimeError(f"{type(layer).__name__} ({self.fmt}) has not been processed yet: the model's "
                               f"load_weights calls process_weights_after_loading once the checkpoint is loaded")
        perm = getattr(layer, "act_perm", None)
        if perm is not None:
            x = x.index_select(-1, perm)
        return int4_linear(x, layer.qweight, layer.scales, layer.qzeros, self.group_size, self.bits,
                           getattr(layer, "g_idx", None), bias)


class _WeightOnlyConfig(SkipListQuantizationConfig):
    fmt = "dense"

    def __init__(self, bits: int, group_size: int, symmetric: bool, modules_to_not_convert: tuple[str, ...] = (),
                 zero_offset: int = 0, act_order: bool = False, lm_head: bool = False) -> None:
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.modules_to_not_convert, self.zero_offset, self.act_order = modules_to_not_convert, zero_offset, act_order
        self.serialized = self.fmt != "dense"
        self.lm_head_quantized = lm_head

    def fuses_experts(self, tensor_parallel_size: int) -> bool:
        """4-bit experts; with act-order on one rank only: a row-parallel rank's slice of act-order's groups is not
        whole, so its w2 keeps g_idx (a scale gathered per weight) instead of a permutation."""
        return self.make_method().expert_operands is not None and (not self.act_order or tensor_parallel_size == 1)

    def get_lm_head_method(self) -> WeightOnlyLinearMethod | None:
        return self.make_method() if self.lm_head_quantized else None

    def make_method(self) -> WeightOnlyLinearMethod:
        return WeightOnlyLinearMethod(self.bits, self.group_size, self.symmetric, self.fmt, self.zero_offset,
                                      self.act_order)

    def stored_shapes(self, output_size: int, input_size: int) -> dict[str, tuple[int, ...]] | None:
        return self.make_method().shapes(output_size, input_size)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(bits={self.bits}, group_size={self.group_size}, sym={self.symmetric}, "
                f"act_order={self.act_order}, lm_head={self.lm_head_quantized})")


def _lm_head(config: dict[str, Any], method: str) -> bool:
    """The `lm_head` key (GPTQModel's name): quantize the LM head too. Only a load-time method can, here: the
    head of a serialized GPTQ/AWQ checkpoint would need its own packed tensors, which the loaders do not read."""
    value = config.get("lm_head", False)
    if not isinstance(value, bool):
        raise ValueError(f"{method}: lm_head must be a bool, got {value!r}")
    if value and method != "rtn":
        raise ValueError(f"{method}: checkpoints with a quantized lm_head are not supported (minillm reads the "
                         f"decoder's packed linears only); quantize the head at load time with "
                         f"quantization='rtn' and lm_head=True")
    return value


class RTNConfig(_WeightOnlyConfig):
    """Round-to-nearest at load time from a dense checkpoint: bits (4), group_size (64), sym (False), lm_head
    (False: True rounds the LM head as well, the largest single matrix of a decode step at batch 1)."""

    name = "rtn"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "RTNConfig":
        sym = config.get("sym", False)
        if not isinstance(sym, bool):
            raise ValueError(f"rtn: sym must be a bool, got {sym!r}")
        return cls(_bits(config, "rtn", 4), _group_size(config, "rtn", 64), sym,
                   parse_modules_to_not_convert(config, "rtn"), lm_head=_lm_head(config, "rtn"))


class GPTQConfig(_WeightOnlyConfig):
    """A GPTQ checkpoint: bits, group_size, desc_act (act-order: g_idx stored), sym, checkpoint_format."""

    name = "gptq"
    fmt = "gptq"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GPTQConfig":
        require_checkpoint(config, "gptq", "calibration data (its Hessians)")
        fmt = config.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"gptq: checkpoint_format must be 'gptq' or 'gptq_v2', got {fmt!r}")
        _lm_head(config, "gptq")
        desc_act, sym = config.get("desc_act", False), config.get("sym", True)
        if not isinstance(desc_act, bool) or not isinstance(sym, bool):
            raise ValueError(f"gptq: desc_act and sym must be bools, got {desc_act!r}, {sym!r}")
        return cls(_bits(config, "gptq", None), _group_size(config, "gptq", None), sym,
                   parse_modules_to_not_convert(config, "gptq"), zero_offset=1 if fmt == "gptq" else 0,
                   act_order=desc_act)


class AWQConfig(_WeightOnlyConfig):
    """An AutoAWQ gemm checkpoint: 4 bits, zero_point=True, group_size (q_group_size)."""

    name = "awq"
    fmt = "awq"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AWQConfig":
        require_checkpoint(config, "awq", "calibration data (activation scales)")
        _lm_head(config, "awq")
        if config.get("zero_point", True) is not True:
            raise ValueError(f"awq: only zero_point=true checkpoints exist in AutoAWQ's gemm format, got "
                             f"{config.get('zero_point')!r}")
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"awq: version must be 'gemm' (the layout minillm reads), got {version!r}")
        return cls(_bits(config, "awq", None, (4,)), _group_size(config, "awq", None), False,
                   parse_modules_to_not_convert(config, "awq"))
