"""Log-probabilities (vLLM's SamplingParams.logprobs / prompt_logprobs), checked against a full forward.

On a tiny random model in fp32: the log-prob, rank and top-k of every generated token equal log_softmax of one
cache-less forward over prompt + output, whatever the sampling settings (they are the raw model's), also through
speculative verify steps; prompt log-probs equal it at every prompt position, with chunked prefill, with prefix
caching on (the request skips the cache) and across preemption by recompute (no duplicates). On the bundled
SmolLM2, prompt log-probs equal log_softmax of Hugging Face transformers' logits. The server returns OpenAI-shaped
logprobs for completions and chat, streamed or not.
"""
from __future__ import annotations

import math

import pytest
import torch

from minillm.config import EngineConfig
from minillm.engine.llm_engine import LLMEngine
from minillm.outputs import Logprob
from minillm.sampling_params import SamplingParams
from test_engine import tiny_config, tiny_model
from tiny import ByteTokenizer, one_thread  # noqa: F401  (one_thread: autouse fixture)

PROMPTS = [list(range(10, 31)), [5, 6, 7, 5, 6, 7, 5, 6], [99, 98, 97]]


@pytest.fixture(scope="module")
def model_and_config():
    config = tiny_config(num_hidden_layers=2)
    return tiny_model(config, seed=1), config


def reference_logprobs(model, tokens: list[int]) -> torch.Tensor:
    """log_softmax of one cache-less forward: row p is the distribution of token p + 1."""
    device = next(model.parameters()).device
    with torch.inference_mode():
        hidden = model(torch.tensor(tokens, device=device), torch.arange(len(tokens), device=device))
        return torch.log_softmax(model.compute_logits(hidden).float(), dim=-1)


def make_engine(model_and_config, **engine_kwargs) -> LLMEngine:
    model, config = model_and_config
    kwargs = dict(block_size=4, num_kv_blocks=64, max_model_len=64, max_num_seqs=4)
    kwargs.update(engine_kwargs)
    return LLMEngine(model, ByteTokenizer(), config, EngineConfig(**kwargs))


def finish(engine: LLMEngine, requests) -> list:
    """Add (prompt, params) requests and step until all are done; their final outputs in order."""
    ids = [engine.add_request(None, prompt, params) for prompt, params in requests]
    done = {}
    while engine.has_unfinished_requests():
        done.update((out.request_id, out) for out in engine.step() if out.finished)
    return [done[i] for i in ids]


def run(model_and_config, requests, **engine_kwargs):
    engine = make_engine(model_and_config, **engine_kwargs)
    return finish(engine, requests), engine


def check_entry(entry: dict, token: int, ref_row: torch.Tensor, k: int) -> None:
    """One token's dict: the actual token first with its true rank, then the top k in decreasing order."""
    assert next(iter(entry)) == token
    assert entry[token].logprob == pytest.approx(float(ref_row[token]), abs=1e-5)
    assert entry[token].rank == 1 + int((ref_row > ref_row[token]).sum())
    assert entry[token].decoded_token == ByteTokenizer().decode([token])
    top = ref_row.topk(k).indices.tolist()
    ranked = sorted(((lp.rank, t) for t, lp in entry.items() if t != token or lp.rank <= k))
    assert [t for _, t in ranked] == top  # exactly the top k, ranks 1..k
    assert set(entry) == set(top) | {token}
    for t in top:
        assert entry[t].logprob == pytest.approx(float(ref_row[t]), abs=1e-5)


def test_generated_token_logprobs_equal_a_full_forward(model_and_config):
    params = [SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.7, top_k=5, max_tokens=5, ignore_eos=True, seed=2, logprobs=0),
              SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]
    outs, _ = run(model_and_config, list(zip(PROMPTS, params)))
    for out, p in zip(outs[:2], params):
        done = out.outputs[0]
        assert len(done.logprobs) == len(done.token_ids) == p.max_tokens
        ref = reference_logprobs(model_and_config[0], out.prompt_token_ids + done.token_ids)
        start = len(out.prompt_token_ids) - 1
        for j, (token, entry) in enumerate(zip(done.token_ids, done.logprobs)):
            check_entry(entry, token, ref[start + j], p.logprobs)
        assert done.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(done.token_ids,
                                                                                          done.logprobs)))
    # greedy: the chosen token is the most likely one
    assert all(e[t].rank == 1 for t, e in zip(outs[0].outputs[0].token_ids, outs[0].outputs[0].logprobs))
    assert outs[2].outputs[0].logprobs is None and outs[2].prompt_logprobs is None


