"""Training examples from LLaVA-CoT records: token ids, a loss mask, and pixels.

Loss falls on the assistant's answers only: the user turns, the chat markup around them, the
image tokens and the padding are masked (-100). Each segment is tokenized on its own, which
is what the runtime does (prompt tokenized, answer generated token by token).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llavao1_data.records import IMAGE_TOKEN, Record, RecordError, record_from_json
from llavao1_edge.images import ImageError, load_image, preprocess

IGNORE = -100


@dataclass
class ImageSpec:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    n_tokens: int  # placeholder tokens one image expands to


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


def render_segments(tokenizer, record: Record) -> list[tuple[str, bool]]:
    """(text, trained) segments of a conversation through the tokenizer's chat template."""
    messages = []
    segments: list[tuple[str, bool]] = []
    done = ""
    for turn in record.conversations:
        role = "user" if turn.role == "human" else "assistant"
        if role == "user":
            messages.append({"role": role, "content": turn.value})
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            trained = False
        else:
            messages.append({"role": role, "content": turn.value})
            text = tokenizer.apply_chat_template(messages, tokenize=False)
            trained = True
        if not text.startswith(done):
            raise BadExample(f"record {record.id}: the chat template is not prefix-consistent across turns")
        segments.append((text[len(done):], trained))
        done = text
    return segments


def tokenize_record(tokenizer, record: Record, image_spec: ImageSpec | None, max_len: int, image_token_id: int,
                    root: Path) -> Example:
    ids: list[int] = []
    labels: list[int] = []
    for text, trained in render_segments(tokenizer, record):
        seg = tokenizer(text, add_special_tokens=False)["input_ids"]
        if trained:  # the answer and its end token; a template's trailing newline is learned too
            labels += seg
        else:
            labels += [IGNORE] * len(seg)
        ids += seg
    n_img = ids.count(image_token_id)
    if n_img > 1:
        raise BadExample(f"record {record.id}: {n_img} image placeholders; one image per record")
    if n_img and (record.image is None or image_spec is None):
        raise BadExample(f"record {record.id}: image placeholder without an image")
    if record.image is not None and not n_img:
        raise BadExample(f"record {record.id}: has an image but no {IMAGE_TOKEN} in its first turn")
    if n_img:
        at = ids.index(image_token_id)
        ids[at:at + 1] = [image_token_id] * image_spec.n_tokens
        labels[at:at + 1] = [IGNORE] * image_spec.n_tokens
    if len(ids) > max_len:
        raise BadExample(f"record {record.id}: {len(ids)} tokens, over the limit of {max_len} (--max-length)")
    if not any(label != IGNORE for label in labels):
        raise BadExample(f"record {record.id}: no answer tokens to train on")
    return Example(record.id, ids, labels, (root / record.image) if record.image else None)


def pixels_for(example: Example, image_spec: ImageSpec) -> np.ndarray:
    """[3, S, S] float32 through the preprocessing shared with llama.cpp's mtmd."""
    try:
        return preprocess(load_image(example.image), image_spec.size, image_spec.mean, image_spec.std)
    except ImageError as e:
        raise BadExample(f"record {example.record_id}: {e}") from None


def collate(examples: list[Example], pixels: list[np.ndarray | None], pad_id: int):
    """Right-padded batch tensors: input_ids, attention_mask, labels [B, T]; pixel_values [n_img, 3, S, S]."""
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
    imgs = [p for p in pixels if p is not None]
    if imgs:
        batch["pixel_values"] = torch.from_numpy(np.stack(imgs))
    return batch
