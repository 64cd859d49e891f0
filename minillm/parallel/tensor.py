"""Tensor parallelism: Megatron-LM's split of every matmul over the ranks of a TP group (chapter 11).

One transformer block costs two all-reduces, no more:

    x ─► qkv_proj (column-parallel: rank r keeps heads r*H/tp ..) ─► attention on its own heads ─► o_proj
         (row-parallel: rank r keeps the matching input columns, computes a partial sum) ─► ALL-REDUCE ─► + residual
    x ─► gate_up_proj (column-parallel) ─► silu*mul (elementwise: stays local) ─► down_proj (row-parallel) ─► ALL-REDUCE

A column-parallel layer splits W [out, in] by output rows: each rank computes its slice of the outputs from the
whole input, no communication. A row-parallel layer splits W by input columns: each rank multiplies its slice of
the input (exactly the slice the column-parallel layer before it produced) and the partial products are summed
over the group. Pairing them this way is what makes the activations in between need no exchange.

The vocabulary is split too: `VocabParallelEmbedding` looks up only the ids in its range (zeros elsewhere) and
all-reduces; `ParallelLMHead` computes its slice of the logits, gathered on TP rank 0, which samples.

Grouped-query attention: K/V heads are split like the query heads when there are at least as many as ranks
(num_kv_heads % tp == 0); with fewer (SmolLM2 has 3; at tp=6) each K/V head is *replicated* on tp / num_kv_heads
ranks, the ones whose query heads read it. vLLM requires num_heads % tp == 0 and so do we (SmolLM2's 9 heads:
tp 1, 3 or 9).

Weights load shard by shard: each layer's `weight_loader` narrows the full checkpoint tensor to this rank's slice
before copying, so a rank's parameters hold only its shard (the lazy loaders read one tensor at a time).
With tp_size == 1 every class here is its single-device parent plus a no-op.

Two course exercises (chapter 11) sit here, reached through `dispatch`: `split_linear` (which slice of W and b a
rank keeps, for every dense load) and `allreduce_placement` (which layer of a sub-block ends in the all-reduce,
asked once per sub-block at construction by `plan_all_reduces`).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minillm.hooks import dispatch
from minillm.layers.embedding import VocabEmbedding
from minillm.layers.linear import Linear, MergedColumnLinear, QKVLinear, dense_linear
from minillm.parallel.state import get_tp_rank, get_tp_size, tensor_parallel_all_reduce, tensor_parallel_gather


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"tensor parallelism needs {what} ({numerator}) divisible by tensor_parallel_size "
                         f"({denominator})")
    return numerator // denominator


# >>> exercise ch11.split_linear
def split_linear(weight: torch.Tensor | None, bias: torch.Tensor | None, tp_rank: int, tp_size: int,
                 style: str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Rank `tp_rank`'s share of a linear layer y = x W^T + b split over `tp_size` ranks: (weight shard, bias shard).

    weight [out, in] and bias [out]; either may be None (a layer without a bias; a loader that hands the
    tensors over one at a time). Shards are contiguous equal slices, rank 0 first.

      "column"  rank r keeps output rows r*out/tp .. (r+1)*out/tp - 1 of W and the same slice of b: it computes
                those outputs completely, and the ranks' outputs side by side are y.
      "row"     rank r keeps input columns r*in/tp .. (r+1)*in/tp - 1 of W: it multiplies the matching slice of
                x and gets a partial sum of every output; the all-reduce adds the ranks' partials. The bias
                shard is what the rank adds to its partial *before* that sum: the whole b on rank 0, None on
                every other rank (a bias on each would be added tp_size times).

    Example: W [[1, 2], [3, 4]], b [5, 6], tp 2: column rank 1 -> ([[3, 4]], [6]); row rank 0 -> ([[1], [3]],
    [5, 6]); row rank 1 -> ([[2], [4]], None).
    Raise ValueError for a style other than "column"/"row", tp_rank outside [0, tp_size), or a split dimension
    that tp_size does not divide.
    """
    # >>> solution
    if style not in ("column", "row"):
        raise ValueError(f"style must be 'column' or 'row', got {style!r}")
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"tp_rank must be in [0, {tp_size}) with tp_size >= 1, got tp_rank={tp_rank}")

    def shard(t: torch.Tensor, dim: int) -> torch.Tensor:
        if t.shape[dim] % tp_size:
            raise ValueError(f"dimension {dim} of size {t.shape[dim]} is not divisible by tp_size {tp_size}")
        size = t.shape[dim] // tp_size
        return t.narrow(dim, tp_rank * size, size)

    if style == "column":  # outputs are rows of W and entries of b
        return (None if weight is None else shard(weight, 0)), (None if bias is None else shard(bias, 0))
    row_bias = bias if tp_rank == 0 else None  # added once: the all-reduce sums what every rank adds
    return (None if weight is None else shard(weight, 1)), row_bias
    # <<< solution
