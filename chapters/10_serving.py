# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chapter 10 — Serving: the async engine loop, streaming over HTTP, latency under load
#
# Users meet vLLM and SGLang over HTTP first: an OpenAI-compatible server that streams tokens as they are made.
# Everything of chapters 1-9 sits behind it; this chapter builds the front door and measures what a user feels.
#
# 1. **The async loop.** The engine has one scheduler and is not thread-safe, but a server holds hundreds of
#    requests at once. `AsyncLLM` (vLLM's `AsyncLLMEngine`) runs *one* loop that steps the engine; any number of
#    coroutines add requests and stream their outputs; a coroutine that goes away aborts its request.
# 2. **Text, one step at a time.** Tokens become text without half characters, and stop strings end a request
#    even when they arrive split across steps, without the client ever seeing text that is taken back.
#    Three exercises: `next_text`, `find_stop_string`, `stream_safe_length`.
# 3. **The server.** `minillm serve`: FastAPI + uvicorn, `/v1/completions` and `/v1/chat/completions` with
#    Server-Sent Events, `/v1/embeddings`, OpenAI-shaped errors, `/metrics` for Prometheus.
# 4. **Latency under load.** `minillm bench serve` sends real prompts at a request rate and reports TTFT, TPOT,
#    ITL and end-to-end latency; the plot of latency against rate is the picture every serving paper shows; and
#    the load a server carries, by Little's law (exercise `max_request_rate`).
# 5. **The playground** at `/`: a chat box beside the live engine (queues, KV blocks, each step's batch).
# 6. **Structured outputs.** A JSON schema, a regex, a list of choices or a grammar, enforced token by token: the
#    format becomes a byte-level automaton (a grammar's with a stack), and each step masks every token that would
#    leave it (exercises `token_mask` and `stack_closure`).
# 7. **Many fine-tunes, one model.** LoRA adapters served side by side: each request names its adapter, and one
#    batch adds every sequence's own low-rank product (exercise `lora_delta`).

# %%
import asyncio
import math

import httpx
import openai
from prometheus_client.parser import text_string_to_metric_families

from minillm import LLM, SamplingParams
from minillm.bench.serve import bench_serve, format_result, plot_latency_vs_rate
from minillm.course.impl import load_function
from minillm.course.overrides import use_overrides
from minillm.engine.async_llm import AsyncLLM
from minillm.engine.detokenizer import DetokenizerState, detokenize_incrementally
from minillm.serve.app import build_app
from minillm.serve.server import ServerThread

llm = LLM(max_model_len=256, max_num_seqs=4)  # the bundled SmolLM2-135M-Instruct; small, so it runs on a CPU
next_text = load_function("ch10.next_text")  # yours (MINILLM_IMPL), or the reference where you have not started
find_stop_string = load_function("ch10.find_stop_string")
stream_safe_length = load_function("ch10.stream_safe_length")
max_request_rate = load_function("ch10.max_request_rate")
token_mask = load_function("ch10.token_mask")
stack_closure = load_function("ch10.stack_closure")
lora_delta = load_function("ch10.lora_delta")

# %% [markdown]
# ## 1. One loop steps the engine; coroutines stream
#
# ```
# coroutine A --add-->   pending adds   \                      / queue of A --> async for out in generate(...)
# coroutine B --add-->   pending adds    > engine loop (1 task) <  queue of B --> ...
# coroutine C --abort--> pending aborts /   step() in a thread  \ snapshot --> /metrics, playground
# ```
#
# Between two steps, on the event loop, the loop applies the queued adds and aborts; then it runs
# `engine.step()` in one worker thread, so the event loop keeps serving other coroutines (and HTTP) while the
# model computes; then it hands each `RequestOutput` to its request's queue. Only the loop touches the engine,
# and only while no step is running: no lock, no race on the scheduler.
#
# Three concurrent requests, greedy: each `async for` sees its request's output after every step it took part
# in; a step listener records who was in each batch, the continuous batching of chapter 6 seen from outside.

# %%
PROMPTS = ["The capital of France is", "Water boils at a temperature of", "The three primary colors are"]
GREEDY = SamplingParams(temperature=0, max_tokens=10)


