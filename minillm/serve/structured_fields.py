"""A request's structured-output fields as one StructuredOutputsParams (chapter 10; the engine side is
minillm/engine/constraints.py).

Clients ask for structured output in three spellings, and a request may use only one of them:

    structured_outputs            vLLM's current field: {"json": schema} / {"regex": ...} / {"choice": [...]} /
                                  {"json_object": true} / {"grammar": GBNF text}, with "whitespace_pattern" or
                                  "disable_any_whitespace"
    guided_json / guided_regex /  vLLM's older names (guided_whitespace_pattern beside them)
    guided_choice / guided_grammar
    / structural_tag
    response_format               OpenAI's: {"type": "json_object"} (any JSON) or {"type": "json_schema",
                                  "json_schema": {"name": ..., "schema": {...}, "strict": ...}}; {"type": "text"}
                                  asks for nothing; XGrammar's {"type": "structural_tag", "format": {...}}
    tool_choice                   a named function or "required" (chat): the call's JSON (serve/tool_calls.py);
                                  "auto" with a tool-call parser: free text, whole calls (serve/tool_parser.py)

The result goes into SamplingParams.structured_outputs, which the engine compiles (a bad schema or regex is a 400
naming the field the client used).
"""
from __future__ import annotations

from typing import Any

from minillm.sampling_params import StructuredOutputsParams
from minillm.serve.protocol import ApiError
from minillm.serve.tool_calls import tool_mode, tool_schema
from minillm.serve.answer_parser import TOOL_PARSERS

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar",
          "structural_tag": "structural_tag"}


def structured_outputs_of(request: Any) -> tuple[StructuredOutputsParams | None, str | None]:
    """(the request's StructuredOutputsParams or None, the name of the field that asked for it); ApiError 400 when
    two spellings are mixed or a value has the wrong shape."""
    asked = []  # (field, StructuredOutputsParams' fields) for every spelling the request used
    if request.structured_outputs is not None:
        asked.append(("structured_outputs", dict(request.structured_outputs)))
    for name, kind in GUIDED.items():
        if getattr(request, name) is not None:
            fields = {kind: getattr(request, name)}
            if request.guided_whitespace_pattern is not None:
                fields["whitespace_pattern"] = request.guided_whitespace_pattern
            asked.append((name, fields))
    if request.guided_whitespace_pattern is not None and not any(name in GUIDED for name, _ in asked):
        raise ApiError(400, "guided_whitespace_pattern is only allowed beside guided_json",
                       param="guided_whitespace_pattern")
    fields = _response_format(getattr(request, "response_format", None))
    if fields is not None:
        asked.append(("response_format", fields))
    schema, mode = tool_schema(request), tool_mode(request)
    if schema is not None:  # a forced tool call: its arguments' JSON (serve/tool_calls.py)
        asked.append(("tool_choice", {"json": schema}))
    elif mode is not None and mode[0] == "auto" and TOOL_PARSERS[mode[1]][2] is not None:
        # free text, and every call the model starts whole (serve/tool_parser.py, json_tools.py)
        asked.append(("tool_choice", {"structural_tag": TOOL_PARSERS[mode[1]][2](request.tools)}))
    if not asked:
        return None, None
    if len(asked) > 1:
        raise ApiError(400, f"ask for structured output once: {' and '.join(n for n, _ in asked)} each ask for it",
                       param=asked[1][0])
    name, values = asked[0]
    try:
        return StructuredOutputsParams(**values), name
    except TypeError as err:  # an unknown key inside structured_outputs
        raise ApiError(400, f"{name}: {err}", param=name) from None
    except ValueError as err:
        raise ApiError(400, f"{name}: {err}", param=name) from None


def _response_format(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """StructuredOutputsParams' fields for OpenAI's response_format (None: plain text)."""
    if value is None:
        return None
    kind = value.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        spec = value.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, (dict, bool)):
            raise ApiError(400, 'response_format json_schema needs {"json_schema": {"name": ..., "schema": {...}}}, '
                                f"got {str(spec)[:100]}", param="response_format")
        return {"json": schema}
    if kind == "structural_tag":
        return {"structural_tag": value}
    raise ApiError(400, f"response_format type {kind!r} is not supported: give 'text', 'json_object', "
                        f"'json_schema' or 'structural_tag'", param="response_format")
