"""Our own GGUF writer: the container that minillm/loader/gguf.py reads, written from the format spec (chapter 8).

A GGUF v3 file, little-endian throughout, is

    "GGUF" | version 3 (u32) | tensor_count (u64) | kv_count (u64)
    kv_count x      key (string) | value type (u32) | value
    tensor_count x  name (string) | n_dims (u32) | dims, innermost first (n_dims x u64) | ggml type (u32) |
                    offset of the data from the start of the data section (u64)
    zero padding up to a multiple of the alignment (general.alignment, default 32)
    the data section: each tensor's bytes, each starting at a multiple of the alignment

A string is a u64 length and UTF-8 bytes; an array is an element type (u32), a count (u64) and the elements.
Value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string, 9 array, 10 u64, 11 i64, 12 f64.

Every offset is known before any data is written (a tensor's size follows from its type and shape), so the
writer lays out the header first and then streams the tensors: a tensor's bytes may be given as a function
that produces them, and they are only computed (e.g. quantized) when their turn comes. A 7B model never has
to sit in memory twice.

    writer = GGUFWriter("out.gguf")
    writer.add_metadata("general.architecture", "llama")                      # type inferred: string
    writer.add_metadata("llama.block_count", 30, GGUFValueType.UINT32)
    writer.add_tensor("output_norm.weight", (576,), GGML_F32, lambda: raw_bytes)   # PyTorch shape
    writer.write(progress=True)

We do not use the `gguf` package's GGUFWriter: the GPU machines do not have it, and the format is short
enough to write down. The tests read our files back with both readers.
"""
from __future__ import annotations

import enum
import math
import os
import struct
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from minillm.loader.dequant import GGML_TYPES
from minillm.loader.gguf import DEFAULT_ALIGNMENT, GGUF_MAGIC

GGUF_VERSION = 3


class GGUFValueType(enum.IntEnum):
    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_FORMATS = {GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
            GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
            GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?", GGUFValueType.UINT64: "<Q",
            GGUFValueType.INT64: "<q", GGUFValueType.FLOAT64: "<d"}
_NUMPY = {GGUFValueType.UINT8: "<u1", GGUFValueType.INT8: "<i1", GGUFValueType.UINT16: "<u2",
          GGUFValueType.INT16: "<i2", GGUFValueType.UINT32: "<u4", GGUFValueType.INT32: "<i4",
          GGUFValueType.FLOAT32: "<f4", GGUFValueType.BOOL: "<u1", GGUFValueType.UINT64: "<u8",
          GGUFValueType.INT64: "<i8", GGUFValueType.FLOAT64: "<f8"}  # a GGUF bool is one byte, 0 or 1


def infer_value_type(value: Any) -> GGUFValueType:
    """The type llama.cpp's tools would give a Python value: bool, u32/i32 (i64/u64 when out of range), f32, string,
    array. Pass the type explicitly where it matters (a u64 count, an f64)."""
    if isinstance(value, (bool, np.bool_)):
        return GGUFValueType.BOOL
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if 0 <= v < 2 ** 32:
            return GGUFValueType.UINT32
        if -2 ** 31 <= v < 2 ** 31:
            return GGUFValueType.INT32
        return GGUFValueType.INT64 if v < 0 or v < 2 ** 63 else GGUFValueType.UINT64
    if isinstance(value, (float, np.floating)):
        return GGUFValueType.FLOAT32
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, (list, tuple)):
        return GGUFValueType.ARRAY
    raise TypeError(f"GGUF metadata cannot hold a {type(value).__name__} ({str(value)[:60]}); use bool, int, "
                    f"float, str or a list of one of them")


def _encode_string(text: str) -> bytes:
    raw = text.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _encode_value(value: Any, vtype: GGUFValueType, etype: GGUFValueType | None, key: str) -> bytes:
    if vtype == GGUFValueType.STRING:
        if not isinstance(value, str):
            raise TypeError(f"metadata {key!r}: a string value must be str, got {type(value).__name__}")
        return _encode_string(value)
    if vtype == GGUFValueType.ARRAY:
        if not isinstance(value, (list, tuple)):
            raise TypeError(f"metadata {key!r}: an array value must be a list, got {type(value).__name__}")
        if etype is None:
            etype = infer_value_type(value[0]) if value else GGUFValueType.UINT32
            if etype == GGUFValueType.FLOAT32 or any(isinstance(v, float) for v in value):
                etype = GGUFValueType.FLOAT32  # one float makes the array a float array
        head = struct.pack("<IQ", etype, len(value))
        if etype in _NUMPY:  # numeric arrays in one call: 49,152 token types should not take 49,152 packs
            try:
                return head + np.asarray(value, dtype=_NUMPY[etype]).tobytes()
            except (OverflowError, ValueError) as err:
                raise ValueError(f"metadata {key!r}: {err} for element type {etype.name}") from None
        return head + b"".join(_encode_value(v, etype, None, f"{key}[{i}]") for i, v in enumerate(value))
    try:
        return struct.pack(_FORMATS[vtype], value)
    except struct.error as err:
        raise ValueError(f"metadata {key!r}: {value!r} does not fit {vtype.name}: {err}") from None


