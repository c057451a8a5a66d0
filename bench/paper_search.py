"""The reference implementation's cost model, on the same GGUF: the baseline our search must beat.

LLaVA-CoT's released code runs every candidate and every judgement as a separate generate call
that re-processes the image and the whole prefix; nothing is shared or batched. This module
does the same through our engine with every cache defeated: before each call the KV cache is
cleared and the image is encoded again. Prompts, sampling and judge wording are the runtime's,
so only the execution strategy differs.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import numpy as np

from llavao1_edge.engine import Engine
from llavao1_edge.judge import (
    pairwise_prompt,
    parse_pairwise_verdict,
    parse_reasoning_check,
    reasoning_check_prompt,
)
from llavao1_edge.sampling import choose
from llavao1_edge.search import SearchConfig
from llavao1_edge.stages import STAGES, StageStreamParser, parse_answer


@dataclass
class PaperResult:
    text: str
    calls: int  # separate generate calls, each re-evaluating prompt and image
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def answer(self) -> str | None:
        return parse_answer(self.text).conclusion


class PaperStyleSearch:
    def __init__(self, engine: Engine, cfg: SearchConfig):
        self.e, self.cfg = engine, cfg
        self.calls = 0

    def _call(self, user: str, image, prefix: str, temperature: float, stop_close: bool, budget: int,
              rng: np.random.Generator | None) -> str:
        """One generate call from scratch: clear the cache, encode the image, evaluate, decode."""
        self.calls += 1
        self.e.clear_caches()  # the reference re-processes the image and the prefix every call
        marker = self.e.marker if image is not None else None
        rendered = self.e.template.user_turn(user, marker) + prefix
        prompt = self.e.prepare(rendered, image)
        state, _ = self.e.eval_prompt(prompt)
        self.e.free_prompt(prompt)
        parser, text, pos, logits = StageStreamParser(), "", state.pos, state.logits
        dec = Engine.text_decoder()
        for _ in range(budget):
            tok, _ = choose(logits, rng, temperature, self.cfg.top_p)
            if self.e.is_eog(tok):
                break
            piece = dec.decode(self.e.piece(tok))
            text += piece
            logits = self.e.decode_tokens(0, [tok], pos)
            pos += 1
            if stop_close and any(ev.kind == "close" for ev in parser.feed(piece)):
                break
        return text

    def run(self, image, question: str) -> PaperResult:
        t0 = time.perf_counter()
        cfg, prefix, context = self.cfg, "", {}
        pyrng = random.Random(cfg.seed)
        for si, stage in enumerate(STAGES):
            cands = []
            for k in range(cfg.candidates):
                rng = np.random.default_rng([cfg.seed, si, k])
                text = self._call(question, image, prefix, cfg.temperature, True, cfg.max_stage_tokens, rng)
                cands.append(text)
            stage_texts = [parse_answer(c).stages.get(stage.name, c.strip()) for c in cands]
            pool = list(range(len(cands)))
            if stage.name == "reasoning" and cfg.reasoning_check:
                ok = [parse_reasoning_check(self._call(reasoning_check_prompt(question, context.get("caption", ""),
                                                                              stage_texts[i]), None, "", 0.0, False,
                                                       cfg.max_judge_tokens, None)) for i in pool]
                pool = [i for i, v in zip(pool, ok, strict=True) if v is not False] or pool
            while len(pool) > 1:
                a, b = pyrng.sample(pool, 2)
                verdict = self._call(pairwise_prompt(stage.name, question, stage_texts[a], stage_texts[b], context),
                                     image, "", 0.0, False, cfg.max_judge_tokens, None)
                loser = b if parse_pairwise_verdict(verdict) == 1 else a
                pool.remove(loser)
            prefix += cands[pool[0]]
            context[stage.name] = stage_texts[pool[0]]
        return PaperResult(prefix, self.calls, {"total_s": time.perf_counter() - t0})
