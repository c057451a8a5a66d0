"""Tiny random-weight checkpoints of the vision families llama.cpp runs, built offline (transformers configs
and a tokenizer trained here), and their GGUF pairs: written by our exporter where it supports the family,
by the fixture writer below (Gemma 3) otherwise. Like the stock models, they were never trained on the
four stages (their tokenizers have no stage tags), so the runtime forces the format.

Every checkpoint is a real Hugging Face folder (config, safetensors, tokenizer, processor) transformers
loads; the widths are small and the tower's MLP is never as wide as the tower (llama.cpp swaps the two
otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llavao1_models.random_checkpoints import QwenShape, bpe_tokenizer, qwen2vl_checkpoint, save

FAMILIES = ("smolvlm", "idefics3", "qwen2vl", "qwen2.5vl", "gemma3", "llava-clip")

SMOLVLM_TEMPLATE = (  # SmolVLM's own: content only as a list of parts
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
GEMMA_TEMPLATE = (  # Gemma 3's, system turn left out
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' "
    "else message['role'] %}{{ '<start_of_turn>' + role + '\n' }}{% if message['content'] is string %}"
    "{{ message['content'] | trim }}{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}"
    "{{ '<start_of_image>' }}{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}"
    "{% endif %}{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
LLAVA15_TEMPLATE = (  # LLaVA-1.5's
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: {% else %}ASSISTANT: {% endif %}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<image>\n' }}{% else %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{% if message['role'] == 'user' %} {% else %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass
class FamilyFixture:
    name: str
    hf: Path  # the Hugging Face checkpoint folder
    gguf: Path  # F32 text model
    mmproj: Path  # F32 projector


def build_idefics3(texts: list[str], out: Path, smolvlm: bool):
    """SmolVLM or Idefics3: 32-pixel tiles of 8-pixel patches, images resized to 64 on the longest edge first
    (2x2 tiles and an overview: five image chunks)."""
    import torch
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessorPil,
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessorPil,
    )

    rows = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
    specials = ["<|pad|>", "<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>",
                "<image>", *rows]
    tok = bpe_tokenizer(texts, specials, "<|im_start|>", "<end_of_utterance>", "<|pad|>", SMOLVLM_TEMPLATE,
                        split="smollm")
    tok.add_special_tokens({"additional_special_tokens": ["<fake_token_around_image>", "<image>",
                                                          "<end_of_utterance>", "<global-img>"]})
    Config, Model, ImageProcessor = (
        (SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMImageProcessorPil) if smolvlm else
        (Idefics3Config, Idefics3ForConditionalGeneration, Idefics3ImageProcessorPil))
    config = Config(
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, layer_norm_eps=1e-6),
        text_config=dict(model_type="llama", architectures=["VLlama3ForCausalLM"], hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tok), rms_norm_eps=1e-5,
                         max_position_embeddings=2048, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id),
        scale_factor=2, image_token_id=tok.convert_tokens_to_ids("<image>"))
    torch.manual_seed(1)
    model = Model(config)
    images = ImageProcessor(size={"longest_edge": 64}, max_image_size={"longest_edge": 32},
                            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return save(model, tok, images, out)


def spm_gemma_tokenizer(texts: list[str]):
    """A SentencePiece-style BPE with byte fallback, as Gemma's: BOS added, its turn and image tokens."""
    import json

    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                "<end_of_image>", "<image_soft_token>"]
    norm = normalizers.Replace(" ", "▁")
    base = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    base.normalizer = norm
    base.train_from_iterator(texts + ["\n\n"] * 2000, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                                       show_progress=False))
    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):  # byte-fallback pieces: an unseen character must still tokenize
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True))
    tok.normalizer = norm
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", tok.token_to_id("<bos>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<end_of_turn>", unk_token="<unk>",
                                   pad_token="<pad>")
    fast.chat_template = GEMMA_TEMPLATE
    return fast