@dataclass
class _PendingTensor:
    name: str
    shape: tuple[int, ...]  # PyTorch order (out_features, in_features)
    ggml_type: int
    nbytes: int
    data: torch.Tensor | Callable[[], torch.Tensor]


class GGUFWriter:
    """Collects metadata and tensors, then writes one GGUF v3 file (`write`)."""

    def __init__(self, path: str | os.PathLike, alignment: int = DEFAULT_ALIGNMENT) -> None:
        if isinstance(alignment, bool) or not isinstance(alignment, int) or alignment < 1 or \
                alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two >= 1, got {alignment!r}")
        self.path = os.fspath(path)
        self.alignment = alignment
        self.metadata: dict[str, bytes] = {}
        self.tensors: dict[str, _PendingTensor] = {}
        if alignment != DEFAULT_ALIGNMENT:
            self.add_metadata("general.alignment", alignment, GGUFValueType.UINT32)

    def add_metadata(self, key: str, value: Any, value_type: int | None = None,
                     element_type: int | None = None) -> None:
        """Add (or replace) one key; the type is inferred unless given (a GGUFValueType or its number)."""
        if not isinstance(key, str) or not key:
            raise ValueError(f"a metadata key must be a non-empty string, got {key!r}")
        vtype = infer_value_type(value) if value_type is None else GGUFValueType(value_type)
        etype = None if element_type is None else GGUFValueType(element_type)
        self.metadata[key] = struct.pack("<I", vtype) + _encode_value(value, vtype, etype, key)

    def add_tensor(self, name: str, shape: tuple[int, ...], ggml_type: int,
                   data: torch.Tensor | Callable[[], torch.Tensor]) -> None:
        """A tensor of PyTorch shape `shape` whose encoded bytes (flat uint8) are `data`, or what `data()` returns."""
        if not isinstance(name, str) or not name or name in self.tensors:
            raise ValueError(f"tensor name must be a new non-empty string, got {name!r}")
        if ggml_type not in GGML_TYPES:
            raise ValueError(f"tensor {name!r}: ggml type {ggml_type} is not one minillm reads "
                             f"({', '.join(f'{t.type_id} {t.name}' for t in GGML_TYPES.values())})")
        shape = tuple(int(d) for d in shape)
        if not 1 <= len(shape) <= 4 or any(d < 1 for d in shape):
            raise ValueError(f"tensor {name!r}: shape {list(shape)} must have 1..4 positive dims")
        gtype = GGML_TYPES[ggml_type]
        if shape[-1] % gtype.block_size:
            raise ValueError(f"tensor {name!r}: row length {shape[-1]} is not a multiple of the {gtype.name} "
                             f"block size {gtype.block_size}")
        self.tensors[name] = _PendingTensor(name, shape, ggml_type, gtype.nbytes(math.prod(shape)), data)

    def _header(self) -> tuple[bytes, list[int]]:
        out = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(self.tensors), len(self.metadata))]
        out += [_encode_string(key) + value for key, value in self.metadata.items()]
        offsets, pos = [], 0
        for t in self.tensors.values():
            offsets.append(pos)
            dims = tuple(reversed(t.shape))  # ggml lists the contiguous dim first
            out.append(_encode_string(t.name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, t.ggml_type, pos))
            pos += -(-t.nbytes // self.alignment) * self.alignment
        header = b"".join(out)
        return header + b"\0" * (-len(header) % self.alignment), offsets

    def write(self, progress: bool = False, desc: str = "write GGUF") -> str:
        """Write the file (computing any lazily given tensors in order); returns its path."""
        header, _ = self._header()
        tmp = self.path + ".partial"  # a crash leaves no half-written file under the real name
        with open(tmp, "wb") as f:
            f.write(header)
            for t in tqdm(list(self.tensors.values()), desc=desc, unit="tensor", disable=not progress):
                raw = t.data() if callable(t.data) else t.data
                if not isinstance(raw, torch.Tensor) or raw.dtype != torch.uint8:
                    raise TypeError(f"tensor {t.name!r}: data must be a flat uint8 tensor of encoded bytes, got "
                                    f"{getattr(raw, 'dtype', type(raw).__name__)}")
                if raw.numel() != t.nbytes:
                    raise ValueError(f"tensor {t.name!r}: got {raw.numel()} bytes, but shape {list(t.shape)} in "
                                     f"{GGML_TYPES[t.ggml_type].name} takes {t.nbytes}")
                f.write(raw.detach().cpu().contiguous().numpy().tobytes())
                f.write(b"\0" * (-t.nbytes % self.alignment))
        os.replace(tmp, self.path)
        return self.path
