"""Exact-match accuracy of the CONCLUSION, overall and per category, with a 95% interval."""

from __future__ import annotations

import hashlib
import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

from llavao1_data.shapes.questions import caption_check, option_walk_check, reasoning_check
from llavao1_edge.answers import is_correct
from llavao1_edge.stages import parse_answer

from .common import BenchItem, wilson_interval


@dataclass
class Answer:
    text: str  # the model's whole answer
    seconds: float
    timings: dict = field(default_factory=dict)


def extract_prediction(text: str) -> str:
    """CONCLUSION text when the answer has one, else the whole answer (direct-answer models)."""
    parsed = parse_answer(text)
    return parsed.conclusion if parsed.conclusion is not None else text.strip()


@dataclass
class AccuracyReport:
    n: int
    correct: int
    by_category: dict[str, dict]
    failures: list[dict]
    seconds: float
    mean_answer_s: float
    judge_picks: dict[str, int] = field(default_factory=dict)  # which of two responses the judge chose: position bias
    captions: dict[str, int] = field(default_factory=dict)  # caption vs scene graph, for shapes questions
    captions_by_objects: dict[int, list[int]] = field(default_factory=dict)  # objects in scene -> [every object right, n]
    by_form: dict[str, list[int]] = field(default_factory=dict)  # "mc" (options A-D) / "open" -> [correct, n]
    flags: dict[str, int] = field(default_factory=dict)  # runtime flag (numbers as N) -> questions that raised it
    reasoning_checks: dict[str, int] = field(default_factory=dict)  # the judge's check of REASONING candidates
    questions_sha256: str = ""  # which questions, in order: `llavao1-bench compare` pairs only reports that match
    caption_search: dict[str, int] = field(default_factory=dict)  # CAPTION candidates vs the scene: does the judge see?
    option_steps: dict[str, int] = field(default_factory=dict)  # multiple-choice option walks vs the question's options

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    def to_json(self) -> dict:
        lo, hi = wilson_interval(self.correct, self.n)
        return {"accuracy": self.accuracy, "ci95": [lo, hi], "n": self.n, "correct": self.correct,
                "by_category": self.by_category, "failures": self.failures, "seconds": self.seconds,
                "mean_answer_s": self.mean_answer_s, "judge_picks": self.judge_picks, "captions": self.captions,
                "captions_by_objects": {str(k): v for k, v in sorted(self.captions_by_objects.items())},
                "by_form": self.by_form, "flags": self.flags, "reasoning_checks": self.reasoning_checks,
                "questions_sha256": self.questions_sha256, "caption_search": self.caption_search,
                "option_steps": self.option_steps}

    def table(self, max_failures: int = 10) -> str:
        lo, hi = wilson_interval(self.correct, self.n)
        lines = [f"accuracy {self.accuracy:.3f} ({self.correct}/{self.n}), 95% CI [{lo:.3f}, {hi:.3f}], "
                 f"{self.mean_answer_s:.2f} s per question"]
        pairs = sum(self.judge_picks.values())
        if pairs:
            lines.append(f"  judge chose the first of two responses in {self.judge_picks['first']}/{pairs} pairs "
                         f"({self.judge_picks['first'] / pairs:.0%}; an unbiased judge: about 50%)")
        cs = self.caption_search
        if cs.get("steps"):  # the search can only help where some candidate is right and the selector finds it
            lines.append(f"  caption candidates: every object right in {cs['candidates_right']}/{cs['candidates']}; "
                         f"a right one among them in {cs['any_right']}/{cs['steps']} questions, chosen in "
                         f"{cs['chosen_right']}/{cs['steps']}")
            if cs["decisive_pairs"]:
                lines.append(f"  caption judge: chose the right caption in {cs['judge_right']}/{cs['decisive_pairs']} "
                             "pairs where one of the two was right (a coin: 50%)")
        checked = sum(self.reasoning_checks.values())
        if checked:  # a check that passes everything costs time and filters nothing
            lines.append(f"  reasoning check: {self.reasoning_checks.get('incorrect', 0)}/{checked} candidates judged "
                         "incorrect")
        o = self.option_steps
        if o.get("walks"):  # a walk that writes the answer value where an option's text belongs names the wrong letter
            lines.append(f"  option step: misquotes an option in {o['misquoted']}/{o['walks']} multiple-choice answers; "
                         f"{o['lost_by_misquote']} wrong answers had settled on the right value")
        if len(self.by_form) > 1:  # a model that reasons right but cannot name the letter shows here
            lines.append("  by form: " + ", ".join(f"{k} {r / n:.3f} ({r}/{n})" for k, (r, n) in sorted(self.by_form.items())))
        c = self.captions
        if c.get("checked"):
            lines.append(f"  captions: object count right in {c['count_right']}/{c['checked']}, every object right in "
                         f"{c['objects_right']}/{c['checked']}; {c['objects_wrong']}/{c['objects']} objects missing "
                         "or described wrong")
            if "left_out" in c:
                lines.append(f"  caption errors: {c['left_out']} objects left out, {c['made_up']} made up; of the "
                             f"objects paired with the scene, {c['wrong_size']} wrong size, {c['wrong_color']} "
                             f"wrong colour, {c['wrong_shape']} wrong shape")
            if c.get("reasoning_objects"):  # the reasoning should list the caption's objects, not look again
                lines.append(f"  reasoning: {c['reasoning_from_caption']}/{c['reasoning_objects']} of the objects it "
                             "names (with their place) are named so in the caption")
            lines.append("  every object right, by objects in the scene: " + ", ".join(
                f"{k}: {r}/{n}" for k, (r, n) in sorted(self.captions_by_objects.items())))
        for flag, n in sorted(self.flags.items(), key=lambda kv: -kv[1]):
            lines.append(f"  flag in {n}/{self.n} answers: {flag}")
        for cat, d in sorted(self.by_category.items()):
            lines.append(f"  {cat:<20} {d['accuracy']:.3f} ({d['correct']}/{d['n']}) CI [{d['ci95'][0]:.2f}, {d['ci95'][1]:.2f}]")
        if self.failures:
            lines.append(f"failures ({len(self.failures)}, first {min(max_failures, len(self.failures))}):")
            for f in self.failures[:max_failures]:
                q = f["question"].splitlines()[0][:70]
                lines.append(f"  [{f['id']}] {q} | expected {f['expected']!r} got {f['got']!r}")
        return "\n".join(lines)


