"""The LLaVA family: SigLIP- or CLIP-style tower, 2-layer GELU MLP projector, Llama decoder.

Built from a small spec for from-scratch training and tests; read from any LlavaForConditionalGeneration
checkpoint for export, as a `llama` text model and an `mlp` projector.

SigLIP has no CLS token (llama.cpp 0.3.36 mishandles CLS in LLaVA projectors, issue #25814),
so every patch feature is used ("full"). Widths are multiples of 256 on the text side so that
K-quants apply to every matrix instead of falling back to other types.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
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


@dataclass(frozen=True)
class ModelSpec:
    name: str
    image_size: int = 96  # pixels, square
    patch_size: int = 8  # image tokens = (image_size / patch_size) ** 2
    vision_width: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    vision_ffn: int = 768  # must differ from vision_width (llama.cpp swaps up/down otherwise)
    text_width: int = 256
    text_layers: int = 6
    text_heads: int = 4
    text_kv_heads: int = 2  # grouped KV heads
    text_ffn: int = 768
    vocab_size: int = 768  # BPE merges + specials; stage tags are added on top
    context_length: int = 2048
    rope_theta: float = 10000.0
    feature_layer: int = -1  # which vision hidden state feeds the projector
    tie_embeddings: bool = False
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    vision_act: str = "gelu_pytorch_tanh"  # ggml's GELU is the tanh form: exact parity
    projector_act: str = "gelu_pytorch_tanh"
    vision_tower: str = "siglip"  # or "clip" (has a CLS token: llama.cpp 0.3.36 mishandles it)

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def image_token_count(config) -> int:
    """Placeholder tokens one image takes in a LLaVA config (a dict or a transformers config): every patch,
    plus CLS if it is kept."""
    c = config if isinstance(config, dict) else config.to_dict()
    vc = c["vision_config"]
    n = (vc["image_size"] // vc["patch_size"]) ** 2
    if vc.get("model_type") == "clip_vision_model" and c.get("vision_feature_select_strategy") == "full":
        n += 1
    return n


def build_model(spec: ModelSpec, tokenizer, seed: int = 0):
    """A randomly initialised LlavaForConditionalGeneration for `spec` and `tokenizer`."""
    import torch
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
    )

    if spec.image_size % spec.patch_size:
        raise ValueError(f"image_size {spec.image_size} is not a multiple of patch_size {spec.patch_size}")
    if spec.vision_ffn == spec.vision_width:
        raise ValueError("vision_ffn must differ from vision_width (llama.cpp's loader swaps them otherwise)")
    common = dict(hidden_size=spec.vision_width, intermediate_size=spec.vision_ffn,
                  num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads,
                  image_size=spec.image_size, patch_size=spec.patch_size, hidden_act=spec.vision_act,
                  layer_norm_eps=1e-6)
    if spec.vision_tower == "siglip":
        vision, strategy = SiglipVisionConfig(vision_use_head=False, **common), "full"
    elif spec.vision_tower == "clip":
        from transformers import CLIPVisionConfig

        vision, strategy = CLIPVisionConfig(projection_dim=spec.vision_width, **common), "default"  # drop CLS
    else:
        raise ValueError(f"vision_tower must be 'siglip' or 'clip', got {spec.vision_tower!r}")
    text = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=spec.text_width, intermediate_size=spec.text_ffn,
        num_hidden_layers=spec.text_layers, num_attention_heads=spec.text_heads,
        num_key_value_heads=spec.text_kv_heads, max_position_embeddings=spec.context_length,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": spec.rope_theta},
        tie_word_embeddings=spec.tie_embeddings, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        projector_hidden_act=spec.projector_act, vision_feature_select_strategy=strategy,
        vision_feature_layer=spec.feature_layer, image_seq_length=spec.image_tokens,
        tie_word_embeddings=spec.tie_embeddings,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_processor(tokenizer, spec: ModelSpec, out_dir: str | Path) -> None:
    """Tokenizer, chat template and image processor config, loadable by AutoProcessor."""
    from transformers import LlavaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    image_processor = SiglipImageProcessorPil(
        size={"height": spec.image_size, "width": spec.image_size}, image_mean=list(spec.image_mean),
        image_std=list(spec.image_std), resample=3,
    )
    clip = spec.vision_tower == "clip"  # CLS is added by the tower and dropped again ("default")
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
                               vision_feature_select_strategy="default" if clip else "full",
                               chat_template=tokenizer.chat_template, num_additional_image_tokens=int(clip))
    processor.save_pretrained(out_dir)


def save_checkpoint(model, tokenizer, spec: ModelSpec, out_dir: str | Path) -> None:
    """A plain Hugging Face checkpoint: config, safetensors, tokenizer, processor, our spec."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_processor(tokenizer, spec, out)
    (out / "llavao1_model.json").write_text(json.dumps(
        {**asdict(spec), "note": "preprocess images with llavao1_edge.images.preprocess (mtmd's rule)"},
        indent=2) + "\n")


