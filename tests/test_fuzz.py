"""Property-based fuzzing of every public entry point: bad input gets a clear ValueError/TypeError, never a crash.

Hypothesis throws values of every type (None, bools, huge and negative ints, nan/inf/-0.0, empty and unicode
strings, bytes, lists, dicts, nested mixtures) at SamplingParams, LLM.generate, LLM.chat, the HTTP server's
JSON bodies and both loaders (a GGUF file with random bytes, flipped bytes or truncated at a random offset; an HF
directory with a random config.json). Each call must either raise ValueError/TypeError (never IndexError, KeyError, RuntimeError,
ZeroDivisionError, ... which would mean the input reached code that did not expect it) or return a correct
result, and the engine must still serve a normal request afterwards.

One tiny random Llama serves the whole module; examples are derandomized (CI sees the same inputs every run);
MINILLM_FUZZ_EXAMPLES=N runs N fresh random examples per test instead.
"""
from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from minillm.config import EngineConfig, ModelConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.engine.worker import build_model
from minillm.llm import LLM
from minillm.loader.chat_template import render_chat_template
from minillm.sampling_params import SamplingParams
from tiny import EOS, ByteTokenizer, one_thread  # noqa: F401  (one_thread: autouse fixture)

# CI: 60 fixed examples per test. A deeper hunt: MINILLM_FUZZ_EXAMPLES=2000 (fresh random examples each run).
_DEEP = int(os.environ.get("MINILLM_FUZZ_EXAMPLES", 0))
FUZZ = settings(max_examples=_DEEP or 60, deadline=None, derandomize=not _DEEP, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
CLEAR = (ValueError, TypeError)
MAX_LEN = 48
CONFIG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=64, eos_token_id=EOS)

scalars = (st.none() | st.booleans() | st.integers() | st.integers(min_value=-2**70, max_value=2**70)
           | st.floats() | st.sampled_from([float("nan"), float("inf"), -float("inf"), -0.0, 5e-324, 1e308])
           | st.text(max_size=8) | st.sampled_from(["", "é漢😀", "\x00", " "]) | st.binary(max_size=8))
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.tuples(inner, inner)
                        | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)


class ChatByteTokenizer(ByteTokenizer):
    """The byte tokenizer plus a real (Jinja, sandboxed) chat template, so LLM.chat runs end to end."""

    chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% endif %}")

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return super().encode(text)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True, **extra) -> str:
        return render_chat_template(self.chat_template, messages, add_generation_prompt=add_generation_prompt)


@pytest.fixture(scope="module")
def llm():
    torch.manual_seed(0)
    state = {}
    from minillm.loader.model_files import expected_weight_shapes
    for name, shape in expected_weight_shapes(CONFIG).items():
        state[name] = torch.ones(shape) if "norm" in name else torch.randn(shape) * (0.5 if "embed" in name else
                                                                                     shape[-1] ** -0.5)
    model = build_model(CONFIG, state.items(), torch.device("cpu"), torch.float32)
    engine = LLMEngine(model, ChatByteTokenizer(), CONFIG, EngineConfig(max_model_len=MAX_LEN, max_num_seqs=4))
    return LLM.from_engine(engine)


def _check_outputs(llm: LLM, outs, n: int, params: list[SamplingParams]) -> None:
    assert isinstance(outs, list) and len(outs) == n
    for out, p in zip(outs, params):
        done = out.outputs[0]
        assert done.finish_reason in ("stop", "length"), (done.finish_reason, done.error)
        assert 1 <= len(done.token_ids) <= p.max_tokens or done.finish_reason == "stop"
        assert all(isinstance(t, int) and 0 <= t < CONFIG.vocab_size for t in done.token_ids)
        assert isinstance(done.text, str)
    assert not llm.llm_engine.has_unfinished_requests()


def _still_serves(llm: LLM) -> None:
    assert not llm.llm_engine.has_unfinished_requests(), "a failed call left a request behind"
    out = llm.generate("ok", SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))[0].outputs[0]
    assert len(out.token_ids) == 2 and out.finish_reason == "length"


# -- SamplingParams --------------------------------------------------------------------------------------
FIELDS = ("temperature", "top_p", "top_k", "max_tokens", "seed", "stop", "stop_token_ids", "ignore_eos", "priority",
          "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias", "min_tokens", "min_p")


