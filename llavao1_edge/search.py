"""Inference-time search over the four stages: greedy, stage-level beam search, best-of-N, sentence.

All strategies share one generation loop (`_Search.generate`): the sequences of a step decode together
in one llama.cpp batch, each forked from the shared prefix (prompt + image + chosen stages), so nothing
re-evaluates the image. Candidates that sampled the same tokens so far share one sequence and one
batch row; a sequence is forked only where they diverge. The engine's `SequencePool` says which
sequences and how many KV cells are free; a `Selector` (selectors.py) chooses among the candidates.
The search is a generator of `Event`s; `run_search` drains it.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import asdict

from .decoding import ANSWER, SENTENCE, Live, StageStop, Stop, TextState, candidate_rng
from .engine import Engine, Prompt, RGBImage, SeqState
from .images import ImageSource
from .options import SearchConfig
from .sampling import TokenDistribution
from .selectors import SELECTORS, VerdictDrafts
from .stages import STAGE_BY_NAME, STAGES, StageStreamParser, parse_answer
from .trace import Candidate, Event, SearchResult, StepRecord

Generation = Generator[Event, None, tuple[list[Candidate], list[SeqState]]]


class SearchStopped(Exception):
    def __init__(self, why: str):
        super().__init__(why)
        self.why = why


class _Search:
    def __init__(self, engine: Engine, image: ImageSource | None, question: str, cfg: SearchConfig,
                 should_stop: Callable[[], str | None], history: Sequence[tuple[str, str]] = ()):
        self.e, self.image, self.question, self.cfg = engine, image, question, cfg
        self.history = tuple(history)  # earlier turns of a conversation, before the question
        self.should_stop = should_stop
        self.force = (not engine.stage_format) if cfg.force_format is None else cfg.force_format
        self.marker = engine.marker if (image is not None and engine.has_vision) else None
        self.selector = SELECTORS[cfg.selector](self)
        self.tokens = Counter()
        self.timings: dict[str, float] = {}
        self.flags: list[str] = []
        self.steps: list[StepRecord] = []
        self.text = ""
        self.t0 = time.perf_counter()

    # -- prompts ---------------------------------------------------------------------------------

    def prompt(self, text: str, with_image: bool, instruct_format: bool = False,
               history: Sequence[tuple[str, str]] = ()) -> Prompt:
        """A chat prompt (the question after any earlier turns, or a one-turn judge prompt) through the GGUF's
        template."""
        marker = self.marker if with_image else None
        rendered = self.e.template.user_turn(text, marker, instruct_format, history)
        if marker and not isinstance(self.image, RGBImage):  # decoded once; judge prompts reuse it
            self.image = self.e.rgb_image(self.image)
        return self.e.prepare(rendered, self.image if marker else None)

    def check_stop(self) -> None:
        why = self.should_stop()
        if why:
            raise SearchStopped(why)

    # -- the generation loop ---------------------------------------------------------------------

    def generate(self, starts: list[SeqState], temperature: float, stop: Stop, budget: int, unit: str | None,
                 seed_path: tuple) -> Generation:
        """Decode all `starts` together until each stops; returns (via StopIteration) the candidates and
        their final states. `unit` names the stage for events (None: the answer's own tags say)."""
        pool = self.e.sequences
        judged_step = not stop.judge and len(starts) > 1 and self.selector.judges
        base = max(st.pos for st in starts) + self.e.pos_lag  # cells of the shared prefix
        limit = pool.candidate_cell_limit(judged_step)
        lives = []
        shared: dict[int, TextState] = {}  # starts on one sequence are in lockstep: one text state
        for k, st in enumerate(starts):
            sampled = temperature > 0 and not (k == 0 and self.cfg.greedy_candidate and not stop.judge)
            rng = candidate_rng(self.cfg.seed, seed_path, k) if sampled else None
            text_state = shared.setdefault(st.seq, TextState(StageStreamParser(), Engine.text_decoder()))
            lives.append(Live(Candidate(k, "", [], 0.0, ""), st, rng, text_state))
        # Candidates that sampled the same tokens so far share one sequence; a new sequence is forked
        # only where they diverge, so a confident model pays for one stream, not N.
        spare = pool.spare({st.seq for st in starts})
        new_cells = 0  # one per decoded row: shared tokens take one cell, not one per candidate
        counted = "judge_" if stop.judge else ""
        while True:
            self.check_stop()
            active = [lv for lv in lives if not lv.done]
            if active and base + new_cells + len(active) > limit:
                for lv in active:
                    lv.done, lv.cand.finish = True, "kv_full"
                label = unit or ("verdict" if stop.judge else "answer")
                self.flags.append(f"{label}: the KV cache (n_ctx {self.e.config.n_ctx}) is full; "
                                  "raise --ctx or lower --candidates")
            groups: dict[int, list[Live]] = {}
            for lv in lives:
                if not lv.done:
                    groups.setdefault(lv.state.seq, []).append(lv)
            rows: list[tuple[int, int, int, list[Live]]] = []  # (seq, token, pos, candidates)
            for seq, members in groups.items():
                # One row, one distribution: each candidate's draw is then one random number.
                dist = TokenDistribution(members[0].state.logits, temperature, self.cfg.top_p)
                branches: dict[int, list[tuple[Live, float]]] = {}  # token -> [(candidate, logprob)]
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
                    decoded = yield from self.advance(tok, drawn, stop, budget, unit)
                    if not decoded:
                        continue
                    if target is None:  # a divergence: the branch gets its own sequence sharing the prefix
                        target = spare.pop(0)
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
            self.tokens[counted + "generated"] += len(rows)
            self.tokens[counted + "decode_steps"] += 1  # llama_decode calls
        flushed: dict[int, str] = {}  # a shared decoder is flushed once
        for lv in lives:
            if id(lv.text) not in flushed:
                flushed[id(lv.text)] = lv.text.decoder.decode(b"", final=True)
            lv.cand.text += flushed[id(lv.text)]
        if not stop.judge:
            pool.cells_held = base + new_cells
        return [lv.cand for lv in lives], [lv.state for lv in lives]

    def advance(self, tok: int, drawn: list[tuple[Live, float]], stop: Stop, budget: int,
                unit: str | None) -> Generator[Event, None, bool]:
        """Append a token to the candidates that drew it (in lockstep: one text state, fed once);
        returns whether to decode it (False: end of text, or a finishing token only read)."""
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
        if not stop.judge:
            if "first_token_s" not in self.timings:
                self.timings["first_token_s"] = time.perf_counter() - self.t0
            if piece:
                for lv, _ in drawn:
                    yield Event("token", stage, lv.cand.index, piece)
        cand = drawn[0][0].cand  # the branch's candidates have the same text and tokens
        finish = stop.finish(cand.text, piece, closed)
        if finish is None and len(cand.tokens) >= budget:
            finish = "budget"
        if finish:
            for lv, _ in drawn:
                lv.done, lv.cand.finish = True, finish
        # Decoded even when done, as a chosen candidate continues from here; a verdict is only read.
        return not (finish and stop.read_last)

    def _select(self, unit: str, cands: list[Candidate], context: dict[str, str], step: int):
        if len(cands) == 1:
            return 0, []
        return (yield from self.selector.select(unit, cands, context, step))

    # -- strategies ------------------------------------------------------------------------------

    def run(self) -> Iterator[Event]:
        cfg, pool = self.cfg, self.e.sequences
        pool.reset()
        prompt = self.prompt(self.question, with_image=True, instruct_format=self.force, history=self.history)
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
            pool.reset()
            if clean:  # keep the prompt (chat header, image, question) for a follow-up question
                self.e.rewind_seq0(prompt_keys, prompt_state.pos, prompt_state.logits)
            else:
                self.e.forget_seq0()

    def _force(self, state: SeqState, text: str) -> SeqState:
        """Decode text the runtime inserts (a stage's tags) into sequence 0."""
        toks = self.e.tokenize(text)
        self.text += text
        return SeqState(0, state.pos + len(toks), self.e.decode_tokens(0, toks, state.pos))

    def _stage_search(self, state: SeqState, n: int) -> Iterator[Event]:
        pool = self.e.sequences
        context: dict[str, str] = {}
        for si, stage in enumerate(STAGES):
            yield Event("stage_started", stage.name)
            forced = ""
            if self.force:
                forced = (("\n\n" if si else "") + stage.open_tag)
                state = self._force(state, forced)
                yield Event("forced", stage.name, text=forced)
            t0 = time.perf_counter()
            temperature = self.cfg.temperature if n > 1 else 0.0  # one candidate: nothing to choose, decode greedily
            cands, finals = yield from self.generate(pool.fork_candidates(state, n), temperature,
                                                     StageStop(stage.close_tag), self.cfg.max_stage_tokens, stage.name,
                                                     ("stage", si))
            decode_s = time.perf_counter() - t0
            for c in cands:
                c.unit_text = self._stage_text(stage.name, forced + c.text)
                yield Event("candidate_finished", stage.name, c.index, c.text,
                            {"finish": c.finish, "mean_logprob": c.mean_logprob})
            t1 = time.perf_counter()
            chosen, judgements = yield from self._select(stage.name, cands, context, si)
            self.steps.append(StepRecord(stage.name, cands, chosen, judgements, forced, decode_s,
                                         time.perf_counter() - t1))
            win = cands[chosen]
            state = pool.adopt(state, finals[chosen])
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
                state = self._force(state, closing)
                yield Event("forced", stage.name, text=closing)
        else:
            # Whatever the model writes after the last stage, up to its end token, is part of its
            # answer (usually nothing): with one candidate the output is then exactly greedy's.
            cands, _ = yield from self.generate([state], 0.0, ANSWER, self.cfg.max_stage_tokens, "trailer",
                                                ("trailer",))
            if cands[0].tokens:
                self.steps.append(StepRecord("trailer", cands, 0))
                self.text += cands[0].text

    @staticmethod
    def _stage_text(name: str, text: str) -> str:
        parsed = parse_answer(text)
        return parsed.stages.get(name, parsed.segments[0].text if parsed.segments else text.strip())

    def _whole_answers(self, state: SeqState, n: int) -> Iterator[Event]:
        pool = self.e.sequences
        t0 = time.perf_counter()
        starts = [state] if n == 1 else pool.fork_candidates(state, n)
        temperature = self.cfg.temperature if n > 1 else 0.0
        cands, finals = yield from self.generate(starts, temperature, ANSWER, self.cfg.max_answer_tokens, None,
                                                 ("answer",))
        decode_s = time.perf_counter() - t0
        for c in cands:
            c.unit_text = c.text.strip()
            yield Event("candidate_finished", None, c.index, c.text, {"finish": c.finish, "mean_logprob": c.mean_logprob})
        t1 = time.perf_counter()
        chosen, judgements = yield from self._select("answer", cands, {}, 0)
        self.steps.append(StepRecord("answer", cands, chosen, judgements, "", decode_s, time.perf_counter() - t1))
        if n > 1:
            pool.adopt(state, finals[chosen])
        self.text = cands[chosen].text
        if cands[chosen].finish == "budget":
            self.flags.append("answer: token budget reached")
        yield Event("stage_chosen", "answer", chosen, cands[chosen].text)

    def _sentence_search(self, state: SeqState) -> Iterator[Event]:
        pool = self.e.sequences
        n, si = self.cfg.candidates, 0
        total = 0
        while total < self.cfg.max_answer_tokens:
            parsed = parse_answer(self.text)
            open_stage = parsed.segments[-1].stage if parsed.segments and not parsed.segments[-1].closed else None
            unit = open_stage or "answer"
            t0 = time.perf_counter()
            budget = min(self.cfg.max_stage_tokens, self.cfg.max_answer_tokens - total)
            cands, finals = yield from self.generate(pool.fork_candidates(state, n),
                                                     self.cfg.temperature if n > 1 else 0.0, SENTENCE, budget, unit,
                                                     ("sentence", si))
            decode_s = time.perf_counter() - t0
            for c in cands:
                c.unit_text = c.text.strip()
            context = {k: v for k, v in parsed.stages.items() if k != open_stage}
            t1 = time.perf_counter()
            chosen, judgements = yield from self._select(unit, cands, context, si)
            self.steps.append(StepRecord(unit, cands, chosen, judgements, "", decode_s, time.perf_counter() - t1))
            win = cands[chosen]
            state = pool.adopt(state, finals[chosen])
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
                  cancel: threading.Event | Callable[[], bool] | None = None,
                  history: Sequence[tuple[str, str]] = ()) -> Iterator[Event]:
    """Run a search, yielding events; the last event is "done" with the SearchResult in data["result"].
    `history`: earlier turns of a conversation, (role, text) pairs put before the question as text."""
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

    s = _Search(engine, image, question, cfg, should_stop, history)
    yield from s.run()
    result = s.result()
    yield Event("done", data={"result": result})


def run_search(engine: Engine, image: ImageSource | None, question: str, cfg: SearchConfig,
               on_event: Callable[[Event], None] | None = None,
               cancel: threading.Event | Callable[[], bool] | None = None,
               history: Sequence[tuple[str, str]] = ()) -> SearchResult:
    result = None
    for ev in search_events(engine, image, question, cfg, cancel, history):
        if on_event is not None:
            on_event(ev)
        if ev.kind == "done":
            result = ev.data["result"]
    assert result is not None
    return result


__all__ = ["Event", "SearchConfig", "SearchResult", "VerdictDrafts", "candidate_rng", "run_search", "search_events"]