async def three_streams() -> tuple[list[str], list[list[str]]]:
    engine = AsyncLLM.from_llm(llm)
    batches = []
    engine.add_step_listener(lambda outputs, snap: batches.append([b["request_id"] for b in snap.batch]))
    await engine.start()

    async def one(i: int) -> str:
        async for out in engine.generate(PROMPTS[i], GREEDY, request_id=f"req{i}"):
            pass
        return out.outputs[0].text
    texts = await asyncio.gather(*(one(i) for i in range(3)))
    await engine.shutdown()
    return texts, [b for b in batches if b]

texts, batches = await three_streams()
print("steps:", len(batches), "| first batches:", batches[:3])

# %%
# NBVAL_CHECK_OUTPUT
for prompt, text in zip(PROMPTS, texts):
    print(f"{prompt!r} -> {text!r}")


# %% [markdown]
# **Cancellation frees blocks at once.** A client that disconnects cancels its coroutine; the generator's
# `finally` queues an abort, and the loop applies it before the next step. The snapshot (what `/metrics`
# reads) shows the KV blocks of a long request, then none a moment after the cancel.

# %%
async def cancel_one() -> tuple[int, int]:
    engine = AsyncLLM.from_llm(llm)
    await engine.start()
    first = asyncio.Event()

    async def long_request():
        async for _ in engine.generate("Write a long story about a lighthouse keeper. " * 4,
                                       SamplingParams(temperature=0, max_tokens=200)):
            first.set()
    task = asyncio.ensure_future(long_request())
    await first.wait()
    held = engine.snapshot().num_used_blocks
    task.cancel()
    while engine.snapshot().num_used_blocks:
        await asyncio.sleep(0.01)
    freed = engine.snapshot().num_used_blocks
    await engine.shutdown()
    return held, freed

held, freed = await cancel_one()
# NBVAL_CHECK_OUTPUT
print(f"blocks held while streaming: {held > 0}; after the cancel: {freed}")

# %% [markdown]
# ## 2. Text, one step at a time
#
# A stream sends text, but the engine makes tokens, and "decode the newest token" is wrong twice over:
#
# * **Half characters.** SmolLM2's tokenizer is byte-level BPE: a CJK character or an emoji is 3-4 bytes of
#   UTF-8 and may be cut between tokens. A piece decoded alone is U+FFFD (�), and a client that received it
#   could never repair it.
# * **Spaces that depend on context.** SentencePiece tokenizers (Llama 2, Mistral) render a word's leading space
#   only when something is decoded before it.
#
# So the engine decodes a small *window* (a few tokens already sent, as context, plus the new ones) and sends the
# difference once it no longer ends in U+FFFD (vLLM's scheme, from Hugging Face's text-generation-inference).
# `next_text` is that rule (**exercise `ch10.next_text`**); the engine calls it for every token of every request.

# %%
tok = llm.tokenizer
ids = tok.encode("Tea in 東京 costs ¥500 🍵!", add_special_tokens=False)
# NBVAL_CHECK_OUTPUT
print("each token alone:", [tok.decode([t]) for t in ids])
state = DetokenizerState.for_prompt(3)  # the first three tokens play the prompt
with use_overrides({"ch10.next_text": next_text}):  # your rule, inside the engine's detokenizer
    print("streamed:        ", [detokenize_incrementally(tok, ids[:n], state) for n in range(4, len(ids) + 1)])

# %% [markdown]
# **Stop strings** (`stop=["\n\nQ:"]`) end a request where the string appears, and cut it from the output.
# Two traps, one exercise each. The string may arrive split across steps (`"\n"`, then `"\nQ"`), so the search
# must reach back over the seam, yet only that far, or every step rescans the whole output
# (**`ch10.find_stop_string`**). And while streaming, text that could still become a stop string (`"\n\nQ"`)
# must be held back, or the client is shown characters the finished answer does not contain
# (**`ch10.stream_safe_length`**). Pieces of text arrive as a stream's steps deliver them; each line is what the
# client is shown after that step:

# %%
# NBVAL_CHECK_OUTPUT
stops, text = ["\n\nQ:"], ""
for piece in ["The answer", " is 42.", "\n", "\nQ", ": and", " then?"]:
    text += piece
    cut = find_stop_string(text, stops, len(piece))
    if cut >= 0:
        print(f"+ {piece!r:12} stop string at {cut}: the request ends with {text[:cut]!r}")
        break
    print(f"+ {piece!r:12} shown: {text[:stream_safe_length(text, stops)]!r}")

# %% [markdown]
# The same three functions of yours, inside the engine, on the real model:

# %%
# NBVAL_CHECK_OUTPUT
yours = {"ch10.next_text": next_text, "ch10.find_stop_string": find_stop_string,
         "ch10.stream_safe_length": stream_safe_length}
with use_overrides(yours):
    out = llm.generate(["List three colors:\n1."], SamplingParams(temperature=0, max_tokens=30, stop=["\n4."]))[0]
print(repr(out.outputs[0].text), out.outputs[0].finish_reason)

# %% [markdown]
# ## 3. The server
#
# `minillm serve` builds exactly this: `build_app(AsyncLLM, model_name)` is a FastAPI app whose lifespan starts
# the loop, and uvicorn serves it on 127.0.0.1 (never every interface by default: an open inference server is
# free compute for anyone). Here we run it in a background thread of this notebook, on a free port, and talk to
# it with the official `openai` client, as any application would.

# %%
server = ServerThread(build_app(AsyncLLM.from_llm(llm), "smollm2")).start()
client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)
# NBVAL_CHECK_OUTPUT
print([m.id for m in client.models.list()])
reply = client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "What is the capital "
                                       "of France?"}], max_tokens=16, temperature=0)
print(repr(reply.choices[0].message.content), reply.choices[0].finish_reason, reply.usage.completion_tokens)

# %% [markdown]
# **Streaming.** With `stream=True` the server answers with Server-Sent Events: one `data: {...}` event per
# engine step that produced text, the last with its `finish_reason`, then (with `stream_options.include_usage`)
# one with the token counts, then `data: [DONE]`. The first event's arrival is the **time to first token**.

# %%
import time

start = time.perf_counter()
arrivals = []
for chunk in client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "Name three "
                                            "fruits."}], max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        arrivals.append((time.perf_counter() - start, chunk.choices[0].delta.content))
    if chunk.usage:
        usage = chunk.usage
print(f"TTFT {arrivals[0][0] * 1000:.0f} ms; then one event every "
      f"{(arrivals[-1][0] - arrivals[0][0]) / max(1, len(arrivals) - 1) * 1000:.0f} ms")
print("".join(text for _, text in arrivals))

# %% [markdown]
# **The Responses API** (`/v1/responses`) is OpenAI's newer shape of the same turn: `instructions` and `input` in,
# a list of typed *output items* out (the message; with tools, function calls; with a reasoning parser, the
# thought), streamed as named events (`response.output_text.delta`, ...). The server answers it with the chat
# path: `minillm/serve/responses.py` only translates, both ways.

# %%
response = client.responses.create(model="smollm2", instructions="Answer in one word.",
                                   input="What is the capital of France?", max_output_tokens=8, temperature=0)
# NBVAL_CHECK_OUTPUT
print([item.type for item in response.output], repr(response.output_text), response.status)

# %% [markdown]
# **Token ids beside the text.** A client that trains on what the model sampled (reinforcement learning on a served
# policy) must not tokenize the answer's text again: a decoded string may come back as other tokens, and the
# log-probabilities it trains on belong to the sampled ones. vLLM's `return_token_ids` returns the prompt's ids and
# the answer's (streamed: each event's own); `minillm serve --skip-tokenizer-init` serves ids alone, no text.

# %%
body = {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "return_token_ids": True}
done = httpx.post(server.url + "/v1/completions", json=body).json()["choices"][0]
print(done["prompt_token_ids"], done["token_ids"], repr(done["text"]))

# %%
tokenizer = llm.get_tokenizer()  # the same ids the tokenizer gives the prompt; the answer's text decoded from its ids
# NBVAL_CHECK_OUTPUT
print(done["prompt_token_ids"] == tokenizer.encode(body["prompt"]),
      tokenizer.decode(done["token_ids"], skip_special_tokens=True) == done["text"])

