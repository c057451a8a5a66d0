"""Build shapes datasets: one scene and image per question, records of the chosen kinds.

Every question draws from its own RNG seeded by (seed, split, index), so the same arguments give
byte-identical files and question i does not depend on how many questions are generated.
"""

from __future__ import annotations

import io
import os
import random
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from llavao1_edge.stages import STAGE_SEPARATOR, render_answer, render_stage

from ..records import (
    IMAGE_TOKEN,
    MCQuestion,
    Record,
    Turn,
    mc_prompt,
    read_records,
    write_records,
    write_tsv,
)
from .judge_examples import judge_examples
from .questions import (
    FAMILIES,
    MC_STEP_OPENINGS,
    MC_STEPS,
    REASONING_STYLES,
    Question,
    choices_for,
    make_question,
    option_step,
)
from .scene import CAPTION_ORDERS, Scene, generate_scene, render_scene

# "option": a text-only drill per question - the options, filler and the answer value are given, the reply is
# the reasoning's option step alone - so the model practises reading the option list with a dense signal.
# "caption": the image and "Describe the image." -> the CAPTION stage alone: no question to copy a colour from,
# so every colour word must be read from the image (the stuck shipped model learnt colours from these; README).
# "reasoning": text-only, the question and the answer's SUMMARY and CAPTION given, the reply is REASONING and
# CONCLUSION: the objects must be taken from the caption by content (left alone, the model re-perceives them; README).
KINDS = ("cot", "direct", "judge", "option", "caption", "reasoning")
CAPTION_PROMPT = "Describe the image."
SPLITS = ("train", "eval")
FORMATS = ("jsonl", "tsv")


@dataclass
class ShapesConfig:
    n: int = 1000  # questions (one scene and image each)
    seed: int = 0
    split: str = "train"  # "eval" writes questions with reference answers only
    kinds: tuple[str, ...] = ("cot", "direct", "judge")  # which records to write per question (of KINDS)
    image_size: int = 128  # pixels, square
    mc_fraction: float = 0.5  # share of multiple-choice questions (A-D) in jsonl output
    judge_fraction: float = 1.0  # share of questions that also get judge examples (kind "judge")
    option_fraction: float = 1.0  # share of questions that also get an option drill (kind "option")
    caption_fraction: float = 1.0  # share of questions that also get a caption-only record (kind "caption")
    reasoning_fraction: float = 1.0  # share of questions that also get a reasoning drill (kind "reasoning")
    families: tuple[str, ...] = field(default=FAMILIES)
    format: str = "jsonl"  # "tsv" writes a VLMEvalKit multiple-choice file
    caption_order: str = "left-to-right"  # how captions list objects: "left-to-right" or "regions"
    mc_step: str = "match"  # how the reasoning names the option: "match" (one sentence) or "check" (line by line)
    reasoning_style: str = "list"  # how the reasoning picks objects: "list" (at once), "scan" or "read" (each in turn)

    def validate(self) -> None:
        if self.reasoning_style not in REASONING_STYLES:
            raise ValueError(f"--reasoning-style must be one of {', '.join(REASONING_STYLES)}, got {self.reasoning_style!r}")
        if self.mc_step not in MC_STEPS:
            raise ValueError(f"--mc-step must be one of {', '.join(MC_STEPS)}, got {self.mc_step!r}")
        if self.caption_order not in CAPTION_ORDERS:
            raise ValueError(f"--caption-order must be one of {', '.join(CAPTION_ORDERS)}, got {self.caption_order!r}")
        if self.n < 1:
            raise ValueError(f"--n must be at least 1, got {self.n}")
        if self.split not in SPLITS:
            raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.format not in FORMATS:
            raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"--kinds takes a comma list of {', '.join(KINDS)}; got {','.join(self.kinds) or 'nothing'}")
        extra = [k for k in self.kinds if k in ("judge", "option", "caption", "reasoning")]
        if self.split == "eval" and extra:
            raise ValueError(f"--split eval writes questions only; drop {' and '.join(map(repr, extra))} from --kinds")
        bad = [f for f in self.families if f not in FAMILIES]
        if bad or not self.families:
            raise ValueError(f"unknown question families {bad}; known: {', '.join(FAMILIES)}")
        if not 32 <= self.image_size <= 1024:
            raise ValueError(f"--image-size must be in 32..1024, got {self.image_size}")
        for name in ("mc_fraction", "judge_fraction", "option_fraction", "caption_fraction",
                     "reasoning_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(self, name)}")


