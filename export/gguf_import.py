"""GGUF text model + mmproj written by `llavao1-export gguf` -> a Hugging Face LLaVA checkpoint again.

The inverse of gguf_convert: what it lets you do is fine-tune a model you only have as GGUF (the
shipped shapes-tiny, say) with `llavao1-train --model OUT`. F32 files come back bit for bit, F16
and BF16 as the rounded values they hold; quantized files are dequantized (lossy, said in the
result). Only our own layout is read back (a llama decoder, a SigLIP-style tower without CLS or
pre-norm, an mlp projector, a byte-level BPE vocabulary); anything else is an ExportError naming
the file. The checkpoint is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import MODEL_TENSOR as MT
from gguf import Keys

from llavao1_data.records import IMAGE_TOKEN
from llavao1_edge import gguf_keys as K
from llavao1_edge.formats import EXACT_TENSOR_TYPES
from llavao1_edge.gguf_keys import tensor_name
from llavao1_edge.modelfile import ModelFileError, check_projector, check_text_model, text_width
from llavao1_models.gguf_plan import unpermute_qk
from llavao1_models.llama import BLOCK_TENSORS, ROPE_PERMUTED
from llavao1_models.llava import (
    PROJECTOR_LAYERS,
    VISION_BLOCK_TENSORS,
    ModelSpec,
    build_model,
    save_checkpoint,
    tower_prefix,
)

from .errors import ExportError


@dataclass
class ImportResult:
    path: Path
    spec: ModelSpec
    tensor_types: dict[str, int]  # ggml type name -> tensors read
    notes: list[str] = field(default_factory=list)


def _value(reader, key: str, path: Path, required: bool = True):
    f = reader.fields.get(key)
    if f is None:
        if required:
            raise ExportError(f"{path}: missing key {key}; only files written by llavao1-export gguf can be imported")
        return None
    return f.contents()


def _tensors(reader, path: Path, types: dict[str, int]) -> dict[str, np.ndarray]:
    """Every tensor as float32 in Hugging Face's (row-major, out x in) shape."""
    out = {}
    for t in reader.tensors:
        kind = t.tensor_type.name
        types[kind] = types.get(kind, 0) + 1
        shape = tuple(int(d) for d in reversed(t.shape))  # ggml lists ne0 (the input width) first
        if kind in ("F32", "F16"):
            data = np.asarray(t.data, dtype=np.float32)
        elif kind == "BF16":
            raw = np.asarray(t.data).view(np.uint16).astype(np.uint32) << 16
            data = raw.view(np.float32)
        else:
            try:
                data = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type)
            except NotImplementedError:
                raise ExportError(f"{path}: tensor {t.name} is {kind}, which gguf cannot dequantize") from None
        out[t.name] = np.ascontiguousarray(data.reshape(shape), dtype=np.float32)
    return out