# %% [markdown]
# **Embeddings** are the same server's other OpenAI endpoint. An embedding request is a prefill and nothing more:
# the vector is the final hidden state of the prompt's *last* token (the one position of a causal model that has
# seen the whole prompt), scaled to unit length, so a dot product is a cosine similarity (`minillm/pooling.py`;
# `LLM.embed` offline). The engine batches these prefill-only requests with everything else.

# %%
texts = ["The cat sat on the mat.", "A kitten was sitting on the rug.", "Stock markets fell sharply today."]
vectors = [d.embedding for d in client.embeddings.create(model="smollm2", input=texts).data]
# NBVAL_CHECK_OUTPUT
print(len(vectors[0]), "numbers each; cat . kitten", round(sum(a * b for a, b in zip(vectors[0], vectors[1])), 2),
      "| cat . stocks", round(sum(a * b for a, b in zip(vectors[0], vectors[2])), 2))

# %% [markdown]
# vLLM's `/rerank` (and `/score`) returns those cosines directly, best document first. Last-token pooling is one
# choice of three: `--pooler-config '{"pooling_type": "MEAN"}'` averages every prompt position instead, and such
# a request skips the prefix cache, since a cached block never computed its rows' hidden states.

# %%
ranked = httpx.post(server.url + "/rerank", json={"query": texts[0], "documents": texts[1:]}).json()["results"]
# NBVAL_CHECK_OUTPUT
print([(r["document"]["text"][:12], round(r["relevance_score"], 2)) for r in ranked])

# %% [markdown]
# **Errors are OpenAI-shaped**, so the `openai` client raises them with our message. A few bad requests and their
# status codes: an unknown model is a 404, a request that cannot fit the context or a value of the wrong type a
# 400 (FastAPI's default for a schema error is 422; OpenAI and vLLM answer 400).

# %%
# NBVAL_CHECK_OUTPUT
for body in ({"model": "gpt-4", "prompt": "hi"}, {"prompt": "hi", "max_tokens": 10_000},
             {"prompt": "hi", "temperature": "hot"}):
    r = httpx.post(server.url + "/v1/completions", json=body)
    print(r.status_code, r.json()["error"]["message"][:90])

# %% [markdown]
# **/metrics** speaks Prometheus' text format (vLLM's names, `minillm:` instead of `vllm:`): gauges for the
# queues and the KV pool, counters for tokens, preemptions and prefix-cache lookups, histograms of TTFT, TPOT
# and end-to-end latency.

# %%
families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.url + "/metrics").text)}
# NBVAL_CHECK_OUTPUT
print(sorted(name for name in families if name.startswith("minillm:") and not name.endswith("_created")))

# %%
gen = families["minillm:generation_tokens"].samples[0].value
print(f"generated so far: {gen:.0f} tokens; KV blocks in use now: "
      f"{families['minillm:kv_cache_blocks_used'].samples[0].value:.0f}")

# %% [markdown]
# ## 4. TTFT, TPOT and ITL under rising load
#
# `minillm bench serve` plays users: prompts cut from the standard library's docstrings, sent at a request rate
# with Poisson arrivals (independent users), or all at once (a burst). For each request it timestamps every
# streamed event:
#
# * **TTFT** (time to first token) = queueing + prefill. Grows first when the server is overloaded: new
#   requests wait for a slot (max_num_seqs) or for KV blocks.
# * **ITL** (inter-token latency), the gaps between events, and **TPOT** (time per output token, one mean per
#   request) = the decode step time. Grows more slowly: a bigger batch makes each step a little longer
#   (chapter 4: decode is memory-bound, so extra sequences are nearly free until compute catches up).
# * **E2E** = TTFT + (output tokens - 1) x TPOT. **Goodput** counts only requests that met an SLO.
#
# A small sweep against the server above (four prompts, six tokens each, three rates; tiny, to keep the
# notebook quick on a CPU, so the curve is rough):

# %%
prompts = ["Return the sum of the numbers in the list.", "Open the file and return a stream.",
           "Parse the string and return a date object.", "Sort the list in place and return None."]
