"""The Idefics3 family: SmolVLM and Idefics3 (SigLIP-style tower, pixel-shuffle connector, Llama decoder).

As GGUF: a `llama` text model and an `idefics3` projector. llama.cpp's mtmd slices an image the way the
Hugging Face processor does — the longest edge resized to `size.longest_edge` (written as
`clip.vision.preproc_image_size`), a grid of tiles of the tower's `image_size`, then the whole image
shrunk to one tile (the overview, last) — and feeds each tile to the tower: one image chunk per tile.
The connector shuffles each 2-D block of scale_factor² patches into one token and projects it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import MODEL_TENSOR as MT
from gguf import GGUFValueType as T
from gguf import Keys

from llavao1_edge import gguf_keys as K
from llavao1_edge.gguf_keys import tensor_name

from .checkpoint import Checkpoint, CheckpointError
from .family import Family, VisionInputs
from .gguf_plan import PlannedFile, new_plan
from .llama import plan_llama_text
from .llava import LINEAR_SIGLIP, LINEAR_TEXT, VISION_BLOCK_TENSORS, tower_keys

VISION = "model.vision_model."
CONNECTOR = "model.connector.modality_projection.proj.weight"
# tokens mtmd looks up (single ids) or writes around the tiles: each must be one token of the vocabulary
IMAGE_TOKENS = ("<fake_token_around_image>", "<global-img>", "<image>")
TEXT_ARCHITECTURES = ("llama",)


def check_config(config: dict, where: Path) -> None:
    text_type = config.get("text_config", {}).get("model_type", "llama")
    if text_type not in TEXT_ARCHITECTURES:
        raise CheckpointError(f"{where}: text decoder {text_type!r} is not supported; supported: llama")
    act = config.get("vision_config", {}).get("hidden_act", "gelu_pytorch_tanh")
    if act not in ("gelu_pytorch_tanh", "gelu_new", "gelu"):
        raise CheckpointError(f"{where}: vision activation {act!r} is not supported (llama.cpp's tower uses GELU)")


def plan_text(ckpt: Checkpoint, outtype: str) -> PlannedFile:
    return plan_llama_text(ckpt, outtype, ckpt.text_config, "model.text_model.", "lm_head.weight")


def image_size_for_slicing(ckpt: Checkpoint) -> int:
    """The longest edge images are resized to before slicing (the processor's size.longest_edge)."""
    size = ckpt.processor.get("size") or {}
    return int(size.get("longest_edge") or ckpt.vision_config["image_size"])


def plan_mmproj(ckpt: Checkpoint, outtype: str) -> PlannedFile:
    vc, t = ckpt.vision_config, ckpt.tensors
    plan = new_plan(K.VISION_ARCHITECTURE, outtype, ckpt.name, ckpt.sha256)
    n_layers, width = vc["num_hidden_layers"], vc["hidden_size"]
    scale = int(ckpt.config.get("scale_factor", 2))
    text_width = ckpt.text_config["hidden_size"]
    proj = t[CONNECTOR]
    if proj.shape != (text_width, width * scale * scale):
        raise CheckpointError(f"{ckpt.path / 'config.json'}: connector {proj.shape} does not map {scale}x{scale} "
                              f"patches of width {width} to the text width {text_width}")
    if scale < 2 or (vc["image_size"] // vc["patch_size"]) % scale:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: scale_factor {scale} must be 2 or more and divide the "
                              f"{vc['image_size'] // vc['patch_size']} patches per side")
    CV = Keys.ClipVision
    plan.kv(Keys.Clip.PROJECTOR_TYPE, T.STRING, "idefics3")
    plan.kv(CV.USE_GELU, T.BOOL, True)  # gelu_pytorch_tanh: ggml's GELU is the tanh form
    tower_keys(plan, ckpt, text_width)  # clip.vision.image_size: the tile
    plan.kv(CV.PREPROC_IMAGE_SIZE, T.UINT32, image_size_for_slicing(ckpt))
    plan.kv(CV.Projector.SCALE_FACTOR, T.UINT32, scale)

    def add(kind: MT, key: str, bid: int | None = None, suffix: str | None = "weight") -> None:
        if key not in t:
            raise CheckpointError(f"{ckpt.path}: tensor {key} is missing")
        plan.tensor(tensor_name(kind, bid, suffix), t[key])

    add(MT.V_ENC_EMBD_PATCH, VISION + "embeddings.patch_embedding.weight")
    add(MT.V_ENC_EMBD_PATCH, VISION + "embeddings.patch_embedding.bias", suffix="bias")
    add(MT.V_ENC_EMBD_POS, VISION + "embeddings.position_embedding.weight")
    for i in range(n_layers):
        for hf, kind in VISION_BLOCK_TENSORS.items():
            for suffix in ("weight", "bias"):
                add(kind, f"{VISION}encoder.layers.{i}.{hf}.{suffix}", i, suffix)
    for suffix in ("weight", "bias"):
        add(MT.V_POST_NORM, VISION + f"post_layernorm.{suffix}", suffix=suffix)
    add(MT.V_MMPROJ_FC, CONNECTOR)
    return plan


def warnings(ckpt: Checkpoint) -> list[str]:
    vocab = {t["content"] for t in ckpt.tokenizer.get("added_tokens", [])}
    missing = [t for t in IMAGE_TOKENS if t not in vocab]
    return [f"the vocabulary lacks {', '.join(missing)}: llama.cpp cannot frame images for this model"] if missing else []


# ---------------------------------------------------------------------------------------------
# transformers: images as tiles and an overview


class Idefics3Inputs(VisionInputs):
    """An image sliced as mtmd slices it (tiles row by row, then the overview), each tile one image chunk of
    (tile / patch)² / scale² tokens, framed by the tokens transformers' processor writes around it."""

    FAKE, GLOBAL = "<fake_token_around_image>", "<global-img>"

    def __init__(self, config: dict, processor: dict, tokenizer, pixel_limits=None):
        super().__init__(config, processor, tokenizer, pixel_limits)
        vc = config["vision_config"]
        self.tile = vc["image_size"]
        self.longest_edge = int((processor.get("size") or {}).get("longest_edge") or self.tile)
        self.tokens_per_tile = (self.tile // vc["patch_size"]) ** 2 // int(config.get("scale_factor", 2)) ** 2

    def grid(self, width: int, height: int) -> tuple[int, int]:
        from llavao1_edge.images import slice_grid

        return slice_grid(width, height, self.longest_edge, self.tile)

    def prompt(self, width: int, height: int) -> str:
        rows, cols = self.grid(width, height)
        tile = self.image_token * self.tokens_per_tile
        text = "".join("".join(f"{self.FAKE}<row_{r + 1}_col_{c + 1}>{tile}" for c in range(cols)) + "\n"
                       for r in range(rows))
        return text + f"\n{self.FAKE}{self.GLOBAL}{tile}{self.FAKE}"

    def arrays(self, img) -> dict[str, np.ndarray]:
        from llavao1_edge.images import normalise, slice_tiles

        tiles, _, _ = slice_tiles(img, self.longest_edge, self.tile)
        px = np.stack([normalise(t, self.processor["image_mean"], self.processor["image_std"]) for t in tiles])
        return {"pixel_values": px[None], "pixel_attention_mask": np.ones((1, len(tiles), self.tile, self.tile), bool)}

    def batch(self, items: list[dict | None]) -> dict[str, np.ndarray]:
        """Tiles padded with all-zero images (transformers drops those) to the batch's most tiles."""
        present = [i for i in items if i is not None]
        if not present:
            return {}
        most = max(i["pixel_values"].shape[1] for i in present)
        px = np.zeros((len(items), most, 3, self.tile, self.tile), np.float32)
        mask = np.zeros((len(items), most, self.tile, self.tile), bool)
        for b, i in enumerate(items):
            if i is not None:
                n = i["pixel_values"].shape[1]
                px[b, :n], mask[b, :n] = i["pixel_values"][0], i["pixel_attention_mask"][0]
        return {"pixel_values": px, "pixel_attention_mask": mask}

    def features(self, model, tensors: dict) -> list:
        out = model.model.get_image_features(**tensors).pooler_output[0]  # [tiles x tokens, width]
        return list(out.split(self.tokens_per_tile))


FAMILY = Family("idefics3", ("SmolVLMForConditionalGeneration", "Idefics3ForConditionalGeneration"), "llama",
                "idefics3", plan_text, plan_mmproj, check_config=check_config, warnings=warnings, inputs=Idefics3Inputs,
                text_module="text_model", vision_module="vision_model", projector_module="connector",
                lora_text=rf".*text_model.*\.{LINEAR_TEXT}", lora_vision=rf".*vision_model.*layers\.\d+\..*{LINEAR_SIGLIP}")
