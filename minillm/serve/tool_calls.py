"""Tool calling as structured output (chapter 10): OpenAI's `tools` and `tool_choice` on chat completions.

A model calls a tool by writing the call as JSON. A server that *forces* the call constrains the output to that
JSON (structured outputs, minillm/engine/constraints.py) and returns it as `tool_calls` instead of text:

    tool_choice {"type": "function",   the output is f's arguments: a JSON value of f's `parameters` schema, one
      "function": {"name": f}}         call of f (finish_reason "stop", as vLLM answers a named choice)
    tool_choice "required"             the output is a JSON array of one or more {"name": <a tool's name>,
                                       "parameters": <its arguments>}: each is a call (finish_reason "tool_calls")
    tool_choice "none"                 no call: plain text; the tools still reach the chat template
    tool_choice "auto"                 OpenAI's default when tools are given: the model chooses between text and
                                       calls in its own syntax, which a server started with vLLM's
                                       --enable-auto-tool-choice --tool-call-parser hermes reads (serve/tool_parser.py,
                                       calls kept whole by a structural tag; pythonic: pythonic_tools.py;
                                       llama3_json, mistral: json_tools.py); refused elsewhere

The tools go to the chat template as `tools`, so a model trained for tool use sees them. An answer cut before its
JSON closes (by max_tokens, or by a stop string or stop token the request gave) comes back as text, since it is no
call.
"""
from __future__ import annotations

import json
from typing import Any

from minillm.serve.tool_parser import make_call

TOOL_CHOICES = ("none", "auto", "required")


def check_tools(tools: Any, tool_choice: Any, tool_parser: str | None = None) -> str | None:
    """What is wrong with a request's tools / tool_choice (a message naming the value), or None. `tool_parser`:
    the server's --tool-call-parser, which "auto" needs."""
    names = []
    for i, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(function, dict):
            return f'tools[{i}] must be {{"type": "function", "function": {{"name": ..., "parameters": ...}}}}'
        name, parameters = function.get("name"), function.get("parameters", {})
        if not isinstance(name, str) or not name:
            return f"tools[{i}].function.name must be a non-empty string, got {name!r}"
        if not isinstance(parameters, (dict, bool)):
            return f"tools[{i}].function.parameters must be a JSON schema (an object), got {parameters!r}"
        if name in names:
            return f"tools[{i}].function.name {name!r} is given twice"
        names.append(name)
    if tool_choice is None:  # OpenAI's default: "auto" where tools are given
        tool_choice = "auto" if names else "none"
    if tool_choice == "none":
        return None
    if tool_choice == "auto":
        return ("tool_choice 'auto' is not supported by this server: it needs a parser of the model's own tool-call "
                "syntax (start the server with --enable-auto-tool-choice --tool-call-parser hermes, pythonic, llama3_json or mistral); give "
                "'required', a named function, or 'none'") if names and tool_parser is None else None
    if tool_choice == "required":
        return None if names else "tool_choice 'required' needs tools"
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(name, str):
        return (f'tool_choice must be one of {", ".join(map(repr, TOOL_CHOICES))} or {{"type": "function", '
                f'"function": {{"name": ...}}}}, got {json.dumps(tool_choice)[:100]}')
    return None if name in names else f"tool_choice names {name!r}, which is not among the tools {names}"


def tool_mode(request: Any) -> tuple[str, str | None] | None:
    """("named", the function's name) or ("required", None) for a request that forces a call, ("auto", the
    server's parser) for one whose model may call (tools given, tool_choice "auto" or left out, on a server with
    a tool-call parser); else None."""
    choice = getattr(request, "tool_choice", None)
    if choice == "required":
        return ("required", None)
    if isinstance(choice, dict):
        return ("named", choice["function"]["name"])
    parser = getattr(request, "tool_parser", None)
    if choice in ("auto", None) and getattr(request, "tools", None) and parser is not None:
        return ("auto", parser)
    return None


def tool_schema(request: Any) -> dict | bool | None:
    """The JSON schema a forced call's output must match (module docstring), or None."""
    mode = tool_mode(request)
    if mode is None or mode[0] == "auto":
        return None
    parameters = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in request.tools}
    if mode[0] == "named":
        return parameters[mode[1]]
    calls = [{"type": "object", "properties": {"name": {"const": name}, "parameters": schema},
              "required": ["name", "parameters"]} for name, schema in parameters.items()]
    return {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}


def tool_calls(text: str, mode: tuple[str, str | None]) -> list[dict] | None:
    """OpenAI's tool_calls for a forced call's finished output (JSON the constraint made valid); None where the
    text is no whole call (a stop string or stop token the request gave ended it early): it is answered as text."""
    try:
        value = json.loads(text)
        found = [(mode[1], value)] if mode[0] == "named" else [(call["name"], call["parameters"]) for call in value]
    except (ValueError, TypeError, KeyError):
        return None
    return [make_call(name, arguments) for name, arguments in found]