results = [bench_serve(server.url, prompts, rate, output_len=6, slo_ttft_ms=2000, slo_tpot_ms=500)
           for rate in (2.0, 8.0, math.inf)]
for r in results:
    print(format_result(r))
plot_latency_vs_rate(results)

# %% [markdown]
# Four requests are too few for a curve: the differences above are mostly noise (a busy CPU, the first request's
# warm-up). What a real sweep shows, read from left to right: at a low rate each request finds the engine idle,
# so TTFT is one prefill and TPOT one small decode step. As the rate rises, batches grow (TPOT creeps up) and
# requests start to queue (TTFT climbs, its p99 first). The burst is the extreme: everyone arrives at once, the
# last admitted waits for all before it. Run it on your own machine (the numbers in `benchmarks/RESULTS.md` are
# ours, on a CPU and on an H200):
#
# ```
# minillm serve --max-num-seqs 8 &
# minillm bench serve --num-prompts 40 --output-len 64 --request-rate 0.5,1,2,4,inf --plot latency.png
# ```
#
# Then try `--enable-prefix-caching` or a larger `--max-num-seqs` and watch which curve moves.
#
# **Interview question: how many requests per second can this server take?** Little's law: requests inside the
# server = arrival rate x time each stays. A full batch holds max_num_seqs requests, each staying output tokens x
# step time, so a rate above max_num_seqs / (output tokens x step time) only lengthens the queue: TTFT grows
# without bound. That is **exercise `ch10.max_request_rate`**. For the sweep above (the burst's median TPOT as
# the step time) and for SmolLM2 on an H200 (256 sequences at 26,118 output tokens/s, benchmarks/RESULTS.md:
# a 9.8 ms step) answering 200 tokens each:

# %%
tpot_s = results[-1].latency_ms["tpot"]["median"] / 1000
print(f"this notebook's server: at most ~{max_request_rate(4, 6, tpot_s):.1f} requests/s of 6 tokens")

# %%
# NBVAL_CHECK_OUTPUT
print(f"SmolLM2 on an H200: {max_request_rate(256, 200, 256 / 26_118):.0f} requests/s of 200 tokens")

# %% [markdown]
# ## 5. The playground
#
# Open `http://127.0.0.1:8000/` while `minillm serve` runs: a chat box streams tokens, and beside it the live
# engine: running and waiting queues, the KV pool as a grid of blocks coloured by the request that holds them,
# and the batch of each recent step (`P` marks a prefill). Send a long question, then another from a second tab,
# and watch the second request's blocks appear and both share each step. The page is plain HTML and JavaScript
# (`minillm/serve/playground.html`): the chat reads the SSE stream with `fetch`, the engine view polls
# `/engine/state`, the snapshot the engine loop takes after every step.

# %%
print(f"while this notebook's server runs, its playground is at {server.url}/")
state = httpx.get(server.url + "/engine/state").json()
print(f"engine: step {state['step']}, {state['num_blocks']} KV blocks of {state['block_size']} tokens, "
      f"{state['num_used_blocks']} in use")
server.stop()  # graceful: open streams finish, then the engine loop stops

# %% [markdown]
# ## 6. Structured outputs: a format enforced in the sampler
#
# An application that parses the answer (JSON for a tool call, one label of a classifier, a date) cannot rely on
# asking nicely. vLLM's `structured_outputs` (OpenAI's `response_format`) *enforce* a format: at every step, every
# token that would take the output outside it gets probability zero before the sampler picks. The model is
# untouched; only its logits are masked (Willard and Louf, 2023: the idea behind Outlines and XGrammar).
#
# 1. The format becomes a regular expression: a JSON schema is written out as one (`json_schema_regex`), a list of
#    choices as their alternation.
# 2. The regex becomes a deterministic automaton over **bytes**: tokens are byte strings, and one may end inside a
#    character.
# 3. From each automaton state, the allowed tokens are those whose bytes the automaton can read without dying. The
#    vocabulary is walked as a trie, all 49,152 tokens at once, and the mask is cached per state.
# 4. Each step a request's row gets the mask of the state its output has reached (`minillm/engine/constraints.py`);
#    EOS is allowed exactly where the output is complete, and a finished format ends the request.

