"""A byte-level BPE tokenizer trained on the training texts, and the chat format.

The stage tags are added tokens (one id each), so stages cost one token to open and one to
close and a sampler can stop a stage on a single id. The chat template written into the
checkpoint (and from there into the GGUF) renders exactly what `format_prompt` builds; a test
holds the two together.
"""

from __future__ import annotations

from collections.abc import Iterable

from llavao1_data.records import IMAGE_TOKEN
from llavao1_edge.stages import STAGES

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIAL_TOKENS = (PAD, BOS, EOS, USER, ASSISTANT, IMAGE_TOKEN)  # control tokens, ids 0..5
STAGE_TOKENS = tuple(t for s in STAGES for t in (s.open_tag, s.close_tag))

# Jinja, as Hugging Face and llama.cpp render it. `content` is a string (with "<image>" where the
# image goes) or a list of {"type": "image"} / {"type": "text", "text": ...} parts.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set text = ns.text -%}{%- endif -%}"
    "{%- if message['role'] == 'user' -%}{{ '<|user|>\n' + text + '<|end|>\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<|assistant|>\n' + text + '<|end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- endif -%}"
)


def format_prompt(user_text: str) -> str:
    """The text before the answer for one user turn (image marker inside `user_text`)."""
    return f"{USER}\n{user_text}{EOS}\n{ASSISTANT}\n"


def format_answer(answer: str) -> str:
    """The assistant's answer as trained: the text, then the end token."""
    return f"{answer}{EOS}"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer; returns a transformers PreTrainedTokenizerFast."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in STAGE_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   extra_special_tokens={"image_token": IMAGE_TOKEN})
    fast.chat_template = CHAT_TEMPLATE
    fast.add_bos_token = False
    return fast
