"""Embeddings from the generative model: vLLM's PoolingParams and pooling (LLM.embed, POST /v1/embeddings;
chapter 10, section 3).

An embedding request runs only the prefill. Its vector is the final hidden state (after the final norm) of the
prompt's **last** token, which in a causal model is the one position that has seen the whole prompt: vLLM's
`pooling_type="LAST"`, the pooling of decoder embedding models (E5-Mistral, Qwen3-Embedding, ...). Then, as vLLM:
`dimensions` keeps the first d components (Matryoshka embeddings) and `normalize` scales to unit L2 norm, so the
dot product of two embeddings is their cosine similarity.

In the engine it is a request that samples one token (discarded) with `return_hidden_states` set on its steps
(engine/llm_engine.py): chunked prefill, prefix caching (a cached prompt still recomputes its last token) and
continuous batching beside generating requests all apply. MEAN and CLS pooling are refused: they need every
prompt position's hidden state, and a prefix-cache hit computes none of the cached ones.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minillm.sampling_params import ParamError

POOLING_TYPES = ("LAST",)


@dataclass
class PoolingParams:
    """How an embedding request pools (vLLM's names). pooling_type "LAST"; normalize to unit length (default
    True); dimensions: keep the first d components (None: all of hidden_size)."""

    pooling_type: str = "LAST"
    normalize: bool = True
    dimensions: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pooling_type, str) or self.pooling_type.upper() not in POOLING_TYPES:
            raise ParamError("pooling_type", f"pooling_type must be 'LAST', got {self.pooling_type!r} (MEAN and CLS "
                                             f"need every prompt position's hidden state, which a prefix-cache hit "
                                             f"does not compute)")
        self.pooling_type = self.pooling_type.upper()
        if not isinstance(self.normalize, bool):
            raise ParamError("normalize", f"normalize must be a bool, got {self.normalize!r}")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise ParamError("dimensions", f"dimensions must be an integer >= 1 or None, got {self.dimensions!r}")

    def check(self, hidden_size: int) -> None:
        """ParamError when `dimensions` exceeds the model's hidden size."""
        if self.dimensions is not None and self.dimensions > hidden_size:
            raise ParamError("dimensions", f"dimensions={self.dimensions} exceeds this model's hidden size "
                                           f"{hidden_size}")


def pool(hidden: torch.Tensor, params: PoolingParams) -> list[float]:
    """The embedding of one request from its last prompt token's hidden state `hidden` [hidden_size]."""
    vector = hidden.detach().float().cpu()
    if params.dimensions is not None:
        vector = vector[:params.dimensions]
    if params.normalize:
        vector = torch.nn.functional.normalize(vector, dim=0)
    return vector.tolist()


def pool_embeddings(seqs: list, step_output, tokens: list[list[int]]) -> None:
    """After a step: each embedding request whose prefill ended in it (it sampled a token) keeps the embedding of
    its last row, the last prompt token (an earlier chunk of a chunked prefill samples nothing)."""
    hidden = step_output.hidden_states
    for i, seq in enumerate(seqs):
        if seq.pooling is not None and seq.embedding is None and tokens[i]:
            if hidden is None or not len(hidden[i]):
                raise RuntimeError(f"request {seq.request_id}: its step returned no hidden states to pool")
            seq.embedding = pool(hidden[i][-1], seq.pooling)
