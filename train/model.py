"""From-scratch LLaVA models by name: SigLIP-style tower, 2-layer GELU MLP projector, Llama decoder.

SigLIP has no CLS token (llama.cpp 0.3.36 mishandles CLS in LLaVA projectors, issue #25814),
so every patch feature is used ("full"). Widths are multiples of 256 on the text side so that
K-quants apply to every matrix instead of falling back to other types.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path


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


MODEL_SPECS: dict[str, ModelSpec] = {
    "shapes-tiny": ModelSpec("shapes-tiny", image_size=96, patch_size=12),  # 64 image tokens
    # shapes-tiny with a decoder twice as wide (8 heads). Not shipped: 0.408 greedy vs 0.464 in the same 2 h (README).
    "shapes-wide": ModelSpec("shapes-wide", image_size=96, patch_size=12, text_width=512, text_heads=8),
    # For tests: seconds to build, train a step and convert.
    "test-tiny": ModelSpec("test-tiny", image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                           vision_heads=2, vision_ffn=128, text_width=256, text_layers=2, text_heads=4,
                           text_kv_heads=2, text_ffn=512, vocab_size=400, context_length=1024),
}


def image_token_count(config) -> int:
    """Placeholder tokens one image takes in a LLaVA config: every patch, plus CLS if it is kept."""
    vc = config.vision_config
    n = (vc.image_size // vc.patch_size) ** 2
    if vc.model_type == "clip_vision_model" and config.vision_feature_select_strategy == "full":
        n += 1
    return n


def read_image_stats(folder: str | Path) -> tuple[list[float], list[float]] | None:
    """(image_mean, image_std) from a checkpoint's processor config, or None when there is none."""
    for name in ("preprocessor_config.json", "processor_config.json"):
        path = Path(folder) / name
        if path.is_file():
            try:
                cfg = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
            cfg = cfg.get("image_processor", cfg)
            if "image_mean" in cfg and "image_std" in cfg:
                return [float(v) for v in cfg["image_mean"]], [float(v) for v in cfg["image_std"]]
    return None


def looks_like_hub_id(name: str) -> bool:
    """'org/model': what users pass when they expect a download (we never download)."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).exists()


def get_spec(name: str, **overrides) -> ModelSpec:
    if name not in MODEL_SPECS:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(MODEL_SPECS)}")
    return replace(MODEL_SPECS[name], **overrides)


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