def check_prompt_logprobs(model, out, k: int) -> None:
    prompt = out.prompt_token_ids
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    ref = reference_logprobs(model, prompt)
    for p in range(1, len(prompt)):
        check_entry(out.prompt_logprobs[p], prompt[p], ref[p - 1], k)


@pytest.mark.parametrize("engine_kwargs", [
    {},
    {"enable_chunked_prefill": True, "max_num_batched_tokens": 6},  # chunks of a few rows
    {"enable_prefix_caching": True},
    {"num_kv_blocks": 9, "max_num_seqs": 3},  # not enough blocks for all three: preemption by recompute
], ids=["plain", "chunked", "prefix_cache", "preemption"])
def test_prompt_logprobs_equal_a_full_forward(model_and_config, engine_kwargs):
    long_prompt = list(range(40, 62))
    requests = [(long_prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=2)),
                (PROMPTS[1], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=0,
                                            logprobs=1)),
                (PROMPTS[2], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))]
    engine = make_engine(model_and_config, **engine_kwargs)
    if engine_kwargs.get("enable_prefix_caching"):  # the long prompt is cached before the request that scores it
        finish(engine, [(long_prompt, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))])
    outs = finish(engine, requests)
    assert [o.outputs[0].finish_reason for o in outs] == ["length"] * 3  # decoding past the scored prompt too
    check_prompt_logprobs(model_and_config[0], outs[0], 2)
    check_prompt_logprobs(model_and_config[0], outs[1], 0)
    assert outs[2].prompt_logprobs is None
    bm = engine.scheduler.block_manager
    if engine_kwargs.get("enable_prefix_caching"):  # the scoring request did not read the cache
        assert bm.prefix_cache_hits == 0
    if "num_kv_blocks" in engine_kwargs:
        assert sum(o.metrics.num_preemptions for o in outs) > 0
    second = outs[1].outputs[0]  # logprobs of a preempted/chunked request still match, one per token
    ref = reference_logprobs(model_and_config[0], outs[1].prompt_token_ids + second.token_ids)
    for j, (token, entry) in enumerate(zip(second.token_ids, second.logprobs)):
        check_entry(entry, token, ref[len(PROMPTS[1]) - 1 + j], 1)
    assert len(second.logprobs) == len(second.token_ids)


def test_prompt_logprobs_of_a_prefill_preempted_between_its_chunks(model_and_config):
    """Preempted by recompute in the middle of its chunked prefill, a request re-reads its prompt from position
    0: the first recomputed chunks have no prompt row left to score (the scores are kept), and a step where no
    other request scores its prompt returns none. That is not an executor ignoring the ask (it once finished the
    request with an error): the request completes, with every prompt score once."""
    shared = list(range(30, 58))
    prompts = [shared + [1, 2], shared + [3], shared[:13], shared, [7, 8, 9]]
    scored = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, prompt_logprobs=2)
    plain = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine = make_engine(model_and_config, num_kv_blocks=16, enable_chunked_prefill=True, max_num_batched_tokens=8)
    outs = finish(engine, [(p, scored) for p in prompts] + [(p, plain) for p in prompts])
    assert engine.scheduler.num_preemptions > 0
    assert [o.outputs[0].finish_reason for o in outs] == ["length"] * len(outs)
    for out in outs[:len(prompts)]:
        check_prompt_logprobs(model_and_config[0], out, 2)


def test_prompt_logprobs_do_not_stop_other_requests_hitting_the_prefix_cache(model_and_config):
    prompt = list(range(40, 62))
    plain = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    engine = make_engine(model_and_config, enable_prefix_caching=True)
    finish(engine, [(prompt, plain)])
    finish(engine, [(prompt, plain)])
    assert engine.scheduler.block_manager.prefix_cache_hits > 0


