"""Training examples from LLaVA-CoT records: token ids, a loss mask, and the image's model inputs.

A conversation is rendered the way the runtime renders a question: through the model's own chat template,
in the content form it reads (a string, or a list of parts), with mtmd's marker where the image goes, BOS
only where the tokenizer adds it. The marker then becomes the family's image tokens for that image's size
(tiles and overview, or a dynamic-size grid; models.family), so the model trains on the prompt llama.cpp
will build. Loss falls on the assistant's answers only: the user turns, the chat markup around them, the
image tokens and the padding are masked (-100). Each segment is tokenized on its own, which is what the
runtime does (prompt tokenized, answer generated token by token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llavao1_data.records import (
    HUMAN,
    IMAGE_TOKEN,
    Record,
    RecordError,
    record_from_json,
    strip_image_token,
)
from llavao1_edge.images import ImageError, image_size, load_image
from llavao1_edge.prompting import MEDIA_MARKER, ChatTemplate, TemplateError, render, user_content

IGNORE = -100


@dataclass
class Example:
    record_id: str
    input_ids: list[int]
    labels: list[int]
    image: Path | None


class BadExample(ValueError):
    pass


def read_records_tolerant(path: str | Path, skip_bad: bool, skipped: list[str]) -> list[Record]:
    """All records of a JSONL file; with skip_bad, bad lines are counted in `skipped` instead of raising."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(path, None, "file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RecordError(path, lineno, f"invalid JSON: {e.msg}") from None
                out.append(record_from_json(obj, path, lineno, path.parent))
            except RecordError as e:
                if not skip_bad:
                    raise
                skipped.append(str(e))
    return out


class Conversations:
    """Renders records through a model's chat template as the runtime renders its prompts."""

    def __init__(self, tokenizer, model_name: str):
        self.template = ChatTemplate(tokenizer.chat_template, model_name, tokenizer.eos_token or "")

    def segments(self, record: Record) -> list[tuple[str, bool]]:
        """(text, trained) segments of a conversation; the image (if any) as MEDIA_MARKER in the first turn."""
        first = record.conversations[0].value
        has_image = IMAGE_TOKEN in first
        try:  # the content form the template reads, found as the runtime finds it
            self.template.user_turn(strip_image_token(first), MEDIA_MARKER if has_image else None)
        except TemplateError as e:
            raise BadExample(f"record {record.id}: {e}") from None
        form = self.template.form
        messages, segments, done = [], [], ""
        for k, turn in enumerate(record.conversations):
            if turn.role == HUMAN:
                text = strip_image_token(turn.value) if k == 0 else turn.value
                messages.append({"role": "user", "content": user_content(text, MEDIA_MARKER if k == 0 and has_image
                                                                         else None, form)})
            else:
                content = turn.value if form == "string" else [{"type": "text", "text": turn.value}]
                messages.append({"role": "assistant", "content": content})
            rendered = render(self.template.source, messages, add_generation_prompt=turn.role == HUMAN,
                              eos=self.template.eos)
            if not rendered.startswith(done):
                raise BadExample(f"record {record.id}: the chat template is not prefix-consistent across turns")
            segments.append((rendered[len(done):], turn.role != HUMAN))
            done = rendered
        return segments


def tokenize_record(tokenizer, conversations: Conversations, vision, record: Record, max_len: int,
                    root: Path) -> Example:
    """Token ids and labels of a record; `vision` (a family's VisionInputs) writes out the image's tokens."""
    n_img = sum(t.value.count(IMAGE_TOKEN) for t in record.conversations if t.role == HUMAN)
    if n_img > 1:
        raise BadExample(f"record {record.id}: {n_img} image placeholders; one image per record")
    if n_img and record.image is None:
        raise BadExample(f"record {record.id}: image placeholder without an image")
    if record.image is not None and IMAGE_TOKEN not in record.conversations[0].value:
        raise BadExample(f"record {record.id}: has an image but no {IMAGE_TOKEN} in its first turn")
    image_text = ""
    if record.image is not None:
        if vision is None:
            raise BadExample(f"record {record.id}: has an image, but the model has no vision inputs")
        try:
            image_text = vision.prompt(*image_size(root / record.image))
        except ImageError as e:
            raise BadExample(f"record {record.id}: {e}") from None
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trained) in enumerate(conversations.segments(record)):
        # BOS where the tokenizer adds one (as llama.cpp does where the GGUF says so), at the start only
        seg = tokenizer(text.replace(MEDIA_MARKER, image_text), add_special_tokens=i == 0)["input_ids"]
        labels += seg if trained else [IGNORE] * len(seg)  # the answer and its end token are learned
        ids += seg
    if len(ids) > max_len:
        raise BadExample(f"record {record.id}: {len(ids)} tokens, over the limit of {max_len} (--max-length)")
    if not any(label != IGNORE for label in labels):
        raise BadExample(f"record {record.id}: no answer tokens to train on")
    return Example(record.id, ids, labels, (root / record.image) if record.image else None)


def image_arrays(example: Example, vision) -> dict[str, np.ndarray] | None:
    """The example's image as the model takes it (mtmd's preprocessing for the family), or None."""
    if example.image is None:
        return None
    try:
        return vision.arrays(load_image(example.image))
    except ImageError as e:
        raise BadExample(f"record {example.record_id}: {e}") from None


def collate(examples: list[Example], images: list[dict | None], pad_id: int, vision):
    """Right-padded batch tensors: input_ids, attention_mask, labels [B, T], the images' arguments
    (vision.batch) and any per-token inputs the family needs (M-RoPE token types)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if vision is not None and any(i is not None for i in images):
        batch.update({k: torch.from_numpy(v) for k, v in vision.batch(images).items()})
        batch.update(vision.sequence_inputs(ids))
    return batch
