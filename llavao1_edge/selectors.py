"""Selectors: how a search picks one of a step's candidates.

    logprob   the highest mean token log-probability
    vote      the most common conclusion (earlier stages by logprob)
    judge     the paper's: a random pairwise knockout judged by the same model, with the text-only
              correctness check first at the reasoning stage

`Selector.select` is a generator of events (the judge's decisions) that returns the chosen index and
the judgements made. The judge evaluates its prompts in the engine's spare sequences, forked from the
question's chat header and image, all pairs of a round in one batch, and decodes greedy verdicts several
tokens a step where its earlier verdicts predict them (`VerdictDrafts`).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Generator
from dataclasses import asdict
from typing import TYPE_CHECKING

from .decoding import VERDICT, Live, TextState
from .engine import Engine, Prompt, SeqState
from .judge import (
    pairwise_prompt,
    parse_pairwise_verdict,
    parse_reasoning_check,
    reasoning_check_prompt,
)
from .sampling import TokenDistribution
from .stages import StageStreamParser, parse_answer
from .trace import Candidate, Event, Judgement

if TYPE_CHECKING:
    from .search import _Search

Selection = Generator[Event, None, tuple[int, list[Judgement]]]
NOT_JUDGED = "(not judged: no room in the KV cache)"


class Selector:
    judges = False  # decodes verdicts: a judged step's candidates leave KV cells for the judge prompts

    def __init__(self, search: _Search):
        self.search = search

    def select(self, unit: str, cands: list[Candidate], context: dict[str, str], step: int) -> Selection:
        """(index chosen, judgements made) among `cands` for `unit` (a stage, "answer" or a sentence's stage).
        A generator, so that a selector that decodes (the judge) can yield its events; others just pick."""
        return self.pick(unit, cands), []
        yield  # unreachable: it makes this a generator

    def pick(self, unit: str, cands: list[Candidate]) -> int:
        raise NotImplementedError


def likeliest(cands: list[Candidate], among: list[int] | None = None) -> int:
    """The candidate with the highest mean log-probability (the first of equals)."""
    return max(among if among is not None else range(len(cands)), key=lambda i: cands[i].mean_logprob)


class LogprobSelector(Selector):
    def pick(self, unit, cands) -> int:
        return likeliest(cands)


class VoteSelector(Selector):
    def pick(self, unit, cands) -> int:
        if unit not in ("conclusion", "answer"):
            return likeliest(cands)

        from .answers import normalise_text

        def conclusion(c: Candidate) -> str:
            return normalise_text(c.unit_text if unit == "conclusion" else (parse_answer(c.text).conclusion or ""))

        votes = Counter(conclusion(c) for c in cands if conclusion(c))
        if not votes:
            return likeliest(cands)
        top = max(votes.values())
        return likeliest(cands, [i for i, c in enumerate(cands) if votes.get(conclusion(c), 0) == top])


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


class JudgeSelector(Selector):
    judges = True
    DRAFT_TOKENS = 16  # drafted tokens per verdict and step; a wrong one costs a batch row (half a step, shipped model)

    def __init__(self, search: _Search):
        super().__init__(search)
        self.drafts = VerdictDrafts()  # this search's verdicts, for drafting the next ones

    def select(self, unit, cands, context, step) -> Selection:
        s, cfg = self.search, self.search.cfg
        pool, seen = [], set()  # identical texts need no judging
        for i, c in enumerate(cands):
            if c.unit_text not in seen:
                seen.add(c.unit_text)
                pool.append(i)
        judgements: list[Judgement] = []
        if unit == "reasoning" and cfg.reasoning_check and len(pool) > 1:
            checks = yield from self._reasoning_checks([cands[i] for i in pool], context)
            survivors = [i for i, ok in zip(pool, checks, strict=True) if ok is not False]
            pool = survivors or pool  # if every candidate fails, the knockout decides among all
        rng = random.Random(f"{cfg.seed}:{step}")
        while len(pool) > 1:
            rng.shuffle(pool)
            pairs = [(pool[i], pool[i + 1]) for i in range(0, len(pool) - 1, 2)]
            bye = [pool[-1]] if len(pool) % 2 else []
            made = yield from self._judge_pairs(unit, cands, pairs, context)
            for j in made:
                yield Event("judge_decision", unit, j.winner, j.verdict, asdict(j))
            judgements += made
            pool = [j.winner for j in made] + bye
        s.e.sequences.release()
        return pool[0], judgements

    def _judge_pairs(self, unit: str, cands: list[Candidate], pairs, context) -> Generator[Event, None, list[Judgement]]:
        s = self.search
        asked = pairs + ([(b, a) for a, b in pairs] if s.cfg.judge_both_orders else [])
        prompts = [s.prompt(pairwise_prompt(unit, s.question, cands[a].unit_text, cands[b].unit_text, context),
                            with_image=True) for a, b in asked]
        verdicts = yield from self._ask(prompts, unit)
        out = []
        for (a, b), v in zip(pairs, verdicts[:len(pairs)], strict=True):
            if v is None:  # no room to judge: the likelier candidate goes on
                out.append(Judgement(a, b, likeliest(cands, [a, b]), NOT_JUDGED, False))
                continue
            choice = parse_pairwise_verdict(v)
            out.append(Judgement(a, b, a if choice == 1 else b, v, choice is not None))
        if s.cfg.judge_both_orders:  # the swapped verdicts, from the second half of the batch
            for j, v in zip(out, verdicts[len(pairs):], strict=True):
                if v is None or j.verdict == NOT_JUDGED:
                    j.verdict += " | swapped: " + (v or NOT_JUDGED)
                    j.parsed = False
                    continue
                choice = parse_pairwise_verdict(v)
                swapped_winner = j.second if choice == 1 else j.first
                j.verdict += " | swapped: " + v
                j.parsed = j.parsed and choice is not None
                if swapped_winner != j.winner:  # the judge followed the position, not the content
                    j.winner = likeliest(cands, [j.first, j.second])
        return out

    def _reasoning_checks(self, cands: list[Candidate], context) -> Generator[Event, None, list[bool | None]]:
        s = self.search
        caption = context.get("caption", "")
        prompts = [s.prompt(reasoning_check_prompt(s.question, caption, c.unit_text), with_image=False) for c in cands]
        verdicts = yield from self._ask(prompts, "check")
        for c, v in zip(cands, verdicts, strict=True):
            c.check = None if v is None else parse_reasoning_check(v)
        return [c.check for c in cands]

    def _batches(self, prompts: list[Prompt], width: int) -> tuple[list[list[int]], list[int]]:
        """Split judge prompts into batches that fit both `width` free sequences and the free KV cells
        (each prompt's unshared tokens plus its verdict budget); also the prompts that fit nowhere."""
        e = self.search.e
        room = e.sequences.judge_cells()
        groups: list[list[int]] = [[]]
        left_out: list[int] = []
        cells = 0
        for i, p in enumerate(prompts):
            need = e.cells_needed(p) + self.search.cfg.max_judge_tokens
            if need > room:
                left_out.append(i)
                continue
            if len(groups[-1]) == width or cells + need > room:
                groups.append([])
                cells = 0
            groups[-1].append(i)
            cells += need
        return [g for g in groups if g], left_out

    def _ask(self, prompts: list[Prompt], unit: str) -> Generator[Event, None, list[str | None]]:
        """Evaluate judge prompts in parallel sequences (sharing the image prefix) and decode verdicts;
        None for a prompt that does not fit in the KV cache beside the candidates. `unit` (the stage
        judged, or "check") labels the prompt tokens: tokens["judge_prompt_" + unit]."""
        s = self.search
        e, pool, cfg = s.e, s.e.sequences, s.cfg
        verdicts: list[str | None] = [None] * len(prompts)
        groups, left_out = self._batches(prompts, len(pool.judge_sequences()))
        if pool.held and (len(groups) != 1 or left_out):  # the kept rounds crowd this one out
            pool.release()
            groups, left_out = self._batches(prompts, len(pool.judge_sequences()))
        if left_out:
            s.flags.append(f"judge: {len(left_out)} judge prompt(s) did not fit in the KV cache "
                           f"(n_ctx {e.config.n_ctx}); chose by log-probability; raise --ctx")
        try:
            for group in groups:
                seqs = pool.judge_sequences()[:len(group)]
                states, stats = e.eval_forked([prompts[i] for i in group], seqs, pool.held)
                s.tokens["judge_prompt"] += stats.tokens_evaluated
                s.tokens[f"judge_prompt_{unit}"] += stats.tokens_evaluated
                s.timings["image_encode_s"] = s.timings.get("image_encode_s", 0.0) + stats.image_encode_s
                if cfg.draft_verdicts and cfg.judge_temperature <= 0:
                    cands = yield from self._draft_verdicts(states, cfg.max_judge_tokens)
                else:
                    cands, _ = yield from s.generate(states, cfg.judge_temperature, VERDICT, cfg.max_judge_tokens,
                                                     None, ("judge", group[0]))
                for i, c in zip(group, cands, strict=True):
                    verdicts[i] = c.text
                if len(groups) == 1:  # keep them: the next round's prompts start the same way
                    pool.hold({q: prompts[i].keys for q, i in zip(seqs, group, strict=True)},
                              stats.tokens_evaluated + sum(len(c.tokens) + 1 for c in cands))
                else:
                    for q in seqs:
                        e.drop(q)
        finally:
            for p in prompts:
                e.free_prompt(p)
        return verdicts

    def _draft_verdicts(self, starts: list[SeqState], budget: int) -> Generator[Event, None, list[Candidate]]:
        """Greedy verdicts for `starts` (judge prompts just evaluated), decoded together; each step
        decodes a verdict's next token plus tokens drafted by VerdictDrafts, and keeps the drafted
        tokens that equal the model's own greedy choice, so the verdicts are those of `generate`
        (the test holds it) in fewer steps. Cells of rejected drafts are dropped."""
        s = self.search
        lives = [Live(Candidate(k, "", [], 0.0, ""), st, None, TextState(StageStreamParser(), Engine.text_decoder()))
                 for k, st in enumerate(starts)]
        while True:
            s.check_stop()
            rows: list[tuple[int, int, int]] = []  # (seq, token, pos)
            plans: list[tuple[Live, int, list[int]]] = []  # (verdict, its first row, drafted tokens)
            for lv in lives:
                if lv.done:
                    continue
                tok, lp = TokenDistribution(lv.state.logits, 0.0, 1.0).choose(None)
                if not (yield from s.advance(tok, [(lv, lp)], VERDICT, budget, None)):
                    continue  # finished: the last token is read, not decoded
                draft = self.drafts.propose(lv.cand.tokens, min(self.DRAFT_TOKENS, budget - len(lv.cand.tokens)))
                plans.append((lv, len(rows), draft))
                rows += [(lv.state.seq, t, lv.state.pos + j) for j, t in enumerate([tok, *draft])]
            if not rows:
                break
            logits = s.e.step(rows)
            s.tokens["judge_generated"] += len(rows)
            s.tokens["judge_decode_steps"] += 1
            for lv, first, draft in plans:
                kept = 0  # drafted tokens the model agrees with
                for d in draft:
                    dist = TokenDistribution(logits[first + kept], 0.0, 1.0)
                    if lv.done or dist.choose(None)[0] != d:
                        break
                    kept += 1
                    yield from s.advance(d, [(lv, dist.logprob(d))], VERDICT, budget, None)
                s.tokens["judge_drafted"] += len(draft)
                s.tokens["judge_draft_kept"] += kept
                pos = lv.state.pos + 1 + kept
                if kept < len(draft):
                    s.e.drop(lv.state.seq, pos, -1)
                lv.state = SeqState(lv.state.seq, pos, logits[first + kept])
        for lv in lives:
            lv.cand.text += lv.text.decoder.decode(b"", final=True)
            self.drafts.add(lv.cand.tokens)
        return [lv.cand for lv in lives]


SELECTORS: dict[str, type[Selector]] = {"judge": JudgeSelector, "logprob": LogprobSelector, "vote": VoteSelector}