@FUZZ
@given(st.dictionaries(st.sampled_from(FIELDS), anything, max_size=4))
def test_sampling_params_accepts_only_valid_values(kwargs):
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tiny temperatures warn (and are raised to 0.01)
            p = SamplingParams(**kwargs)
    except CLEAR as err:
        assert any(name in str(err) for name in kwargs), f"the error names no field: {err}"
        return
    assert math.isfinite(p.temperature) and (p.temperature == 0 or p.temperature >= 0.01)
    assert math.isfinite(p.top_p) and 0 < p.top_p <= 1
    for name in ("top_k", "priority"):
        assert type(getattr(p, name)) is int
    assert p.top_k == -1 or p.top_k >= 1
    assert p.max_tokens is None or (type(p.max_tokens) is int and p.max_tokens >= 1)  # None: until the context ends
    assert isinstance(p.ignore_eos, bool)
    assert p.seed is None or type(p.seed) is int
    assert all(type(s) is str and s for s in p.stop_list)
    assert all(type(t) is int and t >= 0 for t in p.stop_token_ids)
    assert -2 <= p.presence_penalty <= 2 and -2 <= p.frequency_penalty <= 2 and 0 < p.repetition_penalty
    assert 0 <= p.min_p <= 1 and type(p.min_tokens) is int and 0 <= p.min_tokens <= p.max_tokens
    assert p.logit_bias is None or all(type(t) is int and t >= 0 and -100 <= b <= 100 for t, b in p.logit_bias.items())


valid_params = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, -0.0, 0.01, 0.7, 1.0, 50.0, 1e30]) | st.floats(0.01, 1e6),
    top_p=st.sampled_from([1e-300, 1e-6, 0.5, 1.0]) | st.floats(1e-9, 1.0),
    top_k=st.sampled_from([-1, 1, 2, 299, 300, 301, 2**62]), max_tokens=st.integers(1, 4),
    seed=st.none() | st.sampled_from([0, -2**63, 2**64 - 1, 12345]),
    stop=st.none() | st.lists(st.text(min_size=1, max_size=3), max_size=2),
    stop_token_ids=st.none() | st.lists(st.integers(0, 2**62), max_size=3), ignore_eos=st.booleans(),
    presence_penalty=st.floats(-2, 2), frequency_penalty=st.floats(-2, 2), repetition_penalty=st.floats(0.01, 1e3),
    logit_bias=st.none() | st.dictionaries(st.integers(0, 299), st.floats(-100, 100), max_size=3),
    min_tokens=st.integers(0, 1), min_p=st.floats(0, 1))


@FUZZ
@given(valid_params)
def test_every_valid_sampling_params_generates(llm, params):
    outs = llm.generate(["fuzz", [1, 2, 3]], params)
    _check_outputs(llm, outs, 2, [params, params])


# -- LLM.generate and LLM.chat ---------------------------------------------------------------------------
prompts = (anything | st.text(max_size=12) | st.lists(st.integers(-5, 400), max_size=6)
           | st.lists(st.text(max_size=6) | st.lists(st.integers(-2, 2**65), max_size=4), max_size=3)
           | st.just([7] * (MAX_LEN + 1)))
param_args = (st.none() | anything | st.just(SamplingParams(temperature=0, max_tokens=2))
              | st.lists(st.just(SamplingParams(max_tokens=1)) | anything, max_size=3))


@FUZZ
@given(prompts, param_args)
def test_generate_rejects_or_serves(llm, prompt, params):
    try:
        outs = llm.generate(prompt, params)
    except CLEAR:
        assert not llm.llm_engine.has_unfinished_requests()
        return
    n = 1 if isinstance(prompt, str) or (prompt and all(type(t) is int for t in prompt)) else len(prompt)
    plist = params if isinstance(params, list) else [params or SamplingParams()] * n
    _check_outputs(llm, outs, n, plist)


message = st.dictionaries(st.sampled_from(["role", "content", "name"]), anything | st.text(max_size=6),
                          max_size=3) | st.fixed_dictionaries({"role": st.text(max_size=5),
                                                                "content": st.text(max_size=8)})
conversations = anything | st.lists(message, max_size=3) | st.lists(st.lists(message, max_size=2), max_size=2)


@FUZZ
@given(conversations)
def test_chat_rejects_or_serves(llm, messages):
    params = SamplingParams(temperature=0, max_tokens=2)
    try:
        outs = llm.chat(messages, params)
    except CLEAR:
        assert not llm.llm_engine.has_unfinished_requests()
        return
    n = len(messages) if messages and all(isinstance(m, (list, tuple)) for m in messages) else 1
    _check_outputs(llm, outs, n, [params] * n)


def test_engine_still_serves_after_the_fuzzing(llm):
    _still_serves(llm)