def _spec(text_reader, vision_reader, text_path: Path, vision_path: Path, vocab_size: int) -> ModelSpec:
    arch = _value(text_reader, Keys.General.ARCHITECTURE, text_path)
    if arch != "llama":
        raise ExportError(f"{text_path}: architecture {arch!r}; only llama decoders can be imported")

    def tv(key, required=True):
        return _value(text_reader, key.format(arch=arch), text_path, required)

    def vv(key):
        return _value(vision_reader, key, vision_path)

    CV = Keys.ClipVision
    ptype = vv(Keys.Clip.PROJECTOR_TYPE)
    if ptype != "mlp":
        raise ExportError(f"{vision_path}: projector type {ptype!r}; only the mlp projector can be imported")
    if not vv(CV.USE_GELU):
        raise ExportError(f"{vision_path}: quick-GELU towers (CLIP) cannot be imported; ours use GELU")
    names = {t.name for t in vision_reader.tensors}
    extra = sorted(n for n in names if n.startswith(tuple(tensor_name(k, suffix=None) for k in (MT.V_ENC_EMBD_CLS, MT.V_PRE_NORM, MT.V_POST_NORM))))
    if extra:
        raise ExportError(f"{vision_path}: has {', '.join(extra)}: a CLIP-style tower; only SigLIP-style towers "
                          "(no class token, no pre-norm) can be imported")
    if abs(float(vv(CV.Attention.LAYERNORM_EPS)) - 1e-6) > 1e-12 or abs(float(tv(Keys.Attention.LAYERNORM_RMS_EPS)) - 1e-5) > 1e-12:
        raise ExportError(f"{text_path}: norm epsilons differ from the ones llavao1-train builds (1e-5 text, 1e-6 vision)")
    blocks = int(vv(K.CLIP_FEATURE_LAYER)[0]) if K.CLIP_FEATURE_LAYER in vision_reader.fields else int(vv(CV.BLOCK_COUNT))
    n_vision = int(vv(CV.BLOCK_COUNT))
    return ModelSpec(
        name=str(_value(text_reader, Keys.General.NAME, text_path, required=False) or text_path.stem),
        image_size=int(vv(CV.IMAGE_SIZE)), patch_size=int(vv(CV.PATCH_SIZE)),
        vision_width=int(vv(CV.EMBEDDING_LENGTH)), vision_layers=n_vision, vision_heads=int(vv(CV.Attention.HEAD_COUNT)),
        vision_ffn=int(vv(CV.FEED_FORWARD_LENGTH)), text_width=int(tv(Keys.LLM.EMBEDDING_LENGTH)),
        text_layers=int(tv(Keys.LLM.BLOCK_COUNT)), text_heads=int(tv(Keys.Attention.HEAD_COUNT)),
        text_kv_heads=int(tv(Keys.Attention.HEAD_COUNT_KV, False) or tv(Keys.Attention.HEAD_COUNT)),
        text_ffn=int(tv(Keys.LLM.FEED_FORWARD_LENGTH)), vocab_size=vocab_size, context_length=int(tv(Keys.LLM.CONTEXT_LENGTH)),
        rope_theta=float(tv(Keys.Rope.FREQ_BASE, False) or 10000.0),
        feature_layer=blocks - n_vision - 1,  # HF counts from the end: all blocks -> -1
        tie_embeddings=tensor_name(MT.OUTPUT) not in {t.name for t in text_reader.tensors},
        image_mean=tuple(float(v) for v in vv(CV.IMAGE_MEAN)), image_std=tuple(float(v) for v in vv(CV.IMAGE_STD)),
    )


