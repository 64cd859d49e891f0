"""Shared test helpers: a byte-level tokenizer for tiny random models, a tiny HF checkpoint, the one-thread fixture.

On a busy 2-core machine torch's two intra-op threads fight each other and small ops slow down many times over;
test modules that run many small forwards import `one_thread` (autouse, module scope) to pin torch to one thread.
"""
from __future__ import annotations

import pytest
import torch

EOS = 257


class ByteTokenizer:
    """Token i < 256 is byte i; 256.. are special tokens (257 is EOS) that decode to nothing, or to "<|i|>" with
    skip_special_tokens=False (as a real tokenizer writes "<|im_end|>")."""

    eos_token_id = EOS

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:  # (it has no special tokens to add)
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if skip_special_tokens:
            return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")
        return b"".join(bytes([t]) if t < 256 else f"<|{t}|>".encode() for t in token_ids).decode("utf-8", "replace")

    def token_bytes(self, token_id: int) -> bytes:
        return bytes([token_id]) if token_id < 256 else b""


def run_to_completion(engine, prompts: list, params) -> list[list[int]]:
    """Add every prompt to `engine` and step it until all finish; each prompt's generated token ids, in prompt
    order. `params`: one SamplingParams for all, or a list with one per prompt."""
    per_prompt = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
    ids = [engine.add_request(None, p, sp) for p, sp in zip(prompts, per_prompt)]
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    return [done[i] for i in ids]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_qwen2_checkpoint(path, sliding_window: int | None = None) -> None:
    """Write a tiny random Qwen2 checkpoint (q/k/v biases, untied LM head) and a word-level BPE tokenizer ("a",
    "b", "ab", "w3" .. "w111") into directory `path`: a real HF directory that worker processes read themselves.
    sliding_window: every layer attends through a window of that many keys (use_sliding_window, max_window_layers 0)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer as Backend
    from tokenizers import models, pre_tokenizers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=112,
                                      max_position_embeddings=256, use_sliding_window=sliding_window is not None,
                                      sliding_window=sliding_window, max_window_layers=0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(path, safe_serialization=True)
    backend = Backend(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, **{f"w{i}": i for i in range(3, 112)}},
                                 merges=[("a", "b")]))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(path / "tokenizer.json"))