# %%
from minillm.sampling_params import StructuredOutputsParams
from minillm.structured import TokenIndex, TokenVocabulary, compile_regex, json_schema_regex
from minillm.structured.token_index import dfa_tables

schema = {"type": "object", "properties": {"city": {"enum": ["Paris", "London", "Tokyo"]},
                                           "population_millions": {"type": "number"}},
          "required": ["city", "population_millions"]}
pattern = json_schema_regex(schema, whitespace="")
vocabulary = TokenVocabulary.from_tokenizer(tok, tok.vocab_size, [tok.eos_token_id])
index = TokenIndex(compile_regex(pattern), vocabulary)
# NBVAL_CHECK_OUTPUT
print(pattern)
state = index.start
for text in ['{"city":"', "Lon", 'don","population_millions":', "8.9", "}"]:
    allowed = index.allowed(state)
    examples = [tok.decode([t]) for t in allowed.nonzero().flatten()[:4].tolist()]
    print(f"{int(allowed.sum()):6d} tokens allowed, e.g. {examples}; the text goes on with {text!r}")
    state = index.dfa.walk(state, text.encode())
print("complete:", index.is_accepting(state), "| anything may follow:", index.dfa.can_continue(state))

# %% [markdown]
# `allowed` applies one rule (**exercise `ch10.token_mask`**): a token may come when the automaton reads *all* of
# its bytes from the state without dying (it need not end in a match: more tokens follow); a token without bytes
# (`<|im_end|>`) never may, except EOS, exactly where the output is a complete match. The index computes it for the
# whole vocabulary at once, walking the vocabulary's trie so that tokens sharing a prefix share its walk; your
# version walks token by token, and must agree at every state of the walk above:

# %%
transitions, accepting = dfa_tables(index.dfa)
state, same = index.start, []
for text in ['{"city":"', "Lon", 'don","population_millions":', "8.9", "}"]:
    yours = token_mask(transitions, accepting, state, vocabulary.token_bytes, vocabulary.eos_token_ids)
    same.append(bool((yours == index.allowed(state)).all()))
    state = index.dfa.walk(state, text.encode())
# NBVAL_CHECK_OUTPUT
print("your masks equal the index's at every state:", same)

# %% [markdown]
# The same schema on the model, greedy. Without the constraint SmolLM2 answers in prose; with it, the first token
# can only be `{`, and the answer parses:

# %%
import json

question = [{"role": "user", "content": "Which city is the capital of the United Kingdom, and how many people live "
                                        "there? Answer in JSON."}]
free = llm.chat([question], SamplingParams(temperature=0, max_tokens=30))[0].outputs[0]
forced = llm.chat([question], SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(
    json=schema, disable_any_whitespace=True)))[0].outputs[0]
# NBVAL_CHECK_OUTPUT
print("free:  ", repr(free.text))
print("forced:", forced.text, "->", json.loads(forced.text))

# %% [markdown]
# The format is guaranteed; the content is not. The city is right, but "population in millions" came out as a
# runaway number: a regular language can say "a JSON number", not "a number below 100" (`minimum` and `maximum`
# are not regular: `json_schema_regex` accepts them and says it ignores them), and a 135M model fills the
# format with what it can. Requests ask for a format on the server the same ways: `structured_outputs`,
# `guided_json` / `guided_regex` / `guided_choice`, or OpenAI's `response_format` with a `json_schema`. Tool calling
# is the same idea: `tool_choice` naming a function (or `"required"`) constrains the answer to the call's JSON,
# which the server returns as `tool_calls` (`minillm/serve/tool_calls.py`).

