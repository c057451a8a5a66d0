"""Data records: LLaVA-CoT-100k conversation JSONL and VLMEvalKit multiple-choice TSV.

The single definition of both formats. Readers stream (the real JSONL has ~100k lines) and
validate; every problem raises RecordError naming the file, the line and what is wrong.
Writers write to a temporary name and rename, so a killed write leaves nothing half-written.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_TOKEN = "<image>"  # LLaVA's image placeholder in the human turn
HUMAN, GPT = "human", "gpt"
TSV_REQUIRED = ("index", "question", "answer", "image")
TSV_OPTIONS = ("A", "B", "C", "D")


class RecordError(ValueError):
    """A bad record or file: the message names the file and line."""

    def __init__(self, path: str | os.PathLike, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {problem}")


@dataclass
class Turn:
    role: str  # "human" or "gpt"
    value: str


@dataclass
class Record:
    """One LLaVA-CoT sample: an image and a conversation (human first, turns alternating)."""

    id: str
    image: str | None  # path relative to the dataset root, or None for a text-only sample
    conversations: list[Turn]
    meta: dict = field(default_factory=dict)  # optional extras (family, reference answer, ...)

    @property
    def question(self) -> str:
        """The first human turn without the image placeholder."""
        return strip_image_token(self.conversations[0].value)

    @property
    def answer(self) -> str:
        """The first assistant turn."""
        return self.conversations[1].value

    def to_json(self) -> dict:
        obj: dict = {"id": self.id}
        if self.image is not None:
            obj["image"] = self.image
        obj["conversations"] = [{"from": t.role, "value": t.value} for t in self.conversations]
        if self.meta:
            obj["meta"] = self.meta
        return obj


def strip_image_token(text: str) -> str:
    return text.replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "").strip()


def record_from_json(obj: object, path: str | os.PathLike = "<record>", line: int | None = None,
                     root: str | os.PathLike | None = None, check_image: bool = True) -> Record:
    """Validate one decoded JSON object and build a Record."""

    def bad(problem: str) -> RecordError:
        return RecordError(path, line, problem)

    if not isinstance(obj, dict):
        raise bad(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("id", "conversations"):
        if key not in obj:
            raise bad(f"missing field {key!r}")
    rid = obj["id"]
    if not isinstance(rid, str | int) or isinstance(rid, bool):
        raise bad("field 'id' must be a string or an integer")
    image = obj.get("image")
    if isinstance(image, list):
        if len(image) > 1:
            raise bad(f"more than one image ({len(image)}); one image per record")
        image = image[0] if image else None
    if image is not None and (not isinstance(image, str) or not image):
        raise bad("field 'image' must be a non-empty string")
    convs = obj["conversations"]
    if not isinstance(convs, list) or len(convs) < 2:
        raise bad("field 'conversations' must be a list of at least two turns")
    turns = []
    for i, t in enumerate(convs):
        if not isinstance(t, dict) or "from" not in t or "value" not in t:
            raise bad(f"turn {i}: needs 'from' and 'value'")
        role, value = t["from"], t["value"]
        if role not in (HUMAN, GPT):
            raise bad(f"turn {i}: 'from' must be 'human' or 'gpt', got {role!r}")
        if role != (HUMAN if i % 2 == 0 else GPT):
            raise bad(f"turn {i}: turns must alternate human, gpt, ... starting with human")
        if not isinstance(value, str):
            raise bad(f"turn {i}: 'value' must be a string")
        if role == GPT and not value.strip():
            raise bad(f"turn {i}: empty answer")
        if role == HUMAN and not strip_image_token(value):
            raise bad(f"turn {i}: empty question")
        turns.append(Turn(role, value))
    if len(turns) % 2:
        raise bad("the conversation ends with a human turn that has no answer")
    n_markers = sum(t.value.count(IMAGE_TOKEN) for t in turns)
    if n_markers > 1:
        raise bad(f"more than one image ({n_markers} {IMAGE_TOKEN} markers); one image per record")
    if n_markers and image is None:
        raise bad(f"{IMAGE_TOKEN} marker but no 'image' field")
    if image is not None:
        _check_image_path(image, root, bad, check_image)
    meta = obj.get("meta", {})
    if not isinstance(meta, dict):
        raise bad("field 'meta' must be an object")
    return Record(str(rid), image, turns, meta)


def _check_image_path(image: str, root, bad, check_exists: bool) -> None:
    rel = Path(image)
    if rel.is_absolute() or ".." in rel.parts:
        raise bad(f"image path {image!r} escapes the dataset root")
    if root is None:
        return
    root_path = Path(root).resolve()
    full = (root_path / rel).resolve()
    if root_path not in full.parents:
        raise bad(f"image path {image!r} escapes the dataset root")
    if check_exists and not full.is_file():
        raise bad(f"image file not found: {full}")


def read_records(path: str | os.PathLike, root: str | os.PathLike | None = None,
                 check_images: bool = True) -> Iterator[Record]:
    """Stream validated records from a JSONL file. `root` defaults to the file's folder."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(path, None, "file not found")
    root = path.parent if root is None else Path(root)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecordError(path, lineno, f"invalid JSON: {e.msg} (column {e.colno})") from None
            yield record_from_json(obj, path, lineno, root, check_images)


