"""Our own GGUF reader: header, metadata, tensor table, and zero-copy access to the data (chapter 1).

GGUF is llama.cpp's single-file model format. Little-endian throughout, it is laid out as

    magic "GGUF" | version (u32) | tensor_count (u64) | kv_count (u64)
    kv_count   x  key (string) | value type (u32) | value
    tensor_count x name (string) | n_dims (u32) | dims (n_dims x u64) | ggml type (u32) | offset (u64)
    padding up to `general.alignment` (default 32)
    data section: each tensor at data_start + offset

A string is a u64 byte length followed by UTF-8 bytes; an array is an element type (u32), a count
(u64) and the elements. Dims are listed innermost first (ggml's ne[0] is the contiguous one), so a
weight of PyTorch shape [out_features, in_features] is stored with dims (in_features, out_features):
`load_tensor` reverses them.

The file is memory-mapped copy-on-write: opening a 100 MB model reads only the header, and a tensor's
bytes are paged in when it is dequantized. The `gguf` package reads the same files; our tests use it
as the oracle, never the implementation.
"""
from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from minillm.loader.dequant import GGML_TYPES, ggml_type_name, supported_type_names

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)  # version 1 used 32-bit counts and is long obsolete
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types -> struct format (scalars); 8 = string and 9 = array are handled apart.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY_DTYPES = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
                 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


class GGUFError(ValueError):
    """A GGUF file that is missing, corrupt, truncated, or uses something minillm does not read."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in the file and how it is encoded."""

    name: str
    shape: tuple[int, ...]  # PyTorch order: reversed GGUF dims, e.g. (out_features, in_features)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int | None  # None when the type is one we cannot decode (its size is then unknown to us)

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)

    @property
    def num_elements(self) -> int:
        return math.prod(self.shape)


class _Cursor:
    """Reads little-endian values from the mapped file, turning any read past the end into a GGUFError."""

    def __init__(self, buf: memoryview, path: str) -> None:
        self.buf, self.path, self.pos = buf, path, 0

    def _need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise GGUFError(
                f"{self.path}: truncated or corrupt: reading {what} needs bytes {self.pos}..{self.pos + n} "
                f"but the file has {len(self.buf)}"
            )

    def scalar(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size, what)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def string(self, what: str) -> str:
        n = self.scalar("<Q", f"the length of {what}")
        self._need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int, what: str) -> Any:
        if vtype in _SCALAR_FORMATS:
            return self.scalar(_SCALAR_FORMATS[vtype], what)
        if vtype == _STRING:
            return self.string(what)
        if vtype == _ARRAY:
            etype = self.scalar("<I", f"the element type of {what}")
            count = self.scalar("<Q", f"the length of {what}")
            if etype in _NUMPY_DTYPES:  # numeric arrays in one read instead of count struct calls
                nbytes = count * np.dtype(_NUMPY_DTYPES[etype]).itemsize
                self._need(nbytes, what)
                arr = np.frombuffer(self.buf, dtype=_NUMPY_DTYPES[etype], count=count, offset=self.pos)
                self.pos += nbytes
                return arr.tolist()
            if etype in (_STRING, _ARRAY):
                return [self.value(etype, f"{what}[{i}]") for i in range(count)]
            raise GGUFError(f"{self.path}: {what} is an array of unknown value type {etype} (known: 0..12)")
        raise GGUFError(f"{self.path}: {what} has unknown value type {vtype} (known: 0..12)")