def run_accuracy(items: list[BenchItem], answer: Callable[[BenchItem], Answer], progress: bool | None = None) -> AccuracyReport:
    from tqdm import tqdm

    t0 = time.perf_counter()
    cats: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    failures, correct, spent = [], 0, 0.0
    picks = {"first": 0, "second": 0}
    checks: dict[str, int] = defaultdict(int)
    captions: dict[str, int] = defaultdict(int)
    by_objects: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    by_form: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    flags: dict[str, int] = defaultdict(int)
    caption_search: dict[str, int] = defaultdict(int)
    option_steps: dict[str, int] = defaultdict(int)
    for item in tqdm(items, desc="accuracy", unit="q", disable=None if progress is None else not progress):
        ans = answer(item)
        spent += ans.seconds
        for k, v in ans.timings.get("judge_picks", {}).items():
            picks[k] += v
        for k, v in ans.timings.get("reasoning_checks", {}).items():
            checks[k] += v
        for flag in {re.sub(r"\d+", "N", f) for f in ans.timings.get("flags", [])}:
            flags[flag] += 1
        for step in ans.timings.get("caption_steps", []) if item.scene else []:
            _score_caption_step(step, item.scene, caption_search)
        got = extract_prediction(ans.text)
        stages = parse_answer(ans.text).stages if item.scene else {}
        caption = stages.get("caption")
        if caption is not None:
            captions["checked"] += 1
            check = caption_check(caption, item.scene)
            check |= reasoning_check(stages.get("reasoning") or "", caption)
            for k, v in check.items():
                captions[k] += v
            by_objects[check["objects"]][0] += check["objects_right"]
            by_objects[check["objects"]][1] += 1
        ok = is_correct(got, item.reference, item.choices)
        walk = option_walk_check(stages.get("reasoning") or "", item.choices) if stages and item.choices else None
        if walk and walk["lines"]:
            option_steps["walks"] += 1
            option_steps["misquoted"] += walk["misquoted"] > 0
            option_steps["lost_by_misquote"] += not ok and walk["misquoted"] > 0 and walk["letter"] == item.reference
        correct += ok
        cats[item.category][0] += ok
        cats[item.category][1] += 1
        form = by_form["mc" if item.choices else "open"]
        form[0] += ok
        form[1] += 1
        if not ok:
            failures.append({"id": item.id, "category": item.category, "question": item.question,
                             "expected": item.reference, "got": got})
    by_cat = {c: {"accuracy": k / n, "correct": k, "n": n, "ci95": list(wilson_interval(k, n))}
              for c, (k, n) in cats.items()}
    return AccuracyReport(len(items), correct, by_cat, failures, time.perf_counter() - t0,
                          spent / max(1, len(items)), picks, dict(captions), dict(by_objects),
                          dict(by_form), dict(flags), dict(checks), questions_fingerprint(items), dict(caption_search),
                          dict(option_steps))


def _score_caption_step(step: dict, scene: list[dict], counts: dict[str, int]) -> None:
    """One CAPTION selection against the scene: candidates with every object right, whether the chosen one is,
    and each judged pair where exactly one caption is right: did the judge keep that one?"""
    right = [bool(caption_check(text, scene)["objects_right"]) for text in step["candidates"]]
    counts["steps"] += 1
    counts["candidates"] += len(right)
    counts["candidates_right"] += sum(right)
    counts["any_right"] += any(right)
    counts["chosen_right"] += right[step["chosen"]]
    counts["decisive_pairs"] += 0  # present, if zero, in every report that scored a selection
    counts["judge_right"] += 0
    for first, second, winner in step["judgements"]:
        if right[first] != right[second]:
            counts["decisive_pairs"] += 1
            counts["judge_right"] += right[winner]


def questions_fingerprint(items: list[BenchItem]) -> str:
    """sha256 over the questions' ids and references, in order."""
    h = hashlib.sha256()
    for it in items:
        h.update(f"{it.id}\t{it.reference}\n".encode())
    return h.hexdigest()
