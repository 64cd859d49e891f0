"""Self-distillation data for draft heads: the target's own generations and its features on them (chapter 9).

A head is trained to guess what *this* target will say, so the best data is what the target says (Medusa-2 and
EAGLE both distil on the target's outputs rather than on a fixed corpus). Offline and deterministic:

  1. prompts: minillm.speculative.train_prompts builds thousands of distinct requests (chat, how-to, stories,
     emails, code in ten languages, code to explain, documents to summarise, sentences to rewrite) in the model's
     chat template, and splits them *by prompt* into training and held-out requests before anything is generated
     (a held-out answer is never trained on: re-sampled training prompts made the old held-out numbers read high),
  2. generations: the engine answers every prompt. Training prompts alternate greedy and sampled answers
     (temperature 0.7, 0.8, 0.9, 1.0 in turn, top-p 0.95): self-distillation as EAGLE does it on ShareGPT, the
     sampled ones showing the branches a sampled request takes. Held-out prompts are answered greedily, so every
     position of their answers is one a greedy engine would draft at (train_eval.held_out_acceptance).
     Some answers go on past the end of the turn (ignore_eos), as benchmark runs with a fixed output length do:
     the target then writes a new turn of an imagined conversation, which a head never shown it drafts badly
     (issue 11: the P7 summaries end after 73-97 of their 128 tokens; chat and code answers run past 128),
  3. features: one cache-less prefill of each *whole document* (prompt + answer; documents batched as packed
     variable-length sequences) records the target's last hidden state before the final norm at every position,
     each position seeing its document's whole context, as in the engine (a hook on the final norm),
  4. rows: training documents end to end, cut into rows of `seq_len` tokens, with each position's document index
     (`segments`) and whether a drafting chain can start there (`drafted`: x_{t+1} is an answer token, the
     positions the engine drafts from; prompt positions are context only, as EAGLE's loss mask has it).
     Held-out documents stay whole, one per row, right-padded (`HeldOut`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from minillm.config import EngineConfig, ModelConfig
from minillm.forward_context import forward_context, prefill_metadata
from minillm.sampling_params import SamplingParams
from minillm.speculative.train_prompts import prompt_texts, split_prompts

SAMPLED_TEMPERATURES = (0.7, 0.8, 0.9, 1.0)  # the sampled training answers, in turn
IGNORE_EOS_EVERY = 4  # one training answer in 4 (half the held-out ones) runs past its end of turn (module docstring)
HELD_OUT_FRACTION = 0.05
FEATURE_TOKENS_PER_BATCH = 16384  # documents packed into one cache-less prefill when recording features


@dataclass
class HeldOut:
    """Held-out documents, one per row, right-padded with token 0 and zero features (causal: padding never reaches
    a real position). A document is prompt_lengths[i] prompt tokens, then the target's greedy answer."""
    tokens: torch.Tensor  # int64 [H, L]
    features: torch.Tensor  # [H, L, d]
    lengths: torch.Tensor  # int64 [H]
    prompt_lengths: torch.Tensor  # int64 [H]


@dataclass
class DistillData:
    tokens: torch.Tensor  # int64 [N, seq_len]
    features: torch.Tensor  # [N, seq_len, d]: the target's pre-final-norm hidden state at each position
    segments: torch.Tensor | None = None  # int64 [N, seq_len]: the document each position belongs to
    drafted: torch.Tensor | None = None  # bool [N, seq_len]: a drafting chain starts here at inference
    held_out: HeldOut | None = None  # None: rows built by hand, the last tenth held out (held_out_rows)

    def __post_init__(self) -> None:
        if self.tokens.shape != self.features.shape[:2]:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and features {tuple(self.features.shape)} disagree")
        for name in ("segments", "drafted"):
            value = getattr(self, name)
            if value is not None and value.shape != self.tokens.shape:
                raise ValueError(f"{name} {tuple(value.shape)} and tokens {tuple(self.tokens.shape)} disagree")


def encode_request(tokenizer: Any, text: str) -> list[int]:
    """A user turn in the chat template, ready for the answer (plain text where the tokenizer has no template)."""
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        return tokenizer.encode(rendered, add_special_tokens=False)
    except Exception:  # no chat template (tiny test tokenizers): the request as plain text
        return tokenizer.encode(text)


