"""Verifying draft tokens without changing what the target model would sample (chapter on speculative decoding).

Why decoding has idle compute. One decode step of one sequence reads every weight of the model once and does about
2 FLOPs per weight: an arithmetic intensity near 1 FLOP per byte, while an H200 can do about 150 FLOPs in the time it
reads one byte (roughly 700 TFLOP/s of bf16 over 4.8 TB/s). The step is bound by memory bandwidth and the tensor
cores mostly wait. Scoring k+1 tokens of the same sequence in one forward pass reads the same weights once, so it
costs about as much time as scoring one. Speculative decoding spends that idle compute: something cheap proposes
k draft tokens (a small draft model, n-grams from the prompt, Medusa heads, EAGLE), the target scores all of them in
one step, and a verification rule keeps a prefix of them plus one token of its own. With per-token acceptance
rate a, one step yields (1 - a^(k+1)) / (1 - a) tokens on average instead of 1 (Leviathan, Kalman and Matias 2023,
"Fast Inference from Transformers via Speculative Decoding"; Chen et al. 2023, "Accelerating Large Language Model
Decoding with Speculative Sampling").

The rule (speculative sampling). Let p be the target's distribution and q the draft's at one position, and x ~ q
the draft token. Accept x with probability min(1, p(x)/q(x)); on rejection, sample from the residual
r = max(0, p - q) / sum(max(0, p - q)) and stop. If all k drafts are accepted, sample one bonus token from the
target's distribution after the last draft. Every step therefore emits between 1 and k+1 tokens.

Why it is lossless, in three lines. Let beta = sum_y min(p(y), q(y)), the probability of accepting, and note
sum_y max(0, p(y) - q(y)) = 1 - beta. Then
    P(emit x) = q(x) * min(1, p(x)/q(x))  +  (1 - beta) * max(0, p(x) - q(x)) / (1 - beta)
              = min(p(x), q(x))           +  max(0, p(x) - q(x))
              = p(x).
The emitted token is an exact sample of p, whatever q is; by induction over positions (each next p is the target's
distribution given the tokens emitted so far) the whole output is distributed as the target's own sampling. q only
decides how many tokens a step yields. Two special cases fall out of the same code:
- greedy (temperature 0): p is one-hot at the target's argmax, so a draft is accepted exactly when it equals the
  argmax, and the residual after a mismatch is one-hot at the argmax again (`greedy_verify` is the shortcut that
  needs only the argmax ids, not [B, k+1, V] probabilities);
- deterministic proposals (prompt lookup, lookahead n-grams): q is one-hot at the proposed token, so x is accepted
  with probability p(x) and the residual is p with x removed (pass draft_probs=None). That is the same as drawing
  y ~ p at every position and accepting while y == x, emitting y at the first mismatch: so `greedy_verify` fed with
  the target's *sampled* tokens (what the runner returns at each of the 1+k rows) is exact for such drafts at any
  temperature. A draft model's sampled drafts need `rejection_sample` with q: matching a sample of p accepts x with
  probability p(x) < min(1, p(x)/q(x)), still lossless but a shorter accept length.

The probabilities come from `logits_to_probs`, which applies temperature, top-k and top-p exactly as the engine's
sampler (minillm.layers.sampler, chapter 1) does, through the same filters and override hooks: the target must be
filtered the same way here as in ordinary decoding, or speculative decoding would sample a different distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from minillm.hooks import dispatch
from minillm.layers.sampler import greedy_tokens, top_k_filter, top_p_filter

# Fills the positions of a row after its last emitted token (vLLM's convention).
PLACEHOLDER_TOKEN_ID = -1


@dataclass
class SpecDecodeOutput:
    """The result of verifying one step of draft tokens.

    token_ids: int64 [B, K+1]. Row b holds num_accepted[b] accepted drafts, then exactly one token chosen by the
    target (the residual resample or the bonus), then PLACEHOLDER_TOKEN_ID.
    num_accepted: int64 [B], the number of accepted draft tokens (0..k_b).
    """

    token_ids: torch.Tensor
    num_accepted: torch.Tensor

    def to_lists(self) -> list[list[int]]:
        """Per sequence, the tokens to append (accepted drafts + one): what Scheduler.postprocess consumes."""
        rows = self.token_ids.tolist()
        return [row[: n + 1] for row, n in zip(rows, self.num_accepted.tolist())]


# >>> exercise ch09.expected_tokens_per_step
def expected_tokens_per_step(acceptance_rate: float, num_speculative_tokens: int) -> float:
    """Leviathan et al.'s expected tokens per verification step when each of the k = num_speculative_tokens drafts
    is accepted independently with probability a = acceptance_rate (a = sum_x min(p(x), q(x)) for sampled drafts).

    Draft i counts only if drafts 1..i were all accepted (probability a^i), and every step ends with one token of
    the target's own (the correction after a rejection, or the bonus token after k acceptances). So the step
    emits 1 + a + a^2 + ... + a^k = (1 - a^(k+1)) / (1 - a) tokens on average, and exactly k + 1 when a = 1.
    It is the ceiling a benchmark's measured accepted length + 1 is compared with (chapter 9).
    Example: a = 0.6, k = 4 -> (1 - 0.6^5) / 0.4 = 2.306; a = 0 -> 1 (the target's token alone); a = 1 -> k + 1.
    Raise ValueError unless 0 <= acceptance_rate <= 1 and num_speculative_tokens is an integer >= 0.
    """
    # >>> solution
    if not 0 <= acceptance_rate <= 1:
        raise ValueError(f"acceptance_rate must be in [0, 1], got {acceptance_rate!r}")
    if isinstance(num_speculative_tokens, bool) or not isinstance(num_speculative_tokens, int) \
            or num_speculative_tokens < 0:
        raise ValueError(f"num_speculative_tokens must be an integer >= 0, got {num_speculative_tokens!r}")
    if acceptance_rate == 1:
        return float(num_speculative_tokens + 1)
    return (1 - acceptance_rate ** (num_speculative_tokens + 1)) / (1 - acceptance_rate)
    # <<< solution
# <<< exercise


def logits_to_probs(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor | None = None,
                    top_ps: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, V] or [B, S, V] -> float32 probabilities of the same shape, under per-sequence parameters [B].

    Applied identically to the target's and the draft's logits. Rows with temperature 0 become one-hot at the
    argmax (the greedy case of the rejection rule). Others: logits / T -> top-k -> top-p -> softmax, the order and
    the filters of minillm.layers.sampler.Sampler, so the target distribution is the one ordinary decoding samples.
    """
    if not isinstance(logits, torch.Tensor) or logits.dim() not in (2, 3):
        raise ValueError(f"logits must be a tensor [B, V] or [B, S, V], got {getattr(logits, 'shape', logits)!r}")
    batch, vocab = logits.shape[0], logits.shape[-1]
    steps = 1 if logits.dim() == 2 else logits.shape[1]
    top_ks = torch.full((batch,), -1, dtype=torch.int64) if top_ks is None else top_ks
    top_ps = torch.ones(batch) if top_ps is None else top_ps
    for name, t in (("temperatures", temperatures), ("top_ks", top_ks), ("top_ps", top_ps)):
        if not isinstance(t, torch.Tensor) or t.shape != (batch,):
            raise ValueError(f"{name} must be a tensor of shape ({batch},), got {getattr(t, 'shape', t)!r}")
    if bool((temperatures < 0).any()):
        raise ValueError(f"temperatures must be >= 0 (0 = greedy), got {temperatures.tolist()}")
    if bool(((top_ps <= 0) | (top_ps > 1)).any()):
        raise ValueError(f"top_ps must be in (0, 1], got {top_ps.tolist()}")
    device = logits.device
    rows = logits.reshape(batch * steps, vocab).float()
    # every position of a sequence uses that sequence's parameters
    temps, ks, ps = (t.to(device).repeat_interleave(steps) for t in (temperatures, top_ks, top_ps))
    greedy = temps <= 0
    one_hot = torch.zeros_like(rows).scatter_(-1, rows.argmax(dim=-1, keepdim=True), 1.0)
    if bool(greedy.all()):
        return one_hot.reshape(logits.shape)
    scaled = rows / torch.where(greedy, torch.ones_like(temps), temps).to(rows).unsqueeze(-1)
    if bool((ks > 0).any()):
        scaled = dispatch("ch01.top_k_filter", top_k_filter)(scaled, ks)
    if bool((ps < 1).any()):
        scaled = dispatch("ch01.top_p_filter", top_p_filter)(scaled, ps.float())
    probs = torch.softmax(scaled, dim=-1)
    return torch.where(greedy.unsqueeze(-1), one_hot, probs).reshape(logits.shape)


# >>> exercise ch09.residual_distribution
def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) row by row: what to sample after rejecting a draft token. [R, V] -> [R, V].

    p is the target's distribution at the rejected position, q the draft's. After a rejection, the token must
    come from where the target has more mass than the draft: max(0, p - q), renormalised to sum to 1. (That is
    what makes the whole step exact: min(p, q) was already emitted through acceptance, the residual adds the rest.)
    A row whose leftover mass is at most 1e-6 is rounding noise of p == q (the rejection that led here has
    probability 0 in exact arithmetic): return p for that row instead of dividing by ~0.

    Example: p [0.5, 0.3, 0.2], q [0.2, 0.6, 0.2] -> [1.0, 0.0, 0.0];  p == q -> p.
    """
    # >>> solution
    residual = (p - q).clamp_min(0)
    mass = residual.sum(dim=-1, keepdim=True)
    # The error the 1e-6 floor allows is at most the probability of reaching the residual at all: that same mass.
    return torch.where(mass > 1e-6, residual / mass.clamp_min(1e-6), p)
    # <<< solution
# <<< exercise


def draw_noise(num_draws: torch.Tensor, width: int, vocab: int, device: torch.device,
               generators: list[torch.Generator | None] | None,
               default_generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: num_draws[b] uniforms in [0, 1) (padded to `width`) for the accept tests, and `vocab` Exp(1) values
    for the final draw by the exponential race (argmax p/E ~ Categorical(p); see minillm.layers.sampler).

    A row with its own generator draws exactly its own numbers from it, so a seeded request's result does not depend
    on the other rows of the batch (nor on their number of drafts). The other rows draw together from the default.
    """
    batch = num_draws.shape[0]
    uniforms = torch.zeros((batch, width), device=device)
    race = torch.empty((batch, vocab), device=device)
    generators = [None] * batch if generators is None else generators
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch} rows")
    shared = [b for b, g in enumerate(generators) if g is None]
    if shared:
        uniforms[shared] = torch.rand((len(shared), width), device=device, generator=default_generator)
        race[shared] = torch.empty((len(shared), vocab), device=device).exponential_(generator=default_generator)
    for b, g in enumerate(generators):
        if g is not None:
            k = int(num_draws[b])
            uniforms[b, :k] = torch.rand(k, device=device, generator=g)
            race[b].exponential_(generator=g)
    return uniforms, race.clamp_min_(torch.finfo(race.dtype).tiny)  # Exp(1) may round to 0: keep p/E finite


