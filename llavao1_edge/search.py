"""Inference-time search over the four stages: greedy, stage-level beam search, best-of-N, sentence.

All strategies share one generation loop (`_generate`): the sequences of a step decode together
in one llama.cpp batch, each forked from the shared prefix (prompt + image + chosen stages), so
nothing re-evaluates the image. Judge prompts fork the chat header and image from sequence 0
and are evaluated together too; greedy verdicts decode several tokens a step where earlier verdicts
predict them (`VerdictDrafts`). The search is a generator of `Event`s; `run_search` drains it.

Selectors: "judge" (the paper: a random pairwise knockout judged by the same model, with the
text-only correctness check first at the reasoning stage), "logprob" (mean token
log-probability) and "vote" (majority over conclusions; earlier stages by logprob).
"""

from __future__ import annotations

import copy
import random
import re
import threading
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np

from .answers import normalise_text
from .engine import Engine, Prompt, RGBImage, SeqState
from .images import ImageSource
from .judge import (
    pairwise_prompt,
    parse_pairwise_verdict,
    parse_reasoning_check,
    reasoning_check_prompt,
)
from .prompting import render_user_turn, user_text
from .sampling import TokenDistribution
from .stages import STAGE_BY_NAME, STAGES, ParsedAnswer, StageStreamParser, parse_answer

STRATEGIES = ("greedy", "stage", "best-of-n", "sentence")
SELECTORS = ("judge", "logprob", "vote")
_VERDICT_DONE = re.compile(r"I choose response\s*\[?[12]|verdict:\s*(?:in)?correct", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?](?:\s|$)|\n")


