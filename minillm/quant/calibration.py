"""Calibration and evaluation text from a real, offline source: the Python standard library's docstrings (chapters 7-8).

GPTQ, AWQ and SmoothQuant look at a few hundred sequences of real activations; perplexity needs held-out
text the calibration never saw. Nothing here may download a dataset (no machine reaches a hub), and text the
model generated itself would flatter it, so we use English prose that every Python install carries: the
docstrings of standard-library modules, their public functions, classes and methods.

Determinism is the point: a fixed, sorted list of module names (STDLIB_MODULES), each imported in a guarded
way and skipped if it fails; module names that do something on import (`antigravity` opens a browser, `this`
prints, `idlelib`/`tkinter`/`turtle` want a display) are refused outright. Docstrings are cleaned
(inspect.cleandoc), deduplicated and sorted, then split by a *stable* hash (sha1 of the text, not Python's
salted hash()) into disjoint calibration and held-out parts, so a document never moves between the parts
when the module list grows. Different Python versions ship different docstrings; within one version the
texts, the split and the token sequences are identical run after run.
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
from typing import Any, Sequence

import torch

__all__ = ["STDLIB_MODULES", "stdlib_docstrings", "split_texts", "calibration_texts", "tokenize_to_sequences"]

# Modules with plenty of prose and no import-time side effects; kept sorted, edited only by appending names.
STDLIB_MODULES: tuple[str, ...] = tuple(sorted((
    "abc", "argparse", "array", "ast", "asyncio", "base64", "bisect", "bz2", "calendar", "cmd", "codecs",
    "collections", "colorsys", "concurrent.futures", "configparser", "contextlib", "copy", "csv", "dataclasses",
    "datetime", "decimal", "difflib", "dis", "email", "email.message", "enum", "filecmp", "fnmatch",
    "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "graphlib", "gzip", "hashlib", "heapq",
    "hmac", "html", "html.parser", "http.client", "http.cookies", "http.server", "imaplib", "inspect", "io",
    "ipaddress", "itertools", "json", "logging", "lzma", "mailbox", "math", "mimetypes", "operator",
    "optparse", "os", "pathlib", "pickle", "pickletools", "pkgutil", "platform", "plistlib", "poplib",
    "pprint", "pydoc", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets", "selectors",
    "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3", "statistics", "string",
    "struct", "subprocess", "symtable", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "trace", "traceback", "types", "typing", "unittest", "urllib.parse", "urllib.request", "uuid", "warnings",
    "wave", "weakref", "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo",
)))
SIDE_EFFECT_MODULES = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"})


def _docs_of_module(name: str, min_chars: int) -> list[str]:
    try:
        module = importlib.import_module(name)
    except Exception:  # absent on this platform or build (e.g. sqlite3 without libsqlite): skip it
        return []
    found = [inspect.getdoc(module)]
    for attr in sorted(vars(module)):
        obj = getattr(module, attr, None)
        if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue  # private, or re-exported from elsewhere (it is gathered where it is defined)
        if inspect.isclass(obj):
            found.append(inspect.getdoc(obj))
            # methods patched in by other libraries (transformers adds Logger.warning_once) are not ours
            found += [inspect.getdoc(m) for a, m in sorted(vars(obj).items())
                      if not a.startswith("_") and (inspect.isfunction(m) or inspect.ismethoddescriptor(m))
                      and getattr(m, "__module__", module.__name__) == module.__name__]
        elif inspect.isfunction(obj) or inspect.isbuiltin(obj):
            found.append(inspect.getdoc(obj))
    return [d for d in found if isinstance(d, str) and len(d) >= min_chars]


def stdlib_docstrings(modules: Sequence[str] = STDLIB_MODULES, min_chars: int = 200) -> list[str]:
    """Every docstring of at least `min_chars` characters in `modules`, cleaned, deduplicated and sorted."""
    if isinstance(modules, str) or not all(isinstance(m, str) and m for m in modules):
        raise TypeError(f"modules must be a sequence of module names, got {modules!r:.80}")
    bad = sorted(m for m in modules if m.split(".")[0] in SIDE_EFFECT_MODULES)
    if bad:
        raise ValueError(f"modules {bad} have side effects on import (browser, printing, a display); leave them out")
    if not isinstance(min_chars, int) or min_chars < 1:
        raise ValueError(f"min_chars must be a positive int, got {min_chars!r}")
    docs = set()
    for name in sorted(set(modules)):
        docs.update(_docs_of_module(name, min_chars))
    return sorted(docs)


def _held_out(text: str, held_out_fraction: float) -> bool:
    bucket = int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2 ** 64
    return bucket < held_out_fraction


def split_texts(texts: Sequence[str], held_out_fraction: float = 0.2) -> tuple[list[str], list[str]]:
    """(calibration, held_out): a stable hash of each text decides its part; the parts never share a text."""
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    calib = [t for t in texts if not _held_out(t, held_out_fraction)]
    held = [t for t in texts if _held_out(t, held_out_fraction)]
    return calib, held


def calibration_texts(split: str = "calibration", held_out_fraction: float = 0.2) -> list[str]:
    """The standard library's docstrings, `split` = "calibration" (for GPTQ/AWQ) or "held_out" (perplexity)."""
    if split not in ("calibration", "held_out"):
        raise ValueError(f"split must be 'calibration' or 'held_out', got {split!r}")
    calib, held = split_texts(stdlib_docstrings(), held_out_fraction)
    return calib if split == "calibration" else held


def tokenize_to_sequences(texts: Sequence[str], tokenizer: Any, n_samples: int = 128, seq_len: int = 512,
                          separator: str = "\n\n") -> torch.Tensor:
    """Token ids [n_samples, seq_len] (int64): the texts encoded in order, concatenated and cut into rows.

    Each text is encoded alone (no special tokens where the tokenizer takes add_special_tokens) and joined by
    `separator`, so the result does not depend on how many texts were needed; encoding stops once enough
    tokens are in hand. Raises ValueError if the texts are too short for n_samples * seq_len tokens.
    """
    for name, v in (("n_samples", n_samples), ("seq_len", seq_len)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not callable(getattr(tokenizer, "encode", None)):
        raise TypeError(f"tokenizer must have an encode(text) method, got {type(tokenizer).__name__}")
    try:
        inspect.signature(tokenizer.encode).bind("", add_special_tokens=False)
        kwargs = {"add_special_tokens": False}
    except (TypeError, ValueError):
        kwargs = {}
    need = n_samples * seq_len
    ids: list[int] = []
    for text in texts:
        ids += tokenizer.encode(text + separator, **kwargs)
        if len(ids) >= need:
            break
    if len(ids) < need:
        raise ValueError(f"the texts give {len(ids)} tokens, fewer than n_samples * seq_len = {need}; "
                         f"lower n_samples or seq_len")
    return torch.tensor(ids[:need], dtype=torch.int64).reshape(n_samples, seq_len)
