"""An HF tokenizer.json as GGUF tokenizer metadata, so an HF directory can become a GGUF file (chapter 8).

A GGUF file carries a tokenizer as ingredients (minillm/loader/tokenizer.py rebuilds it from them):

    tokenizer.ggml.model        "gpt2": byte-level BPE (the only kind minillm writes)
    tokenizer.ggml.pre          the *name* of the word-splitting rule that runs before BPE
    tokenizer.ggml.tokens       the vocabulary, in id order
    tokenizer.ggml.token_type   1 normal, 3 control (matched whole, hidden when decoding), 4 user-defined, 5 unused
    tokenizer.ggml.merges       "a b" strings, in priority order
    tokenizer.ggml.{bos,eos,padding,unknown}_token_id, add_bos_token, add_eos_token, tokenizer.chat_template

Everything but `pre` is a direct copy. The splitting rule is a regex inside tokenizer.json that GGUF does not
store; llama.cpp's converter recognises it by hashing the tokenizer's output on a test text. We do the same,
by behaviour: for each rule minillm knows, build the tokenizer a reader would build from the metadata, and keep
the first rule whose ids equal the original's on every probe text (digits, contractions, whitespace runs,
code, non-Latin script, special tokens, and real prose). If none matches, writing fails: a GGUF whose
tokenizer silently splits differently would produce unfamiliar ids and quietly worse text.
"""
from __future__ import annotations

import inspect
import json
import os
import tempfile
from typing import Any

from minillm.loader.gguf_writer import GGUFValueType, GGUFWriter
from minillm.loader.tokenizer import CONTROL, PRE_TOKENIZERS, USER_DEFINED, Tokenizer

NORMAL, UNUSED = 1, 5
# one name per distinct splitting rule (several names in PRE_TOKENIZERS are aliases), most specific first: where
# two rules give the same ids on every probe (SmolLM2's vocabulary has no multi-digit tokens, so splitting digits
# apart changes nothing), the one the model was trained with is the better name
CANDIDATE_PRE = ("smollm", "llama-bpe", "qwen2", "default")
PROBES = (
    "Hello world! It's 2024; we'll see 12345 or 3.14159 and 1,000,000 items, a1b2 x99.",
    "I'M HERE, you're there. Don't, won't, shouldn't've.",
    "  leading spaces,\ttabs\t\tand\n\nnewlines \r\n trailing   ",
    "def f(x):\n    return x**2  # square\n\nprint(f(7))",
    "Ünïcödé: naïve café, Straße, 日本語のテキスト, русский текст, emoji 🙂👍",
)
Metadata = list[tuple[str, Any, GGUFValueType, GGUFValueType | None]]


def _probe_texts(tokenizer: Tokenizer) -> list[str]:
    special = [t for t in (tokenizer.bos_token, tokenizer.eos_token) if t]
    prose = [inspect.getdoc(m) or "" for m in (json, os, tempfile)]
    return list(PROBES) + [f"{s}hello{s} world" for s in special] + prose


def _vocabulary(tokenizer: Tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    data = json.loads(tokenizer.backend.to_str())
    model = data.get("model", {})
    if model.get("type") != "BPE":
        raise ValueError(f"minillm writes byte-level BPE tokenizers to GGUF; this tokenizer.json has a "
                         f"{model.get('type')!r} model")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens", [])}
    vocab.update({content: t["id"] for content, t in added.items()})
    if max(vocab.values()) >= vocab_size:
        raise ValueError(f"the tokenizer has token id {max(vocab.values())}, beyond the model's vocab_size "
                         f"{vocab_size}")
    n = vocab_size
    tokens, types = [f"[PAD{i}]" for i in range(n)], [UNUSED] * n  # rows the model has but the tokenizer lacks
    for token, i in vocab.items():
        tokens[i] = token
        types[i] = (CONTROL if added[token].get("special") else USER_DEFINED) if token in added else NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def tokenizer_metadata(tokenizer: Tokenizer, vocab_size: int) -> Metadata:
    """(key, value, type, element type) of every tokenizer.* key for `tokenizer`, checked to encode identically."""
    if not isinstance(tokenizer, Tokenizer):
        raise TypeError(f"tokenizer must be minillm's Tokenizer, got {type(tokenizer).__name__}")
    tokens, types, merges = _vocabulary(tokenizer, vocab_size)
    V = GGUFValueType
    ids = tokenizer.encode("a", add_special_tokens=True)
    meta: Metadata = [("tokenizer.ggml.model", "gpt2", V.STRING, None),
                      ("tokenizer.ggml.tokens", tokens, V.ARRAY, V.STRING),
                      ("tokenizer.ggml.token_type", types, V.ARRAY, V.INT32),
                      ("tokenizer.ggml.merges", merges, V.ARRAY, V.STRING)]
    for key, token_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id),
                          ("padding", tokenizer.pad_token_id), ("unknown", tokenizer.unk_token_id)):
        if token_id is not None:
            meta.append((f"tokenizer.ggml.{key}_token_id", token_id, V.UINT32, None))
    meta += [("tokenizer.ggml.add_bos_token", bool(ids) and ids[0] == tokenizer.bos_token_id, V.BOOL, None),
             ("tokenizer.ggml.add_eos_token", bool(ids) and ids[-1] == tokenizer.eos_token_id, V.BOOL, None)]
    if tokenizer.chat_template:
        meta.append(("tokenizer.chat_template", tokenizer.chat_template, V.STRING, None))
    probes = _probe_texts(tokenizer)
    expected = [tokenizer.encode(text) for text in probes]
    with tempfile.TemporaryDirectory() as tmp:
        for pre in CANDIDATE_PRE:
            path = os.path.join(tmp, f"{pre}.gguf")  # metadata only: exactly what a reader will see
            writer = GGUFWriter(path)
            for key, value, vtype, etype in meta + [("tokenizer.ggml.pre", pre, V.STRING, None)]:
                writer.add_metadata(key, value, vtype, etype)
            rebuilt = Tokenizer.from_gguf(writer.write())
            if all(rebuilt.encode(text) == ids for text, ids in zip(probes, expected)):
                return meta + [("tokenizer.ggml.pre", pre, V.STRING, None)]
    aliases = ", ".join(sorted(set(PRE_TOKENIZERS) - set(CANDIDATE_PRE)))
    raise ValueError(f"the tokenizer's word splitting matches none of the GGUF pre-tokenizers minillm knows "
                     f"({', '.join(CANDIDATE_PRE)}; aliases: {aliases}); it cannot be written to GGUF faithfully")
