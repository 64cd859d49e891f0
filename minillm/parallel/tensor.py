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
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minillm.layers.embedding import VocabEmbedding
from minillm.layers.linear import Linear, MergedColumnLinear, QKVLinear
from minillm.parallel.state import get_tp_rank, get_tp_size, tensor_parallel_all_reduce, tensor_parallel_gather


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"tensor parallelism needs {what} ({numerator}) divisible by tensor_parallel_size "
                         f"({denominator})")
    return numerator // denominator


def _narrow(loaded: torch.Tensor, dim: int, index: int, size: int) -> torch.Tensor:
    """Slice `index` of `loaded` along `dim`, in pieces of `size` (a full tensor at tp=1 comes back whole)."""
    if loaded.shape[dim] == size:
        return loaded
    return loaded.narrow(dim, index * size, size)


class ColumnParallelLinear(Linear):
    """W [out, in] split by output rows: rank r computes outputs r*out/tp .. (r+1)*out/tp - 1; no communication."""

    def __init__(self, input_size: int, output_size: int, **kwargs: Any) -> None:
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        super().__init__(input_size, divide(output_size, self.tp_size, "output_size"), **kwargs)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        dim = getattr(param, "output_dim", 0)
        if dim is not None:
            loaded_weight = _narrow(loaded_weight, dim, self.tp_rank, param.shape[dim])
        super().weight_loader(param, loaded_weight, shard_id)


class RowParallelLinear(Linear):
    """W [out, in] split by input columns; each rank's partial x_r W_r^T is summed over the group (the block's
    all-reduce). The bias is added once, after the sum."""

    def __init__(self, input_size: int, output_size: int, **kwargs: Any) -> None:
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        super().__init__(divide(input_size, self.tp_size, "input_size"), output_size, **kwargs)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        if param.dim() >= 2:  # a matrix: its input dimension is the other one (a bias, a per-row scale: whole)
            out_dim = getattr(param, "output_dim", 0)
            dim = getattr(param, "input_dim", 1 - out_dim if out_dim in (0, 1) else 1)
            loaded_weight = _narrow(loaded_weight, dim, self.tp_rank, param.shape[dim])
        super().weight_loader(param, loaded_weight, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.quant_method.apply(self, x, self.bias)
        out = tensor_parallel_all_reduce(self.quant_method.apply(self, x, None))
        return out if self.bias is None else out + self.bias


class QKVParallelLinear(QKVLinear):
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

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        dim = getattr(param, "output_dim", 0)
        if shard_id in self.shard_ids and dim is not None:
            index = self.tp_rank if shard_id == "q" else self.kv_rank
            loaded_weight = _narrow(loaded_weight, dim, index, self.shard_slice(shard_id)[1])
        super().weight_loader(param, loaded_weight, shard_id)


class MergedColumnParallelLinear(MergedColumnLinear):
    """gate_up_proj: each of gate and up split by output rows; rank r keeps slice r of each."""

    def __init__(self, input_size: int, output_sizes: list[int], **kwargs: Any) -> None:
        self.tp_size, self.tp_rank = get_tp_size(), get_tp_rank()
        local = [divide(s, self.tp_size, "each merged output size") for s in output_sizes]
        super().__init__(input_size, local, **kwargs)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        dim = getattr(param, "output_dim", 0)
        if shard_id in self.shard_ids and dim is not None:
            loaded_weight = _narrow(loaded_weight, dim, self.tp_rank, self.output_sizes[shard_id])
        super().weight_loader(param, loaded_weight, shard_id)


class VocabParallelEmbedding(VocabEmbedding):
    """Rows vocab_start .. vocab_end - 1 of the embedding on this rank (the last rank's tail padded with zero rows
    so every rank's slice has the same shape, which the logits gather needs); forward: masked lookup, all-reduce."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None) -> None:
        tp, rank = get_tp_size(), get_tp_rank()
        per_rank = -(-vocab_size // tp)
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
    """forward(hidden [N, hidden]) -> logits [N, vocab] on TP rank 0 (None on the other TP ranks)."""

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__(vocab_size, hidden_size, dtype=dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(self.num_embeddings_per_partition, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader  # rows of the vocabulary, like the weight
        else:
            self.register_parameter("bias", None)

    def tie_to(self, embedding: VocabEmbedding) -> None:
        """Share the (vocab-parallel) embedding's weight: the same rows of the vocabulary on the same rank."""
        if embedding.weight.shape != self.weight.shape:
            raise ValueError(f"cannot tie LM head {tuple(self.weight.shape)} to embedding "
                             f"{tuple(embedding.weight.shape)}")
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        logits = tensor_parallel_gather(F.linear(hidden_states, self.weight, self.bias))
        if logits is None or logits.shape[-1] == self.vocab_size:
            return logits
        return logits[..., :self.vocab_size]  # drop the padding rows of the last rank