@contextmanager
def atomic_text_file(path: str | os.PathLike, newline: str | None = None):
    """Write to a temporary name beside `path`; rename over it only when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline=newline) as f:
            yield f
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_records(path: str | os.PathLike, records: Iterable[Record]) -> int:
    """Write records as JSONL atomically; returns the number written."""
    n = 0
    with atomic_text_file(path) as f:
        for rec in records:
            f.write(json.dumps(rec.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


# --------------------------------------------------------------------------------------------
# VLMEvalKit TSV


@dataclass
class MCQuestion:
    """One multiple-choice benchmark row (VLMEvalKit TSV)."""

    index: str
    question: str
    options: dict[str, str]  # letter -> text, empty options left out
    answer: str  # the correct letter
    image: bytes  # encoded image file (PNG/JPEG bytes)
    category: str = ""
    hint: str = ""

    def prompt(self) -> str:
        return mc_prompt(self.question, self.options, self.hint)


def mc_prompt(question: str, options: dict[str, str], hint: str = "") -> str:
    """Question, options and the instruction to answer with a letter (VLMEvalKit's layout)."""
    parts = [f"Hint: {hint}"] if hint else []
    parts.append(question)
    parts.append("Options:")
    parts += [f"{k}. {v}" for k, v in options.items()]
    parts.append("Answer with the option's letter from the given choices.")
    return "\n".join(parts)


def _csv_field_limit() -> None:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # base64 images are large fields


def read_tsv(path: str | os.PathLike) -> Iterator[MCQuestion]:
    """Stream validated rows from a VLMEvalKit-style TSV file."""
    path = Path(path)
    if not path.is_file():
        raise RecordError(path, None, "file not found")
    _csv_field_limit()
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        header = reader.fieldnames or []
        missing = [c for c in TSV_REQUIRED if c not in header]
        if missing:
            raise RecordError(path, 1, f"missing column(s) {', '.join(missing)}; have {', '.join(header)}")
        if not any(c in header for c in TSV_OPTIONS):
            raise RecordError(path, 1, "no option columns (A, B, C, D)")
        for row in reader:
            lineno = reader.line_num
            if None in row:
                raise RecordError(path, lineno, "more fields than columns")
            options = {k: row[k].strip() for k in TSV_OPTIONS if k in row and row[k] and row[k].strip()
                       and row[k].strip().lower() != "nan"}
            if len(options) < 2:
                raise RecordError(path, lineno, "fewer than two non-empty options")
            answer = (row.get("answer") or "").strip()
            if answer not in options:
                raise RecordError(path, lineno, f"answer {answer!r} is not one of the options {list(options)}")
            if not (row.get("question") or "").strip():
                raise RecordError(path, lineno, "empty question")
            try:
                image = base64.b64decode(row["image"] or "", validate=True)
            except (binascii.Error, ValueError):
                raise RecordError(path, lineno, "column 'image' is not valid base64") from None
            if not image:
                raise RecordError(path, lineno, "empty image")
            yield MCQuestion(str(row["index"]), row["question"].strip(), options, answer, image,
                             (row.get("category") or "").strip(), (row.get("hint") or "").strip())


def write_tsv(path: str | os.PathLike, rows: Iterable[MCQuestion]) -> int:
    """Write rows as a VLMEvalKit TSV atomically; returns the number written."""
    cols = ["index", "question", "hint", *TSV_OPTIONS, "answer", "category", "image"]
    n = 0
    with atomic_text_file(path, newline="") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(cols)
        for q in rows:
            w.writerow([q.index, q.question, q.hint, *(q.options.get(k, "") for k in TSV_OPTIONS),
                        q.answer, q.category, base64.b64encode(q.image).decode("ascii")])
            n += 1
    return n
