"""Hugging Face checkpoint -> GGUF text model + mmproj, with our own explicit writer.

The checkpoint's family (models.family) plans both files: every key with the type llama.cpp
requires, every tensor with its shape and type. Each file is written under a temporary name, read
back with the gguf reader and compared with the plan, and only then renamed into place.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T
from gguf import Keys

from llavao1_edge.formats import OUTTYPES
from llavao1_models.checkpoint import load_checkpoint
from llavao1_models.family import Family
from llavao1_models.gguf_plan import PlannedFile

from .errors import ExportError


def _encode(data: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return data.astype(np.float32)
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def write_plan(plan: PlannedFile, path: Path) -> None:
    writer = gguf.GGUFWriter(str(path), plan.arch)
    try:
        for key, vtype, value, item_type in plan.keys:
            if key == Keys.General.ARCHITECTURE:
                continue  # GGUFWriter writes general.architecture itself
            if vtype == T.ARRAY:
                writer.add_key_value(key, list(value), T.ARRAY, sub_type=item_type)
            else:
                writer.add_key_value(key, value, vtype)
        for name, data, qtype in plan.tensors:
            enc = _encode(data, qtype)
            # BF16 arrives as bytes; the writer derives the element shape from raw_dtype.
            writer.add_tensor(name, enc, raw_dtype=qtype if qtype == Q.BF16 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
    finally:
        writer.close()


def check_written(plan: PlannedFile, path: Path) -> None:
    """Read the file back and compare keys, types, tensor names, shapes and types with the plan."""
    reader = gguf.GGUFReader(str(path))
    for key, vtype, value, item_type in plan.keys:
        f = reader.fields.get(key)
        if f is None:
            raise ExportError(f"{path}: key {key} missing after write")
        if f.types[0] != vtype or (item_type is not None and f.types[-1] != item_type):
            raise ExportError(f"{path}: key {key} has type {f.types} after write, expected {vtype}")
        got_value = f.contents()
        same = np.allclose(got_value, value, rtol=1e-6) if vtype in (T.FLOAT32,) or item_type == T.FLOAT32 \
            else got_value == (list(value) if vtype == T.ARRAY else value)
        if not same:
            raise ExportError(f"{path}: key {key} reads back as {str(got_value)[:60]}, expected {str(value)[:60]}")
    got = {t.name: t for t in reader.tensors}
    if set(got) != {name for name, _, _ in plan.tensors}:
        raise ExportError(f"{path}: tensor names differ after write")
    for name, data, qtype in plan.tensors:
        t = got[name]
        if tuple(int(d) for d in reversed(t.shape)) != data.shape or t.tensor_type != qtype:
            raise ExportError(f"{path}: tensor {name} is {tuple(t.shape)} {t.tensor_type.name} after write, "
                              f"expected {data.shape} {qtype.name}")


@dataclass
class ExportResult:
    text: Path
    mmproj: Path
    warnings: list[str]


def convert_to_gguf(model_dir: str | os.PathLike, out_dir: str | os.PathLike, outtype: str = "f16",
                    log: Callable[[str], None] = lambda s: None, family: Family | None = None) -> ExportResult:
    """Write DIR/NAME-OUTTYPE.gguf and DIR/mmproj-NAME-OUTTYPE.gguf; returns their paths. `family`: the
    checkpoint's family when config.json's architectures do not say it (tests' fixture writers)."""
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    ckpt = load_checkpoint(model_dir, family)
    for w in ckpt.warnings:
        log(f"warning: {w}")
    plans = {"text": ckpt.family.plan_text(ckpt, outtype), "mmproj": ckpt.family.plan_mmproj(ckpt, outtype)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = {"text": out / f"{ckpt.name}-{outtype}.gguf", "mmproj": out / f"mmproj-{ckpt.name}-{outtype}.gguf"}
    tmp = {k: p.with_name(f".{p.name}.tmp-{os.getpid()}") for k, p in final.items()}
    try:
        for k in plans:
            log(f"writing {final[k].name} ({len(plans[k].tensors)} tensors)")
            write_plan(plans[k], tmp[k])
            check_written(plans[k], tmp[k])
        for k in plans:
            os.replace(tmp[k], final[k])
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return ExportResult(final["text"], final["mmproj"], ckpt.warnings)
