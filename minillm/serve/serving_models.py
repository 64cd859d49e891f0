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

With `--allow-runtime-lora-updating` (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING=True) adapters also come and go
while the server runs, through vLLM's two routes:

    POST /v1/load_lora_adapter   {"lora_name": "sql2", "lora_path": "/adapters/sql2"}
        200 "Success: LoRA adapter 'sql2' added successfully."; 400 InvalidUserInput for an empty name or path, the
        base model's name or a name already served; 404 NotFoundError when the directory holds no adapter; 400
        BadRequestError for an adapter this model cannot run (another shape, a rank above --max-lora-rank)
    POST /v1/unload_lora_adapter {"lora_name": "sql2"}
        200 "Success: LoRA adapter 'sql2' removed successfully."; 404 NotFoundError for a name not served

A loaded adapter gets the next unused lora_int_id, never one an unloaded adapter had: the engine keys its device
slots and prefix cache by id, so a reused id could serve the old adapter's weights or cached KV. Unloading only
stops new requests from naming it (they get the unknown model's 404): requests already running keep their
LoRARequest and finish, and the engine's slot goes to the next adapter the LRU picks. Handlers read the registry
while a load or unload runs: it is an immutable mapping, replaced whole under a lock, never changed in place.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping, NamedTuple, Sequence

from minillm.lora.adapter import CONFIG_FILE
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


class _Served(NamedTuple):
    """One adapter the server answers to: its LoRARequest and the model /v1/models names as its `parent`."""

    request: LoRARequest
    parent: str


class OpenAIServingModels:
    """The base model's name and the adapters served over it; `resolve` turns a request's `model` into the
    LoRARequest it runs with (None: the base model) or a 404."""

    def __init__(self, engine: Any, model_name: str, max_model_len: int,
                 lora_modules: Sequence[LoRAModulePath] = ()) -> None:
        self.engine, self.model_name, self.max_model_len = engine, model_name, max_model_len
        self.created = int(time.time())
        served: dict[str, _Served] = {}
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
            if module.name in served:
                raise ValueError(f"LoRA module name {module.name!r} is given twice ("
                                 f"{served[module.name].request.lora_path} and {module.path}): names must differ")
            served[module.name] = _Served(LoRARequest(module.name, lora_int_id, module.path),
                                          module.base_model_name or model_name)
        # read by every request, replaced whole (never changed in place) under _lock by load/unload
        self._served: Mapping[str, _Served] = MappingProxyType(served)
        self._lock = threading.Lock()
        self._next_id = len(modules) + 1  # ids only grow: an unloaded adapter's id is never given again

    @property
    def lora_requests(self) -> dict[str, LoRARequest]:
        """The adapters served now, by name (a copy)."""
        return {name: s.request for name, s in self._served.items()}

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
        served = self._served.get(model)
        if served is None:
            raise _unknown_model(model)
        return served.request

    def name_of(self, lora_request: LoRARequest | None) -> str:
        """The model id an answer reports: the adapter's name, or the base model's."""
        return self.model_name if lora_request is None else lora_request.lora_name

    # -- /v1/models ---------------------------------------------------------------------------------------
    def cards(self) -> list[dict[str, Any]]:
        """/v1/models' data: the base model first (clients that take data[0] get it), then each adapter."""
        base = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "minillm",
                "root": self.model_name, "parent": None, "max_model_len": self.max_model_len}
        return [base] + [{"id": name, "object": "model", "created": self.created, "owned_by": "minillm",
                          "root": s.request.lora_path, "parent": s.parent,
                          "max_model_len": self.max_model_len} for name, s in self._served.items()]

    def card(self, model_id: str) -> dict[str, Any]:
        """/v1/models/{model_id}: that model's card, or the same 404 as an unknown `model` in a request."""
        card = next((card for card in self.cards() if card["id"] == model_id), None)  # one look at the registry
        if card is None:
            raise _unknown_model(model_id)
        return card

    # -- runtime loading (POST /v1/load_lora_adapter, /v1/unload_lora_adapter; vLLM's messages and types) --
    async def load_lora_adapter(self, lora_name: str, lora_path: str) -> str:
        """Read and check the adapter in `lora_path` (in a thread: it reads files) under the next unused id, then
        serve it as `lora_name`. vLLM's success text, or an ApiError: 400 InvalidUserInput for the name, 404
        NotFoundError for a directory without an adapter, 400 BadRequestError for one this model cannot run."""
        if not lora_name.strip() or not lora_path:
            raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.", "InvalidUserInput", code=400)
        self._check_new_name(lora_name)
        with self._lock:
            lora_int_id, self._next_id = self._next_id, self._next_id + 1
        request = LoRARequest(lora_name, lora_int_id, lora_path)
        try:
            await asyncio.to_thread(self.engine.check_lora_request, request)
        except Exception as err:  # noqa: BLE001 (as vLLM: whatever reading the adapter raised is the client's 4xx)
            if not os.path.isfile(os.path.join(lora_path, CONFIG_FILE)):  # vLLM's LoRAAdapterNotFoundError
                raise ApiError(404, f"Loading lora {lora_name} failed: No adapter found for {lora_path} ({err})",
                               "NotFoundError", code=404) from None
            raise ApiError(400, f"Loading lora {lora_name} failed: {err}", "BadRequestError", code=400) from None
        with self._lock:
            self._check_new_name(lora_name)  # another load of this name may have finished while this one read
            self._served = MappingProxyType({**self._served, lora_name: _Served(request, self.model_name)})
        return f"Success: LoRA adapter '{lora_name}' added successfully."

    def unload_lora_adapter(self, lora_name: str) -> str:
        """Stop serving `lora_name` (requests already running with it finish); 404 NotFoundError if not served."""
        if not lora_name:
            raise ApiError(400, "'lora_name' must be provided.", "InvalidUserInput", code=400)
        with self._lock:
            if lora_name not in self._served:
                raise ApiError(404, f"The lora adapter '{lora_name}' cannot be found.", "NotFoundError", code=404)
            self._served = MappingProxyType({n: s for n, s in self._served.items() if n != lora_name})
        return f"Success: LoRA adapter '{lora_name}' removed successfully."

    def _check_new_name(self, lora_name: str) -> None:
        if lora_name == self.model_name:
            raise ApiError(400, f"The lora adapter '{lora_name}' cannot be loaded: it is the name of the base model "
                                f"this server serves.", "InvalidUserInput", code=400)
        if lora_name in self._served:
            raise ApiError(400, f"The lora adapter '{lora_name}' has already been loaded.", "InvalidUserInput",
                           code=400)


def _unknown_model(model: str) -> ApiError:
    """vLLM's 404 for a `model` the server does not serve (OpenAI's error shape, type NotFoundError)."""
    return ApiError(404, f"The model `{model}` does not exist.", "NotFoundError", "model", 404)
