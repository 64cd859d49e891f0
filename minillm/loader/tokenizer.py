"""The tokenizer: text <-> token ids, rebuilt from GGUF metadata or read from an HF tokenizer.json (chapter 1).

A GGUF file carries no tokenizer.json, only its ingredients: the vocabulary (`tokenizer.ggml.tokens`),
the BPE merges (`tokenizer.ggml.merges`), each token's type (3 = control, e.g. `<|im_end|>`), the
special ids, and a *name* for how text is split before BPE runs (`tokenizer.ggml.pre`). We assemble
these into a Hugging Face `tokenizers` pipeline:

    pre-tokenizer   split text into words with the model's regex, then map bytes to printable characters
                    (GPT-2's byte-level trick: every byte has a token, so nothing is ever unknown)
    model           BPE with the file's vocabulary and merges, applied inside each word
    decoder         byte-level, back from printable characters to UTF-8 bytes
    added tokens    control tokens matched whole in the text, before any splitting

The split regex matters: the merges were learned on words cut a certain way, and cutting differently
gives different (valid but unfamiliar) ids. llama.cpp names each regex; `PRE_TOKENIZERS` maps the
names we know, and an unknown name is an error rather than a silent guess.
"""
from __future__ import annotations

import json
import os
import re
from functools import cache, cached_property
from typing import Any, Iterable

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as _Backend

from minillm.loader.chat_template import ChatTemplateError, render_chat_template
from minillm.loader.gguf import GGUFError, GGUFFile
from minillm.loader.model_files import read_json

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _byte_level(split: str | None = None, digits: bool = False) -> pre_tokenizers.PreTokenizer:
    steps: list[pre_tokenizers.PreTokenizer] = []
    if digits:  # StarCoder / SmolLM: every digit is its own word, before the GPT-2 regex runs
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    if split is None:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))  # GPT-2's own regex
    else:
        steps.append(pre_tokenizers.Split(Regex(split), behavior="isolated"))
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


# tokenizer.ggml.pre -> how to split words (names as llama.cpp's converter writes them).
PRE_TOKENIZERS = {
    "default": lambda: _byte_level(),
    "gpt-2": lambda: _byte_level(),
    "gpt2": lambda: _byte_level(),
    "smollm": lambda: _byte_level(digits=True),
    "starcoder": lambda: _byte_level(digits=True),
    "refact": lambda: _byte_level(digits=True),
    "llama-bpe": lambda: _byte_level(_LLAMA3_SPLIT),
    "llama3": lambda: _byte_level(_LLAMA3_SPLIT),
    "smaug-bpe": lambda: _byte_level(_LLAMA3_SPLIT),
    "dbrx": lambda: _byte_level(_LLAMA3_SPLIT),
    "qwen2": lambda: _byte_level(_QWEN2_SPLIT),
    "deepseek-r1-qwen": lambda: _byte_level(_QWEN2_SPLIT),
}

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types


def _string_list(meta: dict[str, Any], key: str, path: str) -> list[str]:
    """A GGUF metadata array of strings ([] when absent); GGUFError when it holds anything else."""
    value = meta.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GGUFError(f"{path}: {key} must be an array of strings, got {str(value)[:80]}")
    return value


