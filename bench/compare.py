"""Paired comparison of two accuracy reports on the same questions.

Two settings that score 0.79 and 0.81 on 500 questions may differ on 60 of them or on 10; what
tells a real gain from noise is how many questions the second setting fixes against how many it
breaks. McNemar's exact test asks how likely a split at least that lopsided is if neither setting
were better (a fair coin over the questions they disagree on).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .common import BenchError


def mcnemar_exact(fixed: int, broken: int) -> float:
    """Two-sided exact McNemar p-value: P(a split at least this uneven) over fixed + broken fair coin flips."""
    n, k = fixed + broken, min(fixed, broken)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def load_accuracy(spec: str) -> tuple[str, dict]:
    """(label, report) from `llavao1-bench accuracy --json` output, or from a sweep's results.json as
    PATH#CELL (e.g. 'sweep/results.json#gguf|F16|F16|stage:4'). The report must list every failure."""
    path, _, cell = spec.partition("#")
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise BenchError(f"{p}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BenchError(f"{p}: not a JSON report ({e})") from None
    label = p.stem
    if isinstance(doc, dict) and isinstance(doc.get("cells"), dict):  # a sweep's results.json
        if not cell:
            raise BenchError(f"{p}: a sweep's results; name a cell as {p}#CELL, one of: " + ", ".join(doc["cells"]))
        if cell not in doc["cells"]:
            raise BenchError(f"{p}: no cell {cell!r}; cells: " + ", ".join(doc["cells"]))
        doc, label = doc["cells"][cell], cell
    elif cell:
        raise BenchError(f"{p}: #{cell} names a sweep cell, but this is not a sweep's results.json")
    if not isinstance(doc, dict) or not isinstance(doc.get("n"), int) or not isinstance(doc.get("failures"), list):
        raise BenchError(f"{spec}: not an accuracy report (no n and failures; make one with llavao1-bench accuracy --json)")
    correct = doc.get("correct", round(doc.get("accuracy", 0) * doc["n"]))
    failures = doc["failures"]
    if not all(isinstance(f, dict) and isinstance(f.get("id"), str) for f in failures):
        raise BenchError(f"{spec}: every failure needs a question id")
    if len(failures) != doc["n"] - correct:
        raise BenchError(f"{spec}: lists {len(failures)} of its {doc['n'] - correct} failures (an older sweep kept "
                         "only the first 20); run it again to compare")
    if len({f["id"] for f in failures}) != len(failures):
        raise BenchError(f"{spec}: a question id appears twice among the failures")
    return label, doc


@dataclass
class Comparison:
    labels: tuple[str, str]
    n: int
    correct: tuple[int, int]
    fixed: list[dict]  # questions the second setting gets right and the first wrong
    broken: list[dict]  # the first right, the second wrong
    by_category: dict[str, dict]
    same_questions: bool | None  # None: a report carries no fingerprint of its questions (older reports)

    @property
    def p_value(self) -> float:
        return mcnemar_exact(len(self.fixed), len(self.broken))

    def to_json(self) -> dict:
        a, b = self.labels
        return {"a": a, "b": b, "n": self.n, "accuracy_a": self.correct[0] / self.n,
                "accuracy_b": self.correct[1] / self.n, "fixed": len(self.fixed), "broken": len(self.broken),
                "mcnemar_p": self.p_value, "same_questions_checked": self.same_questions is True,
                "by_category": self.by_category,
                "fixed_ids": [f["id"] for f in self.fixed], "broken_ids": [f["id"] for f in self.broken]}

    def table(self) -> str:
        a, b = self.labels
        diff = (self.correct[1] - self.correct[0]) / self.n
        lines = [f"A {a}: {self.correct[0] / self.n:.3f} ({self.correct[0]}/{self.n})",
                 f"B {b}: {self.correct[1] / self.n:.3f} ({self.correct[1]}/{self.n})",
                 f"B - A: {diff:+.3f}; B fixes {len(self.fixed)} questions and breaks {len(self.broken)}; "
                 f"McNemar exact p = {self.p_value:.3g}"]
        if self.same_questions is None:
            lines.append("  (a report has no question fingerprint: same n, same questions assumed)")
        if self.by_category:
            lines.append(f"  {'category':<20} {'n':>4} {'A':>6} {'B':>6} {'fixed':>6} {'broken':>7}")
        for cat, d in sorted(self.by_category.items()):
            lines.append(f"  {cat:<20} {d['n']:>4} {d['a']:>6.3f} {d['b']:>6.3f} {d['fixed']:>6} {d['broken']:>7}")
        return "\n".join(lines)


def _category_counts(report: dict) -> dict[str, dict]:
    """category -> {"n", "correct"}; empty for reports that keep only accuracies (sweeps before the counts)."""
    cats = report.get("by_category") or {}
    if not all(isinstance(d, dict) and isinstance(d.get("n"), int) and "correct" in d for d in cats.values()):
        return {}
    return cats


def compare_reports(a: tuple[str, dict], b: tuple[str, dict]) -> Comparison:
    """B against A, question by question. Both must come from the same questions."""
    (la, ra), (lb, rb) = a, b
    if ra["n"] != rb["n"]:
        raise BenchError(f"{la} has {ra['n']} questions and {lb} {rb['n']}: not the same question set")
    fa, fb = ra.get("questions_sha256"), rb.get("questions_sha256")
    if fa and fb and fa != fb:
        raise BenchError(f"{la} and {lb} were measured on different questions (questions_sha256 differs)")
    cats_a, cats_b = _category_counts(ra), _category_counts(rb)
    if cats_a and cats_b and {c: d["n"] for c, d in cats_a.items()} != {c: d["n"] for c, d in cats_b.items()}:
        raise BenchError(f"{la} and {lb} count different questions per category: not the same question set")
    wrong_a = {f["id"]: f for f in ra["failures"]}
    wrong_b = {f["id"]: f for f in rb["failures"]}
    fixed = [f for i, f in wrong_a.items() if i not in wrong_b]
    broken = [f for i, f in wrong_b.items() if i not in wrong_a]
    by_cat = {}
    for cat, d in (cats_a if cats_b else {}).items():
        by_cat[cat] = {"n": d["n"], "a": d["correct"] / d["n"], "b": cats_b[cat]["correct"] / d["n"],
                       "fixed": sum(f.get("category") == cat for f in fixed),
                       "broken": sum(f.get("category") == cat for f in broken)}
    return Comparison((la, lb), ra["n"], (ra["n"] - len(wrong_a), rb["n"] - len(wrong_b)), fixed, broken, by_cat,
                      (fa == fb) if fa and fb else None)