# %% [markdown]
# **Beyond regular languages.** A regex cannot count: no regex accepts exactly the balanced brackets, so a JSON
# value written as a regex stops at a few levels of nesting. A *context-free grammar* can, because a rule may use
# itself (`json_object` runs on one). vLLM takes grammars as GBNF, the EBNF of llama.cpp and XGrammar (`structured_outputs={"grammar": ...}`,
# or `guided_grammar` on the server). `minillm/structured/pushdown.py` runs one with the same machinery plus a
# **stack**: every rule is a byte NFA; a rule's use is a *call* that pushes where to go on afterwards, and a rule's
# end pops it. A set of stacks is one state of a DFA that would be infinite if built whole; built lazily (only the
# configurations a decode reaches exist, each interned to an int with its 256-byte row), it is just another DFA to
# `TokenIndex`, so the trie walk, the mask cache and your `token_mask` serve grammars unchanged. The new piece is
# **exercise `ch10.stack_closure`**: every stack reachable without reading a byte (follow epsilon edges; a call
# pushes its return state under the called rule's entry; a rule's exit pops). A call in tail position pushes
# nothing, so `items ::= item ("," items)?` stays one level deep over a thousand items. The cell below runs yours.

# %%
# NBVAL_CHECK_OUTPUT
from minillm.structured import compile_grammar

arithmetic = """
root   ::= expr
expr   ::= term (("+" | "-") term)*
term   ::= factor (("*" | "/") factor)*
factor ::= [0-9]+ | "(" expr ")"
"""
ask = [{"role": "user", "content": "What is 12 times 7 plus 5? Write the expression."}]
with use_overrides({"ch10.stack_closure": stack_closure}):  # the automata built in here run your closure
    grammar_index = TokenIndex(compile_grammar(arithmetic), vocabulary)
    auto = grammar_index.dfa
    for text in ["", "((", "((12", "((12+3)", "((12+3)*4)"]:
        state = auto.walk(auto.start, text.encode())
        allowed = grammar_index.allowed(state)
        print(f"{text!r:14} stack depth {auto.depth(state)}  {int(allowed.sum()):5d} tokens allowed, "
              f"')' among them: {bool(allowed[tok.encode(')', add_special_tokens=False)[0]])}, "
              f"complete: {auto.is_accepting(state)}")
    forced = llm.chat([ask], SamplingParams(temperature=0, max_tokens=30,
                                            structured_outputs={"grammar": arithmetic}))[0].outputs[0]
free = llm.chat([ask], SamplingParams(temperature=0, max_tokens=30))[0].outputs[0]
print("free:  ", repr(free.text), "\nforced:", repr(forced.text), forced.finish_reason)

# %% [markdown]
# A `)` is allowed exactly while a `(` is open, at any depth: the stack remembers what a DFA cannot. What a grammar
# may not do is reach itself before reading a byte (`expr ::= expr "+" term`, left recursion): the closure would push
# forever, so it is refused with the rule cycle named; write it with repetition, as above. XGrammar's *structural
# tags* (`structural_tag=`) compile into the same grammars: free text in which a trigger such as `<function=` may
# appear only as the start of a whole tool call, its arguments held to their JSON schema. That is how the server's
# `tool_choice: "auto"` works (`minillm serve --enable-auto-tool-choice --tool-call-parser hermes`): the model
# decides whether to call, but once it writes `<tool_call>` the call it starts is whole and valid, and the server
# reads it out of the text as `tool_calls` (`minillm/serve/tool_parser.py`).


# %% [markdown]
# ## 7. Many fine-tunes, one model: multi-LoRA serving
#
# A LoRA adapter (Hu et al., 2021) fine-tunes a model by *adding* a low-rank product to chosen layers:
# y = x W^T + scaling (x A^T) B^T, with A [r, in] and B [out, r] and r of 8 to 64. An adapter for SmolLM2's seven
# projections at rank 8 is about 1.9 MB, against 540 MB of weights: a server can keep hundreds and hold one base
# model. Merging (W + scaling B A) serves one adapter at a time; serving many *at once* (S-LoRA, Punica, vLLM's
# `enable_lora`) leaves W alone and adds, after each layer's matmul, each sequence's own product:
#
# 1. The running requests' adapters sit in `max_loras` device **slots**, stacked per layer (minillm/lora/layers.py);
#    the scheduler never runs more distinct adapters than slots, and the engine moves adapters in and out (LRU).
# 2. A step's packed tokens form one **segment** per sequence, (start, length, slot); each segment costs two skinny
#    matmuls, x A^T (r wide) and then B. On a GPU one Triton program per segment tile (`minillm/kernels/lora.py`),
#    and decode steps replay CUDA graphs captured with the adapters' kernels.
# 3. The prefix cache keys a request's blocks from its adapter: the same prompt under two adapters has different
#    keys and values.
#
# The product of one layer for a whole batch is **exercise `ch10.lora_delta`**: here it must equal a layer whose
# weight has each row's adapter merged in.

