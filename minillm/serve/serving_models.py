"""The models one server answers to: the base model and the LoRA adapters served over it (chapter 10; vLLM's
OpenAIServingModels and `--lora-modules`).

A server started with `--enable-lora --lora-modules sql=/adapters/sql chat=/adapters/chat` serves three models
from one set of weights. Clients pick one with the request's `model` field, as they would pick between OpenAI's
models:

    "model": <the base model's name>    the base model (so does a request without `model`)
    "model": "sql"                      the base model with the adapter in /adapters/sql (LoRARequest("sql", 1, ...))
    "model": "gpt-4"                    404, OpenAI's NotFoundError: "The model `gpt-4` does not exist."

Each module becomes a LoRARequest with lora_int_id 1, 2, ... in the order given, so an adapter keeps one engine
slot and one prefix-cache namespace for the server's lifetime. `GET /v1/models` lists the base model first, then
one card per adapter whose `root` is the adapter's directory and `parent` the model it adapts (vLLM's fields).
Adapters are read and checked against the model once, when the server is built (`check_adapters`): a directory
that is not a PEFT adapter, or one trained for another model, stops the server at startup instead of failing every
request that names it.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Sequence

from minillm.lora.request import LoRARequest
from minillm.serve.protocol import ApiError


@dataclass(frozen=True)
class LoRAModulePath:
    """One adapter a server serves (vLLM's name): the model id clients send, its PEFT directory, and optionally
    the model it adapts as /v1/models reports it (`parent`; default: the served base model's name)."""

    name: str
    path: str
    base_model_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"a LoRA module's name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.path, (str, os.PathLike)) or not os.fspath(self.path):
            raise ValueError(f"LoRA module {self.name!r}: its path must be a directory, got {self.path!r}")
        object.__setattr__(self, "path", os.fspath(self.path))


class OpenAIServingModels:
    """The base model's name and the adapters served over it; `resolve` turns a request's `model` into the
    LoRARequest it runs with (None: the base model) or a 404."""

    def __init__(self, engine: Any, model_name: str, max_model_len: int,
                 lora_modules: Sequence[LoRAModulePath] = ()) -> None:
        self.engine, self.model_name, self.max_model_len = engine, model_name, max_model_len
        self.created = int(time.time())
        self.lora_requests: dict[str, LoRARequest] = {}
        self._parents: dict[str, str] = {}
        modules = list(lora_modules or ())
        for module in modules:
            if not isinstance(module, LoRAModulePath):
                raise TypeError(f"lora_modules must hold LoRAModulePath, got {type(module).__name__}: {module!r}")
        if modules and getattr(engine, "lora_slots", None) is None:
            raise ValueError(f"{len(modules)} LoRA module(s) given ({', '.join(m.name for m in modules)}), but the "
                             f"engine was built without enable_lora=True (minillm serve: add --enable-lora)")
        for lora_int_id, module in enumerate(modules, start=1):
            if module.name == model_name:
                raise ValueError(f"LoRA module name {module.name!r} is the served base model's name: give the adapter "
                                 f"a name of its own (or the base model another with --served-model-name)")
            if module.name in self.lora_requests:
                raise ValueError(f"LoRA module name {module.name!r} is given twice ("
                                 f"{self.lora_requests[module.name].lora_path} and {module.path}): names must differ")
            self.lora_requests[module.name] = LoRARequest(module.name, lora_int_id, module.path)
            self._parents[module.name] = module.base_model_name or model_name

    def check_adapters(self) -> None:
        """Read every adapter and check it against the model and the engine's max_lora_rank; ValueError naming
        the module otherwise. Reads files: call it at startup (or off an event loop)."""
        for name, request in self.lora_requests.items():
            try:
                self.engine.check_lora_request(request)
            except (ValueError, TypeError) as err:
                raise ValueError(f"LoRA module {name}={request.lora_path}: {err}") from None

    # -- requests -----------------------------------------------------------------------------------------
    def resolve(self, model: str | None) -> LoRARequest | None:
        """The adapter a request's `model` names (None for the base model, or no `model`); 404 for any other
        name, with vLLM's body (OpenAI's error shape, type NotFoundError)."""
        if model is None or model == self.model_name:
            return None
        request = self.lora_requests.get(model)
        if request is None:
            raise ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model", 404)
        return request

    def name_of(self, lora_request: LoRARequest | None) -> str:
        """The model id an answer reports: the adapter's name, or the base model's."""
        return self.model_name if lora_request is None else lora_request.lora_name

    # -- /v1/models ---------------------------------------------------------------------------------------
    def cards(self) -> list[dict[str, Any]]:
        """/v1/models' data: the base model first (clients that take data[0] get it), then each adapter."""
        base = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "minillm",
                "root": self.model_name, "parent": None, "max_model_len": self.max_model_len}
        return [base] + [{"id": name, "object": "model", "created": self.created, "owned_by": "minillm",
                          "root": request.lora_path, "parent": self._parents[name],
                          "max_model_len": self.max_model_len} for name, request in self.lora_requests.items()]

    def card(self, model_id: str) -> dict[str, Any]:
        """/v1/models/{model_id}: that model's card, or the same 404 as an unknown `model` in a request."""
        self.resolve(model_id)
        return next(card for card in self.cards() if card["id"] == model_id)