# -- the HTTP server ---------------------------------------------------------------------------------------
BODY_FIELDS = ("model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
               "n", "stop", "stop_token_ids", "seed", "stream", "stream_options", "ignore_eos", "logprobs",
               "top_logprobs", "echo", "best_of", "logit_bias", "tools", "response_format", "presence_penalty",
               "frequency_penalty", "repetition_penalty", "min_tokens", "min_p", "return_token_ids")
chat_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant"]),
                                      "content": st.text(max_size=8) | st.none() | st.lists(st.fixed_dictionaries(
                                          {"type": st.just("text"), "text": st.text(max_size=4)}), max_size=2)})
json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 70) | st.integers(-2**70, 2**70)
                           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=6),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                       max_size=3), max_leaves=6)
nearly_valid = {"max_tokens": st.integers(-1, 5), "n": st.integers(0, 3), "stream": st.booleans(),
                "seed": st.integers(-3, 3) | st.none(), "temperature": st.floats(0, 2),
                "repetition_penalty": st.floats(0, 3), "frequency_penalty": st.floats(-3, 3),
                "min_tokens": st.integers(-1, 4), "min_p": st.floats(0, 1), "return_token_ids": st.booleans(),
                "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans(),
                                                                      "continuous_usage_stats": st.booleans()}),
                "logit_bias": st.dictionaries(st.sampled_from(["1", "42", "299", "300", "x"]), st.floats(-101, 101),
                                              max_size=2)}
http_bodies = (st.fixed_dictionaries({}, optional={name: json_values for name in BODY_FIELDS})
               | st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=8)
                                        | st.lists(st.integers(0, 299), min_size=1, max_size=5)},
                                       optional={**nearly_valid, "logprobs": st.integers(-1, 3) | st.none()})
               | st.fixed_dictionaries({"messages": st.lists(chat_message, max_size=3)},
                                       optional={**nearly_valid, "logprobs": st.booleans(),
                                                 "top_logprobs": st.integers(-1, 3)}))


@pytest.fixture(scope="module")
def server():
    from minillm.serve.server import ServerThread
    from serve_tiny import tiny_app
    app, async_llm = tiny_app()
    with ServerThread(app) as srv:
        srv.engine = async_llm.engine
        yield srv


@FUZZ
@given(st.sampled_from(["/v1/completions", "/v1/chat/completions"]), http_bodies)
def test_http_bodies_get_an_answer_or_an_openai_error(server, path, body):
    """Any JSON body: a 2xx (a stream that ends with [DONE] and no error event) or a 4xx in OpenAI's shape, never
    a 500; and no request left in the engine."""
    import httpx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiny temperatures warn (and are raised to 0.01)
        response = httpx.post(server.url + path, json=body, timeout=30)
    assert response.status_code in (200, 400, 404), (response.status_code, response.text[:300])
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif body.get("stream") is True:
        assert response.text.rstrip().endswith("data: [DONE]") and '"error"' not in response.text


RESPONSES_FIELDS = ("input", "instructions", "max_output_tokens", "temperature", "top_p", "tools", "tool_choice",
                    "text", "store", "previous_response_id", "reasoning", "include", "metadata", "stream", "seed")
input_item = st.fixed_dictionaries({}, optional={
    "type": st.sampled_from(["message", "function_call", "function_call_output", "reasoning", "input_image"]),
    "role": st.sampled_from(["user", "assistant", "developer", "tool"]), "content": json_values
    | st.lists(st.fixed_dictionaries({"type": st.sampled_from(["input_text", "output_text", "input_image"]),
                                      "text": st.text(max_size=4)}), max_size=2),
    "call_id": json_values, "name": json_values, "arguments": json_values, "output": json_values})
responses_bodies = (st.fixed_dictionaries({}, optional={name: json_values for name in RESPONSES_FIELDS})
                    | st.fixed_dictionaries({"input": st.text(min_size=1, max_size=8) | st.lists(input_item,
                                                                                                 max_size=3)},
                                            optional={"max_output_tokens": st.integers(-1, 5), "stream": st.booleans(),
                                                      "temperature": st.floats(0, 2), "text": json_values,
                                                      "instructions": st.text(max_size=6) | json_values}))


@FUZZ
@given(responses_bodies)
def test_responses_bodies_get_an_answer_or_an_openai_error(server, body):
    """/v1/responses: a 200 (a stream whose last event completes, is incomplete or failed) or a 4xx in OpenAI's
    shape, never a 500."""
    import httpx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        response = httpx.post(server.url + "/v1/responses", json=body, timeout=30)
    assert response.status_code in (200, 400, 404), (response.status_code, response.text[:300])
    if response.status_code != 200:
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    elif body.get("stream") is True:
        last = [line for line in response.text.splitlines() if line.startswith("event: ")][-1]
        assert last in ("event: response.completed", "event: response.incomplete"), response.text[-300:]


