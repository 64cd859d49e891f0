"""Randomized differential stress test of the OpenAI server (chapter 10): concurrent HTTP clients, each judged
against its requests run alone.

For each seed: an engine as the engine stress test draws one (stress_helpers.draw_engine_options: prefix caching,
chunked prefill with a small token budget, preemption by recompute or swap, async scheduling, the priority policy
(then half the clients send a priority), an fp8 KV cache; a speculative method from
test_engine_stress.SPEC_METHODS), behind build_app and a ServerThread, and 6 to 14 clients (draw_client) that arrive
at random engine steps through httpx: /v1/completions with a text or token-id prompt or a list of 2 or 3 (sharing
prefixes, so the prefix cache hits), or /v1/chat/completions through serve_tiny.TEMPLATE; greedy or seeded
(temperature 0.8; not with speculation or fp8, whose batches legitimately move the draws), n = 1 to 3 (choice i is
seeded seed + i), max_tokens up to what the context leaves (or left out: 16 for completions, the rest of the context
for chat; max_completion_tokens for chat sometimes), ignore_eos, stop_token_ids and stop strings cut from the solo
run (stress_helpers.draw_stop, so they fire; min_tokens with them), skip_special_tokens (false 1 time in 4: special
tokens' text, which token-id prompts hold now and then and the model samples often, in the answer, its stream, its
echo, its log-probs and its stop strings) and spaces_between_special_tokens, log-probs (completions' top-k, chat's
logprobs + top_logprobs), echo (with the prompt's log-probs; max_tokens 0 scores the prompt only), streaming or not,
stream_options.include_usage (with continuous_usage_stats: each choice's usage so far on its chunks),
return_token_ids (the prompt's and the answer's token ids, whole or per event: the engine's exactly), logits
processors (1 in 5: penalties, logit_bias, min_p; top-k and top-p beside a seed). Some clients leave:
"mid_stream" closes the connection after a few events; "early" is cancelled at a random engine step, streaming
or not (maybe before its body was read). A few send a body test_serve_api.BAD refuses (400, 404 or 413 with its
words in an OpenAI-shaped error; a priority only where the engine schedules fcfs).

Checked, for every client that read its answer to the end (async_stress_helpers.EngineRecorder records what the
engine gave each of its requests, `{response id}-{choice index}`; tests/openai_wire.py reads and judges answers):
    the SSE stream is well formed: `data: ` lines, one id and object, `[DONE]` last and once; per choice index a
    chat role chunk first, exactly one finish_reason, in its last chunk; `usage` null in every chunk and a final
    usage chunk without choices with include_usage, no `usage` key without;
    per choice, the streamed pieces (or the JSON body's text) are the echo, if any, then exactly the engine's final
    text, with its finish_reason ("length" for a scored prompt); the log-probs are the engine's (one per token, its
    bytes, the top-k by rank; an echoed prompt's first token null); usage counts the prompt once and every choice's
    tokens; no stop string shows (min_tokens 0), but for the one that ended it with include_stop_str_in_output;
    the engine's outputs are the requests run alone (stress_helpers.compare: tokens, text, finish reason, log-probs;
    a greedy tie or fp8 rounding excepted as there). A client that left mid-stream saw the start of its choices'
    final texts; every engine request ended (aborts included), its tokens the start of its run alone
    (check_partial); after the storm every block is free, no stream or queue is left, the scheduler's invariants
    held after every step, and the server answers a plain completion as the engine alone does.
Three in ten engines (not fp8) have a tokenizer that cannot decode POISON_TEXT (stress_helpers.FussyTokenizer),
and some token-id completions end their first prompt with it: such a request (or one that samples POISON_TEXT)
fails as it does alone (unless a stop token ends it before it makes text), with a 500 "generation failed", or,
streaming, an error event and [DONE] (after whatever its other choices sent); every other client is judged as usual.

CI runs SEEDS seeds (about a second each: a server starts and stops per seed). A longer hunt:
MINILLM_OPENAI_STRESS_SEEDS=200 (and MINILLM_OPENAI_STRESS_FIRST=10000); a failing seed prints its clients.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random

import httpx
import pytest

from async_stress_helpers import EngineRecorder, check_partial, gather_clients, settle, until_step
from minillm.engine.async_llm import AsyncLLM
from minillm.sampling_params import choice_seed
from minillm.serve.app import build_app
from minillm.serve.server import ServerThread
from openai_wire import TOKENIZER, HttpClient, check_choice, read_body, read_sse
from serve_tiny import MODEL, TEMPLATE
from stress_helpers import (MAX_LEN, POISON_TEXT, EngineChecks, Reference, Request, Scenario, compare,
                            draw_constraint, draw_engine_options, draw_processors, draw_prompt_token,
                            draw_special_switches, draw_stop)
from test_engine_stress import SPEC_METHODS, build_engine, head_dirs, model_and_config, reference  # noqa: F401
from test_serve_api import BAD
from tiny import one_thread  # noqa: F401  (autouse fixture)

SEEDS = 6
FIRST = int(os.environ.get("MINILLM_OPENAI_STRESS_FIRST", 0))
NUM_SEEDS = int(os.environ.get("MINILLM_OPENAI_STRESS_SEEDS", SEEDS))
ALPHABET = "abcdefgh ijklmnop.,!?\néß€😀"  # one- to four-byte characters: text prompts that cross UTF-8 widths
SMALL_BAD = [b for b in BAD if len(b[1] if isinstance(b[1], bytes) else json.dumps(b[1])) < 1000]
# a priority is refused only where the engine schedules first come, first served: a priority engine serves it
FCFS_ONLY_BAD = [b for b in SMALL_BAD if isinstance(b[1], dict) and "priority" in b[1]]
AFTER = {"prompt": "after the storm", "max_tokens": 8, "temperature": 0, "ignore_eos": True}


def render(messages: list[dict]) -> str:
    """serve_tiny.TEMPLATE, written out: what the server's chat prompt must be."""
    return "".join(f"<{m['role']}>{m['content']}\n" for m in messages) + "<assistant>"