class GGUFFile:
    """A parsed GGUF file: `.metadata` (key -> value), `.tensors` (name -> TensorInfo), `.load_tensor(name)`."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise GGUFError(f"{self.path}: GGUF file not found")
        self.file_size = os.path.getsize(self.path)
        if self.file_size < 24:  # magic + version + two counts
            raise GGUFError(f"{self.path}: truncated: {self.file_size} bytes is shorter than the 24-byte GGUF header")
        # mode="c" (copy-on-write) gives writable arrays, so torch.from_numpy does not warn; the file is never written.
        self._data = np.memmap(self.path, dtype=np.uint8, mode="c")
        cur = _Cursor(memoryview(self._data), self.path)
        self.version, tensor_count, kv_count = self._read_header(cur)
        self.metadata: dict[str, Any] = {}
        # key -> (value type, element type of an array or None): what a writer needs to copy a key unchanged
        self.metadata_types: dict[str, tuple[int, int | None]] = {}
        for i in range(kv_count):
            key = cur.string(f"metadata key #{i}")
            if key in self.metadata:
                raise GGUFError(f"{self.path}: metadata key {key!r} appears twice (corrupt file)")
            vtype = cur.scalar("<I", f"the type of metadata {key!r}")
            start = cur.pos
            self.metadata[key] = cur.value(vtype, f"metadata {key!r}")  # checks the bytes are there
            etype = struct.unpack_from("<I", cur.buf, start)[0] if vtype == _ARRAY else None
            self.metadata_types[key] = (vtype, etype)
        self.alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if isinstance(self.alignment, bool) or not isinstance(self.alignment, int) or self.alignment < 1 or \
                self.alignment & (self.alignment - 1):
            raise GGUFError(f"{self.path}: general.alignment must be a power of two, got {self.alignment}")
        raw_infos = [self._read_tensor_info(cur, i) for i in range(tensor_count)]
        self.data_start = -(-cur.pos // self.alignment) * self.alignment  # round up to the alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, ggml_type, rel_offset in raw_infos:
            if name in self.tensors:
                raise GGUFError(f"{self.path}: tensor {name!r} appears twice in the tensor table (corrupt file)")
            self.tensors[name] = self._make_info(name, dims, ggml_type, rel_offset)

    def _read_header(self, cur: _Cursor) -> tuple[int, int, int]:
        magic = bytes(cur.buf[0:4])
        if magic != GGUF_MAGIC:
            raise GGUFError(f"{self.path}: not a GGUF file: bad magic {magic!r}, expected {GGUF_MAGIC!r}")
        cur.pos = 4
        version = cur.scalar("<I", "the version")
        if version not in SUPPORTED_VERSIONS:
            if struct.unpack(">I", struct.pack("<I", version))[0] in SUPPORTED_VERSIONS:
                raise GGUFError(f"{self.path}: big-endian GGUF files are not supported (only little-endian)")
            raise GGUFError(f"{self.path}: unsupported GGUF version {version}; supported: {SUPPORTED_VERSIONS}")
        return version, cur.scalar("<Q", "the tensor count"), cur.scalar("<Q", "the metadata count")

    def _read_tensor_info(self, cur: _Cursor, i: int) -> tuple[str, tuple[int, ...], int, int]:
        name = cur.string(f"the name of tensor #{i}")
        n_dims = cur.scalar("<I", f"the rank of tensor {name!r}")
        if not 1 <= n_dims <= 4:  # GGML_MAX_DIMS
            raise GGUFError(f"{self.path}: tensor {name!r} has {n_dims} dims; GGUF allows 1..4")
        dims = tuple(cur.scalar("<Q", f"the dims of tensor {name!r}") for _ in range(n_dims))
        ggml_type = cur.scalar("<I", f"the type of tensor {name!r}")
        offset = cur.scalar("<Q", f"the offset of tensor {name!r}")
        return name, dims, ggml_type, offset

    def _make_info(self, name: str, dims: tuple[int, ...], ggml_type: int, rel_offset: int) -> TensorInfo:
        shape = tuple(reversed(dims))
        start = self.data_start + rel_offset
        if rel_offset % self.alignment:
            raise GGUFError(f"{self.path}: tensor {name!r} offset {rel_offset} is not a multiple of the "
                            f"alignment {self.alignment}")
        nbytes = None
        if ggml_type in GGML_TYPES:
            gtype = GGML_TYPES[ggml_type]
            if dims[0] % gtype.block_size:
                raise GGUFError(f"{self.path}: tensor {name!r} row length {dims[0]} is not a multiple of the "
                                f"{gtype.name} block size {gtype.block_size}")
            # math.prod on Python ints: a corrupt dim near 2**64 must not wrap around in int64
            nbytes = gtype.nbytes(math.prod(dims))
            if start + nbytes > self.file_size:
                raise GGUFError(f"{self.path}: truncated: tensor {name} needs bytes {start}..{start + nbytes} "
                                f"but file has {self.file_size}")
        return TensorInfo(name, shape, ggml_type, start, nbytes)

    @property
    def architecture(self) -> str | None:
        return self.metadata.get("general.architecture")

    def raw_bytes(self, name: str) -> torch.Tensor:
        """The tensor's encoded bytes as a flat uint8 tensor (a view of the mapping, not a copy)."""
        info = self.tensor_info(name)
        if info.nbytes is None:
            raise GGUFError(f"{self.path}: tensor {name!r} has type {info.type_name}, which minillm cannot decode; "
                            f"supported types: {', '.join(supported_type_names())}")
        return torch.from_numpy(self._data[info.offset:info.offset + info.nbytes])

    def tensor_info(self, name: str) -> TensorInfo:
        if name not in self.tensors:
            sample = ", ".join(list(self.tensors)[:5])
            raise GGUFError(f"{self.path}: no tensor named {name!r} (the file has {len(self.tensors)}: {sample}, ...)")
        return self.tensors[name]

    def load_tensor(self, name: str) -> torch.Tensor:
        """Dequantize one tensor to float32, in PyTorch shape order (weights come out [out_features, in_features])."""
        raw = self.raw_bytes(name)  # raises for a type we cannot decode
        info = self.tensors[name]
        return GGML_TYPES[info.ggml_type].dequantize(raw).reshape(info.shape)

    def __repr__(self) -> str:
        return (f"GGUFFile({self.path!r}, version={self.version}, architecture={self.architecture!r}, "
                f"{len(self.metadata)} metadata keys, {len(self.tensors)} tensors)")