def build_gemma3(texts: list[str], out: Path):
    """Gemma 3: a 32-pixel SigLIP tower of 8-pixel patches pooled to 2x2 = 4 image tokens."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3ImageProcessorPil

    tok = spm_gemma_tokenizer(texts)
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<start_of_image>", "<end_of_image>", "<image_soft_token>")}
    config = Gemma3Config(
        text_config=dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=64, query_pre_attn_scalar=64, vocab_size=len(tok),
                         sliding_window=1024, max_position_embeddings=2048, rms_norm_eps=1e-6,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8, vision_use_head=False, layer_norm_eps=1e-6),
        mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
        image_token_index=ids["<image_soft_token>"])
    torch.manual_seed(1)
    model = Gemma3ForConditionalGeneration(config)
    images = Gemma3ImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    return save(model, tok, images, out)


def build_llava_clip(texts: list[str], out: Path):
    """LLaVA-1.5's layout: a CLIP tower (class token, pre-norm, quick GELU), feature layer -2, the MLP projector."""
    from llavao1_models.llava import ModelSpec, build_model, save_checkpoint

    tok = bpe_tokenizer(texts, ["<pad>", "<s>", "</s>", "<image>"], "<s>", "</s>", "<pad>", LLAVA15_TEMPLATE)
    spec = ModelSpec("llava-clip", image_size=32, patch_size=8, vision_width=64, vision_layers=3, vision_heads=2,
                     vision_ffn=128, text_layers=2, text_ffn=512, vocab_size=400, context_length=2048,
                     feature_layer=-2, vision_tower="clip", vision_act="quick_gelu")
    save_checkpoint(build_model(spec, tok, seed=1), tok, spec, out)
    return out


# ---------------------------------------------------------------------------------------------
# Gemma 3 as GGUF: llama.cpp's `gemma3` text model and `gemma3` projector (our exporter has no Gemma family)


def _gemma3_text(ckpt, outtype: str):
    from gguf import MODEL_TENSOR as MT
    from gguf import GGUFValueType as T
    from gguf import Keys

    from llavao1_edge.gguf_keys import tensor_name
    from llavao1_models.gguf_plan import new_plan
    from llavao1_models.gguf_vocab import plan_tokenizer

    tc, t = ckpt.text_config, ckpt.tensors
    plan = new_plan("gemma3", outtype, ckpt.name, ckpt.sha256)
    p = "model.language_model."
    for key, value in ((Keys.LLM.CONTEXT_LENGTH, tc["max_position_embeddings"]), (Keys.LLM.EMBEDDING_LENGTH, tc["hidden_size"]),
                       (Keys.LLM.BLOCK_COUNT, tc["num_hidden_layers"]), (Keys.LLM.FEED_FORWARD_LENGTH, tc["intermediate_size"]),
                       (Keys.Attention.HEAD_COUNT, tc["num_attention_heads"]),
                       (Keys.Attention.HEAD_COUNT_KV, tc["num_key_value_heads"]), (Keys.Attention.KEY_LENGTH, tc["head_dim"]),
                       (Keys.Attention.VALUE_LENGTH, tc["head_dim"]), (Keys.Attention.SLIDING_WINDOW, tc["sliding_window"])):
        plan.kv(key, T.UINT32, int(value))
    rope = tc["rope_parameters"]
    plan.kv(Keys.Attention.LAYERNORM_RMS_EPS, T.FLOAT32, float(tc["rms_norm_eps"]))
    plan.kv(Keys.Rope.FREQ_BASE, T.FLOAT32, float(rope["full_attention"]["rope_theta"]))
    plan.kv(Keys.Rope.FREQ_BASE_SWA, T.FLOAT32, float(rope["sliding_attention"]["rope_theta"]))
    emb = t[p + "embed_tokens.weight"]
    plan_tokenizer(plan, ckpt, emb.shape[0])
    plan.tensor(tensor_name(MT.TOKEN_EMBD), emb)
    plan.tensor(tensor_name(MT.OUTPUT_NORM), t[p + "norm.weight"] + 1)  # Gemma's RMSNorm scales by 1 + w
    plain = {"self_attn.q_proj": MT.ATTN_Q, "self_attn.k_proj": MT.ATTN_K, "self_attn.v_proj": MT.ATTN_V,
             "self_attn.o_proj": MT.ATTN_OUT, "mlp.gate_proj": MT.FFN_GATE, "mlp.up_proj": MT.FFN_UP,
             "mlp.down_proj": MT.FFN_DOWN}
    norms = {"input_layernorm": MT.ATTN_NORM, "post_attention_layernorm": MT.ATTN_POST_NORM,
             "pre_feedforward_layernorm": MT.FFN_NORM, "post_feedforward_layernorm": MT.FFN_POST_NORM,
             "self_attn.q_norm": MT.ATTN_Q_NORM, "self_attn.k_norm": MT.ATTN_K_NORM}
    for i in range(tc["num_hidden_layers"]):
        for hf, kind in plain.items():  # no Q/K row permutation: Gemma's RoPE is the NEOX layout
            plan.tensor(tensor_name(kind, i), t[f"{p}layers.{i}.{hf}.weight"])
        for hf, kind in norms.items():
            plan.tensor(tensor_name(kind, i), t[f"{p}layers.{i}.{hf}.weight"] + 1)
    return plan


