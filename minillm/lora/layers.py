"""Many adapters in one batch: LoRA's products added per token, each token with its own adapter (S-LoRA, Punica).

Merging an adapter into the weights (W + scaling B A) serves one adapter at a time. To serve many at once the base
weights stay as they are and every adapted layer adds, after its own matmul,

    y[t] += (x[t] A_s^T) B_s^T        for each token t of a sequence using the adapter in slot s

as two skinny matmuls: "shrink" (x A^T, [T, r]) and "expand" (the r columns back to `out`). The adapters of the
running requests sit in `max_loras` device slots, stacked per layer (`LoRALayerSlots`: A [slots, S*R, in],
B [slots, out, S*R], R = max_lora_rank, zero-padded; scaling folded into B). A packed layer (qkv_proj: S = 3
shards q, k, v) stacks its shards' A along the rank and places each shard's B in its own rows and rank columns, so
one shrink and one expand serve all three projections (the zero blocks cost a little arithmetic, no launches).

Which tokens use which slot is the step's `LoRAMapping`, carried by the forward context: one segment per sequence
that uses an adapter (its tokens are contiguous in the packed batch). On a GPU the segments run as Triton kernels
(minillm.kernels.lora: one program per segment and tile, Punica's SGMV; shrink and expand fused into one launch
for decode-sized batches, as lora_fused_pays decides); on the CPU, `lora_delta` (chapter 10's exercise), one pair
of matmuls per segment.

Under CUDA graphs, steps with adapters replay second sets of decode and piecewise graphs captured with the kernels
(one segment per row, each row's slot a static input; minillm.engine.cuda_graph, piecewise_graph); what no graph
holds runs eagerly. Those steps skip the decode GEMV's norm and SwiGLU fusions, whose fused input the LoRA product
needs. A step without adapters runs exactly as in an engine without LoRA.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from minillm.hooks import dispatch
from minillm.lora.adapter import TARGETS, AdapterCache, LoRAAdapter
from minillm.lora.request import LoRARequest

# the engine's adapted layers under a decoder layer, with the Hugging Face projections each packs (in shard order)
PACKED = {"self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"), "self_attn.o_proj": ("o_proj",),
          "mlp.gate_up_proj": ("gate_proj", "up_proj"), "mlp.down_proj": ("down_proj",)}
_LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.(" + "|".join(re.escape(k) for k in PACKED) + r")$")


# >>> exercise ch10.lora_delta
def lora_delta(x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, segments: list[tuple[int, int, int]],
               y: torch.Tensor) -> torch.Tensor:
    """Add every segment's LoRA product to y, in place, and return y: for each (start, length, slot) with slot >= 0,
    the rows r = start .. start + length - 1 get y[r] += (x[r] A^T) B^T with A = lora_a[slot], B = lora_b[slot].

    x [T, K] are the layer's inputs (the packed tokens of a batch), y [T, N] its outputs; lora_a [L, R, K] and
    lora_b [L, N, R] stack the adapters of L slots (the scaling is already inside B). A segment with slot -1 is a
    sequence without an adapter, and rows in no segment are left alone. Compute each product in float32 and store
    y[r] + product back in y's dtype (one rounding, as the kernels do). Multiply in the order shrink, then expand:
    (x A^T) is only R wide, so it costs T*R*(K + N) multiply-adds, where forming B A first would cost N*K*R.

    Example: x = [[1., 2.]], lora_a = [[[1., 1.]]] (L=1, R=1, K=2), lora_b = [[[2.], [0.]]] (N=2), segments
    [(0, 1, 0)], y = [[0., 5.]] -> x A^T = 3, times B^T = [6, 0]: y becomes [[6., 5.]].
    """
    # >>> solution
    for start, length, slot in segments:
        if slot < 0 or length == 0:
            continue
        rows = slice(start, start + length)
        product = (x[rows].float() @ lora_a[slot].float().T) @ lora_b[slot].float().T
        y[rows] = (y[rows].float() + product).to(y.dtype)
    return y
    # <<< solution
# <<< exercise


# what tp_slice is handed for a LoRA matrix: it reads only a parameter's layout ([out, in], no input_dim marks)
_MATRIX = torch.empty(0, 0)


@dataclass
class LoRAMapping:
    """Which adapter slot each sequence's tokens use in one step: segments of the packed batch (start, length,
    slot) for the sequences that use one, as device int32 tensors for the kernels and as a host list for the
    torch path. Sequences without an adapter have no segment. rows_covered: every row of the batch lies in a
    segment (a graph's mapping, one segment per row, slot -1 for rows without an adapter), which spares
    lora_shrink its zeroing memset."""

    seg_starts: torch.Tensor
    seg_lens: torch.Tensor
    seg_slots: torch.Tensor
    max_seg_len: int
    segments: list[tuple[int, int, int]] | None  # None in a graph's static mapping (the host does not know it)
    token_slots: torch.Tensor | None = None  # int32 [T]: each row's slot (-1: none), for the piecewise graphs
    rows_covered: bool = False


class LoRALayerSlots:
    """The stacked adapters of one Linear (attached to it as `linear.lora`)."""

    def __init__(self, linear: nn.Module, projections: tuple[str, ...], max_loras: int, max_rank: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.linear, self.projections, self.max_rank = linear, projections, max_rank
        # each shard's output rows: a packed layer's shard_slice, else the whole output
        self.rows = [linear.shard_slice(TARGETS[p][1]) for p in projections] if len(projections) > 1 \
            else [(0, linear.output_size)]
        rank = max_rank * len(projections)
        self.a = torch.zeros(max_loras, rank, linear.input_size, dtype=dtype, device=device)
        self.b = torch.zeros(max_loras, linear.output_size, rank, dtype=dtype, device=device)

    def set_slot(self, slot: int, modules: dict) -> None:
        """Put one adapter's modules of this layer (Hugging Face projection name -> LoRAModule) into `slot`;
        projections the adapter leaves alone stay zero. Under tensor parallelism each rank keeps its piece, cut by
        the layer's own tp_slice: a column-parallel layer (qkv, gate_up) its rows of each shard's B (A whole: every
        rank sees the whole input), a row-parallel one (o, down) its input columns of A (B whole), whose partial
        product is summed by the layer's all-reduce with the partial matmul."""
        self.a[slot].zero_()
        self.b[slot].zero_()
        for i, name in enumerate(self.projections):
            module = modules.get(name)
            if module is None:
                continue
            a, b = module.a, module.b * module.scaling
            tp_slice = getattr(self.linear, "tp_slice", None)
            if tp_slice is not None and self.linear.parallel_style == "row":
                a = tp_slice(_MATRIX, a)
            elif tp_slice is not None:
                b = tp_slice(_MATRIX, b, TARGETS[name][1] if len(self.projections) > 1 else None)
            lo, (offset, size) = i * self.max_rank, self.rows[i]
            self.a[slot, lo:lo + module.rank].copy_(a)
            self.b[slot, offset:offset + size, lo:lo + module.rank].copy_(b)

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, mapping: LoRAMapping) -> torch.Tensor:
        """y += (x A_s^T) B_s^T for each segment's tokens (in place; returns y). On a GPU one fused launch where
        lora_fused_pays (decode-sized batches: the host ints S, max_seg_len and the layer's shape decide, so a
        captured graph keeps the choice), else shrink then expand; on the CPU (or when a learner's version is active
        and the step's segments are known on the host) ch10.lora_delta."""
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        fn = dispatch("ch10.lora_delta", lora_delta)
        if mapping.segments is not None and (not x2.is_cuda or fn is not lora_delta):
            fn(x2, self.a, self.b, mapping.segments, y2)
            return y
        from minillm.kernels.lora import lora_expand, lora_fused, lora_fused_pays, lora_shrink
        args = (mapping.seg_starts, mapping.seg_lens, mapping.seg_slots, mapping.max_seg_len)
        if lora_fused_pays(mapping.seg_starts.shape[0], mapping.max_seg_len, x2.shape[1], y2.shape[1],
                           self.a.shape[1], self.a.element_size()):
            lora_fused(x2, self.a, self.b, *args, y2)
        else:
            shrunk = lora_shrink(x2, self.a, *args, rows_covered=mapping.rows_covered)
            lora_expand(shrunk, self.b, *args, y2)
        return y


