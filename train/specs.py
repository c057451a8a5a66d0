"""Named from-scratch LLaVA configurations for `llavao1-train --init NAME`."""

from __future__ import annotations

from dataclasses import replace

from llavao1_models.llava import ModelSpec

MODEL_SPECS: dict[str, ModelSpec] = {
    "shapes-tiny": ModelSpec("shapes-tiny", image_size=96, patch_size=12),  # 64 image tokens
    # For tests: seconds to build, train a step and convert.
    "test-tiny": ModelSpec("test-tiny", image_size=32, patch_size=8, vision_width=64, vision_layers=2,
                           vision_heads=2, vision_ffn=128, text_width=256, text_layers=2, text_heads=4,
                           text_kv_heads=2, text_ffn=512, vocab_size=400, context_length=1024),
}


def get_spec(name: str, **overrides) -> ModelSpec:
    if name not in MODEL_SPECS:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(MODEL_SPECS)}")
    return replace(MODEL_SPECS[name], **overrides)