def fit(text: str, wrap=lambda t: t) -> str:
    """`text` shortened until wrap(text) encodes to at most MAX_LEN - 1 tokens (bytes)."""
    while len(TOKENIZER.encode(wrap(text))) >= MAX_LEN:
        text = text[:-1]
    return text


def draw_words(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 24)))


def draw_prompt(rng: random.Random, shared: tuple[str, list[int]], text: bool) -> str | list[int]:
    """A completion's prompt: text, or token ids (any byte: the text may hold broken UTF-8), maybe behind the
    shared text or ids (prefix-cache hits)."""
    if text:
        return fit((shared[0] if rng.random() < 0.5 else "") + draw_words(rng) or "x")
    ids = (shared[1] if rng.random() < 0.5 else []) + [draw_prompt_token(rng) for _ in range(rng.randint(1, 30))]
    return ids[:MAX_LEN - 1]


def constraint_fields(rng: random.Random, constraint: tuple) -> dict:
    """A Request's constraint (stress_helpers.CONSTRAINTS) in one of the spellings a client may send: vLLM's
    structured_outputs or its older guided_* fields (a JSON schema with no whitespace either way), allowed_token_ids,
    bad_words."""
    if not constraint:
        return {}
    kind, value = constraint
    if kind in ("allowed", "bad_words"):
        return {"allowed_token_ids" if kind == "allowed" else "bad_words": list(value)}
    value = json.loads(value) if kind == "json" else list(value) if kind == "choice" else value
    if rng.random() < 0.5:
        return {"structured_outputs": {kind: value, **({"disable_any_whitespace": True} if kind == "json" else {})}}
    return {f"guided_{kind}": value, **({"guided_whitespace_pattern": ""} if kind == "json" else {})}