@dataclass
class Example:
    index: int
    scene: Scene
    question: Question


def build_examples(cfg: ShapesConfig) -> Iterator[Example]:
    """Questions 0..n-1; family i cycles through cfg.families so every family is covered."""
    for i in range(cfg.n):
        rng = random.Random(f"shapes:{cfg.split}:{cfg.seed}:{i}")
        family = cfg.families[i % len(cfg.families)]
        form = "mc" if cfg.format == "tsv" or rng.random() < cfg.mc_fraction else "open"
        while True:  # some scenes allow no unambiguous question of a family: draw another
            scene = replace(generate_scene(rng), caption_order=cfg.caption_order)
            q = make_question(family, scene, rng, form, cfg.mc_step, cfg.reasoning_style)
            if q is not None:
                break
        yield Example(i, scene, q)


def _records_for(ex: Example, cfg: ShapesConfig, image: str) -> list[Record]:
    q, base = ex.question, f"shapes-{cfg.split}-{cfg.seed}-{ex.index:06d}"
    meta = {"family": q.family, "form": q.form, "answer": q.answer, "value": q.value,
            "spec": q.spec, "scene": ex.scene.to_json()}
    if q.choices:
        meta["choices"] = q.choices
    human = f"{IMAGE_TOKEN}\n{q.prompt}"
    out = []
    if "cot" in cfg.kinds:
        out.append(Record(f"{base}-cot", image, [Turn("human", human), Turn("gpt", render_answer(q.stages))],
                          {**meta, "kind": "cot"}))
    if "direct" in cfg.kinds:
        out.append(Record(f"{base}-direct", image, [Turn("human", human), Turn("gpt", q.answer)],
                          {**meta, "kind": "direct"}))

    def drawn(kind: str, fraction: float) -> random.Random | None:
        """This question's RNG for the kind if it gets one: adding a kind leaves the others' records as they were."""
        rng = random.Random(f"shapes-{kind}:{cfg.split}:{cfg.seed}:{ex.index}")
        return rng if kind in cfg.kinds and rng.random() < fraction else None

    if rng := drawn("judge", cfg.judge_fraction):
        for j, je in enumerate(judge_examples(q, ex.scene, rng)):
            prompt = f"{IMAGE_TOKEN}\n{je.prompt}" if je.uses_image else je.prompt
            out.append(Record(f"{base}-judge{j}-{je.unit}", image if je.uses_image else None,
                              [Turn("human", prompt), Turn("gpt", je.target)],
                              {"kind": "judge", "unit": je.unit, "family": q.family}))
    if rng := drawn("option", cfg.option_fraction):
        out.append(_option_drill(q, f"{base}-option", rng))
    if drawn("caption", cfg.caption_fraction):
        out.append(Record(f"{base}-caption", image, [Turn("human", f"{IMAGE_TOKEN}\n{CAPTION_PROMPT}"),
                                                     Turn("gpt", render_stage("caption", q.stages["caption"]))],
                          {"kind": "caption", "family": q.family, "scene": meta["scene"]}))
    if drawn("reasoning", cfg.reasoning_fraction):
        given = STAGE_SEPARATOR.join(render_stage(s, q.stages[s]) for s in ("summary", "caption"))
        reply = STAGE_SEPARATOR.join(render_stage(s, q.stages[s]) for s in ("reasoning", "conclusion"))
        out.append(Record(f"{base}-reasoning", None, [Turn("human", f"{q.prompt}\n{given}"), Turn("gpt", reply)],
                          {"kind": "reasoning", "family": q.family, "answer": q.answer}))
    return out


def _option_drill(q: Question, rid: str, rng: random.Random) -> Record:
    """Text-only: the question with options (fresh ones for an open question), then a random-length opening of
    its own answer as filler, then the answer value -> the option step. Without the filler the options sit at a
    fixed distance and the model learns to read them by position, which fails in a real answer (README)."""
    choices = q.choices or choices_for(q.value, rng)
    step, letter = option_step(q.value, choices, q.mc_step)
    words = " ".join(q.stages[s] for s in ("summary", "caption", "reasoning")).split()
    filler = " ".join(words[:rng.randint(0, len(words))]).split(MC_STEP_OPENINGS[q.mc_step])[0]  # not the step
    prompt = "\n".join(p for p in (mc_prompt(q.text, choices), filler, f"The answer is {q.value}. Which option is it?") if p)
    return Record(rid, None, [Turn("human", prompt), Turn("gpt", step.strip())],
                  {"kind": "option", "family": q.family, "answer": letter})


