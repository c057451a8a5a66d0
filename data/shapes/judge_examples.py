"""Judge training examples: for each stage, the correct text against a corrupted one.

Corruptions are made on the scene graph or the answer, then the stage is re-rendered, so the
wrong text reads as fluently as the right one and differs only where it is wrong. Prompts and
verdict forms come from llavao1_edge.judge: exactly what the runtime will ask.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace

from llavao1_edge.judge import (
    pairwise_prompt,
    pairwise_verdict,
    reasoning_check_prompt,
    reasoning_check_verdict,
)
from llavao1_edge.stages import STAGE_NAMES

from .questions import FAMILIES, Question, pick_spec, render_stages, summary_text
from .scene import COLORS, SHAPES, Scene


@dataclass
class JudgeExample:
    unit: str  # the stage judged, or "check" for the reasoning correctness check
    prompt: str
    target: str
    uses_image: bool


def _perturb_scene(scene: Scene, rng: random.Random) -> tuple[Scene, str]:
    """A scene with one error, and the flaw it causes, phrased for a verdict."""
    objs = list(scene.objects)
    i = rng.randrange(len(objs))
    kinds = ["color", "shape"] + (["drop"] if len(objs) > 1 else [])
    kind = rng.choice(kinds)
    if kind == "color":
        objs[i] = replace(objs[i], color=rng.choice([c for c in COLORS if c != objs[i].color]))
        flaw = "gives an object the wrong color"
    elif kind == "shape":
        objs[i] = replace(objs[i], shape=rng.choice([s for s in SHAPES if s != objs[i].shape]))
        flaw = "gives an object the wrong shape"
    else:
        del objs[i]
        flaw = "leaves out an object"
    return replace(scene, objects=tuple(objs)), flaw


def _corrupt(q: Question, scene: Scene, stage: str, rng: random.Random) -> tuple[str, str] | None:
    """(wrong text, flaw) for `stage` of question `q`, or None if no corruption changes it."""
    right = q.stages[stage]
    for _ in range(8):
        if stage == "summary":
            family = rng.choice([f for f in FAMILIES if f != "count_all"] + [q.family])
            spec = pick_spec(family, scene, rng)
            if spec is None:
                continue
            wrong, flaw = summary_text(family, spec, q.form), "plans for a different question"
        elif stage == "caption":
            bad_scene, flaw = _perturb_scene(scene, rng)
            _, st = render_stages(q.family, q.spec, bad_scene, q.form, q.choices, q.mc_step, q.reasoning_style)
            wrong = st["caption"]
        elif stage == "reasoning":
            bad_scene, _ = _perturb_scene(scene, rng)
            _, st = render_stages(q.family, q.spec, bad_scene, q.form, q.choices, q.mc_step, q.reasoning_style)
            wrong, flaw = st["reasoning"], "reasons from objects that are not in the description"
            if wrong == right or rng.random() < 0.3:
                steps = right.split(". ")
                if len(steps) > 2:
                    del steps[rng.randrange(len(steps) - 1)]
                    wrong, flaw = ". ".join(steps), "skips a step"
        else:  # conclusion
            options = list(q.choices) if q.choices else None
            if options:
                wrong = rng.choice([k for k in options if k != right])
            elif right.isdigit():
                wrong = str(max(0, int(right) + rng.choice((-2, -1, 1, 2))))
            elif right in ("yes", "no"):
                wrong = "no" if right == "yes" else "yes"
            elif right in COLORS:
                wrong = rng.choice([c for c in COLORS if c != right])
            else:
                wrong = rng.choice([s for s in (*SHAPES, "small", "large") if s != right])
            flaw = "gives an answer that does not follow from the reasoning"
        if wrong != right:
            return wrong, flaw
    return None


def judge_examples(q: Question, scene: Scene, rng: random.Random) -> list[JudgeExample]:
    """One pairwise example per stage, plus a correct and an incorrect reasoning check."""
    out: list[JudgeExample] = []
    for i, stage in enumerate(STAGE_NAMES):
        corrupted = _corrupt(q, scene, stage, rng)
        if corrupted is None:
            continue
        wrong, flaw = corrupted
        winner = rng.choice((1, 2))
        first, second = (q.stages[stage], wrong) if winner == 1 else (wrong, q.stages[stage])
        context = {n: q.stages[n] for n in STAGE_NAMES[:i]}
        prompt = pairwise_prompt(stage, q.prompt, first, second, context)
        target = pairwise_verdict(f"response {3 - winner} {flaw}", winner)
        out.append(JudgeExample(stage, prompt, target, uses_image=True))
    bad = _corrupt(q, scene, "reasoning", rng)
    caption = q.stages["caption"]
    out.append(JudgeExample("check", reasoning_check_prompt(q.prompt, caption, q.stages["reasoning"]),
                            reasoning_check_verdict("Every step agrees with the description", True),
                            uses_image=False))
    if bad is not None:
        out.append(JudgeExample("check", reasoning_check_prompt(q.prompt, caption, bad[0]),
                                reasoning_check_verdict(f"The reasoning {bad[1]}", False),
                                uses_image=False))
    return out
