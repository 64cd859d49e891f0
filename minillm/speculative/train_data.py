"""Self-distillation data for draft heads: the target's own generations and its features on them (chapter 9).

A head is trained to guess what *this* target will say, so the best data is what the target says (Medusa-2 and
EAGLE both distil on the target's outputs rather than on a fixed corpus). Offline and deterministic:

  1. prompts, in turn (PROMPT_KINDS): a hand-written chat request, a request to write code, a chat request to
     explain one of the standard library's docstrings (minillm.quant.calibration, the calibration split), a
     request to summarise / list the facts of / simplify a docstring, and a docstring as plain text to continue
     (chat requests rendered with the model's chat template when it has one). The code and summary kinds are
     there because serving traffic has them: a head trained on chat and prose alone accepted 3.0 tokens per
     step on chat but 1.6 on code and 1.3 on summaries (benchmarks/eagle_acceptance_probe.py, issue 11),
  2. generations: the engine decodes every prompt; half of the distinct prompts greedily, the rest (and every
     repeat of a prompt) sampled at temperature 0.8, so the heads also see the branches a sampled request takes;
     prompt + generation is one document,
  3. rows: the documents are concatenated and cut into rows of `seq_len` tokens,
  4. features: one cache-less prefill of the target over each row records the last hidden state *before* the
     final norm (a hook on the final norm) at every position: f [N, seq_len, d]. The post-norm state Medusa reads
     and the target's own next-token distribution are recomputed from f during training (norm, LM head: cheap).
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

# none of benchmarks/bench_speculative.py's prompts: its acceptance numbers must measure held-out requests (the
# first three of its chat prompts were here until issue 11, which made its chat numbers read high)
CHAT_PROMPTS = [
    "What are three ways to stay motivated when learning a new language?",
    "Explain the difference between a set and a dictionary in Python.",
    "Write a short, friendly message thanking a neighbour for watering your plants.",
    "Write a Python function that checks whether a string is a palindrome.",
    "Summarise the plot of a story about a lighthouse keeper who finds a message in a bottle.",
    "How does a refrigerator keep food cold?",
    "Give me a recipe for a simple vegetable soup.",
    "What is the capital of Australia, and why was it chosen?",
    "Explain recursion to a ten-year-old.",
    "List five common mistakes beginners make when learning to program.",
    "Write a haiku about autumn rain.",
    "What are the pros and cons of working from home?",
    "Describe how photosynthesis works in simple terms.",
    "Write a SQL query that returns the ten most recent orders with their customer names.",
    "How do I politely decline a meeting invitation?",
    "Explain what a hash table is and when to use one.",
    "Suggest a weekend itinerary for a first visit to Paris.",
    "Why is the sky blue?",
    "Write a Python class for a bank account with deposit and withdraw methods.",
    "What should I pack for a three-day hiking trip?",
    "Translate 'Good morning, how are you?' into French and Spanish.",
    "Explain the difference between weather and climate.",
    "Write a short motivational message for someone starting a new job.",
    "How can I improve my sleep habits?",
]


CODE_PROMPTS = [
    "Write a Python function that merges two sorted lists into one sorted list, with a docstring.",
    "Write a Python function that counts how often each word appears in a text and returns a dict.",
    "Write a Python class Queue with enqueue, dequeue and is_empty methods.",
    "Write a Python function that returns the factorial of n recursively, with type hints and a docstring.",
    "Here is a function:\n\ndef area(w, h):\n    return w * h\n\nAdd type hints and a docstring, then write two "
    "pytest tests for it.",
    "Write a Python function that reads a CSV file and returns the average of one column.",
    "Write a Python generator that yields the prime numbers below n.",
    "Write a Python function that reverses the words of a sentence, and show an example call.",
    "Write a Python dataclass Point with x and y and a method that returns its distance to another point.",
    "Write a Python function that flattens a nested list, with a docstring and an example.",
    "Write a JavaScript function that removes duplicate values from an array.",
    "Write a Python function binary_search(items, target) that returns the index or -1, with a docstring.",
]
SUMMARY_REQUESTS = [  # each followed by a blank line and a docstring of the calibration split
    "Summarise the following text in three sentences.",
    "List the key facts of this text as bullet points.",
    "Rewrite this text in simple words for a beginner, keeping its facts.",
    "Give a one-paragraph summary of this documentation.",
]
PROMPT_KINDS = ("chat", "code", "explain", "summarise", "continue")

@dataclass
class DistillData:
    tokens: torch.Tensor  # int64 [N, seq_len]
    features: torch.Tensor  # [N, seq_len, d]: the target's pre-final-norm hidden state at each position

    def __post_init__(self) -> None:
        if self.tokens.shape != self.features.shape[:2]:
            raise ValueError(f"tokens {tuple(self.tokens.shape)} and features {tuple(self.features.shape)} disagree")


def build_prompts(tokenizer: Any, num_prompts: int, max_prompt_tokens: int = 192) -> list[list[int]]:
    """`num_prompts` prompts, the PROMPT_KINDS in turn (chat request, code request, docstring to explain,
    docstring to summarise, docstring to continue), each cut to max_prompt_tokens."""
    from minillm.quant.calibration import calibration_texts
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int) or num_prompts < 1:
        raise ValueError(f"num_prompts must be an integer >= 1, got {num_prompts!r}")

    def chat(text: str) -> list[int]:
        try:
            rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}])
            return tokenizer.encode(rendered, add_special_tokens=False)
        except Exception:  # no chat template (tiny test tokenizers): the request as plain text
            return tokenizer.encode(text)

    docs = calibration_texts("calibration")
    prompts = []
    for i in range(num_prompts):
        turn, kind = divmod(i, len(PROMPT_KINDS))
        doc = docs[(2 * turn + (kind == 3)) % len(docs)]  # explain and summarise read different docstrings
        if PROMPT_KINDS[kind] == "chat":
            prompts.append(chat(CHAT_PROMPTS[turn % len(CHAT_PROMPTS)]))
        elif PROMPT_KINDS[kind] == "code":
            prompts.append(chat(CODE_PROMPTS[turn % len(CODE_PROMPTS)]))
        elif PROMPT_KINDS[kind] == "explain":
            prompts.append(chat("Explain in plain words what this documentation says:\n\n" + doc[:600]))
        elif PROMPT_KINDS[kind] == "summarise":
            prompts.append(chat(SUMMARY_REQUESTS[turn % len(SUMMARY_REQUESTS)] + "\n\n" + doc[:600]))
        else:
            prompts.append(tokenizer.encode(doc))
    return [p[:max_prompt_tokens] or [0] for p in prompts]


def generate(model: nn.Module, tokenizer: Any, model_config: ModelConfig, prompts: list[list[int]],
             max_new_tokens: int, device: torch.device, dtype: torch.dtype, max_num_seqs: int = 256,
             seed: int = 0, deadline: float | None = None) -> list[list[int]]:
    """prompt + the target's continuation for every prompt (see the module docstring for which are greedy),
    through the engine (paged KV, continuous batching of up to max_num_seqs requests; CUDA graphs on a GPU).
    `deadline` (a time.perf_counter() value): past it the unfinished requests are aborted and kept as far as
    they got (a shorter generation is still the target's own text; one never started is its prompt alone)."""
    from minillm.engine.llm_engine import LLMEngine
    longest = max(len(p) for p in prompts) + max_new_tokens
    engine = LLMEngine(model, tokenizer, model_config,
                       EngineConfig(max_num_seqs=min(max_num_seqs, len(prompts)), max_model_len=longest),
                       device=device, dtype=dtype, seed=seed)
    seen: set[tuple[int, ...]] = set()
    for i, prompt in enumerate(prompts):
        greedy = tuple(prompt) not in seen and len(seen) % 2 == 0  # a repeat greedy would repeat the document
        seen.add(tuple(prompt))
        params = SamplingParams(temperature=0.0 if greedy else 0.8, top_p=0.95, max_tokens=max_new_tokens,
                                seed=seed + i)
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
    return [documents[str(i)] for i in range(len(prompts))]


def pack_rows(documents: list[list[int]], seq_len: int) -> torch.Tensor:
    """The documents end to end, cut into rows [N, seq_len] (the tail that does not fill a row is dropped)."""
    stream = [t for doc in documents for t in doc]
    n = len(stream) // seq_len
    if n < 1:
        raise ValueError(f"{len(stream)} tokens of generations, fewer than one row of seq_len={seq_len}")
    return torch.tensor(stream[:n * seq_len], dtype=torch.int64).view(n, seq_len)


@torch.inference_mode()
def record_features(model: nn.Module, rows: torch.Tensor, device: torch.device, rows_per_batch: int = 32,
                    progress: bool = True) -> torch.Tensor:
    """The target's pre-final-norm hidden state at every position of every row, [N, seq_len, d] (cache-less
    prefills, one row per sequence); `progress`: a progress bar."""
    captured: list[torch.Tensor] = []
    handle = model.model.norm.register_forward_hook(lambda module, args, out: captured.append(out[1]))
    n, seq_len = rows.shape
    features = []
    try:
        for start in tqdm(range(0, n, rows_per_batch), desc="recording features", unit="batch", disable=not progress):
            ids = rows[start:start + rows_per_batch].to(device)
            b = ids.shape[0]
            captured.clear()
            with forward_context(prefill_metadata([seq_len] * b, device=device)):
                model(ids.flatten(), torch.arange(seq_len, device=device).repeat(b))
            features.append(captured[-1].view(b, seq_len, -1).clone())
    finally:
        handle.remove()
    return torch.cat(features)


def distill_data(model: nn.Module, tokenizer: Any, model_config: ModelConfig, num_prompts: int,
                 max_new_tokens: int, seq_len: int, device: torch.device, dtype: torch.dtype,
                 seed: int = 0, max_prompt_tokens: int = 192, deadline: float | None = None) -> DistillData:
    """Prompts -> the target's generations (cut short at `deadline`, see generate) -> rows -> the target's
    features on them."""
    prompts = build_prompts(tokenizer, num_prompts, max_prompt_tokens)
    rows = pack_rows(generate(model, tokenizer, model_config, prompts, max_new_tokens, device, dtype, seed=seed,
                              deadline=deadline), seq_len)
    return DistillData(rows, record_features(model, rows, device))
