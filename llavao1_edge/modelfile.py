"""Check GGUF files with the gguf reader before llama.cpp sees them, and describe them.

llama.cpp aborts the whole process on some bad files (a wrong key type in an mmproj, a missing
projector tensor); desktop apps embed us, so every such problem must be a Python exception
naming the file. `describe` backs `llavao1-edge info` and `llavao1-export inspect`.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import gguf_keys as K
from .families import by_projector, by_text_architecture
from .gguf_constants import MODEL_TENSOR, Keys
from .gguf_header import HeaderError, read_header
from .gguf_keys import tensor_name
from .stages import STAGES


class ModelFileError(ValueError):
    """A model file that must not be handed to llama.cpp; the message names it and says why."""


@dataclass
class ModelInfo:
    path: str
    architecture: str
    name: str
    size_bytes: int
    n_tensors: int
    n_params: int
    tensor_types: dict[str, int]  # ggml type name -> tensor count
    params_by_type: dict[str, int]  # ggml type name -> parameter count
    facts: dict[str, object] = field(default_factory=dict)  # widths, layers, vocab, ...
    stage_format: bool = False  # trained on the four-stage format (our metadata key)
    stage_tags_single_tokens: bool = False  # each stage tag is one token of the vocabulary (text models)
    family: str = ""  # the vision family its projector type (or text architecture) names
    image_tokens: str = ""  # how the projector turns an image into tokens (projectors)
    chat_template: str | None = None
    metadata: dict[str, object] = field(default_factory=dict)  # general.* and llavao1.* keys

    @property
    def is_projector(self) -> bool:
        return self.architecture == K.VISION_ARCHITECTURE

    def to_json(self) -> dict:
        d = dict(vars(self))
        d["chat_template"] = bool(self.chat_template)
        return d


def _read(path: str | os.PathLike):
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"{p}: file not found")
    try:
        reader = read_header(p)
    except HeaderError as e:
        problem = str(e) if str(e).startswith("not a GGUF") else f"corrupt or truncated GGUF header ({e})"
        raise ModelFileError(f"{p}: {problem}") from None
    except OSError as e:
        raise ModelFileError(f"{p}: cannot be read ({e.strerror or e})") from None
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > reader.size:
            raise ModelFileError(f"{p}: truncated (tensor {t.name} ends past the end of the file)")
    return reader, p, reader.size


def _value(reader, key: str):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def _check_types(reader, path: Path, required: dict, optional: dict, fmt: dict) -> None:
    for table, must in ((required, True), (optional, False)):
        for key_t, vtype in table.items():
            key = key_t.format(**fmt)
            f = reader.fields.get(key)
            if f is None:
                if must:
                    raise ModelFileError(f"{path}: missing required key {key}")
                continue
            if f.types[0] != vtype:
                raise ModelFileError(f"{path}: key {key} has type {f.types[0].name}, llama.cpp needs {vtype.name}")


def _tensor_shape(reader, name: str) -> list[int] | None:
    for t in reader.tensors:
        if t.name == name:
            return [int(d) for d in t.shape]  # ggml order: ne0 (input width) first
    return None


def check_text_model(path: str | os.PathLike):
    """Validate a text-model GGUF; returns the open reader."""
    reader, p, _ = _read(path)
    arch = _value(reader, Keys.General.ARCHITECTURE)
    if arch is None:
        raise ModelFileError(f"{p}: missing {Keys.General.ARCHITECTURE}")
    if arch == K.VISION_ARCHITECTURE:
        raise ModelFileError(f"{p}: this is a vision projector (mmproj) file, not a text model; pass it as --mmproj")
    _check_types(reader, p, K.TEXT_REQUIRED, K.TEXT_OPTIONAL, {"arch": arch})
    tokens = reader.fields[Keys.Tokenizer.LIST]
    n_vocab = len(tokens)
    emb = _tensor_shape(reader, tensor_name(MODEL_TENSOR.TOKEN_EMBD))
    if emb is not None and emb[1] != n_vocab:
        raise ModelFileError(f"{p}: {n_vocab} tokens in the vocabulary but token_embd has {emb[1]} rows")
    if len(set(tokens.contents())) != n_vocab:
        raise ModelFileError(f"{p}: duplicate token strings in the vocabulary (llama.cpp aborts on these)")
    return reader


def check_projector(path: str | os.PathLike, text_width: int | None = None):
    """Validate an mmproj GGUF, and that its output width matches the text model's."""
    reader, p, _ = _read(path)
    arch = _value(reader, Keys.General.ARCHITECTURE)
    if arch != K.VISION_ARCHITECTURE:
        raise ModelFileError(f"{p}: not a vision projector (general.architecture is {arch!r}, expected 'clip')")
    if not _value(reader, Keys.Clip.HAS_VISION_ENCODER):
        raise ModelFileError(f"{p}: has no vision encoder ({Keys.Clip.HAS_VISION_ENCODER} is not true)")
    ptype = projector_type(reader)
    if ptype in K.CLIP_PROJECTOR_TYPES:
        _check_types(reader, p, K.CLIP_REQUIRED, K.CLIP_OPTIONAL, {})
    else:  # other families (Qwen2-VL, Gemma 3, ...): check the types of the keys that are there
        _check_types(reader, p, {}, {**K.CLIP_REQUIRED, **K.CLIP_OPTIONAL}, {})
    for key in (Keys.ClipVision.IMAGE_MEAN, Keys.ClipVision.IMAGE_STD):
        v = _value(reader, key)
        if v is not None and len(v) != 3:
            raise ModelFileError(f"{p}: {key} must hold 3 values, has {len(v)}")
    out_width = None
    if ptype == "mlp":
        mm2 = tensor_name(MODEL_TENSOR.V_MMPROJ, 2)
        for name in (tensor_name(MODEL_TENSOR.V_MMPROJ, 0), mm2, tensor_name(MODEL_TENSOR.V_ENC_EMBD_PATCH),
                     tensor_name(MODEL_TENSOR.V_ENC_EMBD_POS)):
            if _tensor_shape(reader, name) is None:  # a missing mm.2 segfaults inside mtmd
                raise ModelFileError(f"{p}: tensor {name} is missing")
        out_width = _tensor_shape(reader, mm2)[1]
    elif _value(reader, Keys.ClipVision.PROJECTION_DIM) is not None:
        out_width = int(_value(reader, Keys.ClipVision.PROJECTION_DIM))
    if text_width is not None and out_width is not None and out_width != text_width:
        raise ModelFileError(f"{p}: projector output width {out_width} does not match the text model's "
                             f"width {text_width}; these files do not belong together")
    return reader


