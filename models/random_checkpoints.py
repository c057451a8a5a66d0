"""Random-weight checkpoints of real families, built offline: tiny ones for tests, published shapes for
benchmarks (what a 2B model costs on a laptop does not depend on what its weights learned).

A checkpoint is a real Hugging Face folder transformers loads (config, safetensors, tokenizer, image
processor settings) with a byte-level BPE trained here on the given texts; for a published shape its
vocabulary is filled up to the published size with merges of the learned tokens (they only make the
embedding and output matrices as large as the real ones; text still tokenizes through the learned merges).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .gguf_vocab import QWEN2_SPLIT

QWEN2VL_TEMPLATE = (  # Qwen2-VL's published chat template
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>")


def bpe_tokenizer(texts: list[str], specials: list[str], bos: str, eos: str, pad: str, template: str,
                  split: str = "gpt2", vocab_size: int = 420, add_bos: bool = False, fill_to: int | None = None):
    """A byte-level BPE trained on `texts` with `specials` as control tokens (first ids); `split` is the
    pre-tokenizer (gpt2, smollm or qwen2); `fill_to` grows the vocabulary to that many tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if split == "qwen2":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    elif split == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    else:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts + ["\n\n"] * 2000, trainer)  # "\n\n" one token: mtmd looks it up (Idefics3)
    if fill_to:
        tok = _filled(tok, fill_to)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad)
    fast.chat_template = template
    fast.add_bos_token = add_bos
    return fast


def _filled(tok, size: int):
    """The same tokenizer with merges of its learned tokens appended until the vocabulary holds `size` tokens."""
    import json

    from tokenizers import Tokenizer

    spec = json.loads(tok.to_str())
    vocab, merges = spec["model"]["vocab"], spec["model"]["merges"]
    specials = {t["content"] for t in spec["added_tokens"]}
    base = [t for t in sorted(vocab, key=vocab.get) if t not in specials]
    i = j = 0
    while len(vocab) < size:
        new = base[i] + base[j]
        if new not in vocab:
            vocab[new] = len(vocab)
            merges.append([base[i], base[j]])
        j += 1
        if j == len(base):
            i, j = i + 1, 0
    return Tokenizer.from_str(json.dumps(spec))


@dataclass(frozen=True)
class QwenShape:
    """The sizes of a Qwen2-VL (version "2") or Qwen2.5-VL ("2.5") checkpoint."""

    version: str = "2"
    width: int = 256
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 512
    vocab: int | None = None  # None: just the tokens learned from the texts
    mrope_section: tuple[int, int, int] = (8, 12, 12)  # halves of head_dim for time, height, width
    vision_width: int = 64
    vision_depth: int = 3
    vision_heads: int = 2
    vision_ffn: int = 128
    fullatt_blocks: tuple[int, ...] = (1, 3)  # Qwen2.5-VL: blocks with full attention, the rest windowed
    tied: bool = False
    rms_norm_eps: float = 1e-12  # llama.cpp's qwen2vl reads none and uses 0; a tiny one keeps parity exact
    extra: dict = field(default_factory=dict)


# Qwen2-VL-2B-Instruct's published sizes
QWEN2VL_2B = QwenShape("2", width=1536, layers=28, heads=12, kv_heads=2, ffn=8960, vocab=151936,
                       mrope_section=(16, 24, 24), vision_width=1280, vision_depth=32, vision_heads=16,
                       vision_ffn=5120, tied=True, rms_norm_eps=1e-6)


def qwen2vl_checkpoint(texts: list[str], out: Path, shape: QwenShape = QwenShape(), seed: int = 1, dtype=None) -> Path:
    """A Qwen2-VL or Qwen2.5-VL checkpoint of `shape` with random weights, saved to `out`."""
    import torch
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    tok = bpe_tokenizer(texts, list(QWEN_SPECIALS), "<|endoftext|>", "<|im_end|>", "<|endoftext|>", QWEN2VL_TEMPLATE,
                        split="qwen2", fill_to=shape.vocab)
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(hidden_size=shape.width, intermediate_size=shape.ffn, num_hidden_layers=shape.layers,
                num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads, vocab_size=len(tok),
                max_position_embeddings=32768, rms_norm_eps=shape.rms_norm_eps, tie_word_embeddings=shape.tied,
                rope_parameters={"rope_type": "default", "mrope_section": list(shape.mrope_section), "rope_theta": 1e6},
                bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    if shape.version == "2":
        Config, Model = Qwen2VLConfig, Qwen2VLForConditionalGeneration
        vision = dict(depth=shape.vision_depth, embed_dim=shape.vision_width, hidden_size=shape.width,
                      mlp_ratio=shape.vision_ffn // shape.vision_width, num_heads=shape.vision_heads, patch_size=14)
    else:
        Config, Model = Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
        vision = dict(depth=shape.vision_depth, hidden_size=shape.vision_width, intermediate_size=shape.vision_ffn,
                      out_hidden_size=shape.width, num_heads=shape.vision_heads, patch_size=14,
                      fullatt_block_indexes=list(shape.fullatt_blocks))
    config = Config(vision_config=vision, text_config=text, image_token_id=ids["<|image_pad|>"],
                    video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                    vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=shape.tied, **shape.extra)
    torch.manual_seed(seed)
    model = Model._from_config(config, dtype=dtype) if dtype is not None else Model(config)
    images = Qwen2VLImageProcessorPil(min_pixels=8 * 28 * 28, max_pixels=64 * 28 * 28)
    return save(model, tok, images, out)


def save(model, tokenizer, image_processor, out: Path) -> Path:
    """The checkpoint as a model's folder holds it; the image processor's settings alone, since the families'
    full processors need torchvision or num2words (the runtime and our trainer do their own preprocessing)."""
    model.save_pretrained(out, safe_serialization=True)
    image_processor.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