class LoRAWeights:
    """A worker's adapter slots: a LoRALayerSlots on every adaptable layer of the model, and which adapter
    (lora_int_id) each slot holds. The engine decides what goes where (minillm.lora.slots); `load` obeys."""

    def __init__(self, model: nn.Module, max_loras: int, max_rank: int, cache: AdapterCache, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.max_loras, self.max_rank, self.cache = max_loras, max_rank, cache
        self.layers: dict[tuple[int, str], LoRALayerSlots] = {}
        self._bound: list[tuple[nn.Module, LoRALayerSlots]] = []
        for name, module in model.named_modules():
            m = _LAYER_NAME.match(name)
            if m is None or not hasattr(module, "quant_method"):
                continue  # not an adaptable layer (an MoE block's experts, a pipeline stage's missing layer)
            slots = LoRALayerSlots(module, PACKED[m.group(2)], max_loras, max_rank, dtype, device)
            self._bound.append((module, slots))
            self.layers[int(m.group(1)), m.group(2)] = slots
        if not self.layers:
            raise ValueError("enable_lora: the model has no layer LoRA can adapt (qkv_proj, o_proj, gate_up_proj, "
                             "down_proj)")
        self.resident: list[int | None] = [None] * max_loras
        self.bind()

    def bind(self) -> None:
        """Attach these slots to their layers (again, when another engine over the same model object attached
        its own meanwhile: the runner checks before each step with adapters, as it rebinds the KV cache)."""
        for module, slots in self._bound:
            module.lora = slots

    @property
    def is_bound(self) -> bool:
        module, slots = self._bound[0]
        return module.lora is slots

    @property
    def num_bytes(self) -> int:
        return sum(s.a.numel() * s.a.element_size() + s.b.numel() * s.b.element_size() for s in self.layers.values())

    def load(self, slot: int, request: LoRARequest) -> None:
        """Copy the adapter of `request` into `slot` (a no-op when it is there already)."""
        if not 0 <= slot < self.max_loras:
            raise ValueError(f"LoRA slot {slot} out of range 0..{self.max_loras - 1}")
        if self.resident[slot] == request.lora_int_id:
            return
        adapter: LoRAAdapter = self.cache.get(request.lora_path)
        if adapter.rank > self.max_rank:
            raise ValueError(f"LoRA adapter {request.lora_name!r}: rank {adapter.rank} above max_lora_rank="
                             f"{self.max_rank}")
        by_layer: dict[int, dict] = {}
        for (layer, name), module in adapter.modules.items():
            by_layer.setdefault(layer, {})[name] = module
        self.resident[slot] = None  # half-written until the loop ends
        for (layer, _), slots in self.layers.items():
            slots.set_slot(slot, by_layer.get(layer, {}))
        self.resident[slot] = request.lora_int_id

