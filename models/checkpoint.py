"""A local Hugging Face checkpoint folder: config, weights as numpy, tokenizer files, processor statistics.

Every problem is a CheckpointError naming the file and what is wrong; nothing is downloaded (a hub id
gets a message that the weights must be on disk).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .family import Family


class CheckpointError(ValueError):
    """A checkpoint folder or file that cannot be used; the message says which and why."""




def read_image_processor(folder: str | Path) -> dict:
    """The image processor's settings from a checkpoint's processor config ({} when there is none)."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(folder) / name
        if path.is_file():
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: not valid JSON ({e})") from None
            cfg = cfg.get("image_processor", cfg)
            if "image_mean" in cfg and "image_std" in cfg:
                return cfg
    return {}


def read_image_stats(folder: str | Path) -> tuple[list[float], list[float]] | None:
    """(image_mean, image_std) from a checkpoint's processor config, or None when there is none."""
    cfg = read_image_processor(folder)
    return ([float(v) for v in cfg["image_mean"]], [float(v) for v in cfg["image_std"]]) if cfg else None


def looks_like_hub_id(name: str) -> bool:
    """'org/model': what users pass when they expect a download (training and export never download)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


@dataclass
class Checkpoint:
    path: Path
    config: dict
    tensors: dict[str, np.ndarray]  # float32, Hugging Face names
    tokenizer: dict  # tokenizer.json
    tokenizer_config: dict
    chat_template: str | None
    image_mean: list[float]
    image_std: list[float]
    sha256: str  # of the safetensors files, in name order
    family: Family | None = None  # what models.family says this checkpoint is
    processor: dict = field(default_factory=dict)  # the image processor's settings
    warnings: list[str] = field(default_factory=list)

    @property
    def text_config(self) -> dict:
        return self.config["text_config"]

    @property
    def vision_config(self) -> dict:
        return self.config["vision_config"]

    @property
    def name(self) -> str:
        return self.path.name


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing ({what})")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def _safetensors_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(_read_json(index, "shard index")["weight_map"].values()))
        files = [root / n for n in names]
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        bins = list(root.glob("*.bin")) + list(root.glob("*.pt"))
        hint = " (only pickle .bin/.pt weights found; re-save with safe_serialization=True)" if bins else ""
        raise CheckpointError(f"{root}: no .safetensors weights{hint}")
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: missing weight shard named in the index")
    return files


# Checkpoints on disk use either layout (transformers 5 saves the legacy one); we use the new one.
_LEGACY_PREFIXES = (
    ("language_model.model.", "model.language_model."),
    ("language_model.lm_head.", "lm_head."),
    ("vision_tower.", "model.vision_tower."),
    ("multi_modal_projector.", "model.multi_modal_projector."),
)


def canonical_name(key: str) -> str:
    for old, new in _LEGACY_PREFIXES:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def weights_sha256(files: list[Path]) -> str:
    """sha256 of a checkpoint's safetensors files, in order: what exported files name as their source."""
    digest = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _load_tensors(files: list[Path]) -> dict[str, np.ndarray]:
    import torch
    from safetensors import SafetensorError, safe_open

    tensors: dict[str, np.ndarray] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensors[canonical_name(key)] = st.get_tensor(key).to(torch.float32).numpy()
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{f}: corrupt or truncated safetensors file ({e})") from None
    return tensors


def load_checkpoint(model_dir: str | Path, family=None, weights: bool = True) -> Checkpoint:
    """Read a checkpoint folder whose config.json names a supported family (models.family); weights=False
    leaves the tensors out, for callers that load the model with transformers."""
    from .family import family_for

    root = Path(model_dir)
    if not root.exists():
        if looks_like_hub_id(str(model_dir)):
            raise CheckpointError(f"{model_dir}: looks like a hub id; download the weights to a folder first "
                                  "(llavao1-edge never downloads checkpoints)")
        raise CheckpointError(f"{root}: no such folder")
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a folder (expected a Hugging Face checkpoint folder)")
    config = _read_json(root / "config.json", "model config")
    fam = family or family_for(config, root / "config.json")
    tokenizer = _read_json(root / "tokenizer.json", "fast tokenizer")
    tok_cfg_path = root / "tokenizer_config.json"
    tokenizer_config = _read_json(tok_cfg_path, "tokenizer config") if tok_cfg_path.is_file() else {}
    template_file = root / "chat_template.jinja"
    chat_template = template_file.read_text(encoding="utf-8") if template_file.is_file() else \
        tokenizer_config.get("chat_template")
    processor = read_image_processor(root)
    if not processor:
        raise CheckpointError(f"{root}: no preprocessor_config.json or processor_config.json with image_mean/image_std")
    mean, std = ([float(v) for v in processor[k]] for k in ("image_mean", "image_std"))
    files = _safetensors_files(root)
    tensors, sha = (_load_tensors(files) if weights else {}), weights_sha256(files)
    ckpt = Checkpoint(root, config, tensors, tokenizer, tokenizer_config, chat_template, mean, std, sha, fam, processor)
    ckpt.warnings += fam.warnings(ckpt)
    return ckpt