# <<< exercise


# >>> exercise ch11.allreduce_placement
def allreduce_placement(styles: list[str], tp_size: int) -> list[bool]:
    """Where a chain of tensor-parallel linears needs its all-reduce: one bool per layer, True where that layer's
    output must be summed over the TP group before anything reads it.

    `styles[i]` is "column", "row" or "replicated" for the i-th linear of one sub-block (the layers between two
    residual adds; only rank-local work sits between them: an activation, attention over the rank's own heads).

      column      each rank holds complete values of a slice of the outputs: nothing to sum. Such a slice can
                  only be read by a row-parallel layer (which wants exactly that slice of its input); anything
                  else (another column layer, a replicated one, the residual at the chain's end) would need the
                  whole vector: raise ValueError.
      row         each rank holds a partial sum of every output: all-reduce.
      replicated  every rank computes the same whole output: nothing to sum.

    With tp_size 1 there is no group: every entry is False (the chain is still checked: a column layer must feed a
    row layer whatever the group's size). Megatron's MLP ["column", "row"] -> [False, True]:
    one all-reduce per sub-block, two per transformer layer.
    Raise ValueError for an unknown style or tp_size < 1.
    """
    # >>> solution
    if tp_size < 1:
        raise ValueError(f"tp_size must be >= 1, got {tp_size}")
    for i, style in enumerate(styles):
        if style not in ("column", "row", "replicated"):
            raise ValueError(f"styles[{i}] must be 'column', 'row' or 'replicated', got {style!r}")
        if style == "column" and (i + 1 == len(styles) or styles[i + 1] != "row"):
            following = "the end of the chain" if i + 1 == len(styles) else f"a {styles[i + 1]!r} layer"
            raise ValueError(f"styles[{i}] is a column-parallel layer followed by {following}: its sharded output "
                             f"must feed a row-parallel layer")
    return [tp_size > 1 and style == "row" for style in styles]
    # <<< solution
# <<< exercise


def plan_all_reduces(*layers: nn.Module) -> None:
    """Ask allreduce_placement where the all-reduces of a chain of parallel layers go (at construction) and set
    each layer's `reduce_output`, which its forward obeys. The models call it once per sub-block:
    plan_all_reduces(qkv_proj, o_proj), plan_all_reduces(gate_up_proj, down_proj)."""
    plan = dispatch("ch11.allreduce_placement", allreduce_placement)([layer.parallel_style for layer in layers],
                                                                      get_tp_size())
    if len(plan) != len(layers):
        raise ValueError(f"allreduce_placement returned {len(plan)} entries for a chain of {len(layers)} layers")
    for layer, reduce in zip(layers, plan):
        layer.reduce_output = bool(reduce)


def _narrow(loaded: torch.Tensor, dim: int, index: int, parts: int) -> torch.Tensor:
    """Piece `index` of `parts` equal pieces of `loaded` along `dim`: for the parameters of quantized formats
    whose output dimension is not the first (split_linear's layout is [out, in])."""
    size = divide(loaded.shape[dim], parts, f"dimension {dim} of a {tuple(loaded.shape)} parameter")
    return loaded.narrow(dim, index * size, size)


def _column_shard(param: nn.Parameter, loaded: torch.Tensor, index: int, parts: int) -> torch.Tensor:
    """Piece `index` of `parts` of a column-parallel parameter along its output dimension: through split_linear
    for a matrix [out, in] or a vector over the outputs (bias, per-channel scale); a per-tensor value whole."""
    dim = getattr(param, "output_dim", 0)
    if dim is None:
        return loaded
    if dim != 0 or loaded.dim() > 2:
        return _narrow(loaded, dim, index, parts)
    split = dispatch("ch11.split_linear", split_linear)
    if loaded.dim() == 2:
        return split(loaded, None, index, parts, "column")[0]
    return split(None, loaded, index, parts, "column")[1]


class _ReducesOutput:
    """Mixin: forward = the layer's matmul, then the all-reduce where plan_all_reduces put one."""

    parallel_style = "column"
    reduce_output = False

    def forward(self, x: torch.Tensor, swiglu: bool = False) -> torch.Tensor:
        out = super().forward(x, swiglu=swiglu)
        return tensor_parallel_all_reduce(out) if self.reduce_output else out


