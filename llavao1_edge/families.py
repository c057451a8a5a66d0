"""The vision families the runtime is tested on, as their GGUF files name them: which projector type and
text architecture each has, and how its projector turns an image into tokens. For `llavao1-edge info`;
nothing here changes how a model runs (llama.cpp's mtmd does each family's preprocessing).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


def _per_side(facts: dict, merge: int = 1) -> int:
    return int(facts.get("image_size", 0)) // max(1, int(facts.get("patch_size", 1))) // max(1, merge)


def _mlp(f: dict) -> str:
    n = _per_side(f) ** 2
    return (f"one chunk: the image fitted into {f.get('image_size')} px (padded to a square), {n} tokens "
            f"({f.get('patch_size')} px patches)")


def _idefics3(f: dict) -> str:
    tile, scale = f.get("image_size"), int(f.get("projector.scale_factor", 1))
    return (f"sliced: the longest edge resized to {f.get('preproc_image_size', tile)} px, cut into tiles of {tile} px, "
            f"plus the whole image as an overview tile: one chunk per tile, {_per_side(f, scale) ** 2} tokens each")


def _qwen2vl(f: dict) -> str:
    unit = 2 * int(f.get("patch_size", 14))
    return (f"dynamic resolution: sides rounded to multiples of {unit} px, one chunk of (width/{unit}) x "
            f"(height/{unit}) tokens (8 to 4096), 2-D positions (M-RoPE)")


def _gemma3(f: dict) -> str:
    return (f"one chunk: the image fitted into {f.get('image_size')} px, "
            f"{_per_side(f, int(f.get('projector.scale_factor', 4))) ** 2} tokens (patches pooled)")


@dataclass(frozen=True)
class VisionFamily:
    name: str
    projector_types: tuple[str, ...]
    text_architectures: tuple[str, ...]
    image_tokens: Callable[[dict], str]  # projector facts (clip.vision.* keys) -> how an image becomes tokens


FAMILIES = (
    VisionFamily("LLaVA (SigLIP or CLIP tower, MLP projector)", ("mlp",), ("llama",), _mlp),
    VisionFamily("SmolVLM / Idefics3", ("idefics3",), ("llama",), _idefics3),
    VisionFamily("Qwen2-VL", ("qwen2vl_merger",), ("qwen2vl",), _qwen2vl),
    VisionFamily("Qwen2.5-VL", ("qwen2.5vl_merger",), ("qwen2vl",), _qwen2vl),
    VisionFamily("Gemma 3", ("gemma3",), ("gemma3",), _gemma3),
)


def by_projector(projector_type: str | None) -> VisionFamily | None:
    return next((f for f in FAMILIES if projector_type in f.projector_types), None)


def by_text_architecture(arch: str) -> list[VisionFamily]:
    return [f for f in FAMILIES if arch in f.text_architectures]
