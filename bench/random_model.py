"""A published model's shape with random weights, as a GGUF pair: what a model of that size costs on this
machine (speed and memory do not depend on what the weights learned).

The checkpoint is built offline (models/random_checkpoints.py), written by our exporter (F16) and the
text model quantized; the F16 text model is removed afterwards, and the Hugging Face folder unless it is
kept (to measure fine-tuning).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

SHAPES = ("qwen2vl-2b",)  # the shapes this builds (models.random_checkpoints)


def write_random_model(shape: str, out: str | Path, quant: str = "Q4_K_M", log=lambda s: None,
                       keep_checkpoint: bool = False) -> tuple[Path, Path]:
    """(text model quantized to `quant`, F16 projector) of `shape`, under `out`; with keep_checkpoint the
    Hugging Face checkpoint (bf16) stays in OUT/SHAPE-hf, to fine-tune."""
    import torch

    from llavao1_data.records import read_records
    from llavao1_data.shapes import ShapesConfig, write_dataset
    from llavao1_export.gguf_convert import convert_to_gguf
    from llavao1_export.quantize import quantize_gguf
    from llavao1_models.random_checkpoints import QWEN2VL_2B, qwen2vl_checkpoint

    from .common import BenchError

    if shape not in SHAPES:
        raise BenchError(f"shape {shape!r}: choose {', '.join(SHAPES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="llavao1-random-", dir=out) as tmp:
        write_dataset(ShapesConfig(n=48, seed=99), Path(tmp) / "texts", progress=False)
        texts = [t.value for r in read_records(Path(tmp) / "texts" / "records.jsonl") for t in r.conversations]
        log(f"building a random {shape} checkpoint (bf16) ...")
        hf = qwen2vl_checkpoint(texts, Path(tmp) / shape, QWEN2VL_2B, dtype=torch.bfloat16)
        log("writing it as GGUF (F16) ...")
        res = convert_to_gguf(hf, Path(tmp) / "gguf", "f16", log=log)
        text = out / f"{shape}-{quant}.gguf"
        log(f"quantizing the text model to {quant} ...")
        quantize_gguf(res.text, text, quant)
        mmproj = out / f"mmproj-{shape}-f16.gguf"
        shutil.move(res.mmproj, mmproj)
        if keep_checkpoint:
            shutil.rmtree(out / f"{shape}-hf", ignore_errors=True)
            shutil.move(hf, out / f"{shape}-hf")
    return text, mmproj
