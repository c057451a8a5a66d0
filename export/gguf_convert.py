"""Hugging Face LLaVA checkpoint -> GGUF text model + mmproj, with our own explicit writer.

Every key is written with the type llama.cpp requires (llavao1_edge.gguf_keys); each file is
written under a temporary name, read back with the gguf reader and compared with what we meant
to write, and only then renamed into place.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as T

from llavao1_edge import __version__
from llavao1_edge import gguf_keys as K
from llavao1_edge.stages import STAGES

from .checkpoint import Checkpoint, ExportError, load_checkpoint

OUTTYPES = {"f32": (Q.F32, gguf.LlamaFileType.ALL_F32), "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
            "bf16": (Q.BF16, gguf.LlamaFileType.MOSTLY_BF16)}


# Hugging Face module -> GGUF tensor name, per block; gguf_import reads them back through the same tables.
TEXT_BLOCK_TENSORS = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
                      "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
                      "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                      "mlp.down_proj": "ffn_down"}
VISION_BLOCK_TENSORS = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                        "self_attn.out_proj": "attn_out", "layer_norm1": "ln1", "layer_norm2": "ln2",
                        "mlp.fc1": "ffn_up", "mlp.fc2": "ffn_down"}
PROJECTOR_TENSORS = {"linear_1": "mm.0", "linear_2": "mm.2"}  # gguf's name map would say mm.1


@dataclass
class PlannedFile:
    """What one GGUF file should contain: keys with types, tensors with shapes and types."""

    arch: str
    keys: list[tuple[str, T, object, T | None]] = field(default_factory=list)  # key, type, value, item type
    tensors: list[tuple[str, np.ndarray, Q]] = field(default_factory=list)

    def kv(self, key: str, vtype: T, value, item_type: T | None = None) -> None:
        self.keys.append((key, vtype, value, item_type))

    def tensor(self, name: str, data: np.ndarray, qtype: Q) -> None:
        self.tensors.append((name, np.ascontiguousarray(data, dtype=np.float32), qtype))


def _weight_type(data: np.ndarray, outtype: str) -> Q:
    """Norms, biases and other 1-D tensors stay F32; matrices take the requested type."""
    return Q.F32 if data.ndim < 2 else OUTTYPES[outtype][0]


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF 'rotate half' RoPE rows -> ggml's adjacent-pair layout: row 2j+a <- a*d/2+j, per head."""
    out_dim, in_dim = w.shape
    d = out_dim // n_heads
    return w.reshape(n_heads, 2, d // 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def _common_keys(plan: PlannedFile, ckpt: Checkpoint, file_type) -> None:
    plan.kv(K.ARCHITECTURE, T.STRING, plan.arch)
    plan.kv(K.NAME, T.STRING, ckpt.name)
    plan.kv(K.FILE_TYPE, T.UINT32, int(file_type))
    plan.kv(K.SOURCE_SHA256, T.STRING, ckpt.sha256)
    plan.kv(K.EXPORTER_VERSION, T.STRING, __version__)


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _pre_tokenizer(tok: dict, where: Path) -> str:
    pre = tok.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    raise ExportError(f"{where}: pre-tokenizer {pre.get('type', 'none')!r} is not supported; "
                      "supported: byte-level BPE with the GPT-2 split (tokenizers' ByteLevel)")


def _is_spm_bpe(tok: dict) -> bool:
    """SentencePiece-style BPE as transformers writes Llama-2 tokenizers: byte fallback, '▁' for spaces."""
    model = tok.get("model") or {}
    return model.get("type") == "BPE" and bool(model.get("byte_fallback"))


def _spm_space_prefix(tok: dict) -> bool:
    """Whether text gets a leading '▁' (llama.cpp's add_space_prefix), from the normalizer or Metaspace."""
    def walk(node) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == "Prepend" and node.get("prepend") == "▁":
            return True
        if node.get("type") == "Metaspace":
            return node.get("prepend_scheme", "always") != "never" and node.get("add_prefix_space", True)
        return any(walk(n) for n in node.get("normalizers", []) + node.get("pretokenizers", []))
    return walk(tok.get("normalizer")) or walk(tok.get("pre_tokenizer"))


def _tokenizer_keys(plan: PlannedFile, ckpt: Checkpoint, n_vocab: int) -> None:
    tok, where = ckpt.tokenizer, ckpt.path / "tokenizer.json"
    model = tok.get("model") or {}
    spm = _is_spm_bpe(tok)
    if model.get("type") != "BPE" or (not spm and (tok.get("decoder") or {}).get("type") != "ByteLevel"):
        raise ExportError(f"{where}: tokenizer model {model.get('type')!r} is not supported; supported: "
                          "byte-level BPE (gpt2) and SentencePiece-style BPE with byte fallback (llama)")
    vocab: dict[str, int] = dict(model["vocab"])
    added = {t["id"]: t for t in tok.get("added_tokens", [])}
    for t in added.values():
        vocab[t["content"]] = t["id"]
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"{where}: token id {max(vocab.values())} is beyond the model's vocabulary ({n_vocab})")
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [int(gguf.TokenType.UNUSED)] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = int(gguf.TokenType.NORMAL)
    for i, t in added.items():
        types[i] = int(gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED)
    if len(set(tokens)) != len(tokens):  # duplicate strings abort llama.cpp's vocab loader
        raise ExportError(f"{where}: duplicate token strings in the vocabulary")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    def special_id(name: str) -> int | None:
        value = ckpt.tokenizer_config.get(name)
        if isinstance(value, dict):
            value = value.get("content")
        return vocab.get(value) if isinstance(value, str) else None

    if spm:
        # llama.cpp's SPM tokenizer merges the pair whose result scores highest: score = -merge rank
        # reproduces the BPE merge order; bytes are BYTE tokens for the fallback.
        scores = [0.0] * n_vocab
        for rank, merge in enumerate(merges):
            i = vocab.get(merge.replace(" ", ""))
            if i is not None and scores[i] == 0.0:
                scores[i] = -float(rank + 1)
        for text, i in vocab.items():
            if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", text) and i not in added:
                types[i] = int(gguf.TokenType.BYTE)
        unk = model.get("unk_token")
        if unk in vocab:
            types[vocab[unk]] = int(gguf.TokenType.UNKNOWN)
            plan.kv("tokenizer.ggml.unknown_token_id", T.UINT32, vocab[unk])
        plan.kv("tokenizer.ggml.model", T.STRING, "llama")
        plan.kv("tokenizer.ggml.tokens", T.ARRAY, tokens, T.STRING)
        plan.kv("tokenizer.ggml.scores", T.ARRAY, scores, T.FLOAT32)
        plan.kv("tokenizer.ggml.token_type", T.ARRAY, types, T.INT32)
        plan.kv("tokenizer.ggml.add_space_prefix", T.BOOL, _spm_space_prefix(tok))
    else:
        plan.kv("tokenizer.ggml.model", T.STRING, "gpt2")
        plan.kv("tokenizer.ggml.pre", T.STRING, _pre_tokenizer(tok, where))
        plan.kv("tokenizer.ggml.tokens", T.ARRAY, tokens, T.STRING)
        plan.kv("tokenizer.ggml.token_type", T.ARRAY, types, T.INT32)
        plan.kv("tokenizer.ggml.merges", T.ARRAY, merges, T.STRING)
    eos = special_id("eos_token") if special_id("eos_token") is not None else ckpt.text_config.get("eos_token_id")
    bos = special_id("bos_token") if special_id("bos_token") is not None else ckpt.text_config.get("bos_token_id")
    pad = special_id("pad_token")
    if eos is None:  # llama.cpp would silently default to id 11
        raise ExportError(f"{where}: no eos token; set eos_token in tokenizer_config.json")
    plan.kv("tokenizer.ggml.eos_token_id", T.UINT32, int(eos))
    plan.kv("tokenizer.ggml.bos_token_id", T.UINT32, int(bos if bos is not None else eos))
    if pad is not None:
        plan.kv("tokenizer.ggml.padding_token_id", T.UINT32, int(pad))
    plan.kv("tokenizer.ggml.add_bos_token", T.BOOL, bool(ckpt.tokenizer_config.get("add_bos_token", False)))
    plan.kv("tokenizer.ggml.add_eos_token", T.BOOL, False)
    if ckpt.chat_template:
        plan.kv(K.CHAT_TEMPLATE, T.STRING, ckpt.chat_template)


