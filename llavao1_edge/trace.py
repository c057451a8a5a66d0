"""What a search records and reports: its events, candidates, judgements, steps and result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .options import SearchConfig
from .stages import STAGES, ParsedAnswer

EVENT_KINDS = ("prompt_ready", "stage_started", "forced", "token", "candidate_finished", "judge_decision",
               "stage_chosen", "done")


@dataclass
class Event:
    kind: str  # one of EVENT_KINDS
    stage: str | None = None
    candidate: int | None = None
    text: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class Candidate:
    index: int
    text: str  # what the model generated (the forced opening tag excluded)
    tokens: list[int]
    logprob_sum: float
    finish: str  # closed | eos | budget | kv_full | sentence | verdict
    unit_text: str = ""  # the stage's text inside its tags (or the whole answer / sentence)
    check: bool | None = None  # reasoning correctness verdict, when checked

    @property
    def mean_logprob(self) -> float:
        return self.logprob_sum / max(1, len(self.tokens))

    def to_json(self) -> dict:
        d = asdict(self)
        d["mean_logprob"] = self.mean_logprob
        return d


@dataclass
class Judgement:
    first: int
    second: int
    winner: int
    verdict: str
    parsed: bool  # False: the verdict named neither response; the second won by the paper's rule


@dataclass
class StepRecord:
    """One selection: a stage (stage search), an answer (best-of-n) or a sentence."""

    unit: str
    candidates: list[Candidate]
    chosen: int
    judgements: list[Judgement] = field(default_factory=list)
    forced: str = ""  # text the runtime inserted before the candidates (separator + opening tag)
    decode_s: float = 0.0
    judge_s: float = 0.0

    def to_json(self) -> dict:
        return {"unit": self.unit, "chosen": self.chosen, "forced": self.forced, "decode_s": self.decode_s,
                "judge_s": self.judge_s, "candidates": [c.to_json() for c in self.candidates],
                "judgements": [asdict(j) for j in self.judgements]}


@dataclass
class SearchResult:
    question: str
    config: SearchConfig
    text: str  # the full chosen answer
    parsed: ParsedAnswer
    steps: list[StepRecord]
    tokens: dict[str, int]
    timings: dict[str, float]
    flags: list[str]

    @property
    def stages(self) -> dict[str, str]:
        return {s.name: self.parsed.stages.get(s.name, "") for s in STAGES}

    @property
    def answer(self) -> str | None:
        return self.parsed.conclusion

    def to_json(self) -> dict:
        return {
            "question": self.question, "answer": self.answer, "stages": self.stages, "text": self.text,
            "config": asdict(self.config), "flags": self.flags, "issues": self.parsed.issues,
            "tokens": self.tokens, "timings": self.timings, "steps": [s.to_json() for s in self.steps],
        }