def sample_from_probs(probs: torch.Tensor, generators: list[torch.Generator | None] | None = None,
                      default_generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row of probs [R, V] (rows need not be normalised). Draft proposers sample with this."""
    if not isinstance(probs, torch.Tensor) or probs.dim() != 2:
        raise ValueError(f"probs must be a tensor [R, V], got {getattr(probs, 'shape', probs)!r}")
    no_draws = torch.zeros(probs.shape[0], dtype=torch.int64)
    _, race = draw_noise(no_draws, 0, probs.shape[1], probs.device, generators, default_generator)
    return (probs.float() / race).argmax(dim=-1)


def _check_drafts(draft_token_ids: torch.Tensor, num_draft_tokens: torch.Tensor | None, batch: int, width: int,
                  vocab: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate draft ids [B, K] and counts [B]; returns (counts, valid mask [B, K])."""
    if not isinstance(draft_token_ids, torch.Tensor) or draft_token_ids.shape != (batch, width):
        raise ValueError(f"draft_token_ids must have shape ({batch}, {width}), "
                         f"got {getattr(draft_token_ids, 'shape', draft_token_ids)!r}")
    if draft_token_ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"draft_token_ids must be an integer tensor, got {draft_token_ids.dtype}")
    device = draft_token_ids.device
    if num_draft_tokens is None:
        num_draft_tokens = torch.full((batch,), width, dtype=torch.int64, device=device)
    if num_draft_tokens.shape != (batch,) or bool(((num_draft_tokens < 0) | (num_draft_tokens > width)).any()):
        raise ValueError(f"num_draft_tokens must be ({batch},) values in [0, {width}], got {num_draft_tokens.tolist()}")
    num_draft_tokens = num_draft_tokens.to(device, torch.int64)
    valid = torch.arange(width, device=device) < num_draft_tokens.unsqueeze(-1)
    if vocab is not None:
        bad = valid & ((draft_token_ids < 0) | (draft_token_ids >= vocab))
        if bool(bad.any()):
            b, i = bad.nonzero()[0].tolist()
            raise ValueError(f"draft token {int(draft_token_ids[b, i])} at row {b} position {i} "
                             f"is outside [0, {vocab})")
    return num_draft_tokens, valid