def rebuild_tokenizer(reader, path: Path):
    """The byte-level BPE tokenizer a GGUF's vocabulary, merges and token types describe."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    if _value(reader, Keys.Tokenizer.MODEL, path) != "gpt2":
        raise ExportError(f"{path}: tokenizer {_value(reader, Keys.Tokenizer.MODEL, path)!r}; only byte-level "
                          "BPE (gpt2) vocabularies can be imported")
    tokens = list(_value(reader, Keys.Tokenizer.LIST, path))
    types = [int(v) for v in _value(reader, Keys.Tokenizer.TOKEN_TYPE, path)]
    merges = [tuple(m.split(" ", 1)) for m in _value(reader, Keys.Tokenizer.MERGES, path)]
    if types.count(int(gguf.TokenType.UNUSED)):
        raise ExportError(f"{path}: the vocabulary has padding entries; only unpadded vocabularies can be imported")
    control = [i for i, t in enumerate(types) if t == int(gguf.TokenType.CONTROL)]
    user = [i for i, t in enumerate(types) if t == int(gguf.TokenType.USER_DEFINED)]
    # As llavao1-train builds it: specials inside the BPE vocabulary, stage tags appended after it.
    in_bpe = {tok: i for i, tok in enumerate(tokens) if i not in set(user)}
    tok = Tokenizer(models.BPE(vocab=in_bpe, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in control])
    tok.add_tokens([AddedToken(tokens[i], special=False, normalized=False) for i in user])
    for i, text in enumerate(tokens):
        if tok.token_to_id(text) != i:
            raise ExportError(f"{path}: token {i} ({text!r}) gets id {tok.token_to_id(text)} when rebuilt; "
                              "only vocabularies laid out as llavao1-train writes them can be imported")

    def special(key: str) -> str | None:
        i = _value(reader, key, path, required=False)
        return tokens[int(i)] if i is not None else None

    if IMAGE_TOKEN not in in_bpe:
        raise ExportError(f"{path}: no {IMAGE_TOKEN} token in the vocabulary")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=special(Keys.Tokenizer.BOS_ID),
                                   eos_token=special(Keys.Tokenizer.EOS_ID), pad_token=special(Keys.Tokenizer.PAD_ID),
                                   extra_special_tokens={"image_token": IMAGE_TOKEN})
    fast.chat_template = _value(reader, Keys.Tokenizer.CHAT_TEMPLATE, path, required=False)
    fast.add_bos_token = bool(_value(reader, Keys.Tokenizer.ADD_BOS, path, required=False))
    return fast


def _state_dict(text: dict[str, np.ndarray], vision: dict[str, np.ndarray], spec: ModelSpec,
                v: str) -> dict[str, np.ndarray]:
    """GGUF tensor names -> the names LlavaForConditionalGeneration loads (gguf_convert's map, reversed);
    `v`: the tower's prefix in this transformers version."""
    sd = {"model.language_model.embed_tokens.weight": text[tensor_name(MT.TOKEN_EMBD)],
          "model.language_model.norm.weight": text[tensor_name(MT.OUTPUT_NORM)]}
    if not spec.tie_embeddings:
        sd["lm_head.weight"] = text[tensor_name(MT.OUTPUT)]
    heads = {MT.ATTN_Q: spec.text_heads, MT.ATTN_K: spec.text_kv_heads}
    for i in range(spec.text_layers):
        for hf, kind in BLOCK_TENSORS.items():
            w = text[tensor_name(kind, i)]
            sd[f"model.language_model.layers.{i}.{hf}.weight"] = unpermute_qk(w, heads[kind]) if kind in ROPE_PERMUTED else w
    sd[v + "embeddings.patch_embedding.weight"] = vision[tensor_name(MT.V_ENC_EMBD_PATCH)]
    sd[v + "embeddings.patch_embedding.bias"] = vision[tensor_name(MT.V_ENC_EMBD_PATCH, suffix="bias")]
    sd[v + "embeddings.position_embedding.weight"] = vision[tensor_name(MT.V_ENC_EMBD_POS)]
    for i in range(spec.vision_layers):
        for hf, kind in VISION_BLOCK_TENSORS.items():
            for suffix in ("weight", "bias"):
                sd[f"{v}encoder.layers.{i}.{hf}.{suffix}"] = vision[tensor_name(kind, i, suffix)]
    for hf, bid in PROJECTOR_LAYERS.items():
        for suffix in ("weight", "bias"):
            sd[f"model.multi_modal_projector.{hf}.{suffix}"] = vision[tensor_name(MT.V_MMPROJ, bid, suffix)]
    return sd


def import_gguf(text_path: str | os.PathLike, mmproj_path: str | os.PathLike, out_dir: str | os.PathLike,
                log: Callable[[str], None] = lambda s: None) -> ImportResult:
    """Write a Hugging Face checkpoint folder OUT from a text GGUF and its mmproj."""
    import torch

    text_path, mmproj_path, out = Path(text_path), Path(mmproj_path), Path(out_dir)
    try:
        text_reader = check_text_model(text_path)
    except ModelFileError as e:
        if "not a text model" in str(e):  # the runtime's hint names --mmproj, which this command does not have
            raise ExportError(f"{text_path}: is a projector (mmproj); give the text model first, then its mmproj") from None
        raise
    vision_reader = check_projector(mmproj_path, text_width(text_reader))  # each file read and checked once
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out}: exists and is not empty; choose a new folder")
    tokenizer = rebuild_tokenizer(text_reader, text_path)
    spec = _spec(text_reader, vision_reader, text_path, mmproj_path, len(tokenizer))
    types: dict[str, int] = {}
    model = build_model(spec, tokenizer)
    own = model.state_dict()
    v = tower_prefix(own)
    # the tensors through gguf's own reader, which maps their data (the runtime's header reader reads none)
    sd = _state_dict(_tensors(gguf.GGUFReader(str(text_path)), text_path, types),
                     _tensors(gguf.GGUFReader(str(mmproj_path)), mmproj_path, types), spec, v)
    notes = []
    lossy = sorted(k for k in types if k not in EXACT_TENSOR_TYPES)
    if lossy:
        notes.append(f"dequantized {', '.join(lossy)} tensors: the weights are the quantized values, not the originals")
    missing = [k for k in own if k not in sd and "post_layernorm" not in k]  # HF LLaVA never reads post_layernorm
    if missing:
        raise ExportError(f"{text_path}: no tensor for {missing[0]} (and {len(missing) - 1} more)")
    for k, arr in sd.items():
        if tuple(own[k].shape) != arr.shape:
            raise ExportError(f"{text_path}: tensor for {k} is {arr.shape}, the model expects {tuple(own[k].shape)}")
    model.load_state_dict({k: torch.tensor(a) for k, a in sd.items()}, strict=False)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        log(f"writing {out} ({len(sd)} tensors, {sum(types.values())} read: "
            + ", ".join(f"{n} {k}" for k, n in sorted(types.items())) + ")")
        save_checkpoint(model, tokenizer, spec, tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImportResult(out, spec, types, notes)