def _is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_utf8(text: str) -> None:
    """ValueError naming the first character UTF-8 cannot encode: a lone surrogate such as U+D800, which a Python
    str may hold (a JSON string escape decodes to one) but no tokenizer can read."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"text is not valid Unicode: {text[err.start]!r} at character {err.start} is a lone "
                         f"surrogate (text must be encodable as UTF-8)") from None


class Tokenizer:
    """Text <-> ids, special-token ids, and the chat template, behind one small interface."""

    def __init__(self, backend: _Backend, *, bos_token_id: int | None, eos_token_id: int | None,
                 pad_token_id: int | None = None, unk_token_id: int | None = None,
                 chat_template: str | None = None, source: str = "") -> None:
        self.backend = backend
        self.bos_token_id, self.eos_token_id = bos_token_id, eos_token_id
        self.pad_token_id, self.unk_token_id = pad_token_id, unk_token_id
        self.chat_template = chat_template
        self.source = source
        # a lower bound of the vocabulary size for decode's range check (asking the backend costs 5 us, and the
        # engine decodes two windows of every running sequence after every step); tokens can be added, never removed
        self._known_vocab_size = self.vocab_size

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, path: str | os.PathLike | GGUFFile) -> "Tokenizer":
        gguf = path if isinstance(path, GGUFFile) else GGUFFile(path)
        meta = gguf.metadata
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise GGUFError(f"{gguf.path}: tokenizer.ggml.model={kind!r} is not supported; minillm builds "
                            f"byte-level BPE ('gpt2') tokenizers from GGUF (use Tokenizer.from_hf_dir otherwise)")
        pre = meta.get("tokenizer.ggml.pre", "default")
        if not isinstance(pre, str) or pre not in PRE_TOKENIZERS:
            raise GGUFError(f"{gguf.path}: unknown tokenizer.ggml.pre {pre!r}; known: {', '.join(PRE_TOKENIZERS)}")
        tokens: list[str] = _string_list(meta, "tokenizer.ggml.tokens", gguf.path)
        if not tokens:
            raise GGUFError(f"{gguf.path}: tokenizer.ggml.tokens is missing or empty")
        merges = [tuple(m.split(" ", 1)) for m in _string_list(meta, "tokenizer.ggml.merges", gguf.path)]
        if any(len(m) != 2 for m in merges):
            raise GGUFError(f"{gguf.path}: tokenizer.ggml.merges holds an entry without a space: "
                            f"{next(m for m in merges if len(m) != 2)[0]!r}")
        vocab = {token: i for i, token in enumerate(tokens)}
        try:  # the Rust library raises a bare Exception for merges that name unknown tokens
            backend = _Backend(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
        except Exception as err:  # noqa: BLE001 - re-raised as the file's error
            raise GGUFError(f"{gguf.path}: the tokenizer's vocabulary and merges do not fit together: {err}") from None
        backend.pre_tokenizer = PRE_TOKENIZERS[pre]()
        backend.decoder = decoders.ByteLevel()
        types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
        if not isinstance(types, list) or len(types) != len(tokens):
            raise GGUFError(f"{gguf.path}: tokenizer.ggml.token_type must list one type per token "
                            f"({len(tokens)}), got {str(types)[:80]}")
        # Control tokens are matched whole and dropped by decode(skip_special_tokens=True); user-defined
        # ones (e.g. <think>) are matched whole but are ordinary text.
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t, k in zip(tokens, types) if k == CONTROL])
        backend.add_tokens([AddedToken(t, special=False, normalized=False)
                            for t, k in zip(tokens, types) if k == USER_DEFINED])
        ids = {key: meta.get(f"tokenizer.ggml.{key}_token_id") for key in ("bos", "eos", "padding", "unknown")}
        for key, token_id in ids.items():
            if token_id is not None and (not _is_index(token_id) or not 0 <= token_id < len(tokens)):
                raise GGUFError(f"{gguf.path}: tokenizer.ggml.{key}_token_id={token_id} is outside the vocabulary "
                                f"[0, {len(tokens)})")
        template = meta.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise GGUFError(f"{gguf.path}: tokenizer.chat_template must be a string, got {type(template).__name__}")
        cls._set_post_processor(backend, tokens, ids["bos"] if meta.get("tokenizer.ggml.add_bos_token") else None,
                                ids["eos"] if meta.get("tokenizer.ggml.add_eos_token") else None)
        return cls(backend, bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["padding"],
                   unk_token_id=ids["unknown"], chat_template=template, source=gguf.path)

    @staticmethod
    def _set_post_processor(backend: _Backend, tokens: list[str], bos: int | None, eos: int | None) -> None:
        """encode(add_special_tokens=True) prepends BOS / appends EOS when the file's add_bos/add_eos flags say so."""
        if bos is None and eos is None:
            return
        prefix = [(tokens[bos], bos)] if bos is not None else []
        suffix = [(tokens[eos], eos)] if eos is not None else []
        single = " ".join([t for t, _ in prefix] + ["$A"] + [t for t, _ in suffix])
        pair = " ".join([t for t, _ in prefix] + ["$A"] + [t for t, _ in suffix] + ["$B:1"])
        backend.post_processor = processors.TemplateProcessing(single=single, pair=pair,
                                                               special_tokens=prefix + suffix)

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """An HF model directory with tokenizer.json (and tokenizer_config.json / chat_template.jinja if present)."""
        path = os.fspath(path)
        tokenizer_json = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tokenizer_json):
            raise FileNotFoundError(f"{path}: no tokenizer.json (minillm reads fast-tokenizer files only)")
        try:
            backend = _Backend.from_file(tokenizer_json)
        except Exception as err:  # the tokenizers library's bare Exception names no file
            raise ValueError(f"{tokenizer_json}: not a valid tokenizer.json ({err})") from None
        config: dict[str, Any] = {}
        if os.path.isfile(os.path.join(path, "tokenizer_config.json")):
            config = read_json(os.path.join(path, "tokenizer_config.json"))
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: take the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()

        def token_id(key: str) -> int | None:
            token = config.get(key)
            if isinstance(token, dict):  # serialized AddedToken
                token = token.get("content")
            return backend.token_to_id(token) if isinstance(token, str) else None

        return cls(backend, bos_token_id=token_id("bos_token"), eos_token_id=token_id("eos_token"),
                   pad_token_id=token_id("pad_token"), unk_token_id=token_id("unk_token"),
                   chat_template=template, source=path)

    # -- the interface the engine uses --------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _token(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    @property
    def bos_token(self) -> str | None:
        return self._token(self.bos_token_id)

    @property
    def eos_token(self) -> str | None:
        return self._token(self.eos_token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}: {text!r}")
        try:  # encode_batch, not encode: the Rust side releases the GIL only there, so a server thread tokenizing a
            # long prompt (~0.6 s for 1 MiB) no longer stops every other Python thread (the event loop, the engine)
            return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids
        except TypeError:  # the Rust tokenizer's "TextInputSequence must be str": the text is not valid Unicode
            _check_utf8(text)
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """The text of `ids`. An id past the tokenizer's vocabulary is no text: a model's embedding often has more
        rows than its tokenizer has tokens (padded to a multiple of 64 or 128; Qwen2.5 151,936 for 151,665), and
        the model may sample them; as in HF's tokenizers, they decode to nothing. A negative id is a ValueError.

        Special (control) tokens such as <|im_end|> are left out unless skip_special_tokens=False, which writes
        their text. What goes *between* two of them is the decoder's business, and vLLM's
        spaces_between_special_tokens cannot change it here: the byte-level decoder (every GGUF tokenizer minillm
        builds, and Llama 3, Qwen2 and SmolLM tokenizer.json files) and the SentencePiece ones (Replace,
        ByteFallback, Fuse, Strip; Metaspace) write special tokens back to back ("<|im_end|><|im_end|>"), so either
        value gives the same text. vLLM behaves the same with these "fast" tokenizers (its fast-tokenizer
        detokenizer follows the decoder; with the switch off it only drops a space the decoder put between two
        added tokens, and these put none); only Hugging Face's slow Python tokenizers join special tokens with
        spaces. A tokenizer.json whose decoder spaces every token apart (WordPiece, or no decoder) keeps those
        spaces with either value."""
        ids = [int(i) for i in ids]
        # range-checked against the size known at construction, asked again only for an id past it: the engine
        # decodes windows of every running sequence after every step, and asking per id cost 3x the decode
        if ids and not (0 <= min(ids) and max(ids) < self._known_vocab_size):
            if min(ids) < 0:
                raise ValueError(f"unknown token id {min(ids)}; token ids are >= 0")
            vocab_size = self._known_vocab_size = self.vocab_size
            ids = [i for i in ids if i < vocab_size]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes token `token_id` stands for, whole even when they are only part of a UTF-8 character (which
        decode() of the token alone turns into U+FFFD): OpenAI's logprobs `bytes`, from which a client rebuilds
        a character split across tokens. A byte-level vocabulary writes each byte as a printable character
        (GPT-2's table, inverted in `_byte_of_char`); a SentencePiece one writes a byte token as <0xNN> and a
        space as U+2581; a user-defined added token is its own text, and a special one (<|im_end|>) has no bytes,
        as decode() skips it (where a request keeps special tokens as text, the engine takes their text's bytes)."""
        token_id = int(token_id)
        if token_id < 0:
            raise ValueError(f"unknown token id {token_id}; token ids are >= 0")
        token = self.backend.id_to_token(token_id)
        if token is None:  # past the tokenizer's vocabulary (a padded embedding row): no text, no bytes
            return b""
        added = self._added_tokens.get(token_id)
        if added is not None:
            return b"" if added.special else token.encode("utf-8")
        if self._byte_level and all(c in _byte_of_char() for c in token):
            return bytes(_byte_of_char()[c] for c in token)
        byte = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", token)
        return bytes([int(byte[1], 16)]) if byte else token.replace("\u2581", " ").encode("utf-8")

    @cached_property
    def _added_tokens(self) -> dict[int, AddedToken]:
        return self.backend.get_added_tokens_decoder()

    @cached_property
    def _byte_level(self) -> bool:
        """Whether the decoder maps GPT-2's byte characters back to bytes (alone, or inside a Sequence)."""
        def has_byte_level(decoder: Any) -> bool:
            if not isinstance(decoder, dict):
                return False
            return decoder.get("type") == "ByteLevel" or any(has_byte_level(d) for d in decoder.get("decoders", []))
        return has_byte_level(json.loads(self.backend.to_str()).get("decoder"))

    def decode_batch(self, batch: list[list[int]], skip_special_tokens: bool = True) -> list[str]:
        """`decode` of each id list, in one call into the tokenizer library (the engine's detokenizer decodes two
        windows of every running sequence per step: one call for all of them instead of 2 x batch)."""
        known = self._known_vocab_size
        if any(len(ids) and not (0 <= min(ids) and max(ids) < known) for ids in batch):  # min, max run in C
            return [self.decode(ids, skip_special_tokens) for ids in batch]  # drops ids past the vocabulary
        try:
            return self.backend.decode_batch(batch, skip_special_tokens=skip_special_tokens)
        except TypeError:  # ids that are not Python ints (numpy, tensors): convert, as `decode` does
            return self.backend.decode_batch([[int(i) for i in ids] for ids in batch],
                                             skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """The prompt string for a conversation (tokenize it with encode(..., add_special_tokens=False))."""
        if not self.chat_template:
            raise ChatTemplateError(f"{self.source or 'this tokenizer'} has no chat template; "
                                    f"pass a plain prompt instead of messages")
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token,
                   "pad_token": self._token(self.pad_token_id), "unk_token": self._token(self.unk_token_id)}
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt,
                                    special_tokens=special, **extra)

    def __repr__(self) -> str:
        return (f"Tokenizer({self.source!r}, vocab_size={self.vocab_size}, bos={self.bos_token!r}, "
                f"eos={self.eos_token!r}, chat_template={'yes' if self.chat_template else 'no'})")


@cache
def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: character -> the byte it stands for. The printable bytes
    ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other 68 (controls, space, ...) are given the
    characters from U+0100 on, in byte order, so that no vocabulary entry holds a space or a control."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(0x100 + i): b for i, b in enumerate(others)}}