def draw_client(rng: random.Random, arrive: int, shared: tuple[str, list[int]], reference: Reference,
                kv_dtype: str, seeded: bool, poison: str | None = None, priorities: bool = False,
                proc_rng: random.Random | None = None) -> HttpClient:
    """A valid request, its solo runs' Requests, and how its client leaves. `priorities`: half the clients send
    a priority, -1 to 2 (an engine under the priority policy); `proc_rng`: logits processors
    (stress_helpers.draw_processors; logit_bias with the token ids as JSON object keys, strings)."""
    chat = rng.random() < 0.35
    if chat:
        system = [{"role": "system", "content": shared[0]}] if rng.random() < 0.5 else []
        messages = system + [{"role": "user", "content": fit(draw_words(rng), lambda t: render(system + [
            {"role": "user", "content": t}]))}]
        client = HttpClient("/v1/chat/completions", {"messages": messages}, arrive,
                            [tuple(TOKENIZER.encode(render(messages)))])
    else:  # one prompt, or (1 in 6) a list of 2 or 3: their choices come back side by side
        text = rng.random() < 0.5
        prompts = [draw_prompt(rng, shared, text) for _ in range(1 if rng.random() < 5 / 6 else rng.randint(2, 3))]
        if poison and not text and rng.random() < 0.5:  # its first prompt's text cannot be made: it fails alone
            prompts[0] = prompts[0][:MAX_LEN - 2] + [POISON_TEXT]
        client = HttpClient("/v1/completions", {"prompt": prompts[0] if len(prompts) == 1 else prompts}, arrive,
                            [tuple(TOKENIZER.encode(p) if text else p) for p in prompts],
                            poisoned=not text and POISON_TEXT in prompts[0])
    body = client.body
    room = MAX_LEN - max(len(p) for p in client.prompts)
    max_tokens = min(rng.choice([1, 2, 5, 12, 30, MAX_LEN]), room)
    if not chat and not client.poisoned and rng.random() < 0.1:  # echo with max_tokens 0: score the prompt only
        client.score_only, max_tokens = True, 1
        body["max_tokens"] = 0
    elif chat and rng.random() < 0.2:  # left out: the rest of the context
        max_tokens = room
    elif not chat and room >= 16 and rng.random() < 0.1:  # left out: 16
        max_tokens = 16
    else:
        body["max_completion_tokens" if chat and rng.random() < 0.5 else "max_tokens"] = max_tokens
    req = Request(client.prompts[0], max_tokens, ignore_eos=rng.random() < 0.2)
    if seeded and rng.random() < 0.3:
        req.seed = rng.randrange(1000)
    if priorities and rng.random() < 0.5:  # (the run alone ignores it: alone, a priority orders nothing)
        req.priority = body["priority"] = rng.randint(-1, 2)
    draw_special_switches(rng, req)
    draw_constraint(rng, req)
    body.update(constraint_fields(rng, req.constraint))
    if proc_rng is not None:
        draw_processors(proc_rng, req)
        body.update({name: {str(tok): bias for tok, bias in value} if name == "logit_bias" else value
                     for name, value in req.processors})
    if not req.skip_special or rng.random() < 0.2:  # (left out: true)
        body["skip_special_tokens"] = req.skip_special
    if not req.spaces_between or rng.random() < 0.2:
        body["spaces_between_special_tokens"] = req.spaces_between
    if not client.score_only:
        draw_stop(rng, req, reference, kv_dtype, poison, odds=(0.2, 0.3), longest=4)
    body.update(temperature=0.8 if req.seed is not None else 0.0, ignore_eos=req.ignore_eos)
    if req.seed is not None:
        body["seed"] = req.seed
    if req.stop:
        body["stop"] = req.stop[0] if rng.random() < 0.5 else list(req.stop)
        r = rng.random()
        if r < 0.3:  # vLLM's extension, either value: true ends the text after the stop string that stopped it
            req.include_stop = r < 0.15
            body["include_stop_str_in_output"] = req.include_stop
    if req.stop_token_ids:
        body["stop_token_ids"] = list(req.stop_token_ids)
    if req.min_tokens:
        body["min_tokens"] = req.min_tokens
    if rng.random() < 0.3 or client.score_only:
        k = rng.randint(0, 5)
        if chat:
            body["logprobs"] = True
            if k or rng.random() < 0.5:
                body["top_logprobs"] = k
        else:
            body["logprobs"] = k
        req.logprobs = k
    if not chat and not client.poisoned and (client.score_only or rng.random() < 0.2):
        body["echo"] = True
        # (a text prompt: itself, as it encodes; token ids as the answer shows tokens: special ones' text or not)
        client.echoes = [TOKENIZER.decode(p, skip_special_tokens=req.skip_special) for p in client.prompts]
        req.prompt_logprobs = req.logprobs
    n = 1 if rng.random() < 0.75 or (req.seed is None and rng.random() < 0.5) else rng.randint(2, 3)
    if n > 1:
        body["n"] = n
    client.choices = [dataclasses.replace(req, prompt=prompt, seed=None if req.seed is None else
                                          choice_seed(req.seed, i)) for prompt in client.prompts for i in range(n)]
    # as alone: a poisoned choice whose first token is a stop token makes no text and does not fail; a sampled one
    # may draw POISON_TEXT itself and fail
    client.fails = poison is not None and any(reference.run(c, kv_dtype, poison)[1] == "error" for c in client.choices)
    body["stream"] = rng.random() < 0.6
    if body["stream"] and rng.random() < 0.6:
        body["stream_options"] = {"include_usage": rng.random() < 0.7}
    body["return_token_ids"] = rng.random() < 0.3
    if body.get("stream_options", {}).get("include_usage") and rng.random() < 0.4:
        body["stream_options"]["continuous_usage_stats"] = True
    fate = rng.random()
    if fate < 0.15 and body["stream"]:
        client.leave, client.leave_at = "mid_stream", rng.randint(1, 4)
    elif fate < 0.25:  # (after up to 30 ms: before its body reached the server, or while it waits or runs)
        client.leave, client.leave_at = "early", arrive + rng.randint(0, 8)
        client.leave_after = rng.choice([0.0, 0.003, 0.01, 0.03])
    return client


