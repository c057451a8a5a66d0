"""A GGUF file's header read in one pass: its keys with their types and values, and its tensors' names,
shapes, types and places. No tensor data is read.

The `gguf` package's own GGUFReader does the same through a numpy view per value: 7.5 s for a Qwen2-size
vocabulary (150k tokens and 150k merges), where this reader takes 0.22 s (AMD EPYC, 2 threads,
2026-12-07). The runtime reads every file this way before llama.cpp sees it. A test holds it equal to
GGUFReader, key for key and tensor for tensor.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .gguf_constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType, Keys

T = GGUFValueType
_SCALARS = {T.UINT8: "<B", T.INT8: "<b", T.UINT16: "<H", T.INT16: "<h", T.UINT32: "<I", T.INT32: "<i",
            T.FLOAT32: "<f", T.BOOL: "<?", T.UINT64: "<Q", T.INT64: "<q", T.FLOAT64: "<d"}
_NUMPY = {T.UINT8: np.uint8, T.INT8: np.int8, T.UINT16: np.uint16, T.INT16: np.int16, T.UINT32: np.uint32,
          T.INT32: np.int32, T.FLOAT32: np.float32, T.BOOL: np.bool_, T.UINT64: np.uint64, T.INT64: np.int64,
          T.FLOAT64: np.float64}
MAGIC = b"GGUF"


class HeaderError(ValueError):
    """The bytes are not a GGUF header this reader understands (truncated, corrupt, unknown type)."""


@dataclass
class Field:
    type: GGUFValueType
    item_type: GGUFValueType | None  # arrays only
    value: object  # a scalar, a str, or a list (strings) / numpy array (numbers) for arrays

    @property
    def types(self) -> list[GGUFValueType]:
        """As GGUFReader's ReaderField.types: [ARRAY, item type] or [type]."""
        return [self.type, self.item_type] if self.item_type is not None else [self.type]

    def contents(self):
        return self.value.tolist() if isinstance(self.value, np.ndarray) else self.value

    def __len__(self) -> int:
        return len(self.value)


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (the input width) first
    tensor_type: GGMLQuantizationType
    data_offset: int  # from the start of the file
    n_bytes: int

    @property
    def n_elements(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class GGUFHeader:
    path: Path
    version: int
    fields: dict[str, Field]
    tensors: list[TensorInfo]
    size: int  # bytes in the file


class _Cursor:
    def __init__(self, buf, pos: int = 0):
        self.buf, self.pos = buf, pos

    def unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise HeaderError("truncated header")
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return value

    def string(self) -> str:
        n = self.unpack("<Q")
        if self.pos + n > len(self.buf):
            raise HeaderError("truncated header (a string runs past the end)")
        raw = self.buf[self.pos:self.pos + n]
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value_type(self) -> GGUFValueType:
        raw = self.unpack("<I")
        try:
            return GGUFValueType(raw)
        except ValueError:
            raise HeaderError(f"unknown value type {raw}") from None

    def value(self, vtype: GGUFValueType):
        if vtype == T.STRING:
            return self.string()
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        raise HeaderError(f"value type {vtype.name} where a scalar was expected")

    def array(self) -> tuple[GGUFValueType, object]:
        item_type, count = self.value_type(), self.unpack("<Q")
        if item_type == T.STRING:
            return item_type, [self.string() for _ in range(count)]
        if item_type not in _NUMPY:
            raise HeaderError(f"arrays of {item_type.name} are not supported")
        dtype = np.dtype(_NUMPY[item_type])
        end = self.pos + count * dtype.itemsize
        if end > len(self.buf):
            raise HeaderError("truncated header (an array runs past the end)")
        values = np.frombuffer(self.buf, dtype=dtype.newbyteorder("<"), count=count, offset=self.pos).copy()
        self.pos = end
        return item_type, values


def read_header(path: str | os.PathLike) -> GGUFHeader:
    """Keys and tensor infos of a GGUF file; HeaderError for anything but a whole, readable header."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        if head != MAGIC:
            raise HeaderError(f"not a GGUF file (starts with {head!r})")
        if size < 24:
            raise HeaderError("truncated header")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    with buf:
        c = _Cursor(buf, 4)
        version, n_tensors, n_kv = c.unpack("<I"), c.unpack("<Q"), c.unpack("<Q")
        if version not in (2, 3):
            raise HeaderError(f"GGUF version {version} is not supported")
        fields: dict[str, Field] = {}
        for _ in range(n_kv):
            key, vtype = c.string(), c.value_type()
            if vtype == T.ARRAY:
                item_type, value = c.array()
                fields[key] = Field(vtype, item_type, value)
            else:
                fields[key] = Field(vtype, None, c.value(vtype))
        infos = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.unpack("<I")
            shape = tuple(c.unpack("<Q") for _ in range(n_dims))
            raw_type, offset = c.unpack("<I"), c.unpack("<Q")
            try:
                ttype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise HeaderError(f"tensor {name}: unknown type {raw_type}") from None
            infos.append((name, shape, ttype, offset))
        alignment = int(fields[Keys.General.ALIGNMENT].value) if Keys.General.ALIGNMENT in fields else 32
        start = c.pos + (-c.pos % alignment)
    tensors = []
    for name, shape, ttype, offset in infos:
        block, type_size = GGML_QUANT_SIZES[ttype]
        n_elems = int(np.prod(shape, dtype=np.int64))
        tensors.append(TensorInfo(name, shape, ttype, start + offset, n_elems * type_size // block))
    return GGUFHeader(path, version, fields, tensors, size)
