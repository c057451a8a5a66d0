"""The model families train/ and export/ support, each declared once as a `Family`.

A family says which Hugging Face architectures it covers, how its checkpoints become a GGUF text
model and projector (the plans export/ writes), and what llama.cpp runs them as. Adding one is one
module with one `FAMILY` and a line in `_MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import Checkpoint, CheckpointError
from .gguf_plan import PlannedFile

_MODULES = ("llava", "idefics3", "qwen2vl")  # modules of this package that declare a FAMILY


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]  # config.json "architectures" this family reads
    text_arch: str  # the GGUF architecture of the text model (llama.cpp's name)
    projector_type: str  # clip.projector_type of its mmproj
    plan_text: Callable[[Checkpoint, str], PlannedFile]  # (checkpoint, out-type) -> the text model
    plan_mmproj: Callable[[Checkpoint, str], PlannedFile]  # (checkpoint, out-type) -> the projector
    check_config: Callable[[dict, Path], None] = lambda config, where: None  # refuse what the plans cannot write
    warnings: Callable[[Checkpoint], list[str]] = lambda ckpt: []  # known gaps to say before converting
    notes: tuple[str, ...] = field(default=())  # for docs and `--help`


def families() -> list[Family]:
    return [importlib.import_module(f"{__package__}.{m}").FAMILY for m in _MODULES]


def family_for(config: dict, where: Path | str = "config.json") -> Family:
    """The family of a checkpoint's config.json; CheckpointError naming what is supported otherwise."""
    archs = config.get("architectures") or []
    for fam in families():
        if any(a in fam.architectures for a in archs):
            fam.check_config(config, Path(where))
            return fam
    known = ", ".join(a for fam in families() for a in fam.architectures)
    raise CheckpointError(f"{where}: architecture {archs or 'unknown'} is not supported; supported: {known}")
