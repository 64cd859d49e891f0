"""The engine's side of multi-LoRA serving (chapter 10, section 7): which adapters a request may use, and which
device slot holds which.

The scheduler keeps at most `max_loras` distinct adapters among the running sequences (a waiting request whose
adapter would be one too many waits, and others behind it may go first: vLLM's rule). Every step, `assign` gives
each of the step's adapters a slot: the one it already sits in, else a free slot, else the least recently used slot
whose adapter this step does not need. The step then tells the workers which adapters to copy in
(`StepInput.lora_loads`) and each sequence's slot (`StepInput.lora_slots`). A copy into a slot that the step
still running on the device reads is safe: the copy is queued on the same stream, behind that step's kernels.

`check` runs when a request arrives: the adapter is read (once per process: minillm.lora.adapter's cache) and
checked against the model and the slots' rank, so a bad adapter fails its own request, not a step.
"""
from __future__ import annotations

import os
from typing import Iterable

from minillm.config import ModelConfig
from minillm.lora.adapter import AdapterCache
from minillm.lora.request import LoRARequest


class LoRASlots:
    def __init__(self, max_loras: int, max_lora_rank: int, model_config: ModelConfig, cache: AdapterCache) -> None:
        self.max_loras, self.max_lora_rank = max_loras, max_lora_rank
        self.model_config, self.cache = model_config, cache
        self.slot_ids: list[int | None] = [None] * max_loras  # lora_int_id per slot, as the workers hold them
        self._last_used = [0] * max_loras
        self._clock = 0
        self._paths: dict[int, str] = {}  # every id this engine has seen -> its directory
        self.num_loads = 0

    def check(self, request: LoRARequest) -> None:
        """Raise ValueError (for this request only) unless its adapter can run here. An id already checked with
        this directory passes at once: no second read or stat of the file for every request that names it."""
        if not isinstance(request, LoRARequest):
            raise TypeError(f"lora_request must be a LoRARequest, got {type(request).__name__}")
        known = self._paths.get(request.lora_int_id)
        if known is not None and os.path.abspath(known) != os.path.abspath(request.lora_path):
            raise ValueError(f"lora_int_id {request.lora_int_id} already names {known!r}; "
                             f"{request.lora_path!r} needs an id of its own")
        if known is not None:
            return
        adapter = self.cache.get(request.lora_path)
        adapter.check_model(self.model_config, self.max_lora_rank,
                            where=f"LoRA adapter {request.lora_name!r} ({request.lora_path})")
        self._paths.setdefault(request.lora_int_id, request.lora_path)

    def assign(self, requests: Iterable[LoRARequest | None]) -> tuple[list[int] | None, list[tuple[int, LoRARequest]]]:
        """Per sequence of a step (its LoRARequest or None), the slot its tokens use (-1: none); None when no
        sequence uses an adapter. Also the (slot, request) copies the workers make first."""
        requests = list(requests)
        needed = {r.lora_int_id: r for r in requests if r is not None}
        if not needed:
            return None, []
        if len(needed) > self.max_loras:
            raise RuntimeError(f"a step uses {len(needed)} adapters, the engine has max_loras={self.max_loras} "
                               f"slots (the scheduler admits no more)")
        self._clock += 1
        slot_of = {lora_id: s for s, lora_id in enumerate(self.slot_ids) if lora_id in needed}
        loads = []
        for lora_id, request in needed.items():
            if lora_id not in slot_of:
                free = [s for s, held in enumerate(self.slot_ids) if held is None]
                s = free[0] if free else min((s for s, held in enumerate(self.slot_ids) if held not in needed),
                                             key=self._last_used.__getitem__)
                self.slot_ids[s] = lora_id
                slot_of[lora_id] = s
                loads.append((s, request))
                self.num_loads += 1
            self._last_used[slot_of[lora_id]] = self._clock
        return [-1 if r is None else slot_of[r.lora_int_id] for r in requests], loads

    def forget(self) -> None:
        """After a failed step (a copy into a slot may have stopped halfway): treat every slot as empty, so the
        next step copies its adapters again."""
        self.slot_ids = [None] * self.max_loras
