"""Quantize GGUF files (text models and mmproj) through llama.cpp's own quantizer.

The types are llavao1_edge.formats' table. Inputs are validated before
llama.cpp sees them, unknown types are refused before any work, the input is never
overwritten, and the output appears under its final name only when complete.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llavao1_edge.engine import captured_llama_log
from llavao1_edge.formats import BY_NAME, QUANT_TYPES
from llavao1_edge.modelfile import describe

from .errors import ExportError

_FALLBACK_RE = re.compile(r"warning: (\S+)\s+- ncols\s+\d+ not divisible by\s+\d+ \(required for type\s+(\S+)\).*?"
                          r"-> falling back to\s+(\S+)", re.DOTALL)


def normalise_type(name: str) -> str:
    """The table's spelling of a quantization type ("q4_k_m" -> "Q4_K_M"); ExportError listing the known ones."""
    key = name.strip().upper()
    if key not in QUANT_TYPES:
        raise ExportError(f"unknown quantization type {name!r}; known: {', '.join(QUANT_TYPES)}")
    return key


@dataclass
class QuantizeResult:
    path: Path
    qtype: str
    size_bytes: int
    input_bytes: int
    tensor_types: dict[str, int]  # ggml type -> tensor count in the output
    fallbacks: list[dict] = field(default_factory=list)  # {tensor, wanted, used}

    def summary(self) -> str:
        mib = self.size_bytes / 2**20
        ratio = self.size_bytes / max(1, self.input_bytes)
        types = ", ".join(f"{k} x{v}" for k, v in sorted(self.tensor_types.items()))
        lines = [f"{self.path} ({self.qtype}): {mib:.2f} MiB, {ratio:.0%} of the input; tensors: {types}"]
        if self.fallbacks:
            lines.append(f"  {len(self.fallbacks)} tensor(s) fell back to another type (row length not divisible "
                         "by the block size):")
            lines += [f"    {f['tensor']}: {f['wanted']} -> {f['used']}" for f in self.fallbacks]
        return "\n".join(lines)


def quantize_gguf(src: str | os.PathLike, dst: str | os.PathLike, qtype: str, threads: int = 0) -> QuantizeResult:
    """Quantize a text-model or mmproj GGUF to `qtype` (a QUANT_TYPES name)."""
    import gguf
    import llama_cpp as L

    qtype = normalise_type(qtype)
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ExportError(f"{src}: file not found")
    if dst.exists() and dst.resolve() == src.resolve():
        raise ExportError(f"{dst}: the output would overwrite the input; choose another name")
    describe(src)  # validates the file (text model or projector): never hand llama.cpp a bad file
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp-{os.getpid()}")
    params = L.llama_model_quantize_default_params()
    params.ftype = getattr(L, "LLAMA_FTYPE_" + BY_NAME[qtype].ftype)
    params.nthread = threads
    with captured_llama_log() as log:
        rc = L.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    try:
        if rc != 0:
            raise ExportError(f"{src}: llama.cpp could not quantize to {qtype} (code {rc})")
        out_reader = gguf.GGUFReader(str(tmp))
        types = Counter(t.tensor_type.name for t in out_reader.tensors)
        del out_reader
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    fallbacks = [{"tensor": m.group(1), "wanted": m.group(2), "used": m.group(3)}
                 for m in _FALLBACK_RE.finditer("".join(log))]
    return QuantizeResult(dst, qtype, dst.stat().st_size, src.stat().st_size, dict(types), fallbacks)