@pytest.mark.parametrize("spec", [
    {"method": "self_speculative", "num_speculative_tokens": 3, "draft_num_layers": 2},  # the target: all accepted
    {"method": "draft_model", "num_speculative_tokens": 2, "draft_num_layers": 1},  # rejections, resampled tokens
], ids=["self_speculative", "draft_model"])
def test_logprobs_through_speculative_verify_steps(model_and_config, spec):
    # the third request's logits processors change the distribution the rejection rule reads; its log-probs must
    # stay the raw model's (they were the processed ones for every token the rule accepted or resampled)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2),
              SamplingParams(temperature=0.9, max_tokens=10, ignore_eos=True, seed=4, logprobs=2),
              SamplingParams(temperature=0.9, max_tokens=10, ignore_eos=True, seed=5, logprobs=2,
                             logit_bias={t: 4.0 for t in range(60, 120)}, presence_penalty=1.5)]
    outs, engine = run(model_and_config, list(zip(PROMPTS, params)), speculative_config=spec)
    metrics = engine.speculative.metrics
    assert metrics.num_accepted_tokens > 0  # multi-token steps happened
    if spec["draft_num_layers"] == 1:  # and tokens the rejection rule resampled (scored from the step's logits)
        assert metrics.num_accepted_tokens < metrics.num_draft_tokens
    for out in outs:
        done = out.outputs[0]
        assert len(done.logprobs) == len(done.token_ids)
        ref = reference_logprobs(model_and_config[0], out.prompt_token_ids + done.token_ids)
        for j, (token, entry) in enumerate(zip(done.token_ids, done.logprobs)):
            check_entry(entry, token, ref[len(out.prompt_token_ids) - 1 + j], 2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_gpu_logprobs_with_cuda_graphs_equal_a_full_forward():
    """Decode steps replay CUDA graphs (the sampled rows' hidden states come from the graph): same log-probs.
    Tolerance 2e-3: the Triton attention kernels may round their fp32 dot products through TF32."""
    config = tiny_config(num_hidden_layers=2, max_position_embeddings=256)
    with torch.device("cuda"):
        model = tiny_model(config, seed=1)
    engine = LLMEngine(model, ByteTokenizer(), config, EngineConfig(block_size=16, num_kv_blocks=64,
                                                                    max_model_len=128, max_num_seqs=8), device="cuda")
    params = SamplingParams(temperature=0.8, seed=1, max_tokens=10, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    outs = finish(engine, [(prompt, params) for prompt in PROMPTS])
    assert engine.runner.cuda_graphs is not None
    for out in outs:
        tokens = out.prompt_token_ids + out.outputs[0].token_ids
        ref = reference_logprobs(model, tokens).cpu()
        scored = out.prompt_logprobs[1:] + out.outputs[0].logprobs
        ours = torch.tensor([entry[t].logprob for t, entry in zip(tokens[1:], scored)])
        torch.testing.assert_close(ours, ref[torch.arange(len(tokens) - 1), torch.tensor(tokens[1:])],
                                   atol=2e-3, rtol=0)


@pytest.mark.parametrize("field, value", [("logprobs", -2), ("logprobs", 2.0), ("prompt_logprobs", 1.5),
                                          ("prompt_logprobs", True)])
def test_bad_logprobs_values_are_rejected(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_max_logprobs_caps_requests_and_minus_one_means_the_whole_vocabulary(model_and_config):
    model, config = model_and_config
    engine = make_engine(model_and_config)  # max_logprobs 20, vLLM's default
    for field in ("logprobs", "prompt_logprobs"):
        with pytest.raises(ValueError, match=rf"{field} must be an integer in \[0, 20\] \(this engine's "
                                             rf"max_logprobs\) or -1, got 21"):
            engine.add_request(None, PROMPTS[0], SamplingParams(**{field: 21}))
        with pytest.raises(ValueError, match=rf"{field}=-1 asks for all {config.vocab_size} tokens of the "
                                             rf"vocabulary, but this engine returns at most max_logprobs=20"):
            engine.add_request(None, PROMPTS[0], SamplingParams(**{field: -1}))
    assert not engine.has_unfinished_requests()  # nothing was queued
    with pytest.raises(ValueError, match="max_logprobs must be an integer >= -1, got -2"):
        EngineConfig(max_logprobs=-2)
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, logprobs=-1, prompt_logprobs=-1)
    (out,), _ = run(model_and_config, [(PROMPTS[2], params)], max_logprobs=-1)
    assert params.logprobs == -1  # the engine resolved its own copy
    tokens = out.prompt_token_ids + out.outputs[0].token_ids
    ref = reference_logprobs(model, tokens)
    for p, entry in enumerate(out.prompt_logprobs[1:] + out.outputs[0].logprobs):
        check_entry(entry, tokens[p + 1], ref[p], config.vocab_size)
    (out,), _ = run(model_and_config, [(PROMPTS[2], SamplingParams(max_tokens=1, logprobs=25))], max_logprobs=25)
    assert len(out.outputs[0].logprobs[0]) in (25, 26)  # the top 25, and the sampled token if it is not among them


def test_logprob_is_a_small_dataclass():
    assert Logprob(-0.5, 1, "a") == Logprob(logprob=-0.5, rank=1, decoded_token="a")
    assert math.isclose(Logprob(-0.5).logprob, -0.5)


# -- the bundled SmolLM2 against Hugging Face transformers --------------------------------------------------------
TEXT = "The quick brown fox jumps over the lazy dog. Paris is the capital of"


@pytest.fixture(scope="module")
def smollm():
    """ONE LLM for the module, and the oracle: transformers' LlamaForCausalLM holding the same GGUF's weights in
    fp32. They are read by minillm's GGUF loader (tests/test_model.py checks that loader against transformers' own,
    which takes ~30 s here) and renamed by nothing: the loader yields Hugging Face names."""
    from test_model import GGUF_NAME, _gguf_dir
    from transformers import LlamaConfig, LlamaForCausalLM as HFLlama

    from minillm import LLM
    from minillm.loader.gguf_model import load_gguf_model
    c, weights = load_gguf_model(f"{_gguf_dir()}/{GGUF_NAME}")
    assert c.rope_scaling is None and not c.attention_bias  # plain Llama: the config below is complete
    with torch.device("meta"):  # no random init of 135M parameters: the GGUF's tensors are assigned below
        hf = HFLlama(LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size,
                                 intermediate_size=c.intermediate_size,
                                 num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                                 num_key_value_heads=c.num_key_value_heads, head_dim=c.head_dim,
                                 rms_norm_eps=c.rms_norm_eps, max_position_embeddings=c.max_position_embeddings,
                                 tie_word_embeddings=c.tie_word_embeddings,
                                 rope_parameters={"rope_type": "default", "rope_theta": c.rope_theta})).eval()
    missing, unexpected = hf.load_state_dict(dict(weights), strict=False, assign=True)
    assert not unexpected and all("lm_head" in name for name in missing), (missing, unexpected)
    if missing:
        hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf.config)  # its buffers are not in a state dict
    return LLM(max_model_len=128, max_num_seqs=2, seed=0, dtype="float32"), hf


