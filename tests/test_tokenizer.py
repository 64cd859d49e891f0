"""Our GGUF-built tokenizer and chat template against transformers' (the oracle), plus input validation.

One known difference, checked explicitly: SmolLM's files say `tokenizer.ggml.pre = "smollm"`, which
llama.cpp (and SmolLM2's own tokenizer.json) implement as "split every digit, then the GPT-2 regex".
transformers' GGUF converter skips the digit split, so on a whitespace run before a digit ("a  12")
it cuts the spaces differently. There we follow the model's real tokenizer, and the test compares
against transformers' vocabulary with SmolLM2's pre-tokenizer put back.
"""
from __future__ import annotations

import os
import re

import gguf
import numpy as np
import pytest
from tokenizers import Tokenizer as Backend
from tokenizers import pre_tokenizers

from minillm.loader.chat_template import ChatTemplateError
from minillm.loader.gguf import GGUFError
from minillm.loader.model_files import default_model_path
from minillm.loader.tokenizer import Tokenizer

GGUF_PATH = default_model_path()

BASE_STRINGS = [
    "Hello, world!", "hello world", " leading space", "trailing space ", "", " ", "a",
    "The quick brown fox jumps over the lazy dog.", "I'm sure you'll see they've done it, we'd say.",
    "Café, naïve, façade, résumé, Ångström, Smørrebrød", "日本語のテキストです。", "中文分词测试，你好世界！",
    "한국어 문장입니다", "مرحبا بالعالم", "שלום עולם", "Привет, мир! Ёлка.", "Ελληνικά γράμματα",
    "emoji 😀😃🎉 and flags 🇫🇷🇯🇵", "family 👨‍👩‍👧‍👦 and 🏳️‍🌈 and 👍🏽", "🤷‍♂️🤷🏿‍♀️",
    "def f(x):\n    return x ** 2  # square\n", "for (int i = 0; i < n; ++i) { a[i] += b[i]; }",
    "print('tabs\\there')\n\tindented\n\t\tdouble", "SELECT * FROM users WHERE id = 42;",
    "   three leading spaces", "multiple     spaces     inside", "\n\n\nnewlines\n\n", "\r\nwindows\r\nlines",
    "\t\t\ttabs", " \t \n mixed \t whitespace \n ", "3.14159 2.71828 1e-10 -42 +7", "1234567890",
    "Call 555-0123 or +1 (800) 555-0199", "2024-01-15T12:34:56Z", "x = 1_000_000; y = 0xFF; z = 0b1010",
    "<|im_start|>user\nHi<|im_end|>\n", "<|endoftext|>", "text<|im_end|>more<|im_start|>",
    "<repo_name>minillm<file_sep>a.py", "not special: <|im_star|> <im_end>",
    "URL: https://example.com/path?q=1&r=two#frag", "e-mail: someone@example.org", "$$\\int_0^1 x^2 dx$$",
    "CamelCaseIdentifier snake_case_identifier kebab-case-identifier", "ALL CAPS SHOUTING!!!",
    "punctuation... ?!?! ;;; ::: ---", "\u00a0non-breaking\u00a0space", "zero\u200bwidth\u200bspace",
    "combining: e\u0301 a\u0308 n\u0303", "math: ∑ ∏ ∫ √ ∞ ≠ ≤ ≥", "Ω≈ç√∫˜µ≤≥÷",
]


def _strings() -> list[str]:
    """The hand-written list, plus deterministic pairings and whitespace/number framings of it."""
    n = len(BASE_STRINGS)
    out = list(BASE_STRINGS)
    out += [BASE_STRINGS[i] + BASE_STRINGS[(7 * i + 3) % n] for i in range(n)]
    out += [frame.format(BASE_STRINGS[(5 * i + 1) % n]) for i, frame in
            enumerate(["  {}", "{}\n", "\t{} 12", "{}  2024", "'{}'", "({})", "{}\n\n 7"] * 6)]
    return list(dict.fromkeys(out))  # deduplicated, order kept


STRINGS = _strings()
SPECIAL_TEXT = re.compile(r"<\|im_start\|>|<\|im_end\|>|<\|endoftext\|>|<repo_name>|<file_sep>")


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    return Tokenizer.from_gguf(GGUF_PATH)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(GGUF_PATH), gguf_file=os.path.basename(GGUF_PATH))


@pytest.fixture(scope="module")
def smollm2_reference(hf) -> Backend:
    """transformers' vocabulary and merges with SmolLM2's own pre-tokenizer (digits split first)."""
    backend = Backend.from_str(hf.backend_tokenizer.to_str())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    return backend


