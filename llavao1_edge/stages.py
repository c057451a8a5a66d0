"""The four-stage answer format: tags, rendering, batch and streaming parsing.

This module is the single source of truth for the stages. Everything else (data generator,
trainer, runtime, bench) imports the names and tags from here.

Parsing never raises on model output: a truncated stage, text outside the tags, missing,
repeated or reordered stages are all recorded on the result. The batch parser and the
streaming parser share one tokenizer state machine (`_TagScanner`) and one fold
(`_Assembler`), so they cannot disagree; `tests/test_stages.py` checks that with hypothesis.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Stage:
    name: str  # lower-case key used in results and JSON: "summary", ...
    tag: str  # the tag word as the model writes it: "SUMMARY"
    purpose: str  # one line, used in prompts for models not trained on the format

    @property
    def open_tag(self) -> str:
        return f"<{self.tag}>"

    @property
    def close_tag(self) -> str:
        return f"</{self.tag}>"


STAGES: tuple[Stage, ...] = (
    Stage("summary", "SUMMARY", "a short plan: what the question asks and the steps to answer it"),
    Stage("caption", "CAPTION", "the parts of the image that matter for the question"),
    Stage("reasoning", "REASONING", "step-by-step reasoning from the caption to the answer"),
    Stage("conclusion", "CONCLUSION", "the final answer only, in the form the question asks for"),
)
STAGE_NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
STAGE_BY_NAME: dict[str, Stage] = {s.name: s for s in STAGES}
STAGE_BY_TAG: dict[str, Stage] = {s.tag: s for s in STAGES}
STAGE_SEPARATOR = "\n\n"  # between rendered stages, as in LLaVA-CoT-100k


def render_stage(name: str, text: str) -> str:
    stage = STAGE_BY_NAME[name]
    return f"{stage.open_tag} {text.strip()} {stage.close_tag}"


def render_answer(stages: dict[str, str]) -> str:
    """Render stage texts (keyed by stage name, all four required) as one answer."""
    missing = [n for n in STAGE_NAMES if n not in stages]
    if missing:
        raise ValueError(f"render_answer: missing stages {missing}")
    unknown = sorted(set(stages) - set(STAGE_NAMES))
    if unknown:
        raise ValueError(f"render_answer: unknown stages {unknown}")
    return STAGE_SEPARATOR.join(render_stage(n, stages[n]) for n in STAGE_NAMES)


# --------------------------------------------------------------------------------------------
# Tokens: the scanner turns text into ("text", s), ("open", name), ("close", name).

_TAG_RE = re.compile(r"<(/?)(" + "|".join(s.tag for s in STAGES) + r")>", re.IGNORECASE)
_ALL_TAGS = tuple(
    t.lower() for s in STAGES for t in (s.open_tag, s.close_tag)
)  # for prefix checks
_MAX_TAG_LEN = max(len(t) for t in _ALL_TAGS)


def _could_start_tag(fragment: str) -> bool:
    """True when `fragment` (starting with '<') is a proper prefix of some tag."""
    low = fragment.lower()
    return any(t.startswith(low) and t != low for t in _ALL_TAGS)


class _TagScanner:
    """Incremental tokenizer: holds back only a suffix that could still become a tag."""

    def __init__(self) -> None:
        self._buf = ""

    def feed(self, chunk: str) -> list[tuple[str, str]]:
        self._buf += chunk
        out: list[tuple[str, str]] = []
        pos = 0
        for m in _TAG_RE.finditer(self._buf):
            if m.start() > pos:
                out.append(("text", self._buf[pos : m.start()]))
            kind = "close" if m.group(1) else "open"
            out.append((kind, STAGE_BY_TAG[m.group(2).upper()].name))
            pos = m.end()
        rest = self._buf[pos:]
        # Keep back the last '<...' if it may still grow into a tag; emit everything before it.
        hold = len(rest)
        lt = rest.rfind("<", max(0, len(rest) - _MAX_TAG_LEN))
        if lt != -1 and _could_start_tag(rest[lt:]):
            hold = lt
        if hold > 0:
            out.append(("text", rest[:hold]))
        self._buf = rest[hold:]
        return out

    def close(self) -> list[tuple[str, str]]:
        rest, self._buf = self._buf, ""
        return [("text", rest)] if rest else []


# --------------------------------------------------------------------------------------------
# Result of parsing a complete answer.


@dataclass
class Segment:
    stage: str
    text: str  # stripped of surrounding whitespace
    closed: bool  # False when the answer ended (or another stage opened) before the close tag


@dataclass
class ParsedAnswer:
    segments: list[Segment] = field(default_factory=list)
    leading_text: str = ""  # text before the first stage opened
    trailing_text: str = ""  # text after the last stage closed
    stray_text: list[str] = field(default_factory=list)  # text between stages
    stray_close_tags: list[str] = field(default_factory=list)  # close tags with no open stage

    @property
    def stages(self) -> dict[str, str]:
        """Text of each stage found (its first occurrence)."""
        out: dict[str, str] = {}
        for seg in self.segments:
            out.setdefault(seg.stage, seg.text)
        return out

    @property
    def found(self) -> list[str]:
        return list(dict.fromkeys(seg.stage for seg in self.segments))

    @property
    def missing(self) -> list[str]:
        return [n for n in STAGE_NAMES if n not in self.found]

    @property
    def repeated(self) -> list[str]:
        seen: set[str] = set()
        rep: list[str] = []
        for seg in self.segments:
            if seg.stage in seen and seg.stage not in rep:
                rep.append(seg.stage)
            seen.add(seg.stage)
        return rep

    @property
    def unclosed(self) -> list[str]:
        return [seg.stage for seg in self.segments if not seg.closed]

    @property
    def out_of_order(self) -> bool:
        order = [STAGE_NAMES.index(n) for n in self.found]
        return order != sorted(order)

    @property
    def empty(self) -> list[str]:
        return [seg.stage for seg in self.segments if not seg.text]

    @property
    def truncated(self) -> bool:
        """The answer ended inside a stage (its close tag never came)."""
        return bool(self.segments) and not self.segments[-1].closed

    @property
    def conclusion(self) -> str | None:
        return self.stages.get("conclusion")

    @property
    def issues(self) -> list[str]:
        """Human-readable list of everything that deviates from the clean format."""
        out = []
        if self.leading_text:
            out.append("text before the first stage")
        if self.trailing_text:
            out.append("text after the last stage")
        if self.stray_text:
            out.append("text between stages")
        out += [f"stray closing tag </{STAGE_BY_NAME[n].tag}>" for n in self.stray_close_tags]
        out += [f"missing stage {n}" for n in self.missing]
        out += [f"repeated stage {n}" for n in self.repeated]
        out += [f"unclosed stage {n}" for n in self.unclosed]
        out += [f"empty stage {n}" for n in self.empty]
        if self.out_of_order:
            out.append("stages out of order")
        return out

    @property
    def well_formed(self) -> bool:
        return not self.issues

    def to_dict(self) -> dict:
        return {
            "stages": self.stages,
            "segments": [vars(s).copy() for s in self.segments],
            "leading_text": self.leading_text,
            "trailing_text": self.trailing_text,
            "stray_text": list(self.stray_text),
            "issues": self.issues,
        }


class _Assembler:
    """Folds scanner tokens into a ParsedAnswer (shared by batch and streaming parsing)."""

    def __init__(self) -> None:
        self.result = ParsedAnswer()
        self._open: str | None = None
        self._text: list[str] = []  # text of the open stage, or outside text since last stage
        self._seen_stage = False

    def token(self, kind: str, value: str) -> None:
        if kind == "text":
            self._text.append(value)
        elif kind == "open":
            if self._open:  # the previous stage never closed
                self._finish(closed=False)
            else:
                self._flush_outside()
            self._open = value
        elif kind == "close":
            if self._open == value:
                self._finish(closed=True)
            else:
                # A close tag for a stage that is not open: record it, keep the text flowing.
                self.result.stray_close_tags.append(value)

    def _finish(self, closed: bool) -> None:
        assert self._open is not None
        self.result.segments.append(Segment(self._open, "".join(self._text).strip(), closed))
        self._open, self._text, self._seen_stage = None, [], True

    def _flush_outside(self) -> None:
        text = "".join(self._text).strip()
        self._text = []
        if not text:
            return
        if not self._seen_stage:
            self.result.leading_text = text
        else:
            self.result.stray_text.append(text)

    def finish(self) -> ParsedAnswer:
        if self._open:
            self._finish(closed=False)
        else:
            text = "".join(self._text).strip()
            self._text = []
            if text and not self._seen_stage:
                self.result.leading_text = text
            elif text:
                self.result.trailing_text = text
        return self.result


def parse_answer(text: str) -> ParsedAnswer:
    """Parse a complete model answer into stages; never raises on malformed output."""
    scanner, asm = _TagScanner(), _Assembler()
    for tok in scanner.feed(text) + scanner.close():
        asm.token(*tok)
    return asm.finish()


# --------------------------------------------------------------------------------------------
# Streaming.


@dataclass(frozen=True)
class StageEvent:
    kind: str  # "open" | "text" | "close"
    stage: str | None  # the stage the event belongs to (None for text outside stages)
    text: str = ""  # for "text"


class StageStreamParser:
    """Feed chunks of any size; get StageEvents. Tags split across chunks are handled.

    `result()` after `close()` equals `parse_answer(full_text)` for any chunking.
    """

    def __init__(self) -> None:
        self._scanner = _TagScanner()
        self._asm = _Assembler()
        self._open: str | None = None
        self._closed = False

    def feed(self, chunk: str) -> list[StageEvent]:
        if self._closed:
            raise RuntimeError("StageStreamParser.feed after close()")
        return self._events(self._scanner.feed(chunk))

    def close(self) -> list[StageEvent]:
        events = self._events(self._scanner.close())
        self._closed = True
        return events

    @property
    def current_stage(self) -> str | None:
        return self._open

    def result(self) -> ParsedAnswer:
        if not self._closed:
            raise RuntimeError("StageStreamParser.result before close()")
        return self._asm.finish()

    def _events(self, tokens: Iterable[tuple[str, str]]) -> list[StageEvent]:
        events: list[StageEvent] = []
        for kind, value in tokens:
            self._asm.token(kind, value)
            if kind == "text":
                events.append(StageEvent("text", self._open, value))
            elif kind == "open":
                if self._open:  # an unclosed stage ends when the next one opens
                    events.append(StageEvent("close", self._open))
                self._open = value
                events.append(StageEvent("open", value))
            elif kind == "close" and self._open == value:
                events.append(StageEvent("close", value))
                self._open = None
        return events


def stream_stages(chunks: Iterable[str]) -> Iterator[StageEvent]:
    parser = StageStreamParser()
    for chunk in chunks:
        yield from parser.feed(chunk)
    yield from parser.close()
