"""The model families train/ and export/ support, each declared once as a `Family`.

A family says which Hugging Face architectures it covers, how its checkpoints become a GGUF text
model and projector (the plans export/ writes), and what llama.cpp runs them as. Adding one is one
module with one `FAMILY` and a line in `_MODULES`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .checkpoint import Checkpoint, CheckpointError
from .gguf_plan import PlannedFile


class VisionInputs:
    """How a family's transformers model takes one image, prepared by the rule llama.cpp's mtmd applies to
    that family (so training, verification and the runtime see the same pixels and the same prompt)."""

    def __init__(self, config: dict, processor: dict, tokenizer, pixel_limits: tuple[int | None, int | None] | None = None):
        self.config, self.processor = config, processor
        self.pixel_limits = pixel_limits  # (min, max) pixels of a dynamic-resolution image; None: llama.cpp's default
        self.image_token_id: int = config.get("image_token_id", config.get("image_token_index"))
        self.image_token: str = tokenizer.convert_ids_to_tokens(self.image_token_id)  # what transformers fills

    def prompt(self, width: int, height: int) -> str:
        """The text that stands for an image of this size where mtmd's marker was: its tokens written out."""
        raise NotImplementedError

    def arrays(self, img) -> dict[str, np.ndarray]:
        """The model's image arguments for one RGB PIL image, as a batch of one."""
        raise NotImplementedError

    def batch(self, items: list[dict | None]) -> dict[str, np.ndarray]:
        """The image arguments of a batch (None for examples without an image): concatenated by default."""
        present = [i for i in items if i is not None]
        return {k: np.concatenate([i[k] for i in present]) for k in present[0]} if present else {}

    def features(self, model, tensors: dict) -> list:
        """The projected image features of a batch of one, one [tokens, width] tensor per mtmd image chunk."""
        raise NotImplementedError

    def sequence_inputs(self, ids) -> dict:
        """Extra per-token inputs the model needs beside input_ids ([B, T] torch tensor)."""
        return {}


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
    # the transformers side (training, verification); None where only export is supported
    inputs: type[VisionInputs] | None = None
    text_module: str = "language_model"  # where the decoder lives (model.<this>)
    vision_module: str = "vision_tower"  # the tower (model.<this>)
    projector_module: str = "multi_modal_projector"  # the projector (model.<this>, or inside the tower)
    lora_text: str = ""  # peft target regex for the decoder's linear layers
    lora_vision: str = ""  # ... for the tower's (optional)
    train_projector: bool = False  # with LoRA, the projector is trained fully unless asked otherwise
    freeze_unused: Callable[[object], list[str]] = lambda model: []  # freeze tower weights the model never reads


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
