"""Log-probabilities of chosen tokens, scored on the device and read back with the sampled tokens (chapter 2).

Only when a request asks (SamplingParams.logprobs / prompt_logprobs): log_softmax in fp32 over the raw logits (the
model's own distribution, before temperature or top-k/top-p: vLLM's default), the log-probability and 1-based rank
of the chosen token (ties rank the same: rank = 1 + tokens strictly more likely) and the row's most likely tokens.

The work is split so that the runner needs no extra transfer for it: `score_tokens` stays on the device and returns
four tensors, which ride in the step's one download with the sampled tokens (minillm.engine.step_buffers.download);
`logprob_entries` turns the host copies into TokenLogprobs.
"""
from __future__ import annotations

import torch

from minillm.engine.step_buffers import download
from minillm.engine.step_input import TokenLogprobs


def score_tokens(logits: torch.Tensor, token_ids: torch.Tensor, width: int) -> list[torch.Tensor]:
    """Row i of `logits` [R, V] scores token_ids[i]: [chosen log-prob (float32 [R]), rank (int64 [R]),
    top-`width` log-probs (float32 [R, w]), their token ids (int64 [R, w])], w = min(width, V). No sync."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(-1, token_ids.view(-1, 1))
    ranks = (logprobs > chosen).sum(-1) + 1
    width = min(width, logprobs.shape[-1])
    if width > 0:
        top_lp, top_ids = logprobs.topk(width, dim=-1)
    else:
        top_lp, top_ids = logprobs[:, :0], token_ids.view(-1, 1)[:, :0]
    return [chosen.view(-1), ranks, top_lp, top_ids]


def logprob_entries(token_ids: list[int], num_top: list[int], scored: list[torch.Tensor]) -> list[TokenLogprobs]:
    """TokenLogprobs per row from the host copies of score_tokens' tensors; row i keeps its num_top[i] best."""
    chosen, ranks, top_lp, top_ids = (t.tolist() for t in scored)
    return [TokenLogprobs(token_ids[i], chosen[i], ranks[i], top_ids[i][:k], top_lp[i][:k])
            for i, k in enumerate(num_top)]


def token_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: list[int]) -> list[TokenLogprobs]:
    """Row i of `logits` [R, V] scores token_ids[i] (its log-probability and 1-based rank) and lists its
    num_top[i] most likely tokens (one transfer back when the logits are on a device)."""
    if logits.dim() != 2 or logits.shape[0] != len(token_ids) or len(num_top) != len(token_ids):
        raise ValueError(f"need [rows, vocab] logits with one token id and one num_top per row, got shape "
                         f"{tuple(logits.shape)}, {len(token_ids)} ids, {len(num_top)} num_top")
    if not token_ids:
        return []
    ids = torch.tensor(token_ids, dtype=torch.int64, device=logits.device)
    return logprob_entries(token_ids, num_top, download(score_tokens(logits, ids, max(num_top))))