def _speaks_stages(ckpt: Checkpoint) -> bool:
    """True when every stage tag is a single token (our trained models)."""
    added = {t["content"] for t in ckpt.tokenizer.get("added_tokens", [])}
    return all(s.open_tag in added and s.close_tag in added for s in STAGES)


# ---------------------------------------------------------------------------------------------
# Plans


def plan_text(ckpt: Checkpoint, outtype: str) -> PlannedFile:
    tc, t = ckpt.text_config, ckpt.tensors
    arch = "llama"
    plan = PlannedFile(arch)
    _common_keys(plan, ckpt, OUTTYPES[outtype][1])
    n_head = tc["num_attention_heads"]
    n_kv = tc.get("num_key_value_heads") or n_head
    width = tc["hidden_size"]
    head_dim = tc.get("head_dim") or width // n_head
    rope = tc.get("rope_parameters") or {}
    rope_theta = rope.get("rope_theta", tc.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") not in ("default", None):
        raise ExportError(f"{ckpt.path / 'config.json'}: RoPE scaling {rope.get('rope_type')!r} is not supported")
    n_layers = tc["num_hidden_layers"]
    plan.kv(f"{arch}.context_length", T.UINT32, int(tc.get("max_position_embeddings", 2048)))
    plan.kv(f"{arch}.embedding_length", T.UINT32, width)
    plan.kv(f"{arch}.block_count", T.UINT32, n_layers)
    plan.kv(f"{arch}.feed_forward_length", T.UINT32, tc["intermediate_size"])
    plan.kv(f"{arch}.attention.head_count", T.UINT32, n_head)
    plan.kv(f"{arch}.attention.head_count_kv", T.UINT32, n_kv)
    plan.kv(f"{arch}.attention.layer_norm_rms_epsilon", T.FLOAT32, float(tc.get("rms_norm_eps", 1e-6)))
    plan.kv(f"{arch}.rope.freq_base", T.FLOAT32, float(rope_theta))
    plan.kv(f"{arch}.rope.dimension_count", T.UINT32, head_dim)
    emb = t["model.language_model.embed_tokens.weight"]
    plan.kv(f"{arch}.vocab_size", T.UINT32, emb.shape[0])
    _tokenizer_keys(plan, ckpt, emb.shape[0])
    if _speaks_stages(ckpt):
        plan.kv(K.STAGE_FORMAT, T.STRING, K.STAGE_FORMAT_VALUE)
        plan.kv(K.STAGE_TAGS, T.ARRAY, [s.tag for s in STAGES], T.STRING)

    def add(name: str, data: np.ndarray) -> None:
        plan.tensor(name, data, _weight_type(data, outtype))

    add("token_embd.weight", emb)
    add("output_norm.weight", t["model.language_model.norm.weight"])
    tied = ckpt.config.get("tie_word_embeddings", tc.get("tie_word_embeddings", False))
    if not tied and "lm_head.weight" in t:
        add("output.weight", t["lm_head.weight"])
    heads = {"attn_q": n_head, "attn_k": n_kv}  # RoPE rows permuted per head
    for i in range(n_layers):
        for hf, gg in TEXT_BLOCK_TENSORS.items():
            w = t[f"model.language_model.layers.{i}.{hf}.weight"]
            add(f"blk.{i}.{gg}.weight", permute_qk(w, heads[gg]) if gg in heads else w)
    return plan


def vision_blocks(n_layers: int, feature_layer) -> int:
    """How many vision blocks llama.cpp must run for HF's vision_feature_layer."""
    if isinstance(feature_layer, list):
        if len(feature_layer) != 1:
            raise ExportError(f"vision_feature_layer {feature_layer}: several feature layers are not supported")
        feature_layer = feature_layer[0]
    blocks = n_layers + 1 + feature_layer if feature_layer < 0 else feature_layer
    if not 1 <= blocks <= n_layers:
        raise ExportError(f"vision_feature_layer {feature_layer} is out of range for {n_layers} layers")
    return blocks


def plan_mmproj(ckpt: Checkpoint, outtype: str) -> PlannedFile:
    vc, t = ckpt.vision_config, ckpt.tensors
    plan = PlannedFile(K.VISION_ARCHITECTURE)
    _common_keys(plan, ckpt, OUTTYPES[outtype][1])
    n_layers = vc["num_hidden_layers"]
    act = vc.get("hidden_act", "gelu")
    if act not in ("gelu", "gelu_pytorch_tanh", "gelu_new", "quick_gelu"):
        raise ExportError(f"{ckpt.path / 'config.json'}: vision activation {act!r} is not supported")
    proj_act = ckpt.config.get("projector_hidden_act", "gelu")
    if proj_act not in ("gelu", "gelu_pytorch_tanh", "gelu_new"):
        raise ExportError(f"{ckpt.path / 'config.json'}: projector activation {proj_act!r} is not supported "
                          "(llama.cpp's mlp projector uses GELU)")
    proj_out = t["model.multi_modal_projector.linear_2.weight"].shape[0]
    if proj_out != ckpt.text_config["hidden_size"]:
        raise ExportError(f"projector output width {proj_out} != text model width {ckpt.text_config['hidden_size']}")
    plan.kv(K.CLIP_HAS_VISION, T.BOOL, True)
    plan.kv(K.CLIP_PROJECTOR_TYPE, T.STRING, "mlp")
    plan.kv(K.CLIP_USE_GELU, T.BOOL, act != "quick_gelu")
    plan.kv(K.CLIP_IMAGE_SIZE, T.UINT32, vc["image_size"])
    plan.kv(K.CLIP_PATCH_SIZE, T.UINT32, vc["patch_size"])
    plan.kv(K.CLIP_EMBEDDING, T.UINT32, vc["hidden_size"])
    plan.kv(K.CLIP_FFN, T.UINT32, vc["intermediate_size"])
    plan.kv(K.CLIP_BLOCKS, T.UINT32, n_layers)
    plan.kv(K.CLIP_PROJECTION_DIM, T.UINT32, proj_out)
    plan.kv(K.CLIP_HEADS, T.UINT32, vc["num_attention_heads"])
    plan.kv(K.CLIP_EPS, T.FLOAT32, float(vc.get("layer_norm_eps", 1e-6)))
    plan.kv(K.CLIP_MEAN, T.ARRAY, [float(v) for v in ckpt.image_mean], T.FLOAT32)
    plan.kv(K.CLIP_STD, T.ARRAY, [float(v) for v in ckpt.image_std], T.FLOAT32)
    blocks = vision_blocks(n_layers, ckpt.config.get("vision_feature_layer", -2))
    plan.kv(K.CLIP_FEATURE_LAYER, T.ARRAY, [blocks], T.INT32)

    def add(name: str, key: str, required: bool = True) -> None:
        if key not in t:
            if required:
                raise ExportError(f"{ckpt.path}: tensor {key} is missing")
            return
        plan.tensor(name, t[key], _weight_type(t[key], outtype))

    v = "model.vision_tower.vision_model."
    if v + "embeddings.patch_embedding.weight" not in t:
        v = "model.vision_tower."
    add("v.patch_embd.weight", v + "embeddings.patch_embedding.weight")
    add("v.patch_embd.bias", v + "embeddings.patch_embedding.bias", required=False)
    add("v.position_embd.weight", v + "embeddings.position_embedding.weight")
    add("v.class_embd", v + "embeddings.class_embedding", required=False)
    add("v.pre_ln.weight", v + "pre_layrnorm.weight", required=False)
    add("v.pre_ln.bias", v + "pre_layrnorm.bias", required=False)
    for i in range(n_layers):
        for hf, gg in VISION_BLOCK_TENSORS.items():
            for kind in ("weight", "bias"):
                add(f"v.blk.{i}.{gg}.{kind}", f"{v}encoder.layers.{i}.{hf}.{kind}")
    for hf, gg in PROJECTOR_TENSORS.items():
        for kind in ("weight", "bias"):
            add(f"{gg}.{kind}", f"model.multi_modal_projector.{hf}.{kind}")
    return plan


# ---------------------------------------------------------------------------------------------
# Writing and checking


def _encode(data: np.ndarray, qtype: Q) -> np.ndarray:
    if qtype == Q.F32:
        return data.astype(np.float32)
    if qtype == Q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


def write_plan(plan: PlannedFile, path: Path) -> None:
    writer = gguf.GGUFWriter(str(path), plan.arch)
    try:
        for key, vtype, value, item_type in plan.keys:
            if key == K.ARCHITECTURE:
                continue  # GGUFWriter writes general.architecture itself
            if vtype == T.ARRAY:
                writer.add_key_value(key, list(value), T.ARRAY, sub_type=item_type)
            else:
                writer.add_key_value(key, value, vtype)
        for name, data, qtype in plan.tensors:
            enc = _encode(data, qtype)
            # BF16 arrives as bytes; the writer derives the element shape from raw_dtype.
            writer.add_tensor(name, enc, raw_dtype=qtype if qtype == Q.BF16 else None)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
    finally:
        writer.close()


def check_written(plan: PlannedFile, path: Path) -> None:
    """Read the file back and compare keys, types, tensor names, shapes and types with the plan."""
    reader = gguf.GGUFReader(str(path))
    for key, vtype, value, item_type in plan.keys:
        f = reader.fields.get(key)
        if f is None:
            raise ExportError(f"{path}: key {key} missing after write")
        if f.types[0] != vtype or (item_type is not None and f.types[-1] != item_type):
            raise ExportError(f"{path}: key {key} has type {f.types} after write, expected {vtype}")
        got_value = f.contents()
        same = np.allclose(got_value, value, rtol=1e-6) if vtype in (T.FLOAT32,) or item_type == T.FLOAT32 \
            else got_value == (list(value) if vtype == T.ARRAY else value)
        if not same:
            raise ExportError(f"{path}: key {key} reads back as {str(got_value)[:60]}, expected {str(value)[:60]}")
    got = {t.name: t for t in reader.tensors}
    if set(got) != {name for name, _, _ in plan.tensors}:
        raise ExportError(f"{path}: tensor names differ after write")
    for name, data, qtype in plan.tensors:
        t = got[name]
        if tuple(int(d) for d in reversed(t.shape)) != data.shape or t.tensor_type != qtype:
            raise ExportError(f"{path}: tensor {name} is {tuple(t.shape)} {t.tensor_type.name} after write, "
                              f"expected {data.shape} {qtype.name}")


@dataclass
class ExportResult:
    text: Path
    mmproj: Path
    warnings: list[str]


def convert_to_gguf(model_dir: str | os.PathLike, out_dir: str | os.PathLike, outtype: str = "f16",
                    log: Callable[[str], None] = lambda s: None) -> ExportResult:
    """Write DIR/NAME-OUTTYPE.gguf and DIR/mmproj-NAME-OUTTYPE.gguf; returns their paths."""
    if outtype not in OUTTYPES:
        raise ExportError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    ckpt = load_checkpoint(model_dir)
    for w in ckpt.warnings:
        log(f"warning: {w}")
    plans = {"text": plan_text(ckpt, outtype), "mmproj": plan_mmproj(ckpt, outtype)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    final = {"text": out / f"{ckpt.name}-{outtype}.gguf", "mmproj": out / f"mmproj-{ckpt.name}-{outtype}.gguf"}
    tmp = {k: p.with_name(f".{p.name}.tmp-{os.getpid()}") for k, p in final.items()}
    try:
        for k in plans:
            log(f"writing {final[k].name} ({len(plans[k].tensors)} tensors)")
            write_plan(plans[k], tmp[k])
            check_written(plans[k], tmp[k])
        for k in plans:
            os.replace(tmp[k], final[k])
    finally:
        for p in tmp.values():
            p.unlink(missing_ok=True)
    return ExportResult(final["text"], final["mmproj"], ckpt.warnings)