# %%
import tempfile

import torch

from minillm import LoRARequest
from minillm.lora.adapter import random_adapter, save_adapter

torch.manual_seed(0)
x, w = torch.randn(6, 32), torch.randn(24, 32)  # 6 tokens of a layer 32 -> 24
a, b = torch.randn(2, 4, 32) * 0.1, torch.randn(2, 24, 4) * 0.1  # two adapters (slots 0, 1) of rank 4
segments = [(0, 2, 1), (2, 3, -1), (5, 1, 0)]  # three sequences: adapter 1, none, adapter 0
y = lora_delta(x, a, b, segments, x @ w.T)
merged = torch.cat([x[0:2] @ (w + b[1] @ a[1]).T, x[2:5] @ w.T, x[5:6] @ (w + b[0] @ a[0]).T])
# NBVAL_CHECK_OUTPUT
print("each row as if its own adapter were merged:", torch.allclose(y, merged, atol=1e-5))

# %% [markdown]
# Two adapters for SmolLM2, in PEFT's format (`adapter_config.json`, `adapter_model.safetensors`): random ones here,
# where a real one comes from a fine-tune. One engine, one batch, three requests: the base model and each adapter.

# %%
folder = tempfile.mkdtemp()
requests = []
for i, name in enumerate(["random-1", "random-2"]):
    save_adapter(random_adapter(llm.llm_engine.model_config, rank=8, seed=i, std=0.05), f"{folder}/{name}")
    requests.append(LoRARequest(name, i + 1, f"{folder}/{name}"))
lora_llm = LLM(max_model_len=256, max_num_seqs=4, enable_lora=True, max_loras=2, max_lora_rank=8)
question = "Name three uses of copper."
outs = lora_llm.generate([question] * 3, SamplingParams(temperature=0, max_tokens=16),
                         lora_request=[None, *requests])
# NBVAL_CHECK_OUTPUT
for label, out in zip(["base", *[r.lora_name for r in requests]], outs):
    print(f"{label:9s}{out.outputs[0].text!r}")

# %% [markdown]
# The same requests over HTTP: `minillm serve --enable-lora --lora-modules random-1=DIR random-2=DIR`; `/v1/models`
# lists the adapters, and a request's `"model": "random-1"` picks one (an unknown name is a 404, as in vLLM).

# %% [markdown]
# **Serving beside a trainer.** In RL from feedback the engine generates rollouts, then the trainer updates the
# policy on the same GPU, then the engine generates again with the new weights. vLLM's answer, and minillm's:
# `pause_generation()` empties the engine (new requests wait), `sleep(level=1)` hands the device memory of the
# weights (copied to host memory) and of the KV pool back (level 2 drops the weights too), the trainer runs,
# `wake_up()` takes the memory again and captures the CUDA graphs anew, `update_weights(...)` copies the new
# weights in, `resume_generation()` lets the waiting requests in. Storages are resized to zero bytes and back, so
# every tensor reference survives; on the H100 this gave back all 70 GiB of an 8B engine in 5.5 s, against 45 s to
# build it again (`minillm/engine/sleep_mode.py`, benchmarks/RESULTS.md). On this CPU it only frees the KV pool:

# %%
pool = lora_llm.llm_engine.executor.driver_worker.runner.kv_cache.storage
before = pool.untyped_storage().nbytes()
lora_llm.sleep(level=1)
asleep = pool.untyped_storage().nbytes()
lora_llm.wake_up()
# NBVAL_CHECK_OUTPUT
print(f"KV pool: {before / 2**20:.0f} MiB, asleep {asleep} bytes, back {pool.untyped_storage().nbytes() == before}")
again = lora_llm.generate([question], SamplingParams(temperature=0, max_tokens=16), lora_request=requests[0])[0]
print("the same answer after waking:", again.outputs[0].text == outs[1].outputs[0].text)