def test_the_server_leaks_nothing_after_the_fuzzing(server):
    import time
    deadline = time.monotonic() + 5  # aborts of finished streams are applied between steps
    while server.engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.engine.has_unfinished_requests()
    assert server.engine.scheduler.block_manager.num_used_blocks == 0


# -- loaders -----------------------------------------------------------------------------------------------
def _tiny_gguf_meta() -> dict:
    import gguf
    VT = gguf.GGUFValueType
    tokens = [chr(c) for c in range(ord("a"), ord("a") + 13)] + ["ab", "<s>", "</s>"]
    meta = {f"llama.{key}": (value, VT.UINT32) for key, value in {
        "block_count": 1, "embedding_length": 8, "feed_forward_length": 12, "attention.head_count": 2,
        "attention.head_count_kv": 1, "context_length": 32}.items()}
    meta.update({"llama.attention.layer_norm_rms_epsilon": (1e-6, VT.FLOAT32),
                 "tokenizer.ggml.model": ("gpt2", VT.STRING),
                 "tokenizer.ggml.tokens": (tokens, VT.ARRAY, VT.STRING),
                 "tokenizer.ggml.merges": (["a b"], VT.ARRAY, VT.STRING),
                 "tokenizer.ggml.eos_token_id": (len(tokens) - 1, VT.UINT32)})
    return meta