class ColumnParallelLinear(_ReducesOutput, Linear):
    """W [out, in] split by output rows: rank r computes outputs r*out/tp .. (r+1)*out/tp - 1; no communication."""

    def __init__(self, input_size: int, output_size: int, **kwargs: Any) -> None:
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        super().__init__(input_size, divide(output_size, self.tp_size, "output_size"), **kwargs)

    def tp_slice(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> torch.Tensor:
        """This rank's piece of a checkpoint tensor (also what a quantized layer's ShardLoader asks for)."""
        return _column_shard(param, loaded_weight, self.tp_rank, self.tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        super().weight_loader(param, self.tp_slice(param, loaded_weight, shard_id), shard_id)


class RowParallelLinear(_ReducesOutput, Linear):
    """W [out, in] split by input columns; each rank's partial x_r W_r^T is summed over the group (the block's
    all-reduce). The bias is added once: by rank 0, to its partial, before the sum (as vLLM does); the other
    ranks hold a zero bias (split_linear gives them none, and adding zero is exact)."""

    parallel_style = "row"
    reduce_output = True  # a row-parallel layer on its own always needs its sum

    def __init__(self, input_size: int, output_size: int, **kwargs: Any) -> None:
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        super().__init__(divide(input_size, self.tp_size, "input_size"), output_size, **kwargs)

    def tp_slice(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> torch.Tensor:
        """This rank's piece of a checkpoint tensor (also what a quantized layer's ShardLoader asks for): the
        input columns r*in/tp .. of a matrix, whatever its layout; per-output-channel vectors whole; a tensor
        marked input_dim=None whole (an act-order GPTQ layer's scales and zeros: its columns' groups are spread
        over every rank), one marked input_dim=0 (act-order's g_idx [in]) narrowed."""
        split = dispatch("ch11.split_linear", split_linear)
        if param is self.bias:
            _, bias = split(None, loaded_weight, self.tp_rank, self.tp_size, "row")
            return torch.zeros_like(loaded_weight) if bias is None else bias
        if hasattr(param, "input_dim") and param.input_dim is None:
            return loaded_weight
        if param.dim() == 1:
            return _narrow(loaded_weight, 0, self.tp_rank, self.tp_size) if getattr(param, "input_dim", None) == 0 \
                else loaded_weight  # per-output-channel scales stay whole
        if param.dim() == 2 and getattr(param, "output_dim", 0) == 0:  # [out, in] (or packed [out, in / k])
            return split(loaded_weight, None, self.tp_rank, self.tp_size, "row")[0]
        out_dim = getattr(param, "output_dim", 0)  # a matrix stored another way: its input dimension is the other
        dim = getattr(param, "input_dim", 1 - out_dim if out_dim in (0, 1) else 1)
        return _narrow(loaded_weight, dim, self.tp_rank, self.tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        super().weight_loader(param, self.tp_slice(param, loaded_weight, shard_id), shard_id)


class QKVParallelLinear(_ReducesOutput, QKVLinear):
    """qkv_proj with this rank's query heads and the K/V heads they read (replicated when num_kv_heads < tp)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, **kwargs: Any) -> None:
        tp, rank = get_tp_size(), get_tp_rank()
        self.tp_size, self.tp_rank = tp, rank
        local_heads = divide(num_heads, tp, "num_attention_heads")
        if num_kv_heads >= tp:
            local_kv, self.kv_rank = divide(num_kv_heads, tp, "num_key_value_heads"), rank
        else:  # each K/V head lives on tp / num_kv_heads ranks: the ones whose query heads use it
            if tp % num_kv_heads:
                raise ValueError(f"tensor_parallel_size ({tp}) must be a multiple of num_key_value_heads "
                                 f"({num_kv_heads}) when it exceeds it (each K/V head is then replicated)")
            local_kv, self.kv_rank = 1, rank // (tp // num_kv_heads)
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        super().__init__(hidden_size, head_dim, local_heads, local_kv, **kwargs)

    def tp_slice(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> torch.Tensor:
        """This rank's piece of shard q, k or v (also what a quantized layer's ShardLoader asks for)."""
        if shard_id not in self.shard_ids:
            return loaded_weight
        # q in tp pieces; k and v in as many as there are distinct K/V shards
        kv_parts = min(self.tp_size, self.total_num_kv_heads)
        index, parts = (self.tp_rank, self.tp_size) if shard_id == "q" else (self.kv_rank, kv_parts)
        return _column_shard(param, loaded_weight, index, parts)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        super().weight_loader(param, self.tp_slice(param, loaded_weight, shard_id), shard_id)


class MergedColumnParallelLinear(_ReducesOutput, MergedColumnLinear):
    """gate_up_proj: each of gate and up split by output rows; rank r keeps slice r of each."""

    def __init__(self, input_size: int, output_sizes: list[int], **kwargs: Any) -> None:
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        local = [divide(s, self.tp_size, "each merged output size") for s in output_sizes]
        super().__init__(input_size, local, **kwargs)

    def tp_slice(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> torch.Tensor:
        """This rank's piece of gate or up (also what a quantized layer's ShardLoader asks for)."""
        if shard_id not in self.shard_ids:
            return loaded_weight
        return _column_shard(param, loaded_weight, self.tp_rank, self.tp_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        super().weight_loader(param, self.tp_slice(param, loaded_weight, shard_id), shard_id)


class VocabParallelEmbedding(VocabEmbedding):
    """Rows vocab_start .. vocab_end - 1 of the embedding on this rank (the last rank's tail padded with zero rows
    so every rank's slice has the same shape, which the logits gather needs); forward: masked lookup, all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None,
                 pad_to: int = 1) -> None:
        tp, rank = get_tp_size(), get_tp_rank()
        per_rank = -(-vocab_size // tp)
        per_rank = -(-per_rank // pad_to) * pad_to  # rows a rank holds: a multiple of pad_to
        super().__init__(per_rank, hidden_size, dtype=dtype)
        self.tp_size, self.tp_rank = tp, rank
        self.vocab_size = vocab_size  # the whole vocabulary: ids are checked against it
        self.num_embeddings_per_partition = per_rank
        self.vocab_start = min(rank * per_rank, vocab_size)
        self.vocab_end = min(self.vocab_start + per_rank, vocab_size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        expected = (self.vocab_size, *param.shape[1:])
        if tuple(loaded_weight.shape) != expected:
            raise ValueError(f"weight shape mismatch for {type(self).__name__}: got {tuple(loaded_weight.shape)}, "
                             f"expected {expected}")
        rows = self.vocab_end - self.vocab_start
        param.data[:rows].copy_(loaded_weight[self.vocab_start:self.vocab_end])
        param.data[rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(input_ids)
        if input_ids.device.type == "cpu" and input_ids.numel():
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got min {lo}, max {hi}")
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        out = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return tensor_parallel_all_reduce(out)

    def extra_repr(self) -> str:
        rows = f", rows {self.vocab_start}..{self.vocab_end - 1} on this rank" if self.tp_size > 1 else ""
        return f"{self.vocab_size}, {self.hidden_size}{rows}"


class ParallelLMHead(VocabParallelEmbedding):
    """forward(hidden [N, hidden]) -> logits [N, vocab] on TP rank 0 (None on the other TP ranks).

    quant_method (QuantizationConfig.get_lm_head_method): a load-time LinearMethod that rounds the head's dense
    `weight` after loading (RTN with lm_head=True); forward then runs its kernel. A quantized head cannot be
    tied to the embedding, which must stay dense for its lookups: the model loads the embedding's rows into it."""

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool = False, dtype: torch.dtype | None = None,
                 quant_method: Any = None) -> None:
        # packed 4-bit zeros fill int32 words along the vocabulary: a quantized head pads its rows to 8
        super().__init__(vocab_size, hidden_size, dtype=dtype, pad_to=1 if quant_method is None else 8)
        self.quant_method = quant_method
        if quant_method is not None:  # a Linear's view of the head: [vocab rows of this rank, hidden]
            self.input_size, self.output_size = hidden_size, self.num_embeddings_per_partition
            quant_method.create_weights(self, hidden_size, self.output_size, False, self.weight.dtype)
            if tuple(self.weight.shape) != (self.output_size, hidden_size):
                raise ValueError(f"the LM head's method {type(quant_method).__name__} must stage a dense weight "
                                 f"{(self.output_size, hidden_size)} (a load-time method), got "
                                 f"{tuple(self.weight.shape)}")
        if bias:
            self.bias = nn.Parameter(torch.empty(self.num_embeddings_per_partition, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader  # rows of the vocabulary, like the weight
        else:
            self.register_parameter("bias", None)

    def tie_to(self, embedding: VocabEmbedding) -> None:
        """Share the (vocab-parallel) embedding's weight: the same rows of the vocabulary on the same rank."""
        if self.quant_method is not None:
            raise ValueError("a quantized LM head cannot share the embedding's dense weight; load the "
                             "embedding's rows into it instead (LlamaForCausalLM does)")
        if embedding.weight.shape != self.weight.shape:
            raise ValueError(f"cannot tie LM head {tuple(self.weight.shape)} to embedding "
                             f"{tuple(embedding.weight.shape)}")
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        if self.quant_method is not None:
            local = self.quant_method.apply(self, hidden_states, self.bias)
        else:
            local = dense_linear(hidden_states, self.weight, self.bias)
        logits = tensor_parallel_gather(local)
        if logits is None or logits.shape[-1] == self.vocab_size:
            return logits
        return logits[..., :self.vocab_size]  # drop the padding rows of the last rank
