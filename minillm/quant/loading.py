"""Loading quantized tensors into packed layers (q/k/v, gate/up), chapters 7-8.

A packed layer (`qkv_proj`, `gate_up_proj`) receives each checkpoint shard (q_proj, k_proj, v_proj) into its
slice of the output dimension; `Linear.weight_loader` does that for every tensor whose output dimension is
plain. Two kinds of quantized tensors need more:

- *packed along the output dimension*: GPTQ's `qzeros` [groups, out * bits / 32] and AWQ's `qweight`
  [in, out / 8] hold several output channels per int32, so shard q's rows [0, q_size) are words
  [0, q_size * bits / 32): the slice is scaled by bits / 32 (and must fall on a word boundary).
- *shared by all shards*: GPTQ's act-order `g_idx` [in] says which group each input column is in; q, k and v
  read the same input and share one Hessian, so their permutation and g_idx are the same, and every shard
  writes the same vector.

`ShardLoader(layer, ...).load` is such a loader. It is a bound method of an object with the layer's
`shard_ids`, so the model's load_weights still knows which shards to expect (it reads `loader.__self__`).
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from minillm.quant.base import add_parameter


class ShardLoader:
    """weight_loader for a parameter packed along its output dim (`bits` < 32) or shared by every shard."""

    def __init__(self, layer: nn.Module, bits: int | None = None, shared: bool = False) -> None:
        self.layer = layer
        self.bits = bits
        self.shared = shared
        self.shard_ids = tuple(getattr(layer, "shard_ids", ()))

    def load(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        tp_slice = getattr(self.layer, "tp_slice", None)  # a tensor-parallel layer: this rank's piece first
        if tp_slice is not None:
            loaded_weight = tp_slice(param, loaded_weight, shard_id)
        if shard_id is None or self.shared:
            if shard_id is not None and shard_id not in self.shard_ids:
                raise ValueError(f"{type(self.layer).__name__} shard_id must be one of {self.shard_ids}, "
                                 f"got {shard_id!r}")
            if tuple(loaded_weight.shape) != tuple(param.shape):
                raise ValueError(f"weight shape mismatch for {type(self.layer).__name__}: got "
                                 f"{tuple(loaded_weight.shape)}, expected {tuple(param.shape)}")
            param.data.copy_(loaded_weight)
            return
        if shard_id not in self.shard_ids:
            raise ValueError(f"{type(self.layer).__name__} shard_id must be one of {self.shard_ids}, got {shard_id!r}")
        offset, size = self.layer.shard_slice(shard_id)
        if self.bits is not None:
            if (offset * self.bits) % 32 or (size * self.bits) % 32:
                raise ValueError(f"shard {shard_id!r} (rows {offset}..{offset + size}) does not start and end on an "
                                 f"int32 word of {32 // self.bits if 32 % self.bits == 0 else '32/' + str(self.bits)}"
                                 f" packed {self.bits}-bit values")
            offset, size = offset * self.bits // 32, size * self.bits // 32
        target = param.data.narrow(param.output_dim, offset, size)
        if tuple(loaded_weight.shape) != tuple(target.shape):
            raise ValueError(f"weight shape mismatch for {type(self.layer).__name__} shard {shard_id!r}: got "
                             f"{tuple(loaded_weight.shape)}, expected {tuple(target.shape)}")
        target.copy_(loaded_weight)


def add_packed_parameter(layer: nn.Module, name: str, tensor: torch.Tensor, output_dim: int,
                         bits: int | None = None, shared: bool = False) -> nn.Parameter:
    """add_parameter with a ShardLoader: `bits` packed output channels per int32, or one tensor all shards share."""
    param = add_parameter(layer, name, tensor, output_dim=output_dim)
    param.weight_loader = ShardLoader(layer, bits=bits, shared=shared).load
    return param


def replace_parameters(layer: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Drop every parameter of `layer` except its bias and register `tensors` instead (frozen, loader attached):
    what process_weights_after_loading does when it turns staging tensors into the runtime layout.

    Each tensor is made contiguous here, once: a packed view (pack_bits returns a moved-dim view) would
    otherwise be copied by the kernel's launcher on every call, which at decode costs more than the GEMM."""
    for name in [n for n in layer._parameters if n != "bias"]:
        del layer._parameters[name]
    for name, tensor in tensors.items():
        add_parameter(layer, name, tensor.contiguous(), output_dim=None)