def _png_bytes(scene: Scene, size: int) -> bytes:
    buf = io.BytesIO()
    render_scene(scene, size).save(buf, format="PNG", optimize=False)
    return buf.getvalue()


def write_dataset(cfg: ShapesConfig, out_dir: str | os.PathLike, progress: bool | None = None) -> Path:
    """Write DIR/records.jsonl (+ DIR/images/) or DIR/records.tsv; returns the file written.

    The whole dataset is built in a temporary folder beside DIR and moved into place at the end,
    so an interrupted run leaves DIR as it was.
    """
    from tqdm import tqdm

    cfg.validate()
    out = Path(out_dir)
    disable = None if progress is None else not progress  # None: show on a terminal only
    with _staged_dir(out, "a shapes dataset") as tmp:
        examples = tqdm(build_examples(cfg), total=cfg.n, desc="shapes", unit="q", disable=disable)
        if cfg.format == "tsv":
            rows = (MCQuestion(str(ex.index), ex.question.text, ex.question.choices or {},
                               ex.question.answer, _png_bytes(ex.scene, cfg.image_size), ex.question.family)
                    for ex in examples)
            write_tsv(tmp / "records.tsv", rows)
        else:
            (tmp / "images").mkdir()

            def records() -> Iterator[Record]:
                for ex in examples:
                    rel = f"images/{cfg.split}-{cfg.seed}-{ex.index:06d}.png"
                    (tmp / rel).write_bytes(_png_bytes(ex.scene, cfg.image_size))
                    yield from _records_for(ex, cfg, rel)
            write_records(tmp / "records.jsonl", records())
    return out / ("records.tsv" if cfg.format == "tsv" else "records.jsonl")


@contextmanager
def _staged_dir(out: Path, what: str) -> Iterator[Path]:
    """A temporary folder beside `out` to build a dataset in, moved into place when the block ends without
    an error (an existing dataset there is replaced) and removed otherwise, so `out` is never half-written."""
    if out.exists() and not _is_dataset_dir(out):
        raise ValueError(f"{out}: exists and is not {what}; choose a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _is_dataset_dir(path: Path) -> bool:
    """An empty folder, or one holding only what write_dataset writes (safe to replace)."""
    return path.is_dir() and {p.name for p in path.iterdir()} <= {"records.jsonl", "records.tsv", "images"}


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished dataset into place; an existing dataset there is replaced."""
    if dst.exists():
        stale = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.replace(dst, stale)
        os.replace(src, dst)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(src, dst)


def merge_datasets(inputs: list[str | os.PathLike], out_dir: str | os.PathLike) -> tuple[Path, int]:
    """Write one dataset holding every record of `inputs`, in order, with their images (hard-linked where the
    file system allows, else copied); returns (records file, records written). Record ids must be unique and an
    image path shared by two inputs must hold the same bytes. Built beside DIR and moved into place, like write_dataset."""
    srcs = [Path(p) / "records.jsonl" if Path(p).is_dir() else Path(p) for p in inputs]
    if len(srcs) < 2:
        raise ValueError("merge needs at least two datasets")
    out = Path(out_dir)
    ids: dict[str, Path] = {}
    images: dict[str, Path] = {}  # relative path -> the file placed there
    checked: set[Path] = set()  # files of later inputs already compared with the one placed at their path

    with _staged_dir(out, "a dataset") as tmp:
        def records() -> Iterator[Record]:
            for src in srcs:
                for rec in read_records(src):
                    if rec.id in ids:
                        raise ValueError(f"{src}: record id {rec.id!r} is also in {ids[rec.id]}")
                    ids[rec.id] = src
                    if rec.image is not None:
                        _place_image(src.parent / rec.image, tmp / rec.image, images, checked, rec.image)
                    yield rec

        n = write_records(tmp / "records.jsonl", records())
    return out / "records.jsonl", n


def _place_image(src: Path, dst: Path, images: dict[str, Path], checked: set[Path], rel: str) -> None:
    """Link (or copy) `src` to `dst` the first time `rel` is seen; a later input's file there must be the same picture."""
    first = images.get(rel)
    if first is None:
        images[rel] = src
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(src, dst)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(src, dst)
    elif first != src and src not in checked:
        if first.read_bytes() != src.read_bytes():
            raise ValueError(f"{src}: differs from {first}, which has the same path in an earlier dataset")
        checked.add(src)
