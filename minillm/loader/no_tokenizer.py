"""A stand-in for a tokenizer where there is none: token ids in, token ids out, no text (chapter 1).

`LLM(model, skip_tokenizer_init=True)` (vLLM's option) runs a model without reading its tokenizer: prompts are
token ids, outputs carry token ids and empty text. Random-weights benchmarks use it too (their ids mean nothing).
The engine takes its end-of-sequence ids from the model's config, so EOS still ends a request.

What needs text is refused by name instead of failing quietly: a text prompt or a chat (`encode`,
`apply_chat_template`); the engine's request checks refuse stop strings, which would never match an empty text,
and structured outputs and bad_words, which need the tokens' bytes (it has no `token_bytes`).
Log-probabilities still come, with empty token texts.
"""
from __future__ import annotations

from typing import Any, Iterable

NO_TOKENIZER = ("this engine has no tokenizer (LLM(skip_tokenizer_init=True), or a random-weights model): "
                "give prompts as token ids")


class NoTokenizer:
    """Decodes every id sequence to "" and refuses to encode; no special tokens of its own."""

    eos_token_id = None
    bos_token_id = None
    chat_template = None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise ValueError(f"cannot encode {text[:40]!r}: {NO_TOKENIZER}")

    def decode(self, token_ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        return ""

    def decode_batch(self, batch: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        return [""] * len(batch)

    def apply_chat_template(self, messages: list[dict[str, Any]], *args: Any, **kwargs: Any) -> Any:
        raise ValueError(f"a chat needs a tokenizer and its chat template: {NO_TOKENIZER}")

    def __repr__(self) -> str:
        return "NoTokenizer()"
