"""Shared test helpers: a byte-level tokenizer for tiny random models, and the one-thread fixture.

On a busy 2-core machine torch's two intra-op threads fight each other and small ops slow down many times over;
test modules that run many small forwards import `one_thread` (autouse, module scope) to pin torch to one thread.
"""
from __future__ import annotations

import pytest
import torch

EOS = 257


class ByteTokenizer:
    """Token i < 256 is byte i; 256.. are special tokens that decode to nothing (257 is EOS)."""

    eos_token_id = EOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, token_ids: list[int]) -> str:
        return bytes(t for t in token_ids if t < 256).decode("utf-8", errors="replace")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