def test_string_list_is_large_and_varied():
    assert len(STRINGS) >= 100 and len(set(STRINGS)) == len(STRINGS)


def test_ids_match_transformers(ours, hf, smollm2_reference):
    same_as_transformers, divergent = 0, []
    for text in STRINGS:
        got = ours.encode(text)
        assert got == smollm2_reference.encode(text).ids, text
        theirs = hf.encode(text)
        if got == theirs:
            same_as_transformers += 1
        else:
            divergent.append(text)
    # Divergence is only the known digit-split case: whitespace right before a digit.
    assert all(re.search(r"\s\d", text) for text in divergent), divergent
    assert same_as_transformers >= 100 and len(divergent) <= len(STRINGS) // 5
    assert ours.encode("a  12") == [81, 256, 33, 34]  # "a", "  ", "1", "2": SmolLM2's own tokenization


def test_decode_matches_transformers_and_round_trips(ours, hf):
    for text in STRINGS:
        ids = ours.encode(text)
        assert ours.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False) == text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
        if not SPECIAL_TEXT.search(text):
            assert ours.decode(ids) == text


def test_special_tokens(ours, hf):
    assert (ours.vocab_size, ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (49152, 1, 2, 2)
    assert (ours.bos_token, ours.eos_token) == (hf.bos_token, hf.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert ours.encode("<|im_start|>assistant<|im_end|>") == [1, 520, 9531, 2]
    assert ours.encode("x", add_special_tokens=True) == ours.encode("x", add_special_tokens=False)  # no BOS flag
    assert ours.decode([1, 520, 9531, 2]) == "assistant"


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"}],
    [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."},
     {"role": "user", "content": "Another, in 日本語 please 🎨"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "  spaces \n and lines\n"},
     {"role": "assistant", "content": "ok"}],
]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_chat_template_matches_transformers(ours, hf, index, add_generation_prompt):
    messages = CONVERSATIONS[index]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected
    prompt_ids = ours.encode(expected, add_special_tokens=False)
    assert prompt_ids == hf.encode(expected, add_special_tokens=False) and prompt_ids[0] == 1


@pytest.mark.parametrize("messages, pattern", [
    ({"role": "user", "content": "hi"}, "got a single dict"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
    ([{"role": "user", "content": "hi"}, "oops"], r"messages\[1\] must be a dict"),
    ([{"content": "hi"}], r"messages\[0\] is missing 'role'"),
    ([{"role": "user"}], r"messages\[0\] is missing 'content'"),
    ([{"role": "", "content": "hi"}], r"messages\[0\]\['role'\] must be a non-empty string"),
    ([{"role": "user", "content": 7}], r"messages\[0\]\['content'\] must be a string, got int"),
])
def test_chat_messages_are_validated(ours, messages, pattern):
    with pytest.raises(ChatTemplateError, match=pattern):
        ours.apply_chat_template(messages)


def test_template_helpers_and_sandbox(ours):
    strict = Tokenizer(ours.backend, bos_token_id=1, eos_token_id=2, chat_template=(
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first turn must be user') }}{% endif %}"
        "{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}{{ eos_token }}"))
    assert strict.apply_chat_template([{"role": "user", "content": "é\"<"}]) == '<|im_start|>"é\\"<"<|im_end|>'
    with pytest.raises(ChatTemplateError, match="rejected the conversation: first turn must be user"):
        strict.apply_chat_template([{"role": "assistant", "content": "x"}])
    from jinja2.exceptions import SecurityError

    evil = Tokenizer(ours.backend, bos_token_id=1, eos_token_id=2,
                     chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(SecurityError):
        evil.apply_chat_template([{"role": "user", "content": "x"}])
    with pytest.raises(ChatTemplateError, match="has no chat template"):
        Tokenizer(ours.backend, bos_token_id=1, eos_token_id=2).apply_chat_template([{"role": "user", "content": "x"}])


def test_bad_inputs(ours):
    assert ours.decode([5, 49152]) == ours.decode([5])  # past the vocabulary (a padded embedding row): no text
    with pytest.raises(ValueError, match="unknown token id -1; token ids are >= 0"):
        ours.decode([-1])
    with pytest.raises(TypeError, match="encode expects a str, got list"):
        ours.encode(["a"])


def test_from_hf_dir_matches(ours, hf, tmp_path):
    hf.save_pretrained(tmp_path)
    from_dir = Tokenizer.from_hf_dir(tmp_path)
    assert (from_dir.bos_token_id, from_dir.eos_token_id, from_dir.vocab_size) == (1, 2, 49152)
    for text in STRINGS[:60]:
        assert from_dir.encode(text) == hf.encode(text), text
    messages = CONVERSATIONS[2]
    assert from_dir.apply_chat_template(messages) == ours.apply_chat_template(messages)
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path / "nowhere")


def _tiny_tokenizer_gguf(path, pre: str = "gpt2", model: str = "gpt2", add_bos: bool = False) -> str:
    """A byte-level vocabulary of 256 single-byte tokens plus "ab" (one merge) and two control tokens."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    VT = gguf.GGUFValueType
    tokens = list(bytes_to_unicode().values()) + ["ab", "<s>", "</s>"]
    writer = gguf.GGUFWriter(os.fspath(path), "llama")
    writer.add_key_value("tokenizer.ggml.model", model, VT.STRING)
    writer.add_key_value("tokenizer.ggml.pre", pre, VT.STRING)
    writer.add_key_value("tokenizer.ggml.tokens", tokens, VT.ARRAY, sub_type=VT.STRING)
    writer.add_key_value("tokenizer.ggml.token_type", [1] * 257 + [3, 3], VT.ARRAY, sub_type=VT.INT32)
    writer.add_key_value("tokenizer.ggml.merges", ["a b"], VT.ARRAY, sub_type=VT.STRING)
    writer.add_key_value("tokenizer.ggml.bos_token_id", 257, VT.UINT32)
    writer.add_key_value("tokenizer.ggml.eos_token_id", 258, VT.UINT32)
    writer.add_key_value("tokenizer.ggml.add_bos_token", add_bos, VT.BOOL)
    writer.add_tensor("dummy", np.zeros(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return os.fspath(path)


def test_crafted_vocab_add_bos_and_errors(tmp_path):
    tok = Tokenizer.from_gguf(_tiny_tokenizer_gguf(tmp_path / "bos.gguf", add_bos=True))
    ids = tok.encode("abc<s>")
    assert ids == [257, 256, tok.backend.token_to_id("c"), 257]  # BOS added, "ab" merged, "<s>" whole
    assert tok.encode("abc", add_special_tokens=False) == [256, tok.backend.token_to_id("c")]
    assert tok.decode(ids) == "abc" and tok.decode(ids, skip_special_tokens=False) == "<s>abc<s>"
    with pytest.raises(GGUFError, match=r"unknown tokenizer.ggml.pre 'mystery'; known: default, gpt-2"):
        Tokenizer.from_gguf(_tiny_tokenizer_gguf(tmp_path / "pre.gguf", pre="mystery"))
    with pytest.raises(GGUFError, match=r"tokenizer.ggml.model='llama' is not supported"):
        Tokenizer.from_gguf(_tiny_tokenizer_gguf(tmp_path / "spm.gguf", model="llama"))


def test_token_bytes_rebuild_characters_split_across_tokens():
    """token_bytes gives each token's own bytes: SmolLM2 splits 東, ¥ and the emoji across byte tokens whose text
    alone is U+FFFD, and the bytes of all the tokens are the text's UTF-8; a special token has none (decode skips
    it too)."""
    from minillm.loader import load_model
    _, _, tok = load_model()
    text = "Tea in 東京 costs ¥500 🍵!"
    ids = tok.encode(text + "<|im_end|>", add_special_tokens=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8")
    assert tok.token_bytes(ids[-1]) == b"" and tok.decode(ids[-1:]) == ""
    split = [i for i in ids if tok.decode([i]).endswith("\ufffd")]
    assert split and all(len(tok.token_bytes(i)) >= 1 and b"\xef\xbf\xbd" not in tok.token_bytes(i) for i in split)
    assert tok.token_bytes(tok.encode(" the", add_special_tokens=False)[0]) == b" the"
    assert tok.token_bytes(10**9) == b""  # past the vocabulary: no bytes, as decode gives no text
    with pytest.raises(ValueError, match="unknown token id -1"):
        tok.token_bytes(-1)


def test_token_bytes_with_a_byte_level_decoder_inside_a_sequence():
    """A tokenizer.json may wrap the ByteLevel decoder in a Sequence: still byte-level ('Ġh' is b' h')."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models

    from minillm.loader.tokenizer import Tokenizer
    backend = Backend(models.BPE(vocab={"Ġh": 0, "Ã©": 1, "h": 2}, merges=[]))
    backend.decoder = decoders.Sequence([decoders.ByteLevel()])
    tok = Tokenizer(backend, bos_token_id=None, eos_token_id=None)
    assert tok.token_bytes(0) == b" h" and tok.token_bytes(1) == "é".encode("utf-8")

