"""Judge prompts and verdict forms for stage-level search: defined once, used twice.

The runtime asks the model these exact prompts, and the shapes data generator imports them to
build judge training examples, so a small model is trained on exactly what it will be asked.
"""

from __future__ import annotations

import re

from .stages import STAGE_BY_NAME, STAGE_NAMES

# What makes one candidate better than another, per stage ("answer" is best-of-N's whole answer).
JUDGE_CRITERIA: dict[str, str] = {
    "summary": "outlines a correct plan for answering the question without doing the reasoning yet",
    "caption": "describes the objects in the image that matter for the question, accurately and completely",
    "reasoning": "reasons step by step from the caption to the answer with no wrong or skipped step",
    "conclusion": "states the answer that follows from the caption and reasoning, in the form the question asks for",
    "answer": "answers the question correctly, with accurate observations and sound reasoning",
}
JUDGED_UNITS = (*STAGE_NAMES, "answer")

_PAIR_TEMPLATE = (
    "Act as a judge. Two responses are given for the {unit} of an answer to the question below. "
    "Choose the response that {criterion}.\n"
    "Question: {question}\n"
    "{context}"
    "Response 1: {first}\n"
    "Response 2: {second}\n"
    "Reply in the form: Since [reason], I choose response [1 or 2]."
)
_CHECK_TEMPLATE = (
    "Act as a judge. Check whether the reasoning below is correct, given the question and the "
    "description of the image.\n"
    "Question: {question}\n"
    "Description: {caption}\n"
    "Reasoning: {reasoning}\n"
    "Reply in the form: [reason]. Verdict: correct or Verdict: incorrect."
)

_VERDICT_RE = re.compile(r"I choose response\s*\[?([12])\]?", re.IGNORECASE)
_CHECK_RE = re.compile(r"verdict:\s*(correct|incorrect)", re.IGNORECASE)


def _unit_name(unit: str) -> str:
    if unit not in JUDGE_CRITERIA:
        raise ValueError(f"unknown judged unit {unit!r}; expected one of {JUDGED_UNITS}")
    return "whole answer" if unit == "answer" else f"{STAGE_BY_NAME[unit].tag} stage"


def render_context(context: dict[str, str]) -> str:
    """Earlier chosen stages, one line each, for the judge to see what came before."""
    return "".join(f"{STAGE_BY_NAME[n].tag.capitalize()}: {context[n]}\n" for n in STAGE_NAMES if n in context)


def pairwise_prompt(unit: str, question: str, first: str, second: str,
                    context: dict[str, str] | None = None) -> str:
    """The prompt asking which of two candidates for `unit` (a stage, or "answer") is better."""
    return _PAIR_TEMPLATE.format(
        unit=_unit_name(unit), criterion=JUDGE_CRITERIA[unit], question=question.strip(),
        context=render_context(context or {}), first=first.strip(), second=second.strip(),
    )


def pairwise_verdict(reason: str, choice: int) -> str:
    """The target text for a pairwise judgement, in the form the prompt asks for."""
    if choice not in (1, 2):
        raise ValueError("choice must be 1 or 2")
    return f"Since {reason.strip().rstrip('.')}, I choose response {choice}."


def parse_pairwise_verdict(text: str) -> int | None:
    """1 or 2 from a verdict; None when the text names neither (callers decide the default)."""
    matches = _VERDICT_RE.findall(text)
    return int(matches[-1]) if matches else None


def verdict_complete(text: str) -> bool:
    """Whether a verdict has named its choice (pairwise) or its verdict (check): decoding can stop."""
    return bool(_VERDICT_RE.search(text) or _CHECK_RE.search(text))


def reasoning_check_prompt(question: str, caption: str, reasoning: str) -> str:
    """The text-only correctness check run on each REASONING candidate before the knockout."""
    return _CHECK_TEMPLATE.format(question=question.strip(), caption=caption.strip(),
                                  reasoning=reasoning.strip())


def reasoning_check_verdict(reason: str, correct: bool) -> str:
    return f"{reason.strip().rstrip('.')}. Verdict: {'correct' if correct else 'incorrect'}."


def parse_reasoning_check(text: str) -> bool | None:
    """True for 'correct', False for 'incorrect', None when no verdict is found."""
    matches = _CHECK_RE.findall(text)
    return matches[-1].lower() == "correct" if matches else None
