"""Weight formats: the one table of GGUF file types, export out-types and ONNX quantization modes.

`llavao1-export gguf --outtype`, `llavao1-export quantize --type`, `llavao1-export import`, the bench
sweep and the runtime's choice of a shipped file all read this table. A file's type is read from the
file (its `general.file_type`, else its weights' tensor types), never guessed from its name.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass


@dataclass(frozen=True)
class FileType:
    name: str  # as users write it: "Q4_K_M"
    ftype: str  # gguf.LlamaFileType member (llama.cpp's LLAMA_FTYPE_*), also general.file_type
    tensor_type: str | None = None  # the ggml type of every weight matrix, for types written in one type
    outtype: str | None = None  # `llavao1-export gguf --outtype` spelling, for types the writer emits
    exact: bool = False  # holds the values written (no quantization): import reads them back as they are


# From large to small; the order is what `--help` and error messages list.
FILE_TYPES: tuple[FileType, ...] = (
    FileType("F32", "ALL_F32", "F32", outtype="f32", exact=True),
    FileType("F16", "MOSTLY_F16", "F16", outtype="f16", exact=True),
    FileType("BF16", "MOSTLY_BF16", "BF16", outtype="bf16", exact=True),
    FileType("Q8_0", "MOSTLY_Q8_0", "Q8_0"),
    FileType("Q6_K", "MOSTLY_Q6_K", "Q6_K"),
    FileType("Q5_K_M", "MOSTLY_Q5_K_M"),
    FileType("Q5_K_S", "MOSTLY_Q5_K_S"),
    FileType("Q4_K_M", "MOSTLY_Q4_K_M"),
    FileType("Q4_K_S", "MOSTLY_Q4_K_S"),
    FileType("Q4_0", "MOSTLY_Q4_0", "Q4_0"),
    FileType("IQ4_NL", "MOSTLY_IQ4_NL", "IQ4_NL"),
    FileType("IQ4_XS", "MOSTLY_IQ4_XS", "IQ4_XS"),
    FileType("Q3_K_M", "MOSTLY_Q3_K_M"),
    FileType("Q2_K", "MOSTLY_Q2_K"),
)
BY_NAME: dict[str, FileType] = {t.name: t for t in FILE_TYPES}
OUTTYPES: dict[str, FileType] = {t.outtype: t for t in FILE_TYPES if t.outtype}
QUANT_TYPES: tuple[str, ...] = tuple(t.name for t in FILE_TYPES if t.name != "F32")  # llama.cpp quantizes to these
EXACT_TENSOR_TYPES: tuple[str, ...] = tuple(t.tensor_type for t in FILE_TYPES if t.exact)
ONNX_QUANTS: tuple[str, ...] = ("none", "int8", "int4")  # `llavao1-export onnx --quant`


def type_of_file(path: str | os.PathLike) -> str:
    """The weight type of a GGUF file, read from it: "F16", "Q4_K_M", ... ("mixed: ..." when none fits)."""
    from .gguf_constants import Keys, LlamaFileType
    from .gguf_header import read_header

    reader = read_header(path)
    field = reader.fields.get(Keys.General.FILE_TYPE)
    if field is not None:
        ftype = LlamaFileType(int(field.contents())).name
        for t in FILE_TYPES:
            if t.ftype == ftype:
                return t.name
    weights = Counter(t.tensor_type.name for t in reader.tensors if len(t.shape) > 1)
    for t in FILE_TYPES:
        if t.tensor_type and set(weights) == {t.tensor_type}:
            return t.name
    return "mixed: " + ", ".join(f"{k} x{v}" for k, v in weights.most_common())