def test_prompt_logprobs_equal_hf_log_softmax_and_give_the_perplexity(smollm):
    from minillm.bench import perplexity
    llm, hf = smollm
    out = llm.generate(TEXT, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=3))[0]
    ids = out.prompt_token_ids
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), dim=-1)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids) > 10
    ours = torch.tensor([out.prompt_logprobs[p][ids[p]].logprob for p in range(1, len(ids))])
    theirs = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(ours, theirs, atol=1e-3, rtol=0)
    for p in range(1, len(ids)):  # the top 3 alternatives are HF's top 3
        top = sorted((lp.rank, t) for t, lp in out.prompt_logprobs[p].items() if lp.rank <= 3)
        assert [t for _, t in top] == ref[p - 1].topk(3).indices.tolist()
    assert perplexity(llm, [TEXT]) == pytest.approx(math.exp(-float(theirs.mean())), rel=1e-3)
    with pytest.raises(ValueError, match="texts"):
        perplexity(llm, [])
    # streaming deltas carry the log-probs of their own tokens
    deltas = list(llm.generate_stream(TEXT, SamplingParams(temperature=0, max_tokens=3, logprobs=1)))
    assert sum(len(d.outputs[0].logprobs) for d in deltas) == sum(len(d.outputs[0].token_ids) for d in deltas)
    assert all(next(iter(e.values())).rank == 1 for d in deltas for e in d.outputs[0].logprobs)