def _encode_within(tokenizer: Any, text: str, max_tokens: int) -> list[int]:
    """encode_request, the request's text shortened until the whole turn fits in max_tokens (the template's
    header and answer prompt stay whole); the last max_tokens tokens if even a bare turn does not fit."""
    ids = encode_request(tokenizer, text)
    while len(ids) > max_tokens and len(text) > 1:
        text = text[:max(1, len(text) * max_tokens // len(ids) - 8)]
        ids = encode_request(tokenizer, text)
    return ids[-max_tokens:] or [0]


def build_prompts(tokenizer: Any, num_prompts: int, max_prompt_tokens: int = 256, seed: int = 0,
                  held_out_fraction: float = HELD_OUT_FRACTION) -> tuple[list[list[int]], list[list[int]]]:
    """(training prompts, held-out prompts) as token ids, from train_prompts.prompt_texts(num_prompts), split by
    prompt; a request too long for max_prompt_tokens has its text shortened until it fits (_encode_within)."""
    if isinstance(max_prompt_tokens, bool) or not isinstance(max_prompt_tokens, int) or max_prompt_tokens < 1:
        raise ValueError(f"max_prompt_tokens must be an integer >= 1, got {max_prompt_tokens!r}")
    texts = [text for _, text in prompt_texts(num_prompts, seed)]
    train, held = split_prompts(texts, held_out_fraction)
    encoded = [_encode_within(tokenizer, t, max_prompt_tokens) for t in texts]
    return [encoded[i] for i in train], [encoded[i] for i in held]


def generate(model: nn.Module, tokenizer: Any, model_config: ModelConfig, prompts: list[list[int]],
             max_new_tokens: int, device: torch.device, dtype: torch.dtype, temperatures: list[float] | None = None,
             max_num_seqs: int = 256, seed: int = 0, deadline: float | None = None,
             ignore_eos: list[bool] | None = None) -> list[list[int]]:
    """prompt + the target's answer for every prompt, through the engine (paged KV, continuous batching of up to
    max_num_seqs requests; CUDA graphs on a GPU). temperatures[i]: 0 for greedy (None: all greedy);
    ignore_eos[i]: generate all max_new_tokens, past the end of the turn (None: stop at EOS).
    `deadline` (a time.perf_counter() value): past it the unfinished requests are aborted and kept as far as
    they got (a shorter generation is still the target's own text; one never started is its prompt alone)."""
    from minillm.engine.llm_engine import LLMEngine
    for name, values in (("temperatures", temperatures), ("ignore_eos", ignore_eos)):
        if values is not None and len(values) != len(prompts):
            raise ValueError(f"{len(values)} {name} for {len(prompts)} prompts")
    longest = max(len(p) for p in prompts) + max_new_tokens
    engine = LLMEngine(model, tokenizer, model_config,
                       EngineConfig(max_num_seqs=min(max_num_seqs, len(prompts)), max_model_len=longest),
                       device=device, dtype=dtype, seed=seed)
    for i, prompt in enumerate(prompts):
        temperature = 0.0 if temperatures is None else temperatures[i]
        params = SamplingParams(temperature=temperature, top_p=0.95 if temperature else 1.0, max_tokens=max_new_tokens,
                                seed=seed + i, ignore_eos=bool(ignore_eos and ignore_eos[i]))
        engine.add_request(str(i), prompt, params)
    documents: dict[str, list[int]] = {}
    with tqdm(total=len(prompts), desc="generating", unit="doc") as bar:
        while engine.has_unfinished_requests():
            if deadline is not None and time.perf_counter() > deadline:
                for request_id in [str(i) for i in range(len(prompts)) if str(i) not in documents]:
                    out = engine.abort(request_id)
                    if out is not None:
                        documents[request_id] = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
                break
            for out in engine.step():
                if out.finished:
                    documents[out.request_id] = list(out.prompt_token_ids) + list(out.outputs[0].token_ids)
                    bar.update(1)
    engine.shutdown()
    return [documents.get(str(i), prompts[i]) for i in range(len(prompts))]


def _prefill_features(model: nn.Module, ids: torch.Tensor, lengths: list[int], device: torch.device) -> torch.Tensor:
    """One cache-less prefill of packed sequences: the pre-final-norm hidden state of every token, [sum(lengths), d]."""
    captured: list[torch.Tensor] = []
    handle = model.model.norm.register_forward_hook(lambda module, args, out: captured.append(out[1]))
    try:
        positions = torch.cat([torch.arange(n, device=device) for n in lengths])
        with forward_context(prefill_metadata(lengths, device=device)):
            model(ids.to(device), positions)
    finally:
        handle.remove()
    return captured[-1].clone()


@torch.inference_mode()
def record_features(model: nn.Module, rows: torch.Tensor, device: torch.device, rows_per_batch: int = 32,
                    progress: bool = True) -> torch.Tensor:
    """The target's pre-final-norm hidden state at every position of every row, [N, seq_len, d] (cache-less
    prefills, each row a sequence of its own); `progress`: a progress bar."""
    n, seq_len = rows.shape
    features = []
    for start in tqdm(range(0, n, rows_per_batch), desc="recording features", unit="batch", disable=not progress):
        ids = rows[start:start + rows_per_batch]
        features.append(_prefill_features(model, ids.flatten(), [seq_len] * ids.shape[0], device)
                        .view(ids.shape[0], seq_len, -1))
    return torch.cat(features)


@torch.inference_mode()
def document_features(model: nn.Module, documents: list[list[int]], device: torch.device,
                      tokens_per_batch: int = FEATURE_TOKENS_PER_BATCH) -> list[torch.Tensor]:
    """[len(doc), d] per document, each recorded over its whole document (documents packed into prefills of about
    tokens_per_batch tokens)."""
    out: list[torch.Tensor] = []
    batch: list[list[int]] = []

    def flush() -> None:
        if batch:
            lengths = [len(d) for d in batch]
            flat = _prefill_features(model, torch.tensor([t for d in batch for t in d]), lengths, device)
            out.extend(flat.split(lengths))
            batch.clear()
    for doc in tqdm(documents, desc="recording features", unit="doc"):
        if batch and sum(map(len, batch)) + len(doc) > tokens_per_batch:
            flush()
        batch.append(doc)
    flush()
    return out


def pack_rows(documents: list[list[int]], seq_len: int) -> torch.Tensor:
    """The documents end to end, cut into rows [N, seq_len] (the tail that does not fill a row is dropped)."""
    stream = [t for doc in documents for t in doc]
    n = len(stream) // seq_len
    if n < 1:
        raise ValueError(f"{len(stream)} tokens of generations, fewer than one row of seq_len={seq_len}")
    return torch.tensor(stream[:n * seq_len], dtype=torch.int64).view(n, seq_len)


def pack_documents(documents: list[list[int]], features: list[torch.Tensor], prompt_lengths: list[int],
                   seq_len: int) -> DistillData:
    """Training rows: documents end to end cut into rows of seq_len, with segments (document index) and drafted
    (position t where x_{t+1} is an answer token: t >= prompt length - 1, and not a document's last position)."""
    tokens = pack_rows(documents, seq_len)
    n = tokens.numel()
    segments = torch.cat([torch.full((len(d),), i) for i, d in enumerate(documents)])[:n]
    drafted = torch.cat([(torch.arange(len(d)) >= p - 1) & (torch.arange(len(d)) < len(d) - 1)
                         for d, p in zip(documents, prompt_lengths)])[:n]
    return DistillData(tokens, torch.cat(features)[:n].view(*tokens.shape, -1), segments.view(tokens.shape),
                       drafted.view(tokens.shape))


def pad_documents(documents: list[list[int]], features: list[torch.Tensor], prompt_lengths: list[int]) -> HeldOut:
    """Held-out documents one per row, right-padded to the longest."""
    longest = max(len(d) for d in documents)
    tokens = torch.zeros(len(documents), longest, dtype=torch.int64)
    padded = features[0].new_zeros(len(documents), longest, features[0].shape[-1])
    for i, (doc, f) in enumerate(zip(documents, features)):
        tokens[i, :len(doc)] = torch.tensor(doc)
        padded[i, :len(doc)] = f
    return HeldOut(tokens, padded, torch.tensor([len(d) for d in documents]), torch.tensor(prompt_lengths))


def distill_data(model: nn.Module, tokenizer: Any, model_config: ModelConfig, num_prompts: int,
                 max_new_tokens: int, seq_len: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 0, max_prompt_tokens: int = 256, deadline: float | None = None,
                 held_out_fraction: float = HELD_OUT_FRACTION, sample_seed: int | None = None) -> DistillData:
    """Prompts split by prompt -> the target's answers (held-out ones first and greedily, so a deadline never
    leaves the evaluation empty; cut short at `deadline`, see generate) -> features over whole documents ->
    training rows and held-out documents.

    `seed` orders the prompts and so decides which are held out; `sample_seed` (default: seed) seeds the sampled
    answers alone. Another sample_seed with the same seed gives new sampled answers to the same training prompts
    and the same held-out requests: fresh data for a head that continues training (train_heads' `init`) without
    its held-out measurement reading a request an earlier run trained on."""
    train, held = build_prompts(tokenizer, num_prompts, max_prompt_tokens, seed, held_out_fraction)
    temperatures = [0.0] * len(held) + [0.0 if i % 2 == 0 else SAMPLED_TEMPERATURES[(i // 2) % 4]
                                         for i in range(len(train))]
    past_eos = [i % 2 == 1 for i in range(len(held))] + [i % IGNORE_EOS_EVERY == 1 for i in range(len(train))]
    prompts = held + train
    documents = generate(model, tokenizer, model_config, prompts, max_new_tokens, device, dtype, temperatures,
                         seed=seed if sample_seed is None else sample_seed, deadline=deadline, ignore_eos=past_eos)
    answered = [i for i, (d, p) in enumerate(zip(documents, prompts)) if len(d) > len(p)]  # aborted unstarted: none
    features = dict(zip(answered, document_features(model, [documents[i] for i in answered], device)))
    held_ids = [i for i in answered if i < len(held)]
    train_ids = [i for i in answered if i >= len(held)]
    if not held_ids or not train_ids:
        raise ValueError(f"generation answered {len(held_ids)} held-out and {len(train_ids)} training prompts before "
                         f"its deadline; both need at least one (raise the time budget or lower num_prompts)")
    data = pack_documents([documents[i] for i in train_ids], [features[i] for i in train_ids],
                          [len(prompts[i]) for i in train_ids], seq_len)
    data.held_out = pad_documents([documents[i] for i in held_ids], [features[i] for i in held_ids],
                                  [len(prompts[i]) for i in held_ids])
    return data