def emit_tokens(draft_token_ids: torch.Tensor, num_accepted: torch.Tensor, last: torch.Tensor) -> SpecDecodeOutput:
    """Assemble [B, K+1] output rows: the first num_accepted[b] of draft_token_ids[b], then last[b], then
    PLACEHOLDER_TOKEN_ID. Shared by the chain verifiers here and the tree verifiers (minillm.speculative.tree)."""
    batch, width = draft_token_ids.shape
    out = torch.full((batch, width + 1), PLACEHOLDER_TOKEN_ID, dtype=torch.int64, device=draft_token_ids.device)
    out[:, :width] = draft_token_ids
    out[torch.arange(width + 1, device=out.device) >= num_accepted.unsqueeze(-1)] = PLACEHOLDER_TOKEN_ID
    out[torch.arange(batch, device=out.device), num_accepted] = last.to(out.device, torch.int64)
    return SpecDecodeOutput(out, num_accepted)


# >>> exercise ch09.greedy_verify
def greedy_accept(target_token_ids: torch.Tensor, draft_token_ids: torch.Tensor,
                  num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """Greedy verification of one step of drafts: the tokens each row appends, int64 [B, K+1].

    target_token_ids [B, K+1]: the target's token at every scored position: column 0 after the last emitted
    token, column i+1 after draft i. draft_token_ids [B, K]; num_draft_tokens [B] in [0, K]: positions
    i >= num_draft_tokens[b] are padding and never accepted.
    Accept drafts while each equals the target's token at its position; at the first mismatch emit the target's
    token there instead, and stop. When all num_draft_tokens[b] drafts are accepted, the target's token after the
    last one comes for free: the bonus token. So row b holds its accepted drafts, then exactly one token of the
    target, then -1 (PLACEHOLDER_TOKEN_ID) to the end: every step emits between 1 and k_b + 1 tokens.

    Example: target [[5, 7, 2, 9]], drafts [[5, 7, 3]], num_draft_tokens [3] -> [[5, 7, 2, -1]];
             drafts [[5, 7, 2]] -> [[5, 7, 2, 9]] (9 is the bonus); num_draft_tokens [1] -> [[5, 7, -1, -1]].
    """
    # >>> solution
    batch, width = draft_token_ids.shape
    device = draft_token_ids.device
    positions = torch.arange(width, device=device)
    valid = positions < num_draft_tokens.to(device).unsqueeze(-1)
    match = (draft_token_ids == target_token_ids[:, :width]) & valid
    num_accepted = match.long().cumprod(dim=1).sum(dim=1)  # length of the all-matching prefix
    out = torch.full((batch, width + 1), -1, dtype=torch.int64, device=device)
    out[:, :width] = torch.where(positions < num_accepted.unsqueeze(-1), draft_token_ids.long(), -1)
    # the target's token right after the accepted prefix: the correction, or the bonus after a full acceptance
    out[torch.arange(batch, device=device), num_accepted] = target_token_ids.long().gather(
        1, num_accepted.unsqueeze(-1)).squeeze(-1)
    return out
    # <<< solution
# <<< exercise


def greedy_verify(target_token_ids: torch.Tensor, draft_token_ids: torch.Tensor,
                  num_draft_tokens: torch.Tensor | None = None) -> SpecDecodeOutput:
    """Temperature 0: accept drafts while they equal the target's argmax; then emit the argmax where they first differ
    (or the bonus argmax after the last draft). Given the target's sampled token at each row instead of its argmax,
    the same code is the exact rule for deterministic drafts at any temperature (sample-and-match, see above).

    target_token_ids: int [B, K+1], the target's argmax at each draft position and at the bonus position.
    draft_token_ids: int [B, K]. num_draft_tokens: int [B] in [0, K] (None = K for every row); positions past a
    row's count are padding and never accepted.
    """
    if not isinstance(target_token_ids, torch.Tensor) or target_token_ids.dim() != 2 or target_token_ids.shape[1] < 1:
        raise ValueError(f"target_token_ids must be [B, K+1], "
                         f"got {getattr(target_token_ids, 'shape', target_token_ids)!r}")
    batch, width = target_token_ids.shape[0], target_token_ids.shape[1] - 1
    num_draft_tokens, _ = _check_drafts(draft_token_ids, num_draft_tokens, batch, width, None)
    token_ids = dispatch("ch09.greedy_verify", greedy_accept)(target_token_ids, draft_token_ids, num_draft_tokens)
    return SpecDecodeOutput(token_ids, (token_ids != PLACEHOLDER_TOKEN_ID).sum(dim=1) - 1)


# >>> exercise ch09.accept_reject
def accept_reject(p_x: torch.Tensor, q_x: torch.Tensor, uniforms: torch.Tensor,
                  num_draft_tokens: torch.Tensor) -> torch.Tensor:
    """The accept test of speculative sampling: how many drafts each row keeps. [B, K] -> int64 [B].

    p_x[b, i] is the target's probability of row b's i-th draft token x_i, q_x[b, i] the draft's (the
    distribution x_i was sampled from; 1.0 for a deterministic proposal), uniforms[b, i] a U[0, 1) draw.
    Accept x_i with probability min(1, p(x_i) / q(x_i)): accepted exactly when uniforms < p_x / q_x, which is
    uniforms * q_x < p_x without the division (q > 0 at every real draft). The drafts form a chain: draft i
    counts only when drafts 0..i-1 were all accepted, so the answer is the length of the accepted prefix.
    Positions i >= num_draft_tokens[b] are padding (any values) and never accepted.

    Example: p_x [[0.5, 0.9, 0.2]], q_x [[1.0, 0.6, 0.1]], uniforms [[0.4, 0.7, 0.0]], num_draft_tokens [2] -> [2]
    (0.4 < 0.5 / 1.0, 0.7 < 0.9 / 0.6, the third is padding); uniforms [[0.6, 0.0, 0.0]] -> [0].
    """
    # >>> solution
    width = p_x.shape[1]
    valid = torch.arange(width, device=p_x.device) < num_draft_tokens.to(p_x.device).unsqueeze(-1)
    accepted = (uniforms * q_x < p_x) & valid
    return accepted.long().cumprod(dim=1).sum(dim=1)  # stop at the first rejection
    # <<< solution
# <<< exercise


def rejection_sample(target_probs: torch.Tensor, draft_probs: torch.Tensor | None, draft_token_ids: torch.Tensor,
                     num_draft_tokens: torch.Tensor | None = None,
                     generators: list[torch.Generator | None] | None = None,
                     default_generator: torch.Generator | None = None) -> SpecDecodeOutput:
    """Speculative sampling over a batch: the emitted tokens are distributed exactly as the target's sampling.

    target_probs: float [B, K+1, V]; row b, position i is the target's distribution after the first i drafts of b
      (position k_b is the bonus position). Padded positions are ignored.
    draft_probs: float [B, K, V], the distributions the drafts were sampled from, or None for deterministic
      proposals (one-hot q: n-gram, lookahead, greedy drafts).
    draft_token_ids: int [B, K]; num_draft_tokens: int [B] in [0, K] (None = K for every row).
    generators: one torch.Generator or None per row (None rows draw from default_generator).
    Raises ValueError when a draft token has q(x) = 0: it cannot have been sampled from q.
    """
    if not isinstance(target_probs, torch.Tensor) or target_probs.dim() != 3 or target_probs.shape[1] < 1:
        raise ValueError(f"target_probs must be [B, K+1, V], got {getattr(target_probs, 'shape', target_probs)!r}")
    batch, width, vocab = target_probs.shape[0], target_probs.shape[1] - 1, target_probs.shape[2]
    if draft_probs is not None and (not isinstance(draft_probs, torch.Tensor)
                                    or draft_probs.shape != (batch, width, vocab)):
        raise ValueError(f"draft_probs must be None or of shape ({batch}, {width}, {vocab}), "
                         f"got {getattr(draft_probs, 'shape', draft_probs)!r}")
    num_draft_tokens, valid = _check_drafts(draft_token_ids, num_draft_tokens, batch, width, vocab)
    p = target_probs.float()
    rows = torch.arange(batch, device=p.device)
    x = draft_token_ids.long().clamp(0, vocab - 1)  # padding may hold anything; it is masked out below
    p_x = p[:, :width].gather(-1, x.unsqueeze(-1)).squeeze(-1)
    if draft_probs is None:
        q_x = torch.ones_like(p_x)
    else:
        q_x = draft_probs.float().gather(-1, x.unsqueeze(-1)).squeeze(-1)
        bad = valid & (q_x <= 0)
        if bool(bad.any()):
            b, i = bad.nonzero()[0].tolist()
            raise ValueError(f"draft token {int(x[b, i])} at row {b} position {i} has draft probability "
                             f"{float(q_x[b, i])}: drafts must be sampled from draft_probs (q(x) > 0)")
    uniforms, race = draw_noise(num_draft_tokens, width, vocab, p.device, generators, default_generator)
    num_accepted = dispatch("ch09.accept_reject", accept_reject)(p_x, q_x, uniforms, num_draft_tokens)
    # The one extra token: the residual at the first rejection, or p itself at the bonus position, which is the
    # residual against q = 0. One code path for both.
    p_last = p[rows, num_accepted]
    q_last = torch.zeros_like(p_last)
    if width > 0:
        at = num_accepted.clamp(max=width - 1)
        if draft_probs is None:
            q_last.scatter_(-1, x[rows, at].unsqueeze(-1), 1.0)
        else:
            q_last = draft_probs[rows, at].float()
        q_last = q_last * (num_accepted < num_draft_tokens).unsqueeze(-1)
    residual = dispatch("ch09.residual_distribution", residual_distribution)(p_last, q_last)
    last = (residual / race).argmax(dim=-1)
    return emit_tokens(draft_token_ids.long(), num_accepted, last)


def pad_per_sequence(rows: torch.Tensor, lengths: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Ragged rows [T, ...] (sequence b owns lengths[b] consecutive rows, T = sum(lengths)) -> [B, max_len, ...]
    padded with `fill`. The runner scores 1 + k_b rows per sequence; the verifiers take [B, K+1, V]."""
    lengths = torch.as_tensor(lengths, dtype=torch.int64, device=rows.device)
    if lengths.dim() != 1 or bool((lengths < 0).any()) or int(lengths.sum()) != rows.shape[0]:
        raise ValueError(f"lengths must be >= 0 and sum to the {rows.shape[0]} rows, got {lengths.tolist()}")
    width = int(lengths.max()) if lengths.numel() else 0
    out = rows.new_full((lengths.shape[0], width, *rows.shape[1:]), fill)
    out[torch.arange(width, device=rows.device) < lengths.unsqueeze(-1)] = rows  # row-major order = ragged order
    return out


def verify_draft_tokens(target_logits: torch.Tensor, draft_token_ids: torch.Tensor,
                        num_draft_tokens: torch.Tensor | None, temperatures: torch.Tensor,
                        top_ks: torch.Tensor | None = None, top_ps: torch.Tensor | None = None,
                        draft_probs: torch.Tensor | None = None,
                        generators: list[torch.Generator | None] | None = None,
                        default_generator: torch.Generator | None = None) -> SpecDecodeOutput:
    """The engine's one call: target logits [B, K+1, V] of a mixed batch -> the tokens each sequence appends.

    All-greedy batches take the argmax shortcut; otherwise every row goes through rejection_sample on
    logits_to_probs (whose greedy rows are one-hot, so they come out greedy). draft_probs: the draft's
    logits_to_probs under the same parameters, or None for deterministic proposals.
    """
    if not isinstance(temperatures, torch.Tensor) or bool((temperatures < 0).any()):
        raise ValueError(f"temperatures must be a tensor of values >= 0, got {temperatures!r}")
    if bool((temperatures == 0).all()):
        return greedy_verify(greedy_tokens(target_logits), draft_token_ids, num_draft_tokens)
    probs = logits_to_probs(target_logits, temperatures, top_ks, top_ps)
    return rejection_sample(probs, draft_probs, draft_token_ids, num_draft_tokens, generators, default_generator)
