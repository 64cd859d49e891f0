"""How LLM's offline calls (generate, chat: minillm/llm.py, chapter 2's entry point) turn their arguments into
engine requests: one checked SamplingParams copy per prompt (normalize_params), vLLM's per-prompt `priority` list
for chapter 6's priority scheduling (with_priority), a conversation as its template reads it (template_messages),
and a prompt's n
choices merged back into one RequestOutput (merge_choices). Everything is checked before any request is queued,
so a bad argument leaves the engine as it was."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence as SequenceT

from minillm.loader.chat_template import template_tool_call
from minillm.outputs import RequestOutput
from minillm.sampling_params import ParamError, SamplingParams


def normalize_params(params: Any, n: int, **changes: Any) -> list[SamplingParams]:
    """One SamplingParams per prompt, from one (or None: the defaults) or a list of n. Each distinct object is
    copied with `changes` applied and checked again (SamplingParams.checked_copy), before any request is queued:
    a bad sampling_params[3] then queues none of the prompts (add_request checks its own copy of each as well:
    about 6 us a request, too little to be worth a trusted side door). The caller's objects are left as they were."""
    if params is None or isinstance(params, SamplingParams):
        return [(SamplingParams() if params is None else params).checked_copy(**changes)] * n
    if not isinstance(params, (list, tuple)):
        raise TypeError(f"sampling_params must be a SamplingParams or a list of them, got {type(params).__name__}")
    if len(params) != n:
        raise ValueError(f"got {len(params)} sampling_params for {n} prompts; give one, or one per prompt")
    copies: dict[int, SamplingParams] = {}
    for i, p in enumerate(params):
        if not isinstance(p, SamplingParams):
            raise TypeError(f"sampling_params[{i}] must be a SamplingParams, got {type(p).__name__}")
        if id(p) not in copies:
            try:
                copies[id(p)] = p.checked_copy(**changes)
            except ParamError as err:
                raise ParamError(err.param, f"sampling_params[{i}]: {err}") from None
    return [copies[id(p)] for p in params]


def with_priority(params: list[SamplingParams], priority: Any, engine: Any) -> list[SamplingParams]:
    """A copy of each prompt's SamplingParams with priority[i], each value checked (an integer, one the
    engine's scheduling policy honours: engine.check_priority) before any request is queued; errors name the index."""
    if isinstance(priority, (str, bytes)) or not isinstance(priority, SequenceT):
        raise TypeError(f"priority must be a list of integers, one per prompt, got {type(priority).__name__}: "
                        f"{priority!r}")
    if len(priority) != len(params):
        raise ValueError(f"got {len(priority)} priorities for {len(params)} prompts; give one per prompt")
    copies = []
    for i, (p, value) in enumerate(zip(params, priority)):
        try:
            copies.append(p.checked_copy(priority=value))
            engine.check_priority(copies[-1].priority)
        except ParamError as err:
            raise ParamError("priority", f"priority[{i}]: {err}") from None
    return copies


def merge_choices(outputs: list[RequestOutput]) -> RequestOutput:
    """One prompt's n choices (one finished engine request each) as one RequestOutput: outputs[i] is choice i, the
    request id and metrics are choice 0's (its prompt and prompt log-probs are every choice's)."""
    if len(outputs) == 1:
        return outputs[0]
    completions = [dataclasses.replace(out.outputs[0], index=i) for i, out in enumerate(outputs)]
    return dataclasses.replace(outputs[0], outputs=completions, finished=all(out.finished for out in outputs))


def template_messages(conversation: Any, where: str) -> list[dict[str, Any]]:
    """One conversation of LLM.chat as its chat template reads it, or ValueError naming the bad message; `where`
    ("conversation 2: ") starts the message. A message is a dict with a string "role" and a "content" that is a
    string, a list of {"type": "text", "text": ...} parts (joined by newlines), or None beside "tool_calls" (an
    assistant's calls, their JSON arguments parsed for the template); "tool_call_id" and "name" are kept."""
    if isinstance(conversation, dict):
        raise ValueError(f"{where}messages must be a list of {{'role', 'content'}} dicts, got a single dict")
    if not isinstance(conversation, (list, tuple)) or not conversation:
        raise ValueError(f"{where}messages must be a non-empty list of {{'role', 'content'}} dicts, "
                         f"got {conversation!r}")
    messages = []
    for j, message in enumerate(conversation):
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                             isinstance(p.get("text"), str) for p in content):
            content = "\n".join(p["text"] for p in content)
        calls = message.get("tool_calls") if isinstance(message, dict) else None
        if content is None and isinstance(calls, list) and calls:
            content = ""
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(content, str):
            raise ValueError(f"{where}message {j} must be a dict with a string 'role' and a 'content' (a string, a "
                             f"list of text parts, or None beside 'tool_calls'), got {message!r}")
        fields = {"role": message["role"], "content": content}
        if calls:
            fields["tool_calls"] = [template_tool_call(call) if isinstance(call, dict) else call for call in calls]
        fields.update((key, message[key]) for key in ("tool_call_id", "name") if message.get(key) is not None)
        messages.append(fields)
    return messages
