"""What a client of tests/test_openai_stress.py sends and expects (HttpClient), and what it read (Answer): an SSE
stream parsed and checked for form (read_sse) or a JSON body (read_body), and each choice judged against the
engine's finished output for it (check_choice). The stress test's docstring says what is checked and why.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from serve_tiny import MODEL
from stress_helpers import Request
from tiny import ByteTokenizer

TOKENIZER = ByteTokenizer()


@dataclass
class HttpClient:
    path: str
    body: dict | bytes
    arrive: int  # the engine step at which it sends its request
    prompts: list[tuple[int, ...]] = dataclasses.field(default_factory=list)  # token ids, as the server must see them
    # choice p * n + i (prompt p, its choice i) must be choices[p * n + i] run alone
    choices: list[Request] = dataclasses.field(default_factory=list)
    echoes: list[str] = dataclasses.field(default_factory=list)  # per prompt: what comes back in front of its texts
    score_only: bool = False  # echo with max_tokens 0: the prompt comes back, nothing generated
    leave: str = "stay"  # or "mid_stream" (after leave_at events) or "early" (cancelled at engine step leave_at)
    leave_at: int = 0
    leave_after: float = 0.0  # "early": seconds it waits before it waits for step leave_at
    status: int = 200
    words: str = ""  # in the error message of a refused body
    poisoned: bool = False  # its first prompt ends in POISON_TEXT (the tokenizer cannot decode it)
    fails: bool = False  # one of its choices fails alone (it decodes POISON_TEXT): a 500, or an error event

    @property
    def chat(self) -> bool:
        return self.path.endswith("/chat/completions")

    def echo(self, index: int) -> str:
        """What choice `index` reads in front of its generated text ("" without echo)."""
        return self.echoes[index * len(self.prompts) // len(self.choices)] if self.echoes else ""

    @property
    def return_ids(self) -> bool:
        """return_token_ids: the answer carries the prompt's and each choice's token ids."""
        return bool(self.body.get("return_token_ids"))


@dataclass
class Answer:
    """What one client read: per choice index its text, finish_reason and log-probs (merged over the chunks)."""

    id: str | None = None
    texts: dict[int, str] = dataclasses.field(default_factory=dict)
    reasons: dict[int, str | None] = dataclasses.field(default_factory=dict)
    logprobs: dict[int, dict] = dataclasses.field(default_factory=dict)
    usage: dict | None = None
    failed: bool = False  # the stream ended with an error event
    token_ids: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # return_token_ids: per choice
    prompt_ids: dict[int, list[int]] = dataclasses.field(default_factory=dict)  # return_token_ids: per choice


def merge_logprobs(into: dict, part: dict | None) -> None:
    for key, values in (part or {}).items():  # parallel lists (completions) or {"content": [...]} (chat)
        into.setdefault(key, []).extend(values)


def read_sse(client: HttpClient, lines: list[str], complete: bool) -> Answer:
    """Parse and check an SSE stream (complete: it was read to the end)."""
    events = []
    for line in lines:
        if line:
            assert line.startswith("data: "), f"not an SSE data line: {line!r}"
            events.append(line[6:])
    answer = Answer()
    if complete:
        assert events and events[-1] == "[DONE]" and events.count("[DONE]") == 1, f"stream ends {events[-2:]}"
        events = events[:-1]
    options = client.body.get("stream_options") or {}
    include_usage = options.get("include_usage", False)
    continuous = include_usage and options.get("continuous_usage_stats", False)  # the usage so far on every chunk
    so_far: dict[int, int] = {}  # per choice, the completion tokens its last chunk's usage counted
    finished: set[int] = set()
    for n, event in enumerate(json.loads(e) for e in events):
        if "error" in event:  # a failed choice ends the stream: this event, then [DONE]
            assert client.fails and n == len(events) - 1, event
            assert "generation failed" in event["error"]["message"] and event["error"]["code"] == 500, event
            answer.failed = True
            continue
        assert event["object"] == ("chat.completion.chunk" if client.chat else "text_completion"), event
        assert event["model"] == MODEL and event.setdefault("id", None) == (answer.id or event["id"])
        answer.id = event["id"]
        assert ("usage" in event) == include_usage, event
        if not event["choices"]:  # the usage chunk: last, once
            assert include_usage and n == len(events) - 1, event
            answer.usage = event["usage"]
            continue
        assert len(event["choices"]) == 1, event
        choice = event["choices"][0]
        i = choice["index"]
        if continuous:  # that choice's own usage (vLLM's): its prompt, its tokens so far
            usage = event["usage"]
            assert usage["completion_tokens"] >= so_far.get(i, 0) and usage["total_tokens"] == \
                usage["prompt_tokens"] + usage["completion_tokens"], (so_far, usage)
            assert usage["prompt_tokens"] == len(client.choices[i].prompt), (i, usage)
            so_far[i] = usage["completion_tokens"]
        else:
            assert event.get("usage") is None, event
        assert i not in finished, f"choice {i}: a chunk after its finish_reason"
        prompt_ids = (event if client.chat else choice).get("prompt_token_ids")
        assert client.return_ids or ("token_ids" not in choice and prompt_ids is None), event
        if client.return_ids:  # the prompt's ids on the choice's first event only; each event its own tokens' ids
            assert (prompt_ids is not None) == (i not in answer.prompt_ids), f"choice {i}: {event}"
            if prompt_ids is not None:
                answer.prompt_ids[i] = prompt_ids
            answer.token_ids.setdefault(i, []).extend(choice.get("token_ids") or [])
        if client.chat:
            first = i not in answer.texts
            assert (choice["delta"] == {"role": "assistant", "content": ""}) == first, f"choice {i}: {choice}"
            piece = choice["delta"].get("content") or ""
        else:
            piece = choice["text"]
        answer.texts[i] = answer.texts.get(i, "") + piece
        merge_logprobs(answer.logprobs.setdefault(i, {}), choice["logprobs"])
        if choice["finish_reason"] is not None:
            finished.add(i)
            answer.reasons[i] = choice["finish_reason"]
    assert answer.failed or not (complete and client.fails), "the poisoned request did not fail"
    if complete and not answer.failed:
        assert finished == set(range(len(client.choices))), f"finish_reasons for {finished}"
        assert answer.usage is not None or not include_usage, "no usage chunk"
    return answer


def read_body(client: HttpClient, body: dict) -> Answer:
    assert body["object"] == ("chat.completion" if client.chat else "text_completion") and body["model"] == MODEL
    answer = Answer(body["id"], usage=body["usage"])
    assert sorted(c["index"] for c in body["choices"]) == list(range(len(client.choices))), body["choices"]
    assert ("prompt_token_ids" in body) == (client.chat and client.return_ids), body  # chat: once, for all choices
    for choice in body["choices"]:
        i = choice["index"]
        assert ("token_ids" in choice) == client.return_ids, choice
        if client.return_ids:
            answer.token_ids[i] = choice["token_ids"]
            answer.prompt_ids[i] = body["prompt_token_ids"] if client.chat else choice["prompt_token_ids"]
        answer.texts[i] = choice["message"]["content"] if client.chat else choice["text"]
        answer.reasons[i] = choice["finish_reason"]
        merge_logprobs(answer.logprobs.setdefault(i, {}), choice["logprobs"])
    return answer


def check_choice(client: HttpClient, answer: Answer, i: int, final) -> None:
    """Choice i as the client read it against its engine request's finished output."""
    done = final.outputs[0]
    text = answer.texts.get(i, "")
    echo = client.echo(i)
    assert text == echo + ("" if client.score_only else done.text), \
        f"choice {i}: read {text!r}, the engine made {echo!r} + {done.text!r}"
    assert answer.reasons[i] == ("length" if client.score_only else done.finish_reason)
    if client.return_ids:  # exactly the engine's tokens (none for a scored prompt), and the prompt it was given
        assert answer.token_ids.get(i) == ([] if client.score_only else list(done.token_ids)), \
            f"choice {i}: token_ids {answer.token_ids.get(i)}, the engine made {done.token_ids}"
        assert answer.prompt_ids[i] == list(client.choices[i].prompt), f"choice {i}: prompt_token_ids"
    req = client.choices[i]
    if req.min_tokens == 0 and not client.score_only:
        made = text[len(echo):]
        if req.include_stop and done.finish_reason == "stop" and done.stop_reason in req.stop:
            assert made.endswith(done.stop_reason), f"choice {i}: {made!r} does not end in {done.stop_reason!r}"
            made = made[:-len(done.stop_reason)]  # the stop string that ended it, kept; none before it
        assert not any(s in made for s in req.stop), f"choice {i}: a stop string {req.stop}"
    logprobs = answer.logprobs.get(i) or {}
    if req.logprobs is None:
        assert not logprobs, f"choice {i}: log-probs nobody asked for"
        return
    entries = [] if client.score_only else list(done.logprobs)
    if echo:  # the prompt's: its first token unscored (null), then the engine's prompt log-probs
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        entries = final.prompt_logprobs[1:] + entries
        logprobs = {k: v[1:] for k, v in logprobs.items()}
    if client.chat:
        content = logprobs["content"]
        assert len(content) == len(entries), f"choice {i}: {len(content)} log-probs for {len(entries)} tokens"
        for item, token, entry in zip(content, done.token_ids, entries):
            assert item["logprob"] == entry[token].logprob and item["bytes"] == chat_bytes(token, entry[token]), \
                (item, entry[token])
            top = sorted(entry.items(), key=lambda kv: kv[1].rank)[:req.logprobs]
            assert [(t["token"], t["logprob"], t["bytes"]) for t in item["top_logprobs"]] == \
                [(lp.decoded_token, lp.logprob, chat_bytes(t, lp)) for t, lp in top], (item["top_logprobs"], top)
    else:
        assert len(logprobs["tokens"]) == len(entries), \
            f"choice {i}: {len(logprobs['tokens'])} log-probs for {len(entries)} tokens"
        for j, entry in enumerate(entries):
            actual = next(iter(entry.values()))
            assert logprobs["token_logprobs"][j] == actual.logprob and logprobs["tokens"][j] == actual.decoded_token
            assert len(logprobs["top_logprobs"][j]) <= req.logprobs + 1
        offsets = logprobs["text_offset"]
        assert all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], logprobs["tokens"]))


def chat_bytes(token: int, logprob) -> list[int]:
    """A chat log-prob's `bytes`: the token's own, or a special token's text's where the request keeps it (it has
    no bytes of its own; skipped, it has none at all)."""
    return list(TOKENIZER.token_bytes(token) or logprob.decoded_token.encode("utf-8"))
