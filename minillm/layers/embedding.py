"""Token embedding and the LM head: the two ends of the model, chapter 1.

`VocabEmbedding` maps token ids [T] to vectors [T, hidden]; `LMHead` maps hidden states [N, hidden] back
to logits over the vocabulary [N, vocab] (with `dense_linear`: at decode on a GPU, the GEMV of
minillm.kernels.gemv). Small models tie the two (SmolLM2 does): the head *is* the
embedding matrix, one parameter shared by both modules. Tensor parallelism (chapter 11) splits both along
the vocabulary, which is why they are their own layers rather than bare `nn.Embedding`/`nn.Linear`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minillm.layers.linear import dense_linear  # F.linear, or the decode GEMV for a few rows on a GPU


class VocabEmbedding(nn.Module):
    """weight: [vocab_size, hidden_size]; forward(input_ids [T]) -> [T, hidden_size]."""

    def __init__(self, vocab_size: int, hidden_size: int, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if vocab_size < 1 or hidden_size < 1:
            raise ValueError(f"embedding sizes must be >= 1, got vocab_size={vocab_size}, hidden_size={hidden_size}")
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size, dtype=dtype), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: object = None) -> None:
        if tuple(loaded_weight.shape) != tuple(param.shape):
            raise ValueError(f"weight shape mismatch for {type(self).__name__}: "
                             f"got {tuple(loaded_weight.shape)}, expected {tuple(param.shape)}")
        param.data.copy_(loaded_weight)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.device.type == "cpu" and input_ids.numel():
            # An out-of-range id on a GPU is a device-side assert; on CPU we can afford a clear message.
            lo, hi = int(input_ids.min()), int(input_ids.max())
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"token ids must lie in [0, {self.vocab_size}), got min {lo}, max {hi}")
        return F.embedding(input_ids, self.weight)

    def extra_repr(self) -> str:
        return f"{self.vocab_size}, {self.hidden_size}"


class LMHead(VocabEmbedding):
    """Same weight layout as the embedding; forward(hidden [N, hidden]) -> logits [N, vocab] (logits = h W^T)."""

    def __init__(self, vocab_size: int, hidden_size: int, bias: bool = False, dtype: torch.dtype | None = None) -> None:
        super().__init__(vocab_size, hidden_size, dtype=dtype)
        if bias:
            self.bias = nn.Parameter(torch.empty(vocab_size, dtype=dtype), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def tie_to(self, embedding: VocabEmbedding) -> None:
        """Share the embedding's weight (tied word embeddings): one tensor, loaded once."""
        if embedding.weight.shape != self.weight.shape:
            raise ValueError(f"cannot tie LM head {tuple(self.weight.shape)} to embedding {tuple(embedding.weight.shape)}")
        self.weight = embedding.weight

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return dense_linear(hidden_states, self.weight, self.bias)