def image_prompt_ids(tokenizer, prompt: str, image_token_id: int, n_image_tokens: int) -> list[int]:
    """Token ids of a rendered chat prompt for transformers or ONNX: its one image placeholder expanded
    to every image token, as LlavaProcessor does."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    at = ids.index(image_token_id)
    return ids[:at] + [image_token_id] * n_image_tokens + ids[at + 1:]


# ---------------------------------------------------------------------------------------------
# GGUF: a `llama` text model and an `mlp` projector

SUPPORTED_TEXT = ("llama", "mistral")
SUPPORTED_VISION = ("siglip_vision_model", "clip_vision_model")
VISION_BLOCK_TENSORS: dict[str, MT] = {
    "self_attn.q_proj": MT.V_ENC_ATTN_Q, "self_attn.k_proj": MT.V_ENC_ATTN_K, "self_attn.v_proj": MT.V_ENC_ATTN_V,
    "self_attn.out_proj": MT.V_ENC_ATTN_O, "layer_norm1": MT.V_ENC_INPUT_NORM, "layer_norm2": MT.V_ENC_POST_ATTN_NORM,
    "mlp.fc1": MT.V_ENC_FFN_UP, "mlp.fc2": MT.V_ENC_FFN_DOWN,
}
PROJECTOR_LAYERS = {"linear_1": 0, "linear_2": 2}  # mm.0 and mm.2: llama.cpp's mlp projector (gguf's map says mm.1)


def check_config(config: dict, where: Path) -> None:
    text_type = config.get("text_config", {}).get("model_type")
    vision_type = config.get("vision_config", {}).get("model_type")
    if text_type not in SUPPORTED_TEXT:
        raise CheckpointError(f"{where}: text decoder {text_type!r} is not supported; supported: {', '.join(SUPPORTED_TEXT)}")
    if vision_type not in SUPPORTED_VISION:
        raise CheckpointError(f"{where}: vision tower {vision_type!r} is not supported; supported: "
                              f"{', '.join(SUPPORTED_VISION)}")


def warnings(ckpt: Checkpoint) -> list[str]:
    if ckpt.vision_config.get("model_type") == "clip_vision_model":
        return ["CLIP tower with a CLS token: llama.cpp 0.3.36 places CLS after the patches while positions "
                "assume it first (llama.cpp issue #25814); image embeddings will differ, and verify will show it"]
    return []


def plan_text(ckpt: Checkpoint, outtype: str) -> PlannedFile:
    return plan_llama_text(ckpt, outtype, ckpt.text_config, "model.language_model.", "lm_head.weight")


def vision_blocks(n_layers: int, feature_layer) -> int:
    """How many vision blocks llama.cpp must run for HF's vision_feature_layer."""
    if isinstance(feature_layer, list):
        if len(feature_layer) != 1:
            raise CheckpointError(f"vision_feature_layer {feature_layer}: several feature layers are not supported")
        feature_layer = feature_layer[0]
    blocks = n_layers + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= blocks <= n_layers:
        raise CheckpointError(f"vision_feature_layer {feature_layer} is out of range for {n_layers} layers")
    return blocks


def tower_prefix(names) -> str:
    """Where the tower's weights live: transformers nests SigLIP's under vision_model, CLIP's not always."""
    v = "model.vision_tower.vision_model."
    return v if v + "embeddings.patch_embedding.weight" in names else "model.vision_tower."


def tower_keys(plan: PlannedFile, ckpt: Checkpoint, projection_dim: int) -> None:
    """The keys of a SigLIP- or CLIP-style tower (LLaVA, Idefics3), from its vision config, and the image
    statistics."""
    vc, CV = ckpt.vision_config, Keys.ClipVision
    plan.kv(Keys.Clip.HAS_VISION_ENCODER, T.BOOL, True)
    plan.kv(CV.IMAGE_SIZE, T.UINT32, vc["image_size"])
    plan.kv(CV.PATCH_SIZE, T.UINT32, vc["patch_size"])
    plan.kv(CV.EMBEDDING_LENGTH, T.UINT32, vc["hidden_size"])
    plan.kv(CV.FEED_FORWARD_LENGTH, T.UINT32, vc["intermediate_size"])
    plan.kv(CV.BLOCK_COUNT, T.UINT32, vc["num_hidden_layers"])
    plan.kv(CV.PROJECTION_DIM, T.UINT32, projection_dim)
    plan.kv(CV.Attention.HEAD_COUNT, T.UINT32, vc["num_attention_heads"])
    plan.kv(CV.Attention.LAYERNORM_EPS, T.FLOAT32, float(vc.get("layer_norm_eps", 1e-6)))
    plan.kv(CV.IMAGE_MEAN, T.ARRAY, [float(v) for v in ckpt.image_mean], T.FLOAT32)
    plan.kv(CV.IMAGE_STD, T.ARRAY, [float(v) for v in ckpt.image_std], T.FLOAT32)