def draw_clients(seed: int, reference: Reference) -> tuple[Scenario, list[HttpClient]]:
    rng = random.Random(seed)
    options = draw_engine_options(rng, random.Random(f"engine extras {seed}"))
    spec = rng.choice([None, None, None, *sorted(SPEC_METHODS)])
    if spec is not None and reference.config.sliding_window is not None:  # (MINILLM_STRESS_ARCH=window: token
        spec = spec.removesuffix("_tree")  # trees are refused beside a sliding window)
    fp8 = "kv_cache_dtype" in options
    policy = options.get("scheduling_policy", "fcfs")
    # a tokenizer that cannot decode POISON_TEXT (not with fp8, whose runs may part from the run alone: then other
    # windows are decoded)
    scenario = Scenario(options, spec, poison=None if fp8 or rng.random() < 0.7 else "text")
    shared = ("".join(rng.choice(ALPHABET) for _ in range(rng.randint(4, 16))),
              [draw_prompt_token(rng) for _ in range(rng.randint(8, 30))])
    clients, step = [], 0
    proc_rng = random.Random(f"processors {seed}")  # (its own generator: a seed draws what it drew before)
    for _ in range(rng.randint(6, 14)):
        step += rng.choice([0, 0, 1, 1, 3])
        if rng.random() < 0.12:
            bad = SMALL_BAD if policy == "fcfs" else [b for b in SMALL_BAD if b not in FCFS_ONLY_BAD]
            path, body, status, words = rng.choice(bad)
            clients.append(HttpClient(path, body, step, status=status, words=words))
        else:
            clients.append(draw_client(rng, step, shared, reference, options.get("kv_cache_dtype", "auto"),
                                       seeded=spec is None and not fp8, poison=scenario.poison,
                                       priorities=policy == "priority", proc_rng=proc_rng))
    return scenario, clients


async def run_client(http: httpx.AsyncClient, llm: AsyncLLM, client: HttpClient, arrived: asyncio.Event):
    """Send the client's request once the engine reached its step; (how it ended, what it read)."""
    await until_step(llm, client.arrive)
    arrived.set()
    kwargs = {"content": client.body, "headers": {"content-type": "application/json"}} \
        if isinstance(client.body, bytes) else {"json": client.body}
    if client.status != 200 or not client.body.get("stream"):
        response = await http.post(client.path, **kwargs)
        status = 500 if client.fails else client.status
        assert response.status_code == status, (response.status_code, response.text)
        return "done", response.json()
    lines, events = [], 0
    async with http.stream("POST", client.path, **kwargs) as response:
        assert response.status_code == 200, await response.aread()
        async for line in response.aiter_lines():
            lines.append(line)
            events += bool(line)
            if client.leave == "mid_stream" and events >= client.leave_at and line.startswith("data: {"):
                return "left", lines  # leaving the block closes the connection
    return "done", lines