def _tiny_gguf_bytes(kv: dict | None = None, arch: str = "llama") -> bytes:
    """A valid 1-layer llama GGUF with a byte-level BPE tokenizer, written with the `gguf` package;
    `kv` replaces or adds metadata entries (key -> (value, GGUFValueType[, array element type]))."""
    import gguf
    import numpy as np

    h, i, v = 8, 12, 16
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "tiny.gguf")
        w = gguf.GGUFWriter(path, arch)
        for key, (value, vtype, *sub) in {**_tiny_gguf_meta(), **(kv or {})}.items():
            w.add_key_value(key, value, vtype, sub_type=sub[0] if sub else None)
        rng = np.random.default_rng(0)
        shapes = {"token_embd.weight": (v, h), "output_norm.weight": (h,), "blk.0.attn_norm.weight": (h,),
                  "blk.0.ffn_norm.weight": (h,), "blk.0.attn_q.weight": (h, h), "blk.0.attn_k.weight": (4, h),
                  "blk.0.attn_v.weight": (4, h), "blk.0.attn_output.weight": (h, h),
                  "blk.0.ffn_gate.weight": (i, h), "blk.0.ffn_up.weight": (i, h), "blk.0.ffn_down.weight": (h, i)}
        for name, shape in shapes.items():
            w.add_tensor(name, rng.standard_normal(shape).astype(np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(path, "rb") as f:
            return f.read()


GGUF_BYTES = _tiny_gguf_bytes()


def _load_everything(path: str) -> None:
    """The loader's whole path: config, tokenizer, every tensor (the weight stream is lazy)."""
    from minillm.loader import load_model
    config, weights, tokenizer = load_model(path)
    for name, tensor in weights:
        assert isinstance(name, str) and isinstance(tensor, torch.Tensor)
    tokenizer.decode(tokenizer.encode("abc"))
    assert isinstance(config, ModelConfig)


def _load_or_explain(path) -> None:
    """Load fully, or raise ValueError/TypeError whose message names the file (a check caught it, not luck)."""
    try:
        _load_everything(str(path))
    except CLEAR as err:
        assert path.name in str(err), f"the error does not name the file: {type(err).__name__}: {err}"


def test_the_untouched_tiny_gguf_loads(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(GGUF_BYTES)
    _load_everything(str(path))


corruptions = st.one_of(
    st.integers(0, len(GGUF_BYTES) - 1).map(lambda n: ("truncate", n)),
    st.lists(st.tuples(st.integers(0, len(GGUF_BYTES) - 1), st.integers(0, 255)), min_size=1, max_size=6)
    .map(lambda flips: ("flip", flips)),
    st.lists(st.tuples(st.integers(8, 900), st.sampled_from([0, 1, 0xFF, 0x7F, 0x80])), min_size=1, max_size=4)
    .map(lambda flips: ("flip", flips)),  # the header and metadata, where a flip changes a count or a type
    st.binary(max_size=200).map(lambda tail: ("random", tail)),
)


def _corrupt(kind: str, arg) -> bytes:
    if kind == "truncate":
        return GGUF_BYTES[:arg]
    if kind == "random":  # a plausible header, then garbage
        return b"GGUF" + struct.pack("<IQQ", 3, 2, 3) + arg
    data = bytearray(GGUF_BYTES)
    for pos, value in arg:
        data[pos] = value
    return bytes(data)


@FUZZ
@given(corruptions)
def test_corrupt_gguf_raises_clearly(tmp_path, corruption):
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(_corrupt(*corruption))
    _load_or_explain(path)


def _gguf_values():
    import gguf
    VT = gguf.GGUFValueType
    return st.one_of(
        st.integers(0, 2**32 - 1).map(lambda x: (x, VT.UINT32)), st.integers(-2**31, 2**31 - 1).map(lambda x: (x, VT.INT32)),
        st.sampled_from([0, 1, 3, 2**63, 2**64 - 1]).map(lambda x: (x, VT.UINT64)),
        st.floats(width=32).map(lambda x: (x, VT.FLOAT32)), st.booleans().map(lambda x: (x, VT.BOOL)),
        st.text(max_size=6).map(lambda x: (x, VT.STRING)),
        st.lists(st.integers(-2**31, 2**31 - 1), min_size=1, max_size=20).map(lambda x: (x, VT.ARRAY, VT.INT32)),
        st.lists(st.text(max_size=3), min_size=1, max_size=20).map(lambda x: (x, VT.ARRAY, VT.STRING)))


GGUF_KEYS = sorted(_tiny_gguf_meta()) + [
    "general.alignment", "llama.attention.key_length", "llama.rope.dimension_count", "llama.rope.freq_base",
    "llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.vocab_size", "tokenizer.ggml.pre",
    "tokenizer.ggml.token_type", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.chat_template"]


@FUZZ
@given(st.dictionaries(st.sampled_from(GGUF_KEYS), _gguf_values(), min_size=1, max_size=3),
       st.sampled_from(["llama", "llama", "qwen2", "gpt2", ""]))
def test_random_gguf_metadata_raises_clearly(tmp_path, kv, arch):
    path = tmp_path / "meta.gguf"
    path.write_bytes(_tiny_gguf_bytes(kv, arch))
    _load_or_explain(path)


@FUZZ
@given(st.sampled_from(["token_embd.weight", "blk.0.attn_q.weight", "output_norm.weight"]),
       st.integers(0, 3), st.sampled_from([0, 1, 7, 2**31, 2**62, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1))
def test_corrupt_tensor_dims_raise_clearly(tmp_path, name, dim, value):
    """A tensor table entry is name | n_dims (u32) | dims (u64 each) | type | offset: overwrite one dim."""
    data = bytearray(GGUF_BYTES)
    at = data.index(name.encode()) + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<Q", data, at + 4 + 8 * min(dim, n_dims - 1), value)
    path = tmp_path / "dims.gguf"
    path.write_bytes(bytes(data))
    _load_or_explain(path)


HF_CONFIG = dict(model_type="llama", vocab_size=16, hidden_size=8, intermediate_size=12, num_hidden_layers=1,
                 num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32, rms_norm_eps=1e-6)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    from safetensors.torch import save_file

    from minillm.loader.model_files import expected_weight_shapes
    path = tmp_path_factory.mktemp("hf")
    shapes = expected_weight_shapes(ModelConfig(**{k: v for k, v in HF_CONFIG.items() if k != "model_type"}))
    save_file({name: torch.randn(shape) for name, shape in shapes.items()}, str(path / "model.safetensors"))
    return path


hf_configs = (anything | st.dictionaries(st.sampled_from(list(HF_CONFIG) + ["head_dim", "rope_scaling",
                                                                            "rope_parameters", "eos_token_id",
                                                                            "quantization_config",
                                                                            "tie_word_embeddings"]),
                                         anything, max_size=4).map(lambda d: {**HF_CONFIG, **d}))


@FUZZ
@given(hf_configs)
def test_random_hf_config_raises_clearly(hf_dir, raw):
    from minillm.loader.hf import load_hf_model
    (hf_dir / "config.json").write_text(json.dumps(raw, default=repr))
    try:
        config, weights = load_hf_model(hf_dir)
    except CLEAR as err:
        assert str(hf_dir) in str(err), f"the error does not name the model: {type(err).__name__}: {err}"
        return
    assert isinstance(config, ModelConfig)
    for _ in weights:
        pass


def test_hf_config_that_is_not_json(hf_dir):
    from minillm.loader.hf import load_hf_model
    (hf_dir / "config.json").write_bytes(b"\xff\xfe{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_hf_model(hf_dir)
