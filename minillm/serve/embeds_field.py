"""The completions request's `prompt_embeds` (chapter 10's server; vLLM's, with --enable-prompt-embeds): each entry
the base64 of `torch.save(tensor)` for a float tensor [num_positions, hidden_size], as a client writes it:

    buffer = io.BytesIO(); torch.save(vectors, buffer)
    body = {"prompt_embeds": base64.b64encode(buffer.getvalue()).decode(), "max_tokens": 16}

The bytes are read with `torch.load(weights_only=True)`, which builds tensors and plain containers only (no code
from the client runs); anything that is not one tensor is a 400. The engine checks the tensor itself
(minillm/engine/prompt_embeds.py).
"""
from __future__ import annotations

import base64
import binascii
import io

import torch


def decode_prompt_embeds(value: str, where: str = "prompt_embeds") -> torch.Tensor:
    """One base64-encoded torch.save'd tensor, on the host; ValueError naming `where` for anything else."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{where} must be base64 (of torch.save(tensor)), got {value[:40]!r}") from None
    try:
        tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as err:  # any unreadable payload: the client's error, not the server's
        raise ValueError(f"{where} holds no torch.save'd tensor ({type(err).__name__})") from None
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{where} must hold one tensor [num_positions, hidden_size], got {type(tensor).__name__}")
    return tensor.to_dense() if tensor.layout != torch.strided else tensor