@dataclass
class SearchConfig:
    strategy: str = "stage"  # greedy | stage | best-of-n | sentence
    candidates: int = 4  # N: samples per stage (stage), answers (best-of-n), sentences (sentence)
    # logprob by default: on the shipped model the paper's judge picks below greedy, logprob above (README Results)
    selector: str = "logprob"  # judge | logprob | vote
    temperature: float = 0.6  # candidate sampling (the paper's setting)
    top_p: float = 0.9
    greedy_candidate: bool = False  # candidate 0 decodes greedily: the selector can always keep greedy's text
    judge_temperature: float = 0.0  # verdicts decoded greedily: deterministic, and best for small judges
    max_stage_tokens: int = 512  # budget per stage (stage, sentence)
    max_answer_tokens: int = 2048  # budget for a whole answer (greedy, best-of-n)
    max_judge_tokens: int = 64  # a verdict is one sentence
    draft_verdicts: bool = True  # greedy verdicts decode tokens drafted from earlier verdicts, verified: same verdicts
    judge_both_orders: bool = False  # ask each pair twice, swapped; a split verdict goes to the higher mean logprob
    reasoning_check: bool = True  # the paper's correctness check before the reasoning knockout
    seed: int = 0
    force_format: bool | None = None  # force stage tags; None: only when the GGUF lacks our stage metadata
    timeout_s: float | None = None  # wall-clock limit; the result so far is returned, flagged

    def validate(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        if self.selector not in SELECTORS:
            raise ValueError(f"selector must be one of {', '.join(SELECTORS)}, got {self.selector!r}")
        if not 1 <= self.candidates <= 64:
            raise ValueError(f"candidates must be in 1..64, got {self.candidates}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        for name in ("max_stage_tokens", "max_answer_tokens", "max_judge_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass
class Event:
    kind: str  # prompt_ready | stage_started | forced | token | candidate_finished | judge_decision | stage_chosen | done
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
            "tokens": self.tokens, "timings": self.timings,
            "steps": [{"unit": s.unit, "chosen": s.chosen, "forced": s.forced, "decode_s": s.decode_s,
                       "judge_s": s.judge_s, "candidates": [c.to_json() for c in s.candidates],
                       "judgements": [asdict(j) for j in s.judgements]} for s in self.steps],
        }


class SearchStopped(Exception):
    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


_NOT_JUDGED = "(not judged: no room in the KV cache)"


def candidate_rng(seed: int, seed_path: tuple, k: int) -> np.random.Generator:
    """Candidate k's random stream at one step of a search (seed_path: e.g. ("stage", 0)): its own,
    so a candidate's draws do not depend on how many others there are or when they diverge."""
    return np.random.default_rng([seed, zlib.crc32(repr(seed_path).encode()), k])


@dataclass
class _TextState:
    """The streaming text of a candidate: shared by candidates in lockstep (same tokens so far)."""

    parser: StageStreamParser
    decoder: object  # incremental UTF-8 decoder


@dataclass
class _Live:
    """A candidate being generated."""

    cand: Candidate
    state: SeqState
    rng: np.random.Generator | None
    text: _TextState
    done: bool = False


class VerdictDrafts:
    """Guesses at a verdict's next tokens from the verdicts already given in this search: a judge
    repeats its wording ("Since response 1 gives ..., I choose response 2").

    Lookup decoding: a step decodes a verdict's next token and the drafted ones after it, and keeps the
    drafted tokens the model would have chosen itself. Kept per search, so a run depends only on its
    own inputs and seed, never on the questions asked before it. (Seeding it with the reply forms the
    judge is asked for was measured a loss: their guesses were mostly wrong, and on the shipped model a
    batch row costs half a decode step.)"""

    MAX_NGRAM = 3  # the longest verdict suffix looked up

    def __init__(self, texts: list[list[int]] | None = None):
        self.texts = [t for t in texts or [] if t]  # token lists, most recent first

    def add(self, tokens: list[int]) -> None:
        if tokens:
            self.texts.insert(0, list(tokens))

    def propose(self, context: list[int], k: int) -> list[int]:
        """Up to k tokens that followed the longest suffix of `context` where it last occurred."""
        if k <= 0:
            return []
        for n in range(min(self.MAX_NGRAM, len(context)), 0, -1):
            key = context[-n:]
            for text in self.texts:
                for i in range(len(text) - n - 1, -1, -1):  # the latest occurrence with a token after it
                    if text[i:i + n] == key:
                        return text[i + n:i + n + k]
        return []


class _Search:
    def __init__(self, engine: Engine, image: ImageSource | None, question: str, cfg: SearchConfig,
                 should_stop: Callable[[], str | None]):
        self.e, self.image, self.question, self.cfg = engine, image, question, cfg
        self.should_stop = should_stop
        self.force = (not engine.stage_format) if cfg.force_format is None else cfg.force_format
        self.marker = engine.marker if (image is not None and engine.has_vision) else None
        self.tokens = Counter()
        self.timings: dict[str, float] = {}
        self.flags: list[str] = []
        self.steps: list[StepRecord] = []
        self.text = ""
        self._n_live = 0  # candidate sequences in use (1..n)
        self._cells_held = 0  # KV cells of the prefix and the live candidates, while they are judged
        self._judges_held: dict[int, list] = {}  # judge sequences kept for the next round: seq -> prompt keys
        self._judge_cells = 0  # KV cells they hold beyond what they share with sequence 0 (an upper bound)
        self._drafts = VerdictDrafts()  # this search's verdicts, for drafting the next ones
        self.t0 = time.perf_counter()

    # -- prompts ---------------------------------------------------------------------------------

    def _prompt(self, text: str, with_image: bool, instruct_format: bool = False) -> Prompt:
        """A one-turn chat prompt (the question, or a judge prompt) through the GGUF's template."""
        marker = self.marker if with_image else None
        rendered = render_user_turn(self.e.chat_template, user_text(text, marker, instruct_format))
        if marker and not isinstance(self.image, RGBImage):  # decoded once; judge prompts reuse it
            self.image = self.e.rgb_image(self.image)
        return self.e.prepare(rendered, self.image if marker else None)

    def _check(self) -> None:
        why = self.should_stop()
        if why:
            raise SearchStopped(why)

    # -- the generation loop ---------------------------------------------------------------------

    def _generate(self, starts: list[SeqState], temperature: float, mode: str, budget: int,
                  unit: str | None, seed_path: tuple, stream: bool = True) -> Iterator[Event]:
        """Decode all `starts` together until each stops; returns (via StopIteration) candidates
        and their final states. mode: stage | answer | sentence | verdict."""
        judging = mode != "verdict" and len(starts) > 1 and self.cfg.selector == "judge"
        base = max(st.pos for st in starts)  # cells of the shared prefix
        limit = self.e.config.n_ctx - (self.e.config.n_ctx // 4 if judging else 0) - 1  # a quarter stays for judges
        close_tag = STAGE_BY_NAME[unit].close_tag.lower() if mode == "stage" and unit in STAGE_BY_NAME else None
        lives = []
        shared: dict[int, _TextState] = {}  # starts on one sequence are in lockstep: one text state
        for k, st in enumerate(starts):
            sampled = temperature > 0 and not (k == 0 and self.cfg.greedy_candidate and mode != "verdict")
            rng = candidate_rng(self.cfg.seed, seed_path, k) if sampled else None
            text_state = shared.setdefault(st.seq, _TextState(StageStreamParser(), Engine.text_decoder()))
            lives.append(_Live(Candidate(k, "", [], 0.0, ""), st, rng, text_state))
        # Candidates that sampled the same tokens so far share one sequence; a new sequence is forked
        # only where they diverge, so a confident model pays for one stream, not N.
        used = {st.seq for st in starts}
        free = [q for q in range(1, self.e.config.n_seq_max)
                if q not in used and q > max(used) and q not in self._judges_held]
        new_cells = 0  # one per decoded row: shared tokens take one cell, not one per candidate
        while True:
            self._check()
            active = [lv for lv in lives if not lv.done]
            if active and base + new_cells + len(active) > limit:
                for lv in active:
                    lv.done, lv.cand.finish = True, "kv_full"
                self.flags.append(f"{unit or mode}: the KV cache (n_ctx {self.e.config.n_ctx}) is full; "
                                  "raise --ctx or lower --candidates")
            groups: dict[int, list[_Live]] = {}
            for lv in lives:
                if not lv.done:
                    groups.setdefault(lv.state.seq, []).append(lv)
            rows: list[tuple[int, int, int, list[_Live]]] = []  # (seq, token, pos, candidates)
            for seq, members in groups.items():
                # One row, one distribution: each candidate's draw is then one random number.
                dist = TokenDistribution(members[0].state.logits, temperature, self.cfg.top_p)
                branches: dict[int, list[tuple[_Live, float]]] = {}  # token -> [(candidate, logprob)]
                for lv in members:
                    tok, lp = dist.choose(lv.rng)
                    branches.setdefault(tok, []).append((lv, lp))
                # Members of a sequence share one text state; a branch that diverges here gets a copy
                # of it as it was before this token.
                before = copy.deepcopy(members[0].text) if len(branches) > 1 else None
                target = seq  # the first branch that decodes keeps the sequence
                for i, (tok, drawn) in enumerate(branches.items()):
                    if i:
                        text_state = copy.deepcopy(before)
                        for lv, _ in drawn:
                            lv.text = text_state
                    decoded = yield from self._advance(tok, drawn, mode, budget, unit, close_tag, stream)
                    if not decoded:
                        continue
                    if target is None:  # a divergence: the branch gets its own sequence sharing the prefix
                        target = free.pop(0)
                        self.e.fork(seq, target)
                    rows.append((target, tok, members[0].state.pos, [lv for lv, _ in drawn]))
                    target = None
            if not rows:
                break
            logits = self.e.step([(q, tok, pos) for q, tok, pos, _ in rows])
            new_cells += len(rows)
            for (q, _, pos, lvs), lg in zip(rows, logits, strict=True):
                state = SeqState(q, pos + 1, lg)
                for lv in lvs:
                    lv.state = state
            self.tokens["judge_generated" if mode == "verdict" else "generated"] += len(rows)
            self.tokens["judge_decode_steps" if mode == "verdict" else "decode_steps"] += 1  # llama_decode calls
        flushed: dict[int, str] = {}  # a shared decoder is flushed once
        for lv in lives:
            if id(lv.text) not in flushed:
                flushed[id(lv.text)] = lv.text.decoder.decode(b"", final=True)
            lv.cand.text += flushed[id(lv.text)]
        if mode != "verdict":
            self._cells_held = base + new_cells
        return [lv.cand for lv in lives], [lv.state for lv in lives]

    def _advance(self, tok: int, drawn: list[tuple[_Live, float]], mode: str, budget: int, unit: str | None,
                 close_tag: str | None, stream: bool) -> Iterator[Event]:
        """Append a token to the candidates that drew it (in lockstep: one text state, fed once);
        returns whether to decode it (False: end of text)."""
        if self.e.is_eog(tok):
            for lv, _ in drawn:
                lv.done, lv.cand.finish = True, "eos"
            return False
        ts = drawn[0][0].text
        stage = unit or ts.parser.current_stage
        piece = ts.decoder.decode(self.e.piece(tok))
        closed = any(ev.kind == "close" for ev in ts.parser.feed(piece))
        for lv, lp in drawn:
            lv.cand.tokens.append(tok)
            lv.cand.logprob_sum += lp
            lv.cand.text += piece
        if "first_token_s" not in self.timings and mode != "verdict":
            self.timings["first_token_s"] = time.perf_counter() - self.t0
        if stream and piece:
            for lv, _ in drawn:
                yield Event("token", stage, lv.cand.index, piece)
        cand = drawn[0][0].cand  # the branch's candidates have the same text and tokens
        if close_tag and not closed:  # a close tag with no open tag still ends the stage
            closed = close_tag in cand.text[-(len(piece) + len(close_tag)):].lower()
        finish = None
        if mode == "stage" and closed:
            finish = "closed"
        elif mode == "sentence" and (closed or _SENTENCE_END.search(piece)) and cand.text.strip():
            finish = "sentence"
        elif mode == "verdict" and _VERDICT_DONE.search(cand.text):
            finish = "verdict"
        elif len(cand.tokens) >= budget:
            finish = "budget"
        if finish:
            for lv, _ in drawn:
                lv.done, lv.cand.finish = True, finish
        # Decoded even when done, as a chosen candidate continues from here; a verdict is only read.
        return not (finish and mode == "verdict")

    # -- selection -------------------------------------------------------------------------------

    def _select(self, unit: str, cands: list[Candidate], context: dict[str, str], si: int) -> Iterator[Event]:
        """Index of the chosen candidate, and the judgements made."""
        if len(cands) == 1:
            return 0, []
        best_lp = max(range(len(cands)), key=lambda i: cands[i].mean_logprob)
        if self.cfg.selector == "logprob" or (self.cfg.selector == "vote" and unit not in ("conclusion", "answer")):
            return best_lp, []
        if self.cfg.selector == "vote":
            def conclusion(c: Candidate) -> str:
                text = c.unit_text if unit == "conclusion" else (parse_answer(c.text).conclusion or "")
                return normalise_text(text)
            votes = Counter(conclusion(c) for c in cands if conclusion(c))
            if not votes:
                return best_lp, []
            top = max(votes.values())
            tied = [i for i, c in enumerate(cands) if votes.get(conclusion(c), 0) == top]
            return max(tied, key=lambda i: cands[i].mean_logprob), []
        # judge: identical texts need no judging
        pool, seen = [], set()
        for i, c in enumerate(cands):
            if c.unit_text not in seen:
                seen.add(c.unit_text)
                pool.append(i)
        judgements: list[Judgement] = []
        if unit == "reasoning" and self.cfg.reasoning_check and len(pool) > 1:
            checks = yield from self._reasoning_checks([cands[i] for i in pool], context)
            survivors = [i for i, ok in zip(pool, checks, strict=True) if ok is not False]
            pool = survivors or pool  # if every candidate fails, the knockout decides among all
        rng = random.Random(f"{self.cfg.seed}:{si}")
        while len(pool) > 1:
            rng.shuffle(pool)
            pairs = [(pool[i], pool[i + 1]) for i in range(0, len(pool) - 1, 2)]
            bye = [pool[-1]] if len(pool) % 2 else []
            made = yield from self._judge_pairs(unit, cands, pairs, context)
            for j in made:
                yield Event("judge_decision", unit, j.winner, j.verdict, asdict(j))
            judgements += made
            pool = [j.winner for j in made] + bye
        self._release_judges()
        return pool[0], judgements

    def _judge_pairs(self, unit: str, cands: list[Candidate], pairs, context) -> Iterator[Event]:
        asked = pairs + ([(b, a) for a, b in pairs] if self.cfg.judge_both_orders else [])
        prompts = [self._prompt(pairwise_prompt(unit, self.question, cands[a].unit_text, cands[b].unit_text,
                                                context), with_image=True) for a, b in asked]
        verdicts = yield from self._ask_judge(prompts, unit)

        def likelier(a: int, b: int) -> int:
            return max((a, b), key=lambda i: cands[i].mean_logprob)

        out = []
        for (a, b), v in zip(pairs, verdicts[:len(pairs)], strict=True):
            if v is None:  # no room to judge: the likelier candidate goes on
                out.append(Judgement(a, b, likelier(a, b), _NOT_JUDGED, False))
                continue
            choice = parse_pairwise_verdict(v)
            out.append(Judgement(a, b, a if choice == 1 else b, v, choice is not None))
        if self.cfg.judge_both_orders:  # the swapped verdicts, from the second half of the batch
            for j, v in zip(out, verdicts[len(pairs):], strict=True):
                if v is None or j.verdict == _NOT_JUDGED:
                    j.verdict += " | swapped: " + (v or _NOT_JUDGED)
                    j.parsed = False
                    continue
                choice = parse_pairwise_verdict(v)
                swapped_winner = j.second if choice == 1 else j.first
                j.verdict += " | swapped: " + v
                j.parsed = j.parsed and choice is not None
                if swapped_winner != j.winner:  # the judge followed the position, not the content
                    j.winner = likelier(j.first, j.second)
        return out

    def _reasoning_checks(self, cands: list[Candidate], context) -> Iterator[Event]:
        caption = context.get("caption", "")
        prompts = [self._prompt(reasoning_check_prompt(self.question, caption, c.unit_text), with_image=False)
                   for c in cands]
        verdicts = yield from self._ask_judge(prompts, "check")
        for c, v in zip(cands, verdicts, strict=True):
            c.check = None if v is None else parse_reasoning_check(v)
        return [c.check for c in cands]

    def _judge_groups(self, prompts: list[Prompt], width: int) -> tuple[list[list[int]], list[int]]:
        """Split judge prompts into batches that fit both `width` free sequences and the free KV cells
        (each prompt's unshared tokens plus its verdict budget); also the prompts that fit nowhere."""
        room = self.e.config.n_ctx - 1 - self._cells_held - self._judge_cells
        groups: list[list[int]] = [[]]
        left_out: list[int] = []
        cells = 0
        for i, p in enumerate(prompts):
            need = self.e.cells_needed(p) + self.cfg.max_judge_tokens
            if need > room:
                left_out.append(i)
                continue
            if len(groups[-1]) == width or cells + need > room:
                groups.append([])
                cells = 0
            groups[-1].append(i)
            cells += need
        return [g for g in groups if g], left_out

    def _ask_judge(self, prompts: list[Prompt], unit: str) -> Iterator[Event]:
        """Evaluate judge prompts in parallel sequences (sharing the image prefix) and decode verdicts;
        None for a prompt that does not fit in the KV cache beside the candidates. `unit` (the stage
        judged, or "check") labels the prompt tokens: tokens["judge_prompt_" + unit]."""
        verdicts: list[str | None] = [None] * len(prompts)
        first = self._n_live + 1  # sequences 1..n hold the candidates until one is adopted
        if self.e.config.n_seq_max - first < 1:
            raise ValueError(f"n_seq_max {self.e.config.n_seq_max} leaves no sequence for judging "
                             f"{self._n_live} candidates; raise n_seq_max")

        def free() -> list[int]:
            return [s for s in range(first, self.e.config.n_seq_max) if s not in self._judges_held]

        groups, left_out = self._judge_groups(prompts, len(free()))
        if self._judges_held and (len(groups) != 1 or left_out):  # the kept rounds crowd this one out
            self._release_judges()
            groups, left_out = self._judge_groups(prompts, len(free()))
        if left_out:
            self.flags.append(f"judge: {len(left_out)} judge prompt(s) did not fit in the KV cache "
                              f"(n_ctx {self.e.config.n_ctx}); chose by log-probability; raise --ctx")
        try:
            for group in groups:
                seqs = free()[:len(group)]
                states, stats = self.e.eval_forked([prompts[i] for i in group], seqs, self._judges_held)
                self.tokens["judge_prompt"] += stats.tokens_evaluated
                self.tokens[f"judge_prompt_{unit}"] += stats.tokens_evaluated
                self.timings["image_encode_s"] = self.timings.get("image_encode_s", 0.0) + stats.image_encode_s
                if self.cfg.draft_verdicts and self.cfg.judge_temperature <= 0:
                    cands = yield from self._draft_verdicts(states, self.cfg.max_judge_tokens)
                else:
                    cands, _ = yield from self._generate(states, self.cfg.judge_temperature, "verdict",
                                                         self.cfg.max_judge_tokens, None, ("judge", group[0]),
                                                         stream=False)
                for i, c in zip(group, cands, strict=True):
                    verdicts[i] = c.text
                if len(groups) == 1:  # keep them: the next round's prompts start the same way
                    self._judges_held.update((s, prompts[i].keys) for s, i in zip(seqs, group, strict=True))
                    self._judge_cells += stats.tokens_evaluated + sum(len(c.tokens) + 1 for c in cands)
                else:
                    for s in seqs:
                        self.e.drop(s)
        finally:
            for p in prompts:
                self.e.free_prompt(p)
        return verdicts

    DRAFT_TOKENS = 16  # drafted tokens per verdict and step; a wrong one costs a batch row (half a step, shipped model)

    def _draft_verdicts(self, starts: list[SeqState], budget: int) -> Iterator[Event]:
        """Greedy verdicts for `starts` (judge prompts just evaluated), decoded together; each step
        decodes a verdict's next token plus tokens drafted by VerdictDrafts, and keeps the drafted
        tokens that equal the model's own greedy choice, so the verdicts are those of `_generate`
        (the test holds it) in fewer steps. Cells of rejected drafts are dropped. Returns candidates."""
        lives = [_Live(Candidate(k, "", [], 0.0, ""), st, None, _TextState(StageStreamParser(), Engine.text_decoder()))
                 for k, st in enumerate(starts)]
        while True:
            self._check()
            rows: list[tuple[int, int, int]] = []  # (seq, token, pos)
            plans: list[tuple[_Live, int, list[int]]] = []  # (verdict, its first row, drafted tokens)
            for lv in lives:
                if lv.done:
                    continue
                tok, lp = TokenDistribution(lv.state.logits, 0.0, 1.0).choose(None)
                if not (yield from self._advance(tok, [(lv, lp)], "verdict", budget, None, None, False)):
                    continue  # finished: the last token is read, not decoded
                draft = self._drafts.propose(lv.cand.tokens, min(self.DRAFT_TOKENS, budget - len(lv.cand.tokens)))
                plans.append((lv, len(rows), draft))
                rows += [(lv.state.seq, t, lv.state.pos + j) for j, t in enumerate([tok, *draft])]
            if not rows:
                break
            logits = self.e.step(rows)
            self.tokens["judge_generated"] += len(rows)
            self.tokens["judge_decode_steps"] += 1
            for lv, first, draft in plans:
                kept = 0  # drafted tokens the model agrees with
                for d in draft:
                    dist = TokenDistribution(logits[first + kept], 0.0, 1.0)
                    if lv.done or dist.choose(None)[0] != d:
                        break
                    kept += 1
                    yield from self._advance(d, [(lv, dist.logprob(d))], "verdict", budget, None, None, False)
                self.tokens["judge_drafted"] += len(draft)
                self.tokens["judge_draft_kept"] += kept
                pos = lv.state.pos + 1 + kept
                if kept < len(draft):
                    self.e.drop(lv.state.seq, pos, -1)
                lv.state = SeqState(lv.state.seq, pos, logits[first + kept])
        for lv in lives:
            lv.cand.text += lv.text.decoder.decode(b"", final=True)
            self._drafts.add(lv.cand.tokens)
        return [lv.cand for lv in lives]

    def _release_judges(self) -> None:
        for s in self._judges_held:
            self.e.drop(s)
        self._judges_held, self._judge_cells = {}, 0

    # -- strategies ------------------------------------------------------------------------------

    def run(self) -> Iterator[Event]:
        cfg = self.cfg
        prompt = self._prompt(self.question, with_image=True, instruct_format=self.force)
        self.tokens["prompt"] = prompt.n_tokens
        state, stats = self.e.eval_prompt(prompt)
        prompt_keys, prompt_state = prompt.keys, state
        self.e.free_prompt(prompt)
        self.tokens["prompt_evaluated"] = stats.tokens_evaluated
        self.timings.update(image_encode_s=stats.image_encode_s, prefill_s=stats.prefill_s)
        yield Event("prompt_ready", data={"image_cache_hit": stats.image_cache_hit, **asdict(stats)})
        clean = False  # the KV cache is in a known state (not cut off by an engine error)
        try:
            if cfg.strategy == "stage" or (cfg.strategy == "greedy" and self.force):
                yield from self._stage_search(state, 1 if cfg.strategy == "greedy" else cfg.candidates)
            elif cfg.strategy == "greedy":
                yield from self._whole_answers(state, 1)
            elif cfg.strategy == "best-of-n":
                yield from self._whole_answers(state, cfg.candidates)
            else:
                yield from self._sentence_search(state)
            clean = True
        except SearchStopped as stop:
            self.flags.append(stop.why)
            clean = True
        finally:
            self._judges_held, self._judge_cells = {}, 0
            for s in range(1, self.e.config.n_seq_max):
                self.e.drop(s)
            if clean:  # keep the prompt (chat header, image, question) for a follow-up question
                self.e.rewind_seq0(prompt_keys, prompt_state.pos, prompt_state.logits)
            else:
                self.e.forget_seq0()

    def _fork(self, state: SeqState, n: int) -> list[SeqState]:
        if n + 1 > self.e.config.n_seq_max:
            raise ValueError(f"{n} candidates need n_seq_max >= {n + 1} (have {self.e.config.n_seq_max})")
        for k in range(1, n + 1):
            self.e.drop(k)
        self.e.fork(0, 1)
        self._n_live = n
        return [SeqState(1, state.pos, state.logits) for _ in range(n)]  # split lazily in _generate

    def _adopt(self, state: SeqState, winner: SeqState, n: int) -> SeqState:
        self.e.adopt(winner.seq, 0, state.pos)
        for k in range(1, n + 1):
            self.e.drop(k)
        return SeqState(0, winner.pos, winner.logits)

    def _stage_search(self, state: SeqState, n: int) -> Iterator[Event]:
        context: dict[str, str] = {}
        for si, stage in enumerate(STAGES):
            yield Event("stage_started", stage.name)
            forced = ""
            if self.force:
                forced = (("\n\n" if si else "") + stage.open_tag)
                toks = self.e.tokenize(forced)
                state = SeqState(0, state.pos + len(toks), self.e.decode_tokens(0, toks, state.pos))
                self.text += forced
                yield Event("forced", stage.name, text=forced)
            t0 = time.perf_counter()
            temperature = self.cfg.temperature if n > 1 else 0.0  # one candidate: nothing to choose, decode greedily
            cands, finals = yield from self._generate(self._fork(state, n), temperature, "stage",
                                                      self.cfg.max_stage_tokens, stage.name, ("stage", si))
            decode_s = time.perf_counter() - t0
            for c in cands:
                c.unit_text = self._stage_text(stage.name, forced + c.text)
                yield Event("candidate_finished", stage.name, c.index, c.text,
                            {"finish": c.finish, "mean_logprob": c.mean_logprob})
            t1 = time.perf_counter()
            chosen, judgements = yield from self._select(stage.name, cands, context, si)
            step = StepRecord(stage.name, cands, chosen, judgements, forced, decode_s, time.perf_counter() - t1)
            self.steps.append(step)
            win = cands[chosen]
            state = self._adopt(state, finals[chosen], n)
            self.text += win.text
            context[stage.name] = win.unit_text
            yield Event("stage_chosen", stage.name, chosen, win.text, {"stage_text": win.unit_text})
            if win.finish != "closed":
                self.flags.append(f"{stage.name}: {'answer ended' if win.finish == 'eos' else 'token budget reached'} "
                                  "before the closing tag")
                if not self.force:
                    break
                # Forcing the format: an end token inside a stage closes it and the next stage is forced
                # open (the end token was never decoded), so every stage is asked for.
                closing = STAGE_BY_NAME[stage.name].close_tag
                toks = self.e.tokenize(closing)
                state = SeqState(0, state.pos + len(toks), self.e.decode_tokens(0, toks, state.pos))
                self.text += closing
                yield Event("forced", stage.name, text=closing)
        else:
            # Whatever the model writes after the last stage, up to its end token, is part of its
            # answer (usually nothing): with one candidate the output is then exactly greedy's.
            cands, _ = yield from self._generate([state], 0.0, "answer", self.cfg.max_stage_tokens, "trailer",
                                                 ("trailer",))
            if cands[0].tokens:
                self.steps.append(StepRecord("trailer", cands, 0))
                self.text += cands[0].text

    @staticmethod
    def _stage_text(name: str, text: str) -> str:
        parsed = parse_answer(text)
        return parsed.stages.get(name, parsed.segments[0].text if parsed.segments else text.strip())

    def _whole_answers(self, state: SeqState, n: int) -> Iterator[Event]:
        t0 = time.perf_counter()
        starts = [state] if n == 1 else self._fork(state, n)
        temperature = self.cfg.temperature if n > 1 else 0.0
        cands, finals = yield from self._generate(starts, temperature, "answer", self.cfg.max_answer_tokens,
                                                  None, ("answer",))
        decode_s = time.perf_counter() - t0
        for c in cands:
            c.unit_text = c.text.strip()
            yield Event("candidate_finished", None, c.index, c.text, {"finish": c.finish, "mean_logprob": c.mean_logprob})
        t1 = time.perf_counter()
        chosen, judgements = yield from self._select("answer", cands, {}, 0)
        self.steps.append(StepRecord("answer", cands, chosen, judgements, "", decode_s, time.perf_counter() - t1))
        if n > 1:
            self._adopt(state, finals[chosen], n)
        self.text = cands[chosen].text
        if cands[chosen].finish == "budget":
            self.flags.append("answer: token budget reached")
        yield Event("stage_chosen", "answer", chosen, cands[chosen].text)

    def _sentence_search(self, state: SeqState) -> Iterator[Event]:
        n, si = self.cfg.candidates, 0
        total = 0
        while total < self.cfg.max_answer_tokens:
            parsed = parse_answer(self.text)
            open_stage = parsed.segments[-1].stage if parsed.segments and not parsed.segments[-1].closed else None
            unit = open_stage or "answer"
            t0 = time.perf_counter()
            budget = min(self.cfg.max_stage_tokens, self.cfg.max_answer_tokens - total)
            cands, finals = yield from self._generate(self._fork(state, n), self.cfg.temperature if n > 1 else 0.0,
                                                      "sentence", budget, unit, ("sentence", si))
            decode_s = time.perf_counter() - t0
            for c in cands:
                c.unit_text = c.text.strip()
            context = {k: v for k, v in parsed.stages.items() if k != open_stage}
            t1 = time.perf_counter()
            chosen, judgements = yield from self._select(unit, cands, context, si)
            self.steps.append(StepRecord(unit, cands, chosen, judgements, "", decode_s, time.perf_counter() - t1))
            win = cands[chosen]
            state = self._adopt(state, finals[chosen], n)
            self.text += win.text
            total += len(win.tokens)
            yield Event("stage_chosen", unit, chosen, win.text)
            si += 1
            if win.finish == "eos" or not win.tokens:
                break
        else:
            self.flags.append("answer: token budget reached")

    def result(self) -> SearchResult:
        self.timings["total_s"] = time.perf_counter() - self.t0
        self.timings["decode_s"] = sum(s.decode_s for s in self.steps)
        self.timings["judge_s"] = sum(s.judge_s for s in self.steps)
        for s in self.steps:
            self.timings[f"{s.unit}_decode_s"] = self.timings.get(f"{s.unit}_decode_s", 0.0) + s.decode_s
            self.timings[f"{s.unit}_judge_s"] = self.timings.get(f"{s.unit}_judge_s", 0.0) + s.judge_s
        parsed = parse_answer(self.text)
        tokens = dict(self.tokens)
        tokens["answer"] = sum(len(s.candidates[s.chosen].tokens) for s in self.steps)
        return SearchResult(self.question, self.cfg, self.text, parsed, self.steps, tokens, self.timings, self.flags)


def search_events(engine: Engine, image: ImageSource | None, question: str, cfg: SearchConfig,
                  cancel: threading.Event | Callable[[], bool] | None = None) -> Iterator[Event]:
    """Run a search, yielding events; the last event is "done" with the SearchResult in data["result"]."""
    cfg.validate()
    if not question or not question.strip():
        raise ValueError("the question is empty")
    deadline = time.monotonic() + cfg.timeout_s if cfg.timeout_s else None

    def should_stop() -> str | None:
        if cancel is not None and (cancel.is_set() if isinstance(cancel, threading.Event) else cancel()):
            return "cancelled"
        if deadline is not None and time.monotonic() > deadline:
            return "timeout"
        return None

    s = _Search(engine, image, question, cfg, should_stop)
    yield from s.run()
    result = s.result()
    yield Event("done", data={"result": result})


def run_search(engine: Engine, image: ImageSource | None, question: str, cfg: SearchConfig,
               on_event: Callable[[Event], None] | None = None,
               cancel: threading.Event | Callable[[], bool] | None = None) -> SearchResult:
    result = None
    for ev in search_events(engine, image, question, cfg, cancel):
        if on_event is not None:
            on_event(ev)
        if ev.kind == "done":
            result = ev.data["result"]
    assert result is not None
    return result


__all__ = ["Event", "SearchConfig", "SearchResult", "run_search", "search_events"]
