"""LoRARequest: which adapter a request runs with, in vLLM's names (`LoRARequest(lora_name, lora_int_id, lora_path)`);
chapter 10, section 7.

A LoRA adapter (Hu et al., 2021) changes a model without touching its weights: for a chosen set of linear layers
it adds a low-rank product, y = x W^T + scaling * (x A^T) B^T with A [r, in] and B [out, r], r of 8 to 64 against
thousands for `in` and `out`. One base model in memory can then serve many fine-tuned variants at once, each
request naming its adapter; the engine (minillm.lora.slots) keeps the adapters of the running requests in a few
device "slots" and every step adds each token's own adapter's product (minillm.lora.layers).

`lora_int_id` is the adapter's identity inside the engine: two requests with the same id share one slot and one
prefix-cache namespace, so one id must always name the same directory (the engine checks it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class LoRARequest:
    """An adapter for one request: a name (what the server's `model` field and the logs show), a positive integer
    id unique per adapter, and the directory holding it in PEFT's format (adapter_config.json and
    adapter_model.safetensors)."""

    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self) -> None:
        if not isinstance(self.lora_name, str) or not self.lora_name.strip():
            raise ValueError(f"LoRARequest.lora_name must be a non-empty string, got {self.lora_name!r}")
        if isinstance(self.lora_int_id, bool) or not isinstance(self.lora_int_id, int) or self.lora_int_id < 1:
            raise ValueError(f"LoRARequest.lora_int_id must be an integer >= 1 (0 means no adapter in vLLM), "
                             f"got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, (str, os.PathLike)) or not os.fspath(self.lora_path):
            raise ValueError(f"LoRARequest.lora_path must be a directory path, got {self.lora_path!r}")
        object.__setattr__(self, "lora_path", os.fspath(self.lora_path))

    @property
    def cache_salt(self) -> int:
        """Where this adapter's prefix-cache keys start (Sequence.cache_salt): the first block's parent hash, one
        per adapter id, so the same tokens under two adapters (whose K/V differ) never share a block."""
        return hash((0x4C6F5241, self.lora_int_id))  # "LoRA" in ASCII; ints hash the same in every process
