"""The Qwen2-VL family: Qwen2-VL and Qwen2.5-VL (a ViT with 2-D RoPE and a 2x2 patch merger, a Qwen2 decoder
with multimodal RoPE).

As GGUF: a `qwen2vl` text model (M-RoPE sections written as four integers, the Qwen2 pre-tokenizer) and a
`qwen2vl_merger` / `qwen2.5vl_merger` projector. The 3-D patch embedding (two frames) becomes two 2-D
kernels, the fused q/k/v of each block three tensors; Qwen2.5-VL's tower uses RMSNorm, a gated SiLU MLP
and window attention, with full attention every n-th block (`clip.vision.n_wa_pattern`).
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
from .llama import vocab_and_ends
from .llava import LINEAR_TEXT

TEXT_BLOCK = {"input_layernorm": MT.ATTN_NORM, "self_attn.q_proj": MT.ATTN_Q, "self_attn.k_proj": MT.ATTN_K,
              "self_attn.v_proj": MT.ATTN_V, "self_attn.o_proj": MT.ATTN_OUT, "post_attention_layernorm": MT.FFN_NORM,
              "mlp.gate_proj": MT.FFN_GATE, "mlp.up_proj": MT.FFN_UP, "mlp.down_proj": MT.FFN_DOWN}
VISION_MLP = {"qwen2_vl": {"mlp.fc1": MT.V_ENC_FFN_UP, "mlp.fc2": MT.V_ENC_FFN_DOWN},
              "qwen2_5_vl": {"mlp.gate_proj": MT.V_ENC_FFN_GATE, "mlp.up_proj": MT.V_ENC_FFN_UP,
                             "mlp.down_proj": MT.V_ENC_FFN_DOWN}}
PROJECTOR_TYPES = {"qwen2_vl": "qwen2vl_merger", "qwen2_5_vl": "qwen2.5vl_merger"}
IMAGE_TOKENS = (8, 4096)  # llama.cpp's limits on one image's tokens for these projectors (clip.cpp)
MERGE, TEMPORAL = 2, 2  # spatial merge and temporal patch size (check_config holds checkpoints to these)
IMAGE_SIZE = 560  # clip.vision.image_size: mtmd sizes images itself for these projectors; llama.cpp's converter's value


def _prefixes(ckpt: Checkpoint) -> tuple[str, str]:
    """(text, vision) weight prefixes: transformers 5 in memory, or the layout it saves."""
    t = ckpt.tensors
    text = "model.language_model." if "model.language_model.embed_tokens.weight" in t else "model."
    vision = "model.visual." if any(k.startswith("model.visual.") for k in t) else "visual."
    return text, vision


def check_config(config: dict, where: Path) -> None:
    if config.get("model_type") not in PROJECTOR_TYPES:
        raise CheckpointError(f"{where}: model_type {config.get('model_type')!r} is not qwen2_vl or qwen2_5_vl")
    vc = config.get("vision_config", {})
    if vc.get("spatial_merge_size", 2) != 2 or vc.get("temporal_patch_size", 2) != 2:
        raise CheckpointError(f"{where}: llama.cpp's qwen2vl projector needs spatial_merge_size 2 and temporal_patch_size 2")
    if config["model_type"] == "qwen2_5_vl":
        full = vc.get("fullatt_block_indexes") or []
        n = full[0] + 1 if full else 0
        if not full or any(b != (i + 1) * n - 1 for i, b in enumerate(full)):
            raise CheckpointError(f"{where}: fullatt_block_indexes {full} are not every n-th block, which is what "
                                  "llama.cpp's window attention runs")


def _text_config(ckpt: Checkpoint) -> dict:
    return ckpt.config.get("text_config") or ckpt.config


def mrope_sections(ckpt: Checkpoint) -> list[int]:
    tc = _text_config(ckpt)
    rope = tc.get("rope_parameters") or tc.get("rope_scaling") or {}
    sections = list(rope.get("mrope_section") or [16, 24, 24])  # transformers' default when the config has none
    head_dim = tc["hidden_size"] // tc["num_attention_heads"]
    if sum(sections) * 2 != head_dim:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: mrope_section {sections} does not cover half of head_dim "
                              f"{head_dim}")
    return sections + [0] * (4 - len(sections))


def plan_text(ckpt: Checkpoint, outtype: str) -> PlannedFile:
    tc, t = _text_config(ckpt), ckpt.tensors
    text, _ = _prefixes(ckpt)
    plan = new_plan("qwen2vl", outtype, ckpt.name, ckpt.sha256)
    n_head, n_layers = tc["num_attention_heads"], tc["num_hidden_layers"]
    rope = tc.get("rope_parameters") or {}
    emb = t[text + "embed_tokens.weight"]
    plan.kv(Keys.LLM.CONTEXT_LENGTH, T.UINT32, int(tc.get("max_position_embeddings", 32768)))
    plan.kv(Keys.LLM.EMBEDDING_LENGTH, T.UINT32, tc["hidden_size"])
    plan.kv(Keys.LLM.BLOCK_COUNT, T.UINT32, n_layers)
    plan.kv(Keys.LLM.FEED_FORWARD_LENGTH, T.UINT32, tc["intermediate_size"])
    plan.kv(Keys.Attention.HEAD_COUNT, T.UINT32, n_head)
    plan.kv(Keys.Attention.HEAD_COUNT_KV, T.UINT32, tc.get("num_key_value_heads") or n_head)
    plan.kv(Keys.Rope.FREQ_BASE, T.FLOAT32, float(rope.get("rope_theta", tc.get("rope_theta", 1e6))))
    plan.kv(Keys.Rope.DIMENSION_SECTIONS, T.ARRAY, mrope_sections(ckpt), T.INT32)
    # the epsilon is written for the readers that use it: llama.cpp 0.3.36 reads none for qwen2vl (it uses 0)
    vocab_and_ends(plan, ckpt, tc, emb, t[text + "norm.weight"], "lm_head.weight")
    for i in range(n_layers):  # no Q/K row permutation: M-RoPE rotates HF's halves, as transformers does
        for hf, kind in TEXT_BLOCK.items():
            plan.tensor(tensor_name(kind, i), t[f"{text}layers.{i}.{hf}.weight"])
            if kind in (MT.ATTN_Q, MT.ATTN_K, MT.ATTN_V):
                plan.tensor(tensor_name(kind, i, "bias"), t[f"{text}layers.{i}.{hf}.bias"])
    return plan


def plan_mmproj(ckpt: Checkpoint, outtype: str) -> PlannedFile:
    vc, t, kind = ckpt.vision_config, ckpt.tensors, ckpt.config["model_type"]
    _, v = _prefixes(ckpt)
    plan = new_plan(K.VISION_ARCHITECTURE, outtype, ckpt.name, ckpt.sha256)
    qwen25 = kind == "qwen2_5_vl"
    width = vc["hidden_size"] if qwen25 else vc["embed_dim"]
    ffn = vc["intermediate_size"] if qwen25 else int(vc["embed_dim"] * vc.get("mlp_ratio", 4))
    out_width = vc["out_hidden_size"] if qwen25 else vc["hidden_size"]
    n_layers = vc["depth"]
    if ffn == width:  # llama.cpp's loader would swap the MLP's up and down weights
        raise CheckpointError(f"{ckpt.path / 'config.json'}: a vision MLP as wide as the tower ({width}) is read "
                              "the wrong way round by llama.cpp")
    CV = Keys.ClipVision
    plan.kv(Keys.Clip.HAS_VISION_ENCODER, T.BOOL, True)
    plan.kv(Keys.Clip.PROJECTOR_TYPE, T.STRING, PROJECTOR_TYPES[kind])
    plan.kv(CV.IMAGE_SIZE, T.UINT32, IMAGE_SIZE)
    plan.kv(CV.PATCH_SIZE, T.UINT32, vc["patch_size"])
    plan.kv(CV.EMBEDDING_LENGTH, T.UINT32, width)
    plan.kv(CV.FEED_FORWARD_LENGTH, T.UINT32, ffn)
    plan.kv(CV.BLOCK_COUNT, T.UINT32, n_layers)
    plan.kv(CV.PROJECTION_DIM, T.UINT32, out_width)
    plan.kv(CV.Attention.HEAD_COUNT, T.UINT32, vc["num_heads"])
    plan.kv(CV.Attention.LAYERNORM_EPS, T.FLOAT32, 1e-6)  # transformers builds every vision norm with 1e-6
    plan.kv(CV.IMAGE_MEAN, T.ARRAY, [float(x) for x in ckpt.image_mean], T.FLOAT32)
    plan.kv(CV.IMAGE_STD, T.ARRAY, [float(x) for x in ckpt.image_std], T.FLOAT32)
    if qwen25:
        plan.kv(CV.USE_SILU, T.BOOL, True)
        plan.kv(CV.N_WA_PATTERN, T.UINT32, vc["fullatt_block_indexes"][0] + 1)
    elif vc.get("hidden_act", "quick_gelu") != "quick_gelu":  # llama.cpp's default for this projector
        raise CheckpointError(f"{ckpt.path / 'config.json'}: vision activation {vc['hidden_act']!r} is not supported")

    def get(key: str) -> np.ndarray:
        if v + key not in t:
            raise CheckpointError(f"{ckpt.path}: tensor {v + key} is missing")
        return t[v + key]

    patch = get("patch_embed.proj.weight")  # [out, 3, 2 frames, p, p]: one 2-D kernel per frame
    plan.tensor(tensor_name(MT.V_ENC_EMBD_PATCH), patch[:, :, 0], f32=True)
    plan.tensor(tensor_name(MT.V_ENC_EMBD_PATCH, suffix="weight.1"), patch[:, :, 1], f32=True)
    norms = ("weight",) if qwen25 else ("weight", "bias")  # RMSNorm has no bias
    for i in range(n_layers):
        b = f"blocks.{i}."
        for suffix in ("weight", "bias"):
            for part, kind_ in zip(np.split(get(b + f"attn.qkv.{suffix}"), 3), (MT.V_ENC_ATTN_Q, MT.V_ENC_ATTN_K,
                                                                                 MT.V_ENC_ATTN_V), strict=True):
                plan.tensor(tensor_name(kind_, i, suffix), part)
            plan.tensor(tensor_name(MT.V_ENC_ATTN_O, i, suffix), get(b + f"attn.proj.{suffix}"))
            for hf, kind_ in VISION_MLP[kind].items():
                plan.tensor(tensor_name(kind_, i, suffix), get(b + f"{hf}.{suffix}"))
        for suffix in norms:
            plan.tensor(tensor_name(MT.V_ENC_INPUT_NORM, i, suffix), get(b + f"norm1.{suffix}"))
            plan.tensor(tensor_name(MT.V_ENC_POST_ATTN_NORM, i, suffix), get(b + f"norm2.{suffix}"))
    for suffix in norms:
        plan.tensor(tensor_name(MT.V_POST_NORM, suffix=suffix), get(f"merger.ln_q.{suffix}"))
    for layer in (0, 2):
        for suffix in ("weight", "bias"):
            plan.tensor(tensor_name(MT.V_MMPROJ, layer, suffix), get(f"merger.mlp.{layer}.{suffix}"))
    if get("merger.mlp.2.weight").shape[0] != _text_config(ckpt)["hidden_size"]:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: the merger's output width does not match the text model's")
    return plan


# ---------------------------------------------------------------------------------------------
# transformers: dynamic-resolution images


class QwenInputs(VisionInputs):
    """An image at its own size as mtmd sizes it (sides to multiples of 28, its tokens within llama.cpp's limits,
    fitted onto black, bicubic): one image chunk of (h/28)·(w/28) tokens between vision start and end tokens."""

    def __init__(self, config: dict, processor: dict, tokenizer, pixel_limits=None):
        super().__init__(config, processor, tokenizer, pixel_limits)
        self.patch = config["vision_config"]["patch_size"]
        self.align = self.patch * MERGE
        low, high = pixel_limits or (None, None)
        self.min_pixels = low if low is not None else IMAGE_TOKENS[0] * self.align ** 2
        self.max_pixels = high if high is not None else IMAGE_TOKENS[1] * self.align ** 2
        if self.min_pixels > self.max_pixels:
            raise ValueError(f"image size limits: at least {self.min_pixels} pixels is more than at most "
                             f"{self.max_pixels} (llama.cpp's least for this family is {IMAGE_TOKENS[0]} tokens of "
                             f"{self.align}x{self.align} pixels)")

    def size(self, width: int, height: int) -> tuple[int, int]:
        from llavao1_edge.images import dynamic_size

        return dynamic_size(width, height, self.align, self.min_pixels, self.max_pixels)

    def prompt(self, width: int, height: int) -> str:
        w, h = self.size(width, height)
        return "<|vision_start|>" + self.image_token * (w // self.align) * (h // self.align) + "<|vision_end|>"

    def arrays(self, img) -> dict[str, np.ndarray]:
        from llavao1_edge.images import fit_into, normalise

        w, h = self.size(*img.size)
        x = normalise(fit_into(img, w, h), self.processor["image_mean"], self.processor["image_std"])  # [3, h, w]
        gh, gw, p = h // self.patch, w // self.patch, self.patch
        x = x.reshape(3, gh // MERGE, MERGE, p, gw // MERGE, MERGE, p).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], TEMPORAL, p, p))  # one frame, twice
        return {"pixel_values": np.ascontiguousarray(x.reshape(gh * gw, 3 * TEMPORAL * p * p)),
                "image_grid_thw": np.array([[1, gh, gw]], np.int64)}

    def features(self, model, tensors: dict) -> list:
        return list(model.model.get_image_features(**tensors).pooler_output)

    def sequence_inputs(self, ids) -> dict:
        return {"mm_token_type_ids": (ids == self.image_token_id).int()}  # M-RoPE positions for image tokens


FAMILY = Family("qwen2vl", ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"), "qwen2vl",
                "qwen2vl_merger", plan_text, plan_mmproj, check_config=check_config, inputs=QwenInputs,
                vision_module="visual", projector_module="merger", lora_text=rf".*language_model.*\.{LINEAR_TEXT}",
                lora_vision=r".*visual\.blocks\.\d+\..*(qkv|attn\.proj|fc1|fc2|gate_proj|up_proj|down_proj)")
