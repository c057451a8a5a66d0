"""Answer extraction from CONCLUSION text, with the normalisation used for exact-match scoring.

The kind of answer is inferred from the reference: an option letter, a number, yes/no, or a
short free-text answer. `is_correct(prediction, reference)` is what bench and train's eval use.
"""

from __future__ import annotations

import re
import string

CHOICE_LETTERS = "ABCDEFGHIJ"

_NUMBER_WORDS = {
    "zero": 0, "none": 0, "no": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10, "eleven": 11, "twelve": 12,
    "thirteen": 13, "fourteen": 14, "fifteen": 15, "sixteen": 16, "seventeen": 17,
    "eighteen": 18, "nineteen": 19, "twenty": 20,
}  # fmt: skip
_YES = {"yes", "true", "correct"}
_NO = {"no", "false", "incorrect"}
_ARTICLES = {"a", "an", "the"}

# "the answer is", "answer:", "final answer -", "option", "choice" ... then the value.
_MARKER = r"(?:(?:final\s+)?answer(?:\s+is)?|option|choice|correct\s+(?:answer|option)(?:\s+is)?)\s*[:\-=]?\s*"
_NUM = r"-?\d+(?:,\d{3})*(?:\.\d+)?"


def answer_kind(reference: str) -> str:
    """'choice', 'number', 'yesno' or 'text', judged from a reference answer."""
    ref = reference.strip()
    if len(ref) == 1 and ref.upper() in CHOICE_LETTERS and ref.isupper():
        return "choice"
    if re.fullmatch(_NUM, ref):
        return "number"
    if ref.lower().strip(".") in ("yes", "no"):
        return "yesno"
    return "text"


def _strip_markup(text: str) -> str:
    return re.sub(r"[*_`]+", "", text).strip()


def _normalise_number(s: str) -> str:
    value = float(s.replace(",", ""))
    return str(int(value)) if value == int(value) else repr(value)


def normalise_text(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces."""
    text = _strip_markup(text).lower()
    text = text.translate(str.maketrans({c: " " for c in string.punctuation}))
    words = [w for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def extract_choice(text: str, choices: dict[str, str] | None = None) -> str | None:
    t = _strip_markup(text)
    letters = "".join(choices) if choices else CHOICE_LETTERS
    # "B", "(B)", "B.", "[B]", "B)"
    m = re.fullmatch(rf"[\(\[]?([{letters}])[\)\]\.:]?", t.strip(" ."))
    if m:
        return m.group(1)
    # "Answer: B", "The answer is (B).", "Option C"; a lower-case letter only at the very end
    # ("the answer is b.") so that "the answer is a circle" is not read as option A.
    m = re.search(rf"(?i:{_MARKER})[\(\[]?([{letters}])(?!\w)", t) or re.search(
        rf"(?i:{_MARKER})[\(\[]?([{letters.lower()}])[\)\]\.]?\s*$", t
    )
    if m:
        return m.group(1).upper()
    # "B) red", "C. 4", "D: circle" at the start
    m = re.match(rf"\s*[\(\[]?([{letters}])[\)\]\.:]\s", t)
    if m:
        return m.group(1)
    # "(B)" anywhere
    m = re.search(rf"\(([{letters}])\)", t)
    if m:
        return m.group(1)
    # The option's text itself, e.g. "red" when B is "red".
    if choices:
        norm = normalise_text(t)
        hits = [k for k, v in choices.items() if v and normalise_text(v) == norm]
        if len(hits) == 1:
            return hits[0]
    return None


def extract_number(text: str) -> str | None:
    t = _strip_markup(text)
    m = re.search(rf"{_MARKER}({_NUM})", t, re.IGNORECASE)
    if m:
        return _normalise_number(m.group(1))
    nums = re.findall(rf"(?<![\w.]){_NUM}(?![\w])", t)
    if nums:
        return _normalise_number(nums[-1])  # the last number is the result in "5 - 2 = 3"
    words = re.findall(r"[a-z]+", t.lower())
    # "no" is a count only in "there are no X" or a short "no objects"; elsewhere it is a reply.
    no_is_zero = len(words) <= 3 or re.search(r"\b(?:are|is)\s+no\b", t.lower()) is not None
    for w in words:
        if w in _NUMBER_WORDS and (w != "no" or no_is_zero):
            return str(_NUMBER_WORDS[w])
    return None


def extract_yesno(text: str) -> str | None:
    for w in re.findall(r"[a-z]+", _strip_markup(text).lower()):
        if w in _YES:
            return "yes"
        if w in _NO:
            return "no"
    return None


def extract_text(text: str) -> str:
    t = _strip_markup(text)
    m = re.search(rf"{_MARKER}(.+)$", t, re.IGNORECASE | re.DOTALL)
    if m:
        t = m.group(1)
    return normalise_text(t)


def extract_answer(text: str, kind: str, choices: dict[str, str] | None = None) -> str | None:
    """The normalised answer of `kind` found in `text`, or None when there is none."""
    if kind == "choice":
        return extract_choice(text, choices)
    if kind == "number":
        return extract_number(text)
    if kind == "yesno":
        return extract_yesno(text)
    if kind == "text":
        return extract_text(text) or None
    raise ValueError(f"unknown answer kind {kind!r}")


def normalise_reference(reference: str, kind: str | None = None) -> str:
    kind = kind or answer_kind(reference)
    if kind == "choice":
        return reference.strip().upper()
    if kind == "number":
        return _normalise_number(reference.strip())
    if kind == "yesno":
        return reference.strip().lower().strip(".")
    return normalise_text(reference)


def is_correct(prediction: str | None, reference: str, choices: dict[str, str] | None = None) -> bool:
    """Exact match of the answer in `prediction` against `reference` after normalisation."""
    if not prediction:
        return False
    kind = answer_kind(reference)
    got = extract_answer(prediction, kind, choices)
    want = normalise_reference(reference, kind)
    if got is None:
        return False
    if kind == "text":
        # "The triangle is red." answers "red": accept the reference as the closing words.
        return got == want or got.endswith(" " + want)
    return got == want
