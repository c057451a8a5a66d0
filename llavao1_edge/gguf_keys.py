"""The GGUF keys the project reads and writes, and the value types llama.cpp requires of them.

Key and tensor names come from the `gguf` package (`gguf.Keys`, `gguf.TENSOR_NAMES`); this module
adds only our own `llavao1.*` keys and the one llama.cpp key gguf-py does not name. export/ writes
the keys; the runtime checks their types with the gguf reader before llama.cpp sees a file, because
some wrong types abort the process instead of raising (see shared/reference/llama-cpp.md).
"""

from __future__ import annotations

from .gguf_constants import MODEL_TENSOR, TENSOR_NAMES, Keys
from .gguf_constants import GGUFValueType as T

# Our own keys: the runtime reads them to know the model speaks the four-stage format.
STAGE_FORMAT = "llavao1.stage_format"  # STAGE_FORMAT_VALUE
STAGE_TAGS = "llavao1.stage_tags"  # ["SUMMARY", "CAPTION", "REASONING", "CONCLUSION"]
EXPORTER_VERSION = "llavao1.exporter_version"
SOURCE_SHA256 = "llavao1.source_sha256"  # sha256 of the source safetensors, in file order
STAGE_FORMAT_VALUE = "llava-cot-4stage"

# llama.cpp reads this (tools/mtmd/clip-impl.h, KEY_FEATURE_LAYER); gguf-py's Keys has no name for it.
CLIP_FEATURE_LAYER = "clip.vision.feature_layer"

VISION_ARCHITECTURE = "clip"  # general.architecture of every mmproj file
VISION_PREFIX = Keys.ClipVision.IMAGE_SIZE.removesuffix("image_size")  # "clip.vision.": the tower's facts

# Keys of a text model that must be present, with their exact types ({arch} filled in).
TEXT_REQUIRED: dict[str, T] = {
    Keys.LLM.CONTEXT_LENGTH: T.UINT32,
    Keys.LLM.EMBEDDING_LENGTH: T.UINT32,
    Keys.LLM.BLOCK_COUNT: T.UINT32,
    Keys.LLM.FEED_FORWARD_LENGTH: T.UINT32,
    Keys.Attention.HEAD_COUNT: T.UINT32,
    Keys.Attention.LAYERNORM_RMS_EPS: T.FLOAT32,
    Keys.Tokenizer.MODEL: T.STRING,
    Keys.Tokenizer.LIST: T.ARRAY,
}
TEXT_OPTIONAL: dict[str, T] = {
    Keys.Attention.HEAD_COUNT_KV: T.UINT32,
    Keys.Rope.FREQ_BASE: T.FLOAT32,
    Keys.Rope.DIMENSION_COUNT: T.UINT32,
    Keys.LLM.VOCAB_SIZE: T.UINT32,
    Keys.Tokenizer.BOS_ID: T.UINT32,
    Keys.Tokenizer.EOS_ID: T.UINT32,
    Keys.Tokenizer.PAD_ID: T.UINT32,
    Keys.Tokenizer.ADD_BOS: T.BOOL,
    Keys.Tokenizer.PRE: T.STRING,
}

# A wrong type here aborts the process inside mtmd (GGML_ASSERT), so all are checked.
CLIP_REQUIRED: dict[str, T] = {
    Keys.Clip.HAS_VISION_ENCODER: T.BOOL,
    Keys.Clip.PROJECTOR_TYPE: T.STRING,
    Keys.ClipVision.IMAGE_SIZE: T.UINT32,
    Keys.ClipVision.PATCH_SIZE: T.UINT32,
    Keys.ClipVision.EMBEDDING_LENGTH: T.UINT32,
    Keys.ClipVision.FEED_FORWARD_LENGTH: T.UINT32,
    Keys.ClipVision.BLOCK_COUNT: T.UINT32,
    Keys.ClipVision.PROJECTION_DIM: T.UINT32,
    Keys.ClipVision.Attention.HEAD_COUNT: T.UINT32,
    Keys.ClipVision.Attention.LAYERNORM_EPS: T.FLOAT32,
    Keys.ClipVision.IMAGE_MEAN: T.ARRAY,
    Keys.ClipVision.IMAGE_STD: T.ARRAY,
}
CLIP_OPTIONAL: dict[str, T] = {
    Keys.ClipVision.USE_GELU: T.BOOL,
    Keys.ClipVision.USE_SILU: T.BOOL,
    CLIP_FEATURE_LAYER: T.ARRAY,
    Keys.ClipVision.Projector.SCALE_FACTOR: T.UINT32,
    Keys.ClipVision.PREPROC_IMAGE_SIZE: T.UINT32,
    Keys.ClipVision.N_WA_PATTERN: T.UINT32,
    Keys.ClipVision.SPATIAL_MERGE_SIZE: T.UINT32,
}
CLIP_PROJECTOR_TYPES = ("mlp",)  # projectors whose required keys are all checked; others: what is there


def tensor_name(kind: MODEL_TENSOR, bid: int | None = None, suffix: str | None = "weight") -> str:
    """gguf-py's name for a tensor, e.g. tensor_name(MODEL_TENSOR.ATTN_Q, 3) == "blk.3.attn_q.weight"."""
    base = TENSOR_NAMES[kind].format(bid=bid)
    return f"{base}.{suffix}" if suffix else base
