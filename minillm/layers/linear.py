"""Linear layers that load (chapter 1), quantize (chapters 7-8) and later shard (tensor parallelism) their weights.

A Llama block has seven projections, but the engine runs three matmuls for the first six: q, k and v are
packed into one `qkv_proj` and gate and up into one `gate_up_proj` (one launch, one read of the input,
a wider and more efficient GEMM). Checkpoints store them separately under Hugging Face's names, so each
packed layer carries a `weight_loader(param, loaded_weight, shard_id)` that copies one checkpoint tensor
into its slice of the packed parameter. That is vLLM's design, and it is also where tensor parallelism
(chapter 11) will take each rank's slice of the columns or rows.

How the weights are stored and the matmul done is delegated to `layer.quant_method`, a LinearMethod
(minillm.quant.base, chapter 7): it registers the parameters (create_weights), repacks or quantizes them once
the checkpoint is in (process_weights_after_loading) and computes y = x W^T + b (apply). The default,
`UnquantizedLinearMethod`, is a dense weight and `F.linear`; a `quant_config` picks another per layer, by
its name (`prefix`), without touching the model code. Whatever a method stores, each parameter carries this
layer's `weight_loader`, which slices along the parameter's `output_dim`, so q/k/v and gate/up shards load
the same way for every method.

At decode (a few tokens per step) a dense layer's matmul is chosen per shape by minillm.layers.gemv_dispatch:
`F.linear`, or on a GPU the decode GEMV (minillm.kernels.gemv), which can also take the activation before down_proj
(`forward(x, swiglu=True)`, after `fuses_swiglu`) and the RMSNorm before qkv_proj and gate_up_proj
(`forward_rms_norm`, after `fuses_rms_norm`); on the CPU in fp32, a memory layout (minillm.layers.cpu_matmul).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minillm.forward_context import get_forward_context
from minillm.layers import gemv_dispatch
# the dispatch's public names, importable from here as before
from minillm.layers.gemv_dispatch import (GEMV_MAX_M, dense_linear, gemv_mode, norm_gemv_choice, set_gemv_mode,
                                          swiglu_gemv_choice)
from minillm.quant.base import LinearMethod, QuantizationConfig, UnquantizedLinearMethod

__all__ = ["Linear", "QKVLinear", "MergedColumnLinear", "UnquantizedLinearMethod", "default_weight_loader",
           "dense_linear", "swiglu_gemv_choice", "norm_gemv_choice", "set_gemv_mode", "gemv_mode", "GEMV_MAX_M"]


def _check_shape(param_name: str, got: torch.Size, expected: torch.Size | tuple[int, ...]) -> None:
    if tuple(got) != tuple(expected):
        raise ValueError(f"weight shape mismatch for {param_name}: got {tuple(got)}, expected {tuple(expected)}")


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
    """Copy a whole checkpoint tensor into a parameter that has no loader of its own (norm weights)."""
    if shard_id is not None:
        raise ValueError(f"parameter of shape {tuple(param.shape)} is not packed; got shard_id={shard_id!r}")
    _check_shape("parameter", loaded_weight.shape, param.shape)
    param.data.copy_(loaded_weight)


class Linear(nn.Module):
    """y = x W^T (+ b), W: [output_size, input_size]; storage and matmul belong to `self.quant_method`.

    `quant_config` (one per model) chooses the method for this layer from its `prefix`, its module name in the
    model; `quant_method` passes one directly (tests, the course). Neither: dense.
    """

    # multi-LoRA (minillm.lora.layers): the adapter slots of this layer, attached by the worker when LoRA is on; a
    # step whose forward context carries a LoRAMapping adds each token's adapter product after the matmul
    lora = None

    def __init__(self, input_size: int, output_size: int, bias: bool = False,
                 dtype: torch.dtype | None = None, quant_config: QuantizationConfig | None = None,
                 prefix: str = "", quant_method: LinearMethod | None = None) -> None:
        super().__init__()
        if input_size < 1 or output_size < 1:
            raise ValueError(f"Linear sizes must be >= 1, got input_size={input_size}, output_size={output_size}")
        self.input_size = input_size
        self.output_size = output_size
        self.prefix = prefix
        if quant_method is None and quant_config is not None:
            quant_method = quant_config.get_quant_method(self, prefix)
        self.quant_method = quant_method if quant_method is not None else UnquantizedLinearMethod()
        self.quant_method.create_weights(self, input_size, output_size, bias, dtype)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        """Copy a whole checkpoint tensor into `param` (an unpacked layer has no shards)."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} is not packed; got shard_id={shard_id!r}")
        _check_shape(type(self).__name__, loaded_weight.shape, param.shape)
        param.data.copy_(loaded_weight)

    @property
    def is_dense(self) -> bool:
        """A plain weight (UnquantizedLinearMethod): the layers the decode GEMV and its fusions serve."""
        return type(self.quant_method) is UnquantizedLinearMethod

    def _codes(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(8-bit codes, per-row scales) where this quantized layer's step on x is the decode GEMV on its codes
        (LinearMethod.decode_codes: int8_rtn, FP8 and INT8 W8A8 on one to four rows); None for a dense layer."""
        return None if self.is_dense else self.quant_method.decode_codes(self, x)

    def _lora_mapping(self):
        """This step's LoRAMapping when the step uses adapters, else None."""
        context = get_forward_context()
        return None if context is None else context.lora

    def fuses_swiglu(self, gate_up: torch.Tensor) -> bool:
        """Whether forward(gate_up, swiglu=True) can take SwiGLU's silu(gate) * up inside this layer's decode
        GEMV (a dense weight, a GEMV-sized batch where the GEMV beat cuBLAS; or a quantized layer whose step is
        the GEMV on its codes): one launch fewer per MLP. Not in a step with LoRA adapters on this layer (their
        product needs the layer's input, which the fused GEMV never writes)."""
        if self.lora is not None and self._lora_mapping() is not None:
            return False
        if self.is_dense:
            return gemv_dispatch.swiglu_gemv_choice(gate_up, self.weight) is not None
        return self._codes(gate_up) is not None

    def fuses_rms_norm(self, x: torch.Tensor) -> bool:
        """Whether forward_rms_norm can take the RMSNorm before this layer inside its decode GEMV (a dense weight,
        no hooks on the layer, no all-reduce after it, a GEMV-sized batch where the fused GEMV timed faster): one
        launch fewer."""
        if self._forward_hooks or self._forward_pre_hooks or getattr(self, "reduce_output", False) \
                or (self.lora is not None and self._lora_mapping() is not None):  # LoRA needs the normed input
            return False
        if self.is_dense:
            return gemv_dispatch.norm_gemv_choice(x, self.weight) is not None
        return self._codes(x) is not None  # a quantized layer whose decode step is the GEMV on its codes

    def forward_rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None,
                         norm: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """(self(norm(x, residual)[0]), the new residual) in one GEMV (only where fuses_rms_norm(x)): `norm` is the
        RMSNorm before this layer (its weight and eps); the residual returned is x + residual (x without one)."""
        cfg = gemv_dispatch.norm_gemv_choice(x, self.weight) if self.is_dense else None
        codes = self._codes(x)
        if cfg is None and codes is None:
            raise ValueError(f"forward_rms_norm needs a dense layer at a GEMV-sized batch on a GPU where the fused "
                             f"GEMV won, or a quantized one whose decode step is the GEMV on its codes (check "
                             f"fuses_rms_norm first); got x {tuple(x.shape)} on {x.device}, "
                             f"{type(self.quant_method).__name__}")
        from minillm.kernels.gemv import gemv_rms_norm
        if codes is not None:
            return gemv_rms_norm(x, residual, norm.weight, norm.eps, codes[0], self.bias, weight_scale=codes[1])
        return gemv_rms_norm(x, residual, norm.weight, norm.eps, self.weight, self.bias, config=cfg)

    def forward(self, x: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
        """y = x W^T (+ b). swiglu=True (only where fuses_swiglu(x)): x is [..., 2 * input_size] = [gate | up]
        and the layer's input is silu(gate) * up, computed by the GEMV as it loads x."""
        if swiglu:
            cfg = gemv_dispatch.swiglu_gemv_choice(x, self.weight) if self.is_dense else None
            codes = self._codes(x)
            if cfg is None and codes is None:
                raise ValueError(f"swiglu=True needs a dense layer at a GEMV-sized batch on a GPU, or a quantized "
                                 f"one whose decode step is the GEMV on its codes (check fuses_swiglu first); got "
                                 f"x {tuple(x.shape)} on {x.device}, {type(self.quant_method).__name__}")
            from minillm.kernels.gemv import gemv
            if codes is not None:
                return gemv(x, codes[0], self.bias, swiglu=True, weight_scale=codes[1])
            return gemv(x, self.weight, self.bias, config=cfg, swiglu=True)
        if self.is_dense:  # F.linear, or the decode GEMV
            y = gemv_dispatch.dense_linear(x, self.weight, self.bias)
        else:
            y = self.quant_method.apply(self, x, self.bias)
        if self.lora is not None:  # (one attribute test per call for a layer without adapters)
            mapping = self._lora_mapping()
            if mapping is not None:
                return self.lora.add_delta(x, y, mapping)
        return y

    def extra_repr(self) -> str:
        method = type(self.quant_method).__name__
        return f"in={self.input_size}, out={self.output_size}, bias={self.bias is not None}, quant_method={method}"


class _PackedLinear(Linear):
    """A Linear whose output rows are the concatenation of several checkpoint tensors (shards)."""

    shard_ids: tuple[Any, ...] = ()

    def shard_slice(self, shard_id: Any) -> tuple[int, int]:
        """(offset, size) of a shard along the output dimension."""
        raise NotImplementedError

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if shard_id not in self.shard_ids:
            raise ValueError(f"{type(self).__name__} shard_id must be one of {self.shard_ids}, got {shard_id!r}")
        offset, size = self.shard_slice(shard_id)
        dim = getattr(param, "output_dim", 0)
        if dim is None:  # e.g. one per-tensor scale: it cannot hold a slice per shard
            raise ValueError(f"{type(self).__name__}: parameter of shape {tuple(param.shape)} has no output "
                             f"dimension to load shard {shard_id!r} into")
        # rows of this shard (a bias, a per-channel scale narrow the same way; a transposed weight on dim 1)
        target = param.data.narrow(dim, offset, size)
        _check_shape(f"{type(self).__name__} shard {shard_id!r}", loaded_weight.shape, target.shape)
        target.copy_(loaded_weight)


class QKVLinear(_PackedLinear):
    """q, k and v projections in one matmul: output = [q (H*D) | k (KVH*D) | v (KVH*D)]."""

    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int,
                 bias: bool = False, dtype: torch.dtype | None = None,
                 quant_config: QuantizationConfig | None = None, prefix: str = "",
                 quant_method: LinearMethod | None = None) -> None:
        if num_heads < 1 or num_kv_heads < 1 or num_heads % num_kv_heads:
            raise ValueError(f"num_heads ({num_heads}) must be a positive multiple of num_kv_heads ({num_kv_heads})")
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        super().__init__(hidden_size, self.q_size + 2 * self.kv_size, bias=bias, dtype=dtype,
                         quant_config=quant_config, prefix=prefix, quant_method=quant_method)

    def shard_slice(self, shard_id: str) -> tuple[int, int]:
        return {"q": (0, self.q_size), "k": (self.q_size, self.kv_size),
                "v": (self.q_size + self.kv_size, self.kv_size)}[shard_id]

    def split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[T, (H+2KVH)*D] -> q [T, H*D], k [T, KVH*D], v [T, KVH*D]."""
        return qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)


class MergedColumnLinear(_PackedLinear):
    """Several projections of the same input side by side (gate_up_proj = [gate | up]); shard ids 0, 1, ..."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False,
                 dtype: torch.dtype | None = None, quant_config: QuantizationConfig | None = None,
                 prefix: str = "", quant_method: LinearMethod | None = None) -> None:
        if not output_sizes or any(s < 1 for s in output_sizes):
            raise ValueError(f"MergedColumnLinear output_sizes must be positive, got {output_sizes}")
        self.output_sizes = list(output_sizes)
        self.shard_ids = tuple(range(len(output_sizes)))
        super().__init__(input_size, sum(output_sizes), bias=bias, dtype=dtype, quant_config=quant_config,
                         prefix=prefix, quant_method=quant_method)

    def shard_slice(self, shard_id: int) -> tuple[int, int]:
        return sum(self.output_sizes[:shard_id]), self.output_sizes[shard_id]