# -- the OpenAI server ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def client():
    import openai

    from minillm.serve.server import ServerThread
    from serve_tiny import tiny_app
    app, _ = tiny_app()
    with ServerThread(app) as srv, openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0,
                                                 timeout=30) as c:
        yield c


def test_server_returns_openai_shaped_logprobs(client):
    from serve_tiny import MODEL
    done = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=2,
                                     extra_body={"ignore_eos": True})
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == done.choices[0].text and lp.text_offset[0] == 0
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob <= 0 and top[token] == logprob and max(top.values()) == logprob  # greedy: the top token
    streamed = list(client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, temperature=0, logprobs=2,
                                              stream=True, extra_body={"ignore_eos": True}))
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.token_logprobs] == \
        lp.token_logprobs

    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                          logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and "".join(c.token for c in content) == chat.choices[0].message.content
    for item in content:
        assert len(item.top_logprobs) == 3 and item.top_logprobs[0].logprob == item.logprob  # greedy
        assert [t.logprob for t in item.top_logprobs] == sorted((t.logprob for t in item.top_logprobs), reverse=True)
        # a byte token's own byte (token_bytes), even where its text alone is U+FFFD
        assert len(item.bytes) <= 1 and bytes(item.bytes).decode("utf-8", errors="replace") == item.token
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0,
                                                 logprobs=True, stream=True, extra_body={"ignore_eos": True}))
    streamed = [i for c in chunks if c.choices and c.choices[0].logprobs for i in c.choices[0].logprobs.content]
    assert [i.logprob for i in streamed] == [i.logprob for i in content]
    assert all(i.top_logprobs == [] for i in streamed)  # top_logprobs not asked: 0 alternatives
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None


def test_chat_logprobs_bytes_are_the_tokens_own(client):
    """OpenAI's `bytes` lets a client rebuild a character split across tokens: each token's own bytes (a byte
    token >= 0x80 is that byte, not the UTF-8 of U+FFFD), so the bytes of all the tokens are the answer's bytes."""
    from serve_tiny import MODEL
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=24,
                                          temperature=0, logprobs=True, extra_body={"ignore_eos": True})
    raw = b"".join(bytes(item.bytes) for item in chat.choices[0].logprobs.content)
    assert any(b >= 0x80 for b in raw)  # the tiny model's answer holds bytes that are no character alone
    assert raw.decode("utf-8", errors="replace") == chat.choices[0].message.content
    assert b"\xef\xbf\xbd" not in raw  # no U+FFFD stood in for a byte



def test_a_sentencepiece_tokens_logprob_text_keeps_its_space():
    """A log-prob entry's token text is its bytes (U+2581 a space), as the output's text has it: a SentencePiece
    token decoded alone ("w58" for "\u2581w58") lost its space, so the server's `token` differed from its
    `bytes` and completions' tokens did not add up to the text."""
    from tokenizers import Tokenizer as Backend
    from tokenizers import decoders, models, pre_tokenizers
    from minillm.loader.tokenizer import Tokenizer
    config = tiny_config(vocab_size=112, eos_token_id=0)
    backend = Backend(models.WordLevel(vocab={f"\u2581w{i}": i for i in range(112)}, unk_token="\u2581w0"))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    tokenizer = Tokenizer(backend, bos_token_id=None, eos_token_id=0)
    engine = LLMEngine(tiny_model(config, seed=2), tokenizer, config,
                       EngineConfig(block_size=4, num_kv_blocks=32, max_model_len=32, max_num_seqs=2))
    (out,) = finish(engine, [([5, 6, 7], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=1))])
    done = out.outputs[0]
    texts = [entry[token].decoded_token for token, entry in zip(done.token_ids, done.logprobs)]
    assert all(text.startswith(" w") for text in texts) and "".join(texts) == done.text, (texts, done.text)