def _gemma3_mmproj(ckpt, outtype: str):
    from gguf import MODEL_TENSOR as MT
    from gguf import GGUFValueType as T
    from gguf import Keys

    from llavao1_edge import gguf_keys as K
    from llavao1_edge.gguf_keys import tensor_name
    from llavao1_models.gguf_plan import new_plan
    from llavao1_models.llava import VISION_BLOCK_TENSORS

    vc, t = ckpt.vision_config, ckpt.tensors
    plan = new_plan(K.VISION_ARCHITECTURE, outtype, ckpt.name, ckpt.sha256)
    CV = Keys.ClipVision
    side = vc["image_size"] // vc["patch_size"]
    kernel = side // int(round(ckpt.config["mm_tokens_per_image"] ** 0.5))
    plan.kv(Keys.Clip.HAS_VISION_ENCODER, T.BOOL, True)
    plan.kv(Keys.Clip.PROJECTOR_TYPE, T.STRING, "gemma3")
    plan.kv(CV.USE_GELU, T.BOOL, True)
    for key, value in ((CV.IMAGE_SIZE, vc["image_size"]), (CV.PATCH_SIZE, vc["patch_size"]),
                       (CV.EMBEDDING_LENGTH, vc["hidden_size"]), (CV.FEED_FORWARD_LENGTH, vc["intermediate_size"]),
                       (CV.BLOCK_COUNT, vc["num_hidden_layers"]), (CV.PROJECTION_DIM, ckpt.text_config["hidden_size"]),
                       (CV.Attention.HEAD_COUNT, vc["num_attention_heads"]), (CV.Projector.SCALE_FACTOR, kernel)):
        plan.kv(key, T.UINT32, int(value))
    plan.kv(CV.Attention.LAYERNORM_EPS, T.FLOAT32, float(vc["layer_norm_eps"]))
    plan.kv(CV.IMAGE_MEAN, T.ARRAY, list(ckpt.image_mean), T.FLOAT32)
    plan.kv(CV.IMAGE_STD, T.ARRAY, list(ckpt.image_std), T.FLOAT32)
    v = "model.vision_tower."
    plan.tensor(tensor_name(MT.V_ENC_EMBD_PATCH), t[v + "embeddings.patch_embedding.weight"])
    plan.tensor(tensor_name(MT.V_ENC_EMBD_PATCH, suffix="bias"), t[v + "embeddings.patch_embedding.bias"])
    plan.tensor(tensor_name(MT.V_ENC_EMBD_POS), t[v + "embeddings.position_embedding.weight"])
    for i in range(vc["num_hidden_layers"]):
        for hf, kind in VISION_BLOCK_TENSORS.items():
            for suffix in ("weight", "bias"):
                plan.tensor(tensor_name(kind, i, suffix), t[f"{v}encoder.layers.{i}.{hf}.{suffix}"])
    for suffix in ("weight", "bias"):
        plan.tensor(tensor_name(MT.V_POST_NORM, suffix=suffix), t[f"{v}post_layernorm.{suffix}"])
    mm = "model.multi_modal_projector."
    plan.tensor("mm.input_projection.weight", t[mm + "mm_input_projection_weight"])  # [vision, text], as llama.cpp reads it
    plan.tensor("mm.soft_emb_norm.weight", t[mm + "mm_soft_emb_norm.weight"] + 1)
    return plan


def gemma3_family():
    from llavao1_models.family import Family

    return Family("gemma3", ("Gemma3ForConditionalGeneration",), "gemma3", "gemma3", _gemma3_text, _gemma3_mmproj)


def build(name: str, texts: list[str], root: Path) -> FamilyFixture:
    """The checkpoint of family `name` under root/NAME and its F32 GGUF pair under root/NAME-gguf."""
    from llavao1_export.gguf_convert import convert_to_gguf

    out = root / name
    builders = {"smolvlm": lambda: build_idefics3(texts, out, True), "idefics3": lambda: build_idefics3(texts, out, False),
                "qwen2vl": lambda: qwen2vl_checkpoint(texts, out, QwenShape("2")),
                "qwen2.5vl": lambda: qwen2vl_checkpoint(texts, out, QwenShape("2.5", vision_depth=4)),
                "gemma3": lambda: build_gemma3(texts, out), "llava-clip": lambda: build_llava_clip(texts, out)}
    builders[name]()
    family = gemma3_family() if name == "gemma3" else None
    res = convert_to_gguf(out, root / f"{name}-gguf", "f32", family=family)
    return FamilyFixture(name, out, res.text, res.mmproj)


def sample_image(width: int = 50, height: int = 30, seed: int = 0):
    """A non-square image with structure (so tiles differ)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