def projector_type(reader) -> str | None:
    """The projector type of an mmproj (older files name it under clip.vision)."""
    return _value(reader, Keys.Clip.PROJECTOR_TYPE) or _value(reader, Keys.ClipVision.PROJECTOR_TYPE)


def text_width(reader) -> int:
    arch = _value(reader, Keys.General.ARCHITECTURE)
    return int(_value(reader, Keys.LLM.EMBEDDING_LENGTH.format(arch=arch)))


def check_model_pair(model: str | os.PathLike, mmproj: str | os.PathLike | None):
    """Validate a text model and (optionally) its projector; returns the text reader."""
    reader = check_text_model(model)
    if mmproj is not None:
        check_projector(mmproj, text_width(reader))
    return reader


def chat_template(reader) -> str | None:
    return _value(reader, Keys.Tokenizer.CHAT_TEMPLATE)


def has_stage_format(reader) -> bool:
    return _value(reader, K.STAGE_FORMAT) == K.STAGE_FORMAT_VALUE


def describe(path: str | os.PathLike) -> ModelInfo:
    """Architecture, sizes, tensor types and metadata of any GGUF file (validated first)."""
    reader, p, size = _read(path)
    arch = _value(reader, Keys.General.ARCHITECTURE) or "unknown"
    if arch == K.VISION_ARCHITECTURE:
        check_projector(p)
    else:
        check_text_model(p)
    types: Counter = Counter()
    params: Counter = Counter()
    n_params = 0
    for t in reader.tensors:
        n = t.n_elements
        types[t.tensor_type.name] += 1
        params[t.tensor_type.name] += n
        n_params += n
    facts: dict[str, object] = {}
    prefix = K.VISION_PREFIX if arch == K.VISION_ARCHITECTURE else f"{arch}."
    for key in reader.fields:
        if key.startswith(prefix):
            value = _value(reader, key)
            if not (isinstance(value, list) and len(value) > 16):  # no token lists in a summary
                facts[key[len(prefix):]] = value
    single_tags, family, image_tokens = False, "", ""
    if arch == K.VISION_ARCHITECTURE:
        facts["projector_type"] = projector_type(reader)
        fam = by_projector(facts["projector_type"])
        family = fam.name if fam else f"unknown to llavao1-edge (projector {facts['projector_type']})"
        image_tokens = fam.image_tokens(facts) if fam else ""
    else:
        tokens = set(reader.fields[Keys.Tokenizer.LIST].contents())
        facts["vocab_size"] = len(reader.fields[Keys.Tokenizer.LIST])
        facts["tokenizer"] = _value(reader, Keys.Tokenizer.MODEL)
        single_tags = all(t in tokens for s in STAGES for t in (s.open_tag, s.close_tag))
        family = " or ".join(f.name for f in by_text_architecture(arch)) or f"a text model ({arch})"
    meta = {k: _value(reader, k) for k in reader.fields
            if k.split(".")[0] in ("general", "llavao1") and k != Keys.General.ARCHITECTURE}
    return ModelInfo(str(p), arch, str(_value(reader, Keys.General.NAME) or p.stem), size, len(reader.tensors), n_params,
                     dict(types), dict(params), facts, has_stage_format(reader), single_tags, family, image_tokens,
                     chat_template(reader), meta)