async def storm(url: str, llm: AsyncLLM, clients: list[HttpClient]) -> list:
    limits = httpx.Limits(max_connections=len(clients) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        async def leaver(client: HttpClient, task: asyncio.Task, arrived: asyncio.Event) -> None:
            await arrived.wait()
            await asyncio.sleep(client.leave_after)
            await until_step(llm, client.leave_at)
            task.cancel()

        tasks, leavers = [], []
        for client in clients:
            arrived = asyncio.Event()
            tasks.append(asyncio.ensure_future(run_client(http, llm, client, arrived)))
            if client.leave == "early":
                leavers.append(asyncio.ensure_future(leaver(client, tasks[-1], arrived)))
        results = await gather_clients(tasks)
        await asyncio.gather(*leavers)
        await settle(llm)
        after = (await http.post("/v1/completions", json=AFTER)).json()
    return [("cancelled", None) if r is None else r for r in results], after


def judge(scenario: Scenario, reference: Reference, clients: list[HttpClient], results: list,
          recorder: EngineRecorder) -> None:
    kv_dtype = scenario.options.get("kv_cache_dtype", "auto")
    requests, finished, outputs_of = {}, {}, {}
    for n, (client, (how, got)) in enumerate(zip(clients, results)):
        try:
            if how == "cancelled":
                continue
            if client.status != 200 or (client.fails and not client.body.get("stream")):
                error = got["error"]
                words = "generation failed" if client.fails else client.words
                assert words in error["message"] and set(error) == {"message", "type", "param", "code"}, error
                continue
            stream = client.body.get("stream")
            answer = read_sse(client, got, how == "done") if stream else read_body(client, got)
            if answer.id is None or answer.failed:  # it left before the first event, or its stream failed
                continue
            for i, req in enumerate(client.choices):
                rid = f"{answer.id}-{i}"
                final = recorder.final(rid)
                requests[rid] = req
                if how == "left":  # what it read is the start of what the engine made
                    assert (client.echo(i) + final.outputs[0].text).startswith(answer.texts.get(i, ""))
                else:
                    check_choice(client, answer, i, final)
                if final.outputs[0].finish_reason == "abort":
                    check_partial(reference, rid, req, final.outputs[0].token_ids, kv_dtype)
                else:
                    finished[rid] = (final.outputs[0].token_ids, final.outputs[0].finish_reason, final.outputs[0].text)
                    outputs_of[rid] = final
            if how == "done" and answer.usage is not None:
                tokens = 0 if client.score_only else sum(len(recorder.final(f"{answer.id}-{i}").outputs[0].token_ids)
                                                         for i in range(len(client.choices)))
                prompt_tokens = sum(len(p) for p in client.prompts)  # each prompt once, whatever n
                assert answer.usage == {"prompt_tokens": prompt_tokens, "completion_tokens": tokens,
                                        "total_tokens": prompt_tokens + tokens}, answer.usage
        except AssertionError as err:
            raise AssertionError(f"client {n} {client}: {err}") from err
    compare(scenario, reference, requests, finished, outputs_of, set())


def run_seed(model_and_config, head_dirs, reference: Reference, seed: int) -> None:  # noqa: F811
    scenario, clients = draw_clients(seed, reference)
    engine = build_engine(model_and_config, head_dirs, scenario)
    llm = AsyncLLM(engine)
    recorder = EngineRecorder(llm)
    try:
        with ServerThread(build_app(llm, MODEL, chat_template=TEMPLATE)) as server:
            results, after = asyncio.run(storm(server.url, llm, clients))
        assert not engine._requests and not engine.scheduler.has_unfinished() and llm.num_in_flight == 0
        EngineChecks(engine).at_end()
        recorder.check_all_ended()
        prompt = tuple(TOKENIZER.encode(AFTER["prompt"]))  # the plain request after the storm: judged as a client
        plain = HttpClient("/v1/completions", AFTER, 0, [prompt], [Request(prompt, 8, ignore_eos=True)])
        judge(scenario, reference, clients + [plain], results + [("done", after)], recorder)
        for outputs in recorder.outputs.values():  # a request fails only over POISON_TEXT: nobody fails beside it
            last = outputs[-1]
            assert last.outputs[0].finish_reason != "error" or \
                POISON_TEXT in last.prompt_token_ids + last.outputs[0].token_ids, last
    except AssertionError as err:
        raise AssertionError(f"seed {seed}: {err}\noptions={scenario.options!r}, spec={scenario.spec!r}\n"
                             + "\n".join(f"  {c}" for c in clients)) from err


@pytest.mark.parametrize("seed", range(FIRST, FIRST + NUM_SEEDS))
def test_http_clients_get_what_requests_run_alone_make(model_and_config, head_dirs, reference, seed):  # noqa: F811
    run_seed(model_and_config, head_dirs, reference, seed)
