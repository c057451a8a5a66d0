"""Can the model copy each option's text into its option walk? The probability of option A's first
token right after "Checking the options:\\nA.", by what option A is: a colour, a number, another word.

The walk of `llavao1-data shapes --mc-step check` ("A. yellow is not purple", line by line until the
match) must copy every option's text from the question; a misquoted line names the wrong letter
(accuracy's `option_steps`). Two sources: text-only option drills (records of kind "option", the
training format, teacher-forced) and the model's own greedy answers to multiple-choice questions
with their images, cut where the walk starts. On the drills every line of the walk is probed too
("\nB." -> option B's first token, teacher-forced): a model can learn to copy option A and still write
the answer value on line B.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from llavao1_edge.engine import Engine
from llavao1_edge.prompting import render_user_turn, user_text
from llavao1_edge.records import read_records
from llavao1_edge.search import SearchConfig, run_search
from llavao1_train.shapes.questions import MC_STEP_OPENINGS
from llavao1_train.shapes.scene import COLORS

WALK_START = MC_STEP_OPENINGS["check"].strip() + "\nA."  # where option A's text is copied
_OPTION = re.compile(r"^([A-Z])\. (.+)$", re.MULTILINE)  # the options as mc_prompt lists them
_LINE = re.compile(r"\n([A-Z])\.")  # where each line of a walk copies its option's text


def option_kind(text: str) -> str:
    return "colour" if text in COLORS else "number" if text.isdigit() else "word"


@dataclass
class OptionCopyReport:
    probs: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # source -> kind -> P(option A)
    lines: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # drills: kind -> letter -> P(its option)
    no_walk: int = 0  # answers to multiple-choice questions without a "check" walk

    def summary(self) -> dict[str, dict[str, dict]]:
        return {src: {kind: {"n": len(p), "median": statistics.median(p), "mean": sum(p) / len(p),
                             "below_half": sum(x < 0.5 for x in p)} for kind, p in sorted(kinds.items())}
                for src, kinds in sorted(self.probs.items())}

    def line_summary(self) -> dict[str, dict[str, dict]]:
        return {kind: {letter: {"n": len(p), "median": statistics.median(p), "below_half": sum(x < 0.5 for x in p)}
                       for letter, p in sorted(letters.items())} for kind, letters in sorted(self.lines.items())}

    def to_json(self) -> dict:
        return {"summary": self.summary(), "lines": self.line_summary(), "no_walk": self.no_walk,
                "probs": self.probs}

    def table(self) -> str:
        lines = [f"P(option A's first token) after {WALK_START!r}:"]
        for src, kinds in self.summary().items():
            for kind, s in kinds.items():
                lines.append(f"  {src:<8} {kind:<7} {s['n']:>5} walks: median {s['median']:.2f}, mean {s['mean']:.2f}, "
                             f"below 0.5 in {s['below_half']}")
        for kind, letters in self.line_summary().items():
            lines.append(f"  drills   {kind:<7} by walk line: " + ", ".join(
                f"{k} {v['median']:.2f} (n {v['n']})" for k, v in letters.items()) + " (median P of the line's option)")
        if self.no_walk:
            lines.append(f"  {self.no_walk} multiple-choice answers had no option walk")
        return "\n".join(lines)


def measure_option_copy(engine: Engine, records: str | Path, limit: int = 200) -> OptionCopyReport:
    """Up to `limit` records of each source (drills, answers) from a shapes records.jsonl."""
    report = OptionCopyReport(defaultdict(lambda: defaultdict(list)), defaultdict(lambda: defaultdict(list)))
    taken: dict[str, int] = defaultdict(int)
    folder = Path(records).parent
    for rec in read_records(records):
        if min(taken["drills"], taken["answers"]) >= limit:
            break
        choices = dict(_OPTION.findall(rec.question))
        source = {"option": "drills", "cot": "answers"}.get(rec.meta.get("kind", "cot"))
        if "A" not in choices or source is None or taken[source] >= limit:
            continue
        image = folder / rec.image if rec.image else None
        if source == "answers":
            if image is None:
                continue
            text = run_search(engine, image, rec.question, SearchConfig(strategy="greedy")).text
            if WALK_START not in text:
                report.no_walk += 1
                continue
            prefix = text[:text.index(WALK_START) + len(WALK_START)]
            cuts = [(prefix, "A")]
        else:  # a drill's reply is the walk itself: each line, teacher-forced up to "X."
            image = None
            cuts = [(rec.answer[:m.end()], m.group(1)) for m in _LINE.finditer(rec.answer) if m.group(1) in choices]
        taken[source] += 1
        marker = engine.marker if image is not None else None
        prompt = engine.prepare(render_user_turn(engine.chat_template, user_text(rec.question, marker, False)), image)
        try:
            state, _ = engine.eval_prompt(prompt)
        finally:
            engine.free_prompt(prompt)
        for prefix, letter in cuts:
            logits = engine.decode_tokens(0, engine.tokenize(prefix), state.pos).astype(np.float64)
            engine.drop(0, state.pos)  # back to the question alone for the next line
            logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            p = float(np.exp(logp[engine.tokenize(" " + choices[letter])[0]]))
            if letter == "A":
                report.probs[source][option_kind(choices["A"])].append(p)
            if source == "drills":
                report.lines[option_kind(choices[letter])][letter].append(p)
        engine.forget_seq0()  # sequence 0 holds this question
    report.probs = {src: dict(kinds) for src, kinds in report.probs.items()}
    report.lines = {kind: dict(letters) for kind, letters in report.lines.items()}
    return report
