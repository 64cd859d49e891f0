"""Embeddings from the generative model: vLLM's PoolingParams and pooling (LLM.embed, POST /v1/embeddings;
chapter 10, section 3).

An embedding request runs only the prefill. Its vector pools the final hidden states (after the final norm) of
its prompt, as vLLM's `pooling_type` says:

- "LAST" (the default): the prompt's last token, which in a causal model is the one position that has seen the
  whole prompt: the pooling of decoder embedding models (E5-Mistral, Qwen3-Embedding, gte-Qwen2, ...);
- "MEAN": the average over every prompt position (sentence-transformers' mean pooling; GritLM);
- "CLS": the first position (BERT's [CLS] token; in a causal model it has seen only itself, so it is here for
  models trained to put a summary there, not a good choice for a plain decoder).

Then, as vLLM: `dimensions` keeps the first d components (Matryoshka embeddings) and `normalize` scales to unit L2
norm, so the dot product of two embeddings is their cosine similarity.

In the engine it is a request that samples one token (discarded) with `return_hidden_states` set on its steps
(engine/llm_engine.py): chunked prefill and continuous batching beside generating requests apply to all three.
LAST reads only the last chunk's last row, so prefix caching applies too (a cached prompt still recomputes its
last token). MEAN and CLS need rows a prefix-cache hit never computes, so such a request skips the cache lookup
and computes its whole prompt (Sequence.reads_every_prompt_row, as prompt_logprobs does), summing its rows chunk
by chunk (PooledRows); a recompute after preemption starts the sum again.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minillm.sampling_params import ParamError

POOLING_TYPES = ("LAST", "MEAN", "CLS")


@dataclass
class PoolingParams:
    """How an embedding request pools (vLLM's names). pooling_type "LAST", "MEAN" or "CLS" (any case); normalize
    to unit length (default True); dimensions: keep the first d components (None: all of hidden_size)."""

    pooling_type: str = "LAST"
    normalize: bool = True
    dimensions: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pooling_type, str) or self.pooling_type.upper() not in POOLING_TYPES:
            raise ParamError("pooling_type", f"pooling_type must be one of {', '.join(POOLING_TYPES)}, got "
                                             f"{self.pooling_type!r}")
        self.pooling_type = self.pooling_type.upper()
        if not isinstance(self.normalize, bool):
            raise ParamError("normalize", f"normalize must be a bool, got {self.normalize!r}")
        if self.dimensions is not None and (isinstance(self.dimensions, bool) or not isinstance(self.dimensions, int)
                                            or self.dimensions < 1):
            raise ParamError("dimensions", f"dimensions must be an integer >= 1 or None, got {self.dimensions!r}")

    @property
    def reads_every_row(self) -> bool:
        """MEAN and CLS read prompt rows before the last: the request must compute its whole prompt."""
        return self.pooling_type != "LAST"

    def check(self, hidden_size: int) -> None:
        """ParamError when `dimensions` exceeds the model's hidden size."""
        if self.dimensions is not None and self.dimensions > hidden_size:
            raise ParamError("dimensions", f"dimensions={self.dimensions} exceeds this model's hidden size "
                                           f"{hidden_size}")


class PooledRows:
    """MEAN / CLS pooling's state across one prompt's prefill chunks: the fp32 sum of the rows seen, how many, and
    the first. Chunks must arrive in order from position 0 (add checks it), so a skipped row is an error, never a
    silently wrong mean."""

    def __init__(self) -> None:
        self.total: torch.Tensor | None = None
        self.count = 0
        self.first: torch.Tensor | None = None

    def add(self, rows: torch.Tensor, start: int) -> None:
        """Fold in a chunk's rows [n, hidden] for prompt positions start .. start + n - 1."""
        if start != self.count:
            raise RuntimeError(f"pooling got rows from position {start} after {self.count} pooled rows: a chunk "
                               f"was skipped (a prefix-cache hit must not serve MEAN / CLS pooling)")
        rows = rows.detach().float()
        if self.total is None:
            self.first = rows[0].clone()
            self.total = rows.sum(0)
        else:
            self.total += rows.sum(0)
        self.count += rows.shape[0]


def pool(vector: torch.Tensor, params: PoolingParams) -> list[float]:
    """The embedding from one request's pooled hidden state `vector` [hidden_size]: dimensions, then normalize."""
    vector = vector.detach().float().cpu()
    if params.dimensions is not None:
        vector = vector[:params.dimensions]
    if params.normalize:
        vector = torch.nn.functional.normalize(vector, dim=0)
    return vector.tolist()


def cosine_similarity(a: list[float], b: list[float]) -> float:
    """The cosine of the angle between two embeddings, whether or not they were normalized (LLM.score, the
    server's /score and /rerank)."""
    return float(torch.nn.functional.cosine_similarity(torch.tensor(a), torch.tensor(b), dim=0))


def pool_embeddings(seqs: list, step_output, tokens: list[list[int]]) -> None:
    """After a step (before the scheduler advances num_computed_tokens): each embedding request folds in its rows
    (MEAN, CLS) and, if its prefill ended in this step (it sampled a token), keeps its embedding. LAST needs only
    that last chunk's last row, the prompt's last token (an earlier chunk samples nothing)."""
    hidden = step_output.hidden_states
    for i, seq in enumerate(seqs):
        params = seq.pooling
        if params is None or seq.embedding is not None or not (tokens[i] or params.reads_every_row):
            continue
        if hidden is None or not len(hidden[i]):
            raise RuntimeError(f"request {seq.request_id}: its step returned no hidden states to pool")
        rows = hidden[i]
        if params.reads_every_row:
            if seq.num_computed_tokens == 0 or seq.pooled is None:  # the first chunk (again, after a recompute)
                seq.pooled = PooledRows()
            seq.pooled.add(rows, seq.num_computed_tokens)
        if not tokens[i]:
            continue
        if params.pooling_type == "LAST":
            vector = rows[-1]
        elif seq.pooled.count != seq.num_prompt_tokens:
            raise RuntimeError(f"request {seq.request_id}: {seq.pooled.count} rows pooled for a prompt of "
                               f"{seq.num_prompt_tokens} tokens")
        else:
            vector = seq.pooled.total / seq.pooled.count if params.pooling_type == "MEAN" else seq.pooled.first
        seq.embedding = pool(vector, params)
        seq.pooled = None
