"""What a search decodes: a candidate's live state, its random stream, and the rule that ends it."""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

from .engine import SeqState
from .judge import verdict_complete
from .stages import StageStreamParser
from .trace import Candidate

_SENTENCE_END = re.compile(r"[.!?](?:\s|$)|\n")


def candidate_rng(seed: int, seed_path: tuple, k: int) -> np.random.Generator:
    """Candidate k's random stream at one step of a search (seed_path: e.g. ("stage", 0)): its own,
    so a candidate's draws do not depend on how many others there are or when they diverge."""
    return np.random.default_rng([seed, zlib.crc32(repr(seed_path).encode()), k])


@dataclass
class TextState:
    """The streaming text of a candidate: shared by candidates in lockstep (same tokens so far)."""

    parser: StageStreamParser
    decoder: object  # incremental UTF-8 decoder


@dataclass
class Live:
    """A candidate being generated."""

    cand: Candidate
    state: SeqState
    rng: np.random.Generator | None
    text: TextState
    done: bool = False


class Stop:
    """When a generation ends (besides its end token and budget), and how it is counted. The base rule: a
    whole answer, which ends only at the end token or the budget."""

    judge = False  # a verdict: counted as the judge's tokens, never streamed, never the first token
    read_last = False  # the finishing token is read, not decoded: nothing continues from it

    def finish(self, text: str, piece: str, closed: bool) -> str | None:
        """The reason to stop after `piece` (text: all so far; closed: a stage's closing tag was read)."""
        return None


class StageStop(Stop):
    """A stage ends at its closing tag (also one with no opening tag before it)."""

    def __init__(self, close_tag: str):
        self.close_tag = close_tag.lower()

    def finish(self, text, piece, closed):
        if closed or self.close_tag in text[-(len(piece) + len(self.close_tag)):].lower():
            return "closed"
        return None


class SentenceStop(Stop):
    def finish(self, text, piece, closed):
        return "sentence" if (closed or _SENTENCE_END.search(piece)) and text.strip() else None


class VerdictStop(Stop):
    judge = True
    read_last = True

    def finish(self, text, piece, closed):
        return "verdict" if verdict_complete(text) else None


ANSWER, SENTENCE, VERDICT = Stop(), SentenceStop(), VerdictStop()
