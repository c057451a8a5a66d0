"""What a GGUF file should hold, planned before anything is written: keys with their types, tensors
with their shapes and types. Each model family fills plans (text model and projector); export/ writes
them, reads the files back and compares them with the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T
from gguf import Keys, LlamaFileType

from llavao1_edge import __version__
from llavao1_edge import gguf_keys as K
from llavao1_edge.formats import OUTTYPES


@dataclass
class PlannedFile:
    """One GGUF file: keys (name, type, value, item type of arrays) and tensors (name, float32 data, type)."""

    arch: str
    outtype: str = "f32"  # a formats.OUTTYPES key: the type of weight matrices
    keys: list[tuple[str, T, object, T | None]] = field(default_factory=list)
    tensors: list[tuple[str, np.ndarray, Q]] = field(default_factory=list)

    def kv(self, key: str, vtype: T, value, item_type: T | None = None) -> None:
        """Add a key; `{arch}` in its name (gguf.Keys.LLM.*) is filled in."""
        self.keys.append((key.format(arch=self.arch), vtype, value, item_type))

    def tensor(self, name: str, data: np.ndarray, f32: bool = False) -> None:
        """Add a tensor: norms, biases and other 1-D tensors (and any with f32) stay F32, matrices take the
        out-type."""
        data = np.ascontiguousarray(data, dtype=np.float32)
        qtype = Q.F32 if data.ndim < 2 or f32 else Q[OUTTYPES[self.outtype].tensor_type]
        self.tensors.append((name, data, qtype))

    def value(self, key: str):
        for name, _, value, _ in self.keys:
            if name == key:
                return value
        raise KeyError(key)


def new_plan(arch: str, outtype: str, name: str, source_sha256: str) -> PlannedFile:
    """A plan with the keys every file of ours carries."""
    if outtype not in OUTTYPES:
        raise ValueError(f"out-type must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    plan = PlannedFile(arch, outtype)
    plan.kv(Keys.General.ARCHITECTURE, T.STRING, arch)
    plan.kv(Keys.General.NAME, T.STRING, name)
    plan.kv(Keys.General.FILE_TYPE, T.UINT32, LlamaFileType[OUTTYPES[outtype].ftype].value)
    plan.kv(K.SOURCE_SHA256, T.STRING, source_sha256)
    plan.kv(K.EXPORTER_VERSION, T.STRING, __version__)
    return plan


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF 'rotate half' RoPE rows -> ggml's adjacent-pair layout: row 2j+a <- a*d/2+j, per head."""
    out_dim, in_dim = w.shape[0], int(np.prod(w.shape[1:]))
    d = out_dim // n_heads
    return w.reshape(n_heads, 2, d // 2, in_dim).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """ggml's adjacent-pair RoPE rows -> HF 'rotate half' layout: the inverse of permute_qk."""
    out_dim, in_dim = w.shape[0], int(np.prod(w.shape[1:]))
    d = out_dim // n_heads
    return w.reshape(n_heads, d // 2, 2, in_dim).swapaxes(1, 2).reshape(w.shape)
