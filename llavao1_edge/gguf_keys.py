"""GGUF key names and the value types llama.cpp requires: the one place they are written down.

export/ writes these keys; the runtime checks them with the gguf reader before llama.cpp sees a
file, because some wrong types abort the process instead of raising (see
shared/reference/llama-cpp.md).
"""

from __future__ import annotations

from gguf import GGUFValueType as T

ARCHITECTURE = "general.architecture"
NAME = "general.name"
FILE_TYPE = "general.file_type"
QUANT_VERSION = "general.quantization_version"
SOURCE_SHA256 = "general.source.sha256"  # sha256 of the source safetensors, in file order
CHAT_TEMPLATE = "tokenizer.chat_template"

# Our own keys: the runtime reads them to know the model speaks the four-stage format.
STAGE_FORMAT = "llavao1.stage_format"  # "llava-cot-4stage"
STAGE_TAGS = "llavao1.stage_tags"  # ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"]
EXPORTER_VERSION = "llavao1.exporter_version"
STAGE_FORMAT_VALUE = "llava-cot-4stage"

TEXT_ARCHITECTURES = ("llama",)
VISION_ARCHITECTURE = "clip"


def text_key(arch: str, name: str) -> str:
    return f"{arch}.{name}"


# Keys of a text model that must be present, with their exact types ({arch} filled in).
TEXT_REQUIRED: dict[str, T] = {
    "{arch}.context_length": T.UINT32,
    "{arch}.embedding_length": T.UINT32,
    "{arch}.block_count": T.UINT32,
    "{arch}.feed_forward_length": T.UINT32,
    "{arch}.attention.head_count": T.UINT32,
    "{arch}.attention.layer_norm_rms_epsilon": T.FLOAT32,
    "tokenizer.ggml.model": T.STRING,
    "tokenizer.ggml.tokens": T.ARRAY,
}
TEXT_OPTIONAL: dict[str, T] = {
    "{arch}.attention.head_count_kv": T.UINT32,
    "{arch}.rope.freq_base": T.FLOAT32,
    "{arch}.rope.dimension_count": T.UINT32,
    "{arch}.vocab_size": T.UINT32,
    "tokenizer.ggml.bos_token_id": T.UINT32,
    "tokenizer.ggml.eos_token_id": T.UINT32,
    "tokenizer.ggml.padding_token_id": T.UINT32,
    "tokenizer.ggml.add_bos_token": T.BOOL,
    "tokenizer.ggml.pre": T.STRING,
}

CLIP_HAS_VISION = "clip.has_vision_encoder"
CLIP_PROJECTOR_TYPE = "clip.projector_type"
CLIP_USE_GELU = "clip.use_gelu"
CLIP_IMAGE_SIZE = "clip.vision.image_size"
CLIP_PATCH_SIZE = "clip.vision.patch_size"
CLIP_EMBEDDING = "clip.vision.embedding_length"
CLIP_FFN = "clip.vision.feed_forward_length"
CLIP_BLOCKS = "clip.vision.block_count"
CLIP_PROJECTION_DIM = "clip.vision.projection_dim"
CLIP_HEADS = "clip.vision.attention.head_count"
CLIP_EPS = "clip.vision.attention.layer_norm_epsilon"
CLIP_MEAN = "clip.vision.image_mean"
CLIP_STD = "clip.vision.image_std"
CLIP_FEATURE_LAYER = "clip.vision.feature_layer"

# A wrong type here aborts the process inside mtmd (GGML_ASSERT), so all are checked.
CLIP_REQUIRED: dict[str, T] = {
    CLIP_HAS_VISION: T.BOOL,
    CLIP_PROJECTOR_TYPE: T.STRING,
    CLIP_IMAGE_SIZE: T.UINT32,
    CLIP_PATCH_SIZE: T.UINT32,
    CLIP_EMBEDDING: T.UINT32,
    CLIP_FFN: T.UINT32,
    CLIP_BLOCKS: T.UINT32,
    CLIP_PROJECTION_DIM: T.UINT32,
    CLIP_HEADS: T.UINT32,
    CLIP_EPS: T.FLOAT32,
    CLIP_MEAN: T.ARRAY,
    CLIP_STD: T.ARRAY,
}
CLIP_OPTIONAL: dict[str, T] = {
    CLIP_USE_GELU: T.BOOL,
    CLIP_FEATURE_LAYER: T.ARRAY,
}
CLIP_PROJECTOR_TYPES = ("mlp",)  # the projector types our checks know; others are refused
