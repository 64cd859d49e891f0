"""A draft vocabulary: drafts drawn from the target's most frequent tokens only (FR-Spec's idea), chapter 9.

A draft head's own layer is small; what it pays for is the target's LM head. SmolLM2's is 49,152 x 576, 28 M
parameters, eight times the EAGLE head's decoder layer, and every draft step multiplies by it, takes its log-softmax
and its top-k. On the CPU, where a step costs what its weights cost to read, one EAGLE draft step is then about a
quarter of a whole target step. But a model's answers use few of its tokens: ranked by how often the target *says*
them, the first few thousand cover nearly all of what it writes (FR-Spec, Zhao et al. 2025, ranks by corpus
frequency; EAGLE-3 drafts over 32k of Llama 3's 128k). Drafting over those V' rows costs V'/V of the LM head.

Losslessness is untouched: verification still scores the target's full vocabulary, and a token the drafts cannot
name is only a draft that is never made (its q is 0, which the rejection rule handles: the residual
max(0, p - q) keeps its mass). What a small V' costs is acceptance: a draft can never be a rare token.

The counts are those of the target's answers in train-heads' self-distilled data (the token each drafting
position predicts), saved as token_counts.safetensors (with the target's fingerprint) beside the heads;
`frequent_token_ids` ranks them, ties by token id so that every machine picks the same set. `draft_vocab_ids`
finds them: beside the heads (or one level up), else those shipped for the bundled model
(weights/token_counts.safetensors).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from minillm.config import ModelConfig

__all__ = ["COUNTS_FILE", "DraftVocab", "answer_token_counts", "save_token_counts", "load_token_counts",
           "frequent_token_ids", "draft_vocab_ids"]

COUNTS_FILE = "token_counts.safetensors"


class DraftVocab:
    """The LM head a proposer drafts with: every row of `lm_head_weight` [V, d] until `restrict(ids)`, then a copy of
    those rows only. Drafting works in its index space (logits [..., V'], argmax, top-k, q); `to_ids` and `spread`
    turn the results back into token ids and distributions over the whole vocabulary."""

    def __init__(self, lm_head_weight: torch.Tensor) -> None:
        if not isinstance(lm_head_weight, torch.Tensor) or lm_head_weight.dim() != 2 or \
                not lm_head_weight.is_floating_point():
            raise ValueError(f"a draft vocabulary needs a dense floating-point LM head weight [vocab, hidden], got "
                             f"{getattr(lm_head_weight, 'dtype', type(lm_head_weight).__name__)} "
                             f"{tuple(getattr(lm_head_weight, 'shape', ()))}")
        self.vocab_size = lm_head_weight.shape[0]
        self.ids: torch.Tensor | None = None  # None: every token, index = token id
        self.weight = lm_head_weight

    @property
    def size(self) -> int:
        return self.weight.shape[0]

    def restrict(self, token_ids: torch.Tensor) -> "DraftVocab":
        """Draft over these token ids only (int64 [V'], distinct, ascending)."""
        if self.ids is not None:
            raise ValueError("this draft vocabulary is already restricted; restrict a new DraftVocab")
        ids = torch.as_tensor(token_ids, dtype=torch.int64)
        if ids.dim() != 1 or ids.numel() == 0 or bool((ids[1:] <= ids[:-1]).any()) or \
                not 0 <= int(ids[0]) <= int(ids[-1]) < self.vocab_size:
            raise ValueError(f"a draft vocabulary is 1-D, ascending, distinct token ids in [0, {self.vocab_size}); "
                             f"got {tuple(ids.shape)} ids")
        self.ids = ids.to(self.weight.device)
        self._host_ids = ids  # for spread: sampled drafts' q lives on the host, so no device copy per draft step
        self.weight = self.weight.index_select(0, self.ids).contiguous()
        return self

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[..., V']: the draft vocabulary's logits of final-normed hidden states."""
        return F.linear(hidden, self.weight)

    def to_ids(self, index: torch.Tensor) -> torch.Tensor:
        """Token ids of indices into logits' last dimension (the same tensor without a restriction)."""
        return index if self.ids is None else self.ids[index]

    def spread(self, q: torch.Tensor) -> torch.Tensor:
        """A draft distribution [R, V'] as one over every token [R, V], 0 outside the draft vocabulary: what the
        rejection rule compares with the target's p."""
        if self.ids is None:
            return q
        full = q.new_zeros(q.shape[0], self.vocab_size)
        full[:, self._host_ids if q.device.type == "cpu" else self.ids.to(q.device)] = q
        return full


def dense_head_weight(lm_head: torch.nn.Module, user: str) -> torch.Tensor:
    """The LM head's dense [vocab, hidden] weight, which drafters score rows of; ValueError (naming `user`) for a
    head quantized at load time (RTN with lm_head=True), whose rows are packed codes."""
    if getattr(lm_head, "quant_method", None) is not None:
        raise ValueError(f"{user} scores drafts with rows of the target's dense LM head, but the head is quantized "
                         f"(lm_head=True); load the target without lm_head quantization")
    return lm_head.weight


def answer_token_counts(tokens: torch.Tensor, drafted: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """int64 [vocab_size]: how often each token is what a drafting position predicts, i.e. tokens[:, p + 1] where
    drafted[:, p] (every next token when `drafted` is None), over rows tokens [N, L]."""
    if tokens.dim() != 2 or (drafted is not None and drafted.shape != tokens.shape):
        raise ValueError(f"tokens must be [N, L] and drafted None or the same shape, got {tuple(tokens.shape)} and "
                         f"{None if drafted is None else tuple(drafted.shape)}")
    following = tokens[:, 1:]
    if drafted is not None:
        following = following[drafted[:, :-1].bool()]
    following = following.reshape(-1).cpu()
    if following.numel() and not 0 <= int(following.min()) <= int(following.max()) < vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), got {int(following.min())}..{int(following.max())}")
    return torch.bincount(following, minlength=vocab_size).to(torch.int64)


def save_token_counts(directory: str | os.PathLike, counts: torch.Tensor, target: ModelConfig) -> Path:
    """Write `counts` [V] and the fingerprint of the target they count to directory/token_counts.safetensors."""
    from minillm.loader.model_files import save_safetensors
    from minillm.speculative.heads import target_fingerprint
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    save_safetensors({"counts": counts.to(torch.int64).contiguous().cpu()}, path / COUNTS_FILE,
                     metadata={"target": json.dumps(target_fingerprint(target), sort_keys=True)})
    return path / COUNTS_FILE


def load_token_counts(directory: str | os.PathLike, target: ModelConfig) -> torch.Tensor:
    """The counts train-heads saved in `directory`; raises if there are none or they count another target."""
    from safetensors import safe_open

    from minillm.speculative.heads import target_fingerprint
    path = Path(directory) / COUNTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no token counts here (`minillm train-heads` writes them beside the heads)")
    with safe_open(str(path), framework="pt") as f:
        counted = json.loads((f.metadata() or {}).get("target", "null"))
        counts = f.get_tensor("counts")
    if counted != target_fingerprint(target) or counts.shape != (target.vocab_size,):
        raise ValueError(f"{path}: token counts of a target with {counted}, this target has "
                         f"{target_fingerprint(target)}")
    return counts


def frequent_token_ids(counts: torch.Tensor, size: int) -> torch.Tensor:
    """int64 [size]: the `size` most frequent token ids by `counts` [V], ascending (ties: the smaller id first)."""
    vocab = counts.numel()
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= vocab:
        raise ValueError(f"draft vocabulary size must be an integer in [1, {vocab}], got {size!r}")
    order = torch.argsort(-counts.to(torch.int64), stable=True)  # stable: equal counts keep id order
    return order[:size].sort().values


def draft_vocab_ids(size: int, heads_dir: str | os.PathLike | None, target: ModelConfig) -> torch.Tensor:
    """The draft vocabulary of `size` tokens: ranked by the counts in `heads_dir` or its parent (where train-heads
    writes them when it trains several kinds, OUT/<kind> each) when there are some, else by those shipped for the
    bundled model when `target` is it; a ValueError that says how to get counts otherwise."""
    from minillm.speculative.heads import SHIPPED_DIR
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= target.vocab_size:
        raise ValueError(f"speculative_config draft_vocab_size must be an integer in [1, {target.vocab_size}] (the "
                         f"target's vocabulary), got {size!r}")
    nearby = [] if heads_dir is None else [Path(heads_dir), Path(heads_dir).parent]
    for directory in (*nearby, SHIPPED_DIR):
        if (Path(directory) / COUNTS_FILE).is_file():
            try:
                counts = load_token_counts(directory, target)
            except ValueError:  # shipped counts of another target: as if there were none
                if Path(directory) != Path(SHIPPED_DIR):
                    raise
                continue
            return frequent_token_ids(counts, size)
    raise ValueError(f"draft_vocab_size={size} needs token counts of this target's answers: none in {heads_dir} "
                     f"and none shipped for it; `minillm train-heads` writes {COUNTS_FILE} beside the heads")