def plan_mmproj(ckpt: Checkpoint, outtype: str) -> PlannedFile:
    vc, t = ckpt.vision_config, ckpt.tensors
    plan = new_plan(K.VISION_ARCHITECTURE, outtype, ckpt.name, ckpt.sha256)
    n_layers = vc["num_hidden_layers"]
    act = vc.get("hidden_act", "gelu")
    config_path = ckpt.path / "config.json"
    if act not in ("gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu"):
        raise CheckpointError(f"{config_path}: vision activation {act!r} is not supported")
    proj_act = ckpt.config.get("projector_hidden_act", "gelu")
    if proj_act not in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
        raise CheckpointError(f"{config_path}: projector activation {proj_act!r} is not supported "
                              "(llama.cpp's mlp projector uses GELU)")
    proj_out = t["model.multi_modal_projector.linear_2.weight"].shape[0]
    if proj_out != ckpt.text_config["hidden_size"]:
        raise CheckpointError(f"{config_path}: projector output width {proj_out} != text model width "
                              f"{ckpt.text_config['hidden_size']}")
    plan.kv(Keys.Clip.PROJECTOR_TYPE, T.STRING, "mlp")
    plan.kv(Keys.ClipVision.USE_GELU, T.BOOL, act != "quick_gelu")
    tower_keys(plan, ckpt, proj_out)
    blocks = vision_blocks(n_layers, ckpt.config.get("vision_feature_layer", -2))
    plan.kv(K.CLIP_FEATURE_LAYER, T.ARRAY, [blocks], T.INT32)

    def add(kind: MT, key: str, bid: int | None = None, suffix: str | None = "weight", required: bool = True) -> None:
        if key not in t:
            if required:
                raise CheckpointError(f"{ckpt.path}: tensor {key} is missing")
            return
        plan.tensor(tensor_name(kind, bid, suffix), t[key])

    v = tower_prefix(t)
    add(MT.V_ENC_EMBD_PATCH, v + "embeddings.patch_embedding.weight")
    add(MT.V_ENC_EMBD_PATCH, v + "embeddings.patch_embedding.bias", suffix="bias", required=False)
    add(MT.V_ENC_EMBD_POS, v + "embeddings.position_embedding.weight")
    add(MT.V_ENC_EMBD_CLS, v + "embeddings.class_embedding", suffix=None, required=False)
    add(MT.V_PRE_NORM, v + "pre_layrnorm.weight", required=False)
    add(MT.V_PRE_NORM, v + "pre_layrnorm.bias", suffix="bias", required=False)
    for i in range(n_layers):
        for hf, kind in VISION_BLOCK_TENSORS.items():
            for suffix in ("weight", "bias"):
                add(kind, f"{v}encoder.layers.{i}.{hf}.{suffix}", i, suffix)
    for hf, bid in PROJECTOR_LAYERS.items():
        for suffix in ("weight", "bias"):
            add(MT.V_MMPROJ, f"model.multi_modal_projector.{hf}.{suffix}", bid, suffix)
    return plan


# ---------------------------------------------------------------------------------------------
# transformers: images, LoRA targets, unused tower weights


class LlavaInputs(VisionInputs):
    """One fixed-size image: fitted into the tower's square on mtmd's pad colour, one token per patch."""

    def prompt(self, width: int, height: int) -> str:
        return self.image_token * image_token_count(self.config)

    def arrays(self, img) -> dict[str, np.ndarray]:
        from llavao1_edge.images import preprocess

        size = self.config["vision_config"]["image_size"]
        return {"pixel_values": preprocess(img, size, self.processor["image_mean"], self.processor["image_std"])[None]}

    def features(self, model, tensors: dict) -> list:
        return [model.model.get_image_features(pixel_values=tensors["pixel_values"]).pooler_output[0]]


def freeze_unused(model) -> list[str]:
    """LLaVA reads the tower's hidden states: its post-layernorm and any blocks past the feature layer never
    get gradients. Freeze them (DDP requires it, and they need no optimizer state)."""
    tower = model.model.vision_tower
    keep = vision_blocks(model.config.vision_config.num_hidden_layers, model.config.vision_feature_layer)
    frozen = []
    for name, p in tower.named_parameters():
        parts = name.split(".")
        unused = "post_layernorm" in parts or "head" in parts
        if "layers" in parts:
            unused |= int(parts[parts.index("layers") + 1]) >= keep
        if unused and p.requires_grad:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


LINEAR_TEXT = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
LINEAR_SIGLIP = r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"

FAMILY = Family("llava", ("LlavaForConditionalGeneration",), "llama", "mlp", plan_text, plan_mmproj,
                check_config=check_config, warnings=warnings, inputs=LlavaInputs,
                lora_text=rf".*language_model.*\.{LINEAR_TEXT}", lora_vision=rf".*vision_tower.*layers\.\d+\..*{LINEAR_SIGLIP}",
                train_projector=True, freeze_unused=freeze_unused)
