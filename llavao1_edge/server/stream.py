"""The chosen answer's text, as it grows, split the way chat clients show a reasoning model's answer: the
SUMMARY, CAPTION and REASONING stages (with their tags) as reasoning, the CONCLUSION (without its tags,
trimmed) as the content. A tag split across two pieces is held back until it is whole, so no client ever
sees half a tag; the two streams joined equal what the non-streamed answer holds."""

from __future__ import annotations

from ..stages import STAGE_BY_NAME
from ..trace import Event

OPEN, CLOSE = STAGE_BY_NAME["conclusion"].open_tag, STAGE_BY_NAME["conclusion"].close_tag


def _partial_tail(text: str, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class AnswerSplitter:
    """Feed pieces of the answer; get (reasoning, content) deltas back."""

    def __init__(self):
        self.text = ""
        self.reasoning_sent = 0  # characters of text sent as reasoning
        self.content = ""  # the conclusion so far (untrimmed)
        self.content_sent = ""  # what was sent as content

    def feed(self, piece: str, final: bool = False) -> tuple[str, str]:
        self.text += piece
        start = self.text.find(OPEN)
        if start < 0:  # still reasoning; hold back what may start the conclusion's tag, and trailing space
            end = len(self.text) - (0 if final else _partial_tail(self.text, OPEN))
            end = len(self.text[:end].rstrip())
            reasoning = self.text[self.reasoning_sent:end] if end > self.reasoning_sent else ""
            self.reasoning_sent += len(reasoning)
            return reasoning, ""
        reasoning = self.text[self.reasoning_sent:start].rstrip() if self.reasoning_sent < start else ""
        self.reasoning_sent = max(self.reasoning_sent, start)
        body = self.text[start + len(OPEN):]
        end = body.find(CLOSE)
        if end >= 0:
            body = body[:end]
        elif not final:
            body = body[:len(body) - _partial_tail(body, CLOSE)]
        done = end >= 0 or final
        shown = body.strip() if done else body.lstrip()
        if not done:  # trailing spaces wait: the content must end trimmed
            shown = shown.rstrip()
        delta = shown[len(self.content_sent):] if shown.startswith(self.content_sent) else ""
        self.content_sent += delta
        return reasoning, delta


def answer_parts(text: str) -> tuple[str, str]:
    """(reasoning, content) of a whole answer, as the streamed deltas add up to."""
    s = AnswerSplitter()
    reasoning, content = s.feed(text, final=True)
    return reasoning.rstrip(), content


def answer_pieces(ev: Event, streams_tokens: bool) -> str:
    """The text an event adds to the chosen answer: inserted tags, and either every token (one candidate:
    greedy) or each chosen stage (a search decides a stage only when its candidates are done)."""
    if ev.kind == "forced":
        return ev.text
    if streams_tokens and ev.kind == "token" and ev.stage != "trailer":
        return ev.text
    if not streams_tokens and ev.kind == "stage_chosen":
        return ev.text
    return ""
