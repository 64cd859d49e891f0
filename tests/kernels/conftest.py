"""Shared set-up for the Triton kernel tests: the references module on sys.path, the GPU marker's skip."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import minillm  # noqa: F401  (sets TRITON_INTERPRET=1 before triton is imported when there is no CUDA)

sys.path.insert(0, str(Path(__file__).parent))  # `import kernel_reference`, whatever pytest's import mode

import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords and str(Path(__file__).parent) in str(item.fspath):
            item.add_marker(skip)
