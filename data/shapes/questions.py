"""Question families over a shapes scene, each with a four-stage reference answer.

`make_question` picks a question of a family for a scene (or None when the scene does not allow
an unambiguous one). `render_stages` turns (family, spec, scene) into the answer value and the
four stage texts with no randomness, so corrupted judge examples can re-render the stages from a
perturbed scene. The answer itself is computed from the scene graph by `solve`.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from dataclasses import dataclass

from ..records import mc_prompt
from .scene import COLORS, REGIONS, SHAPES, SIZES, Scene, ShapeObject

FAMILIES: tuple[str, ...] = (
    "count_all", "count_color", "count_shape", "count_color_shape",
    "attribute", "spatial", "compare", "arithmetic",
)  # fmt: skip
RELATIONS = ("left", "right", "above", "below")
SPATIAL_MARGIN = 0.06  # objects closer than this to the reference along the axis are ambiguous
_LETTERS = "ABCD"
# How the reasoning names the multiple-choice option. "match": one closing sentence, "The answer 2 matches
# option B." (the shipped model; it names the letter at chance, README). "check": the options rewritten
# line by line as the question lays them out ("\nA. 4 is not 2\nB. 2 is 2"), so each value is a copy of
# the same tokens in the question and the letter is a few tokens back (with option drills: 0.610 greedy, README).
MC_STEPS = ("match", "check")
# How each step begins: where a drill's filler, cut from the answer's own text, must stop.
MC_STEP_OPENINGS = {"match": " The answer", "check": " Checking the options:"}
# How the reasoning picks objects out of the caption. "list": names the matching ones at once ("The red objects
# are: a ... and a ...."), a lookup by content the shipped model gets wrong (it takes 20% of them from its caption,
# README). "scan": walks the caption's objects in order, copying each and marking it ("a small red circle at the
# top: red? yes, 1; a large green square at the right: red? no;"), so each step is the next caption item plus a
# local check (it learns the shape checks, not the colour ones, README). "read": the scan, each step first reading
# the object's own value ("a small red circle at the top is red: red? yes, 1"), so the check compares two words
# three tokens apart and the read is the latest colour (or shape, size) word in the text.
REASONING_STYLES = ("list", "scan", "read")


@dataclass
class Question:
    family: str
    spec: dict  # structured parameters: filters, relation, asked attribute ...
    form: str  # "open" or "mc"
    text: str  # the question itself, without options
    value: str  # the open-form answer: "3", "red", "yes"
    choices: dict[str, str] | None  # letter -> option text, for "mc"
    stages: dict[str, str]  # summary, caption, reasoning, conclusion
    mc_step: str = "match"  # one of MC_STEPS; judge examples re-render the stages with it
    reasoning_style: str = "list"  # one of REASONING_STYLES; likewise

    @property
    def prompt(self) -> str:
        """What the user asks: the question, plus the options for multiple choice."""
        return mc_prompt(self.text, self.choices) if self.choices else self.text

    @property
    def answer(self) -> str:
        """The exact CONCLUSION: the letter for multiple choice, else the value."""
        return self.stages["conclusion"]


# ---------------------------------------------------------------------------------------------
# Filters and phrases.


def matches(o: ShapeObject, flt: dict) -> bool:
    return all(getattr(o, k) == v for k, v in flt.items())


def select(scene: Scene, flt: dict) -> list[ShapeObject]:
    """The objects matching `flt`, in the order the caption lists them."""
    return scene.listed(o for o in scene.objects if matches(o, flt))


def noun(flt: dict, plural: bool) -> str:
    """{'color': 'red', 'shape': 'circle'} -> 'red circles'; {} -> 'objects'."""
    words = [flt[k] for k in ("size", "color") if k in flt]
    words.append(flt.get("shape", "object") + ("s" if plural else ""))
    return " ".join(words)


def _and_join(phrases: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _listing(objs: list[ShapeObject]) -> str:
    return _and_join([o.describe() for o in objs])


def _counting(n: int) -> str:
    return ", ".join(str(i) for i in range(1, n + 1))


def _are(n: int, what_plural: str, what_singular: str) -> str:
    return f"There is 1 {what_singular}." if n == 1 else f"There are {n} {what_plural}."


def caption_text(scene: Scene) -> str:
    """left-to-right: 'The image shows 2 objects. From left to right: a large red circle at the top
    left and ...'. regions: 'The image shows 3 objects. Top left: a large red circle. Center: a small
    blue square and a large green triangle.' - where first, then what, region by region, so the decoder
    finds the next object by asking "is there one in this region?" rather than "which is next to the
    right?"."""
    n = len(scene.objects)
    if scene.caption_order == "left-to-right":
        if n == 1:
            return f"The image shows 1 object: {scene.objects[0].describe()}."
        return f"The image shows {n} objects. From left to right: {_listing(scene.listed())}."
    parts = [f"The image shows {n} object{'s' if n != 1 else ''}."]
    objs = scene.listed()
    for region in REGIONS:
        here = [_a(o.name) for o in objs if o.region == region]
        if here:
            parts.append(f"{region[0].upper()}{region[1:]}: {_and_join(here)}.")
    return " ".join(parts)


_OBJECT_PHRASE = re.compile(rf"\b({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})\b")
_CAPTION_COUNT = re.compile(r"shows (\d+) objects?")


ATTRIBUTES = ("size", "color", "shape")  # the order of _OBJECT_PHRASE's groups


def caption_check(caption: str, scene: list[dict]) -> dict[str, int]:
    """How a caption (in caption_text's wording) matches a scene: the object count it states, and
    the objects it lists as (size, colour, shape) - order aside. Listed objects are also paired
    with the scene's (the pairing with fewest wrong attributes) to say what goes wrong: a wrong
    size, colour or shape in a paired object, objects left out, objects made up."""
    found = _OBJECT_PHRASE.findall(caption)
    truth = [(o["size"], o["color"], o["shape"]) for o in scene]
    listed, want = Counter(found), Counter(truth)
    stated = _CAPTION_COUNT.search(caption)
    pairs = _pair_objects(found, truth)
    out = {"count_right": int(bool(stated) and int(stated.group(1)) == len(scene)),
           "objects_right": int(listed == want), "objects": len(scene),
           "objects_wrong": sum((want - listed).values()),
           "left_out": len(truth) - len(pairs), "made_up": len(found) - len(pairs)}
    for k, name in enumerate(ATTRIBUTES):
        out[f"wrong_{name}"] = sum(found[i][k] != truth[j][k] for i, j in pairs)
    return out


_PLACED_OBJECT = re.compile(rf"\b(?:{'|'.join(SIZES)}) (?:{'|'.join(COLORS)}) (?:{'|'.join(SHAPES)}) (?:at|in) the "
                           rf"(?:{'|'.join(sorted(REGIONS, key=len, reverse=True))})\b")


def reasoning_check(reasoning: str, caption: str) -> dict[str, int]:
    """Does the reasoning take its objects from the caption? Objects the reasoning names with their place
    ("a large red circle at the top left"), and how many of them the caption names exactly so."""
    named = _PLACED_OBJECT.findall(reasoning)
    in_caption = Counter(_PLACED_OBJECT.findall(caption))
    return {"reasoning_objects": len(named), "reasoning_from_caption": sum((Counter(named) & in_caption).values())}


def _pair_objects(found: list[tuple], truth: list[tuple]) -> list[tuple[int, int]]:
    """(found index, truth index) pairs, min(len) of them, with the fewest differing attributes in
    total: a dynamic programme over subsets of the longer list (scenes have at most 8 objects)."""
    if not found or not truth:
        return []
    if len(found) > len(truth):
        return [(i, j) for j, i in _pair_objects(truth, found)]
    truth = truth[:12]  # a rambling caption: pair the first dozen, the rest count as made up

    def cost(a, b):
        return sum(x != y for x, y in zip(a, b, strict=True))
    best: dict[int, tuple[int, list[tuple[int, int]]]] = {0: (0, [])}  # truth subset used -> (cost, pairs)
    for i, f in enumerate(found):
        nxt: dict[int, tuple[int, list[tuple[int, int]]]] = {}
        for used, (c, pairs) in best.items():
            for j, t in enumerate(truth):
                if not used >> j & 1:
                    key, val = used | 1 << j, c + cost(f, t)
                    if key not in nxt or val < nxt[key][0]:
                        nxt[key] = (val, [*pairs, (i, j)])
        best = nxt
    return min(best.values(), key=lambda v: v[0])[1]


def _in_relation(ref: ShapeObject, o: ShapeObject, relation: str) -> float:
    """Signed distance of o from ref along the relation's axis (positive: o is in relation)."""
    return {"left": ref.x - o.x, "right": o.x - ref.x, "above": ref.y - o.y, "below": o.y - ref.y}[relation]


def _relation_phrase(relation: str) -> str:
    return {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}[relation]


# ---------------------------------------------------------------------------------------------
# The answer, from the scene graph.


def solve(family: str, spec: dict, scene: Scene) -> tuple[str, list[ShapeObject]]:
    """The open-form answer and the objects the reasoning rests on. Tolerates specs that do not
    fit the scene (perturbed scenes for corrupted examples): "none" when nothing qualifies."""
    if family == "count_all":
        return str(len(scene.objects)), list(scene.objects)
    if family in ("count_color", "count_shape", "count_color_shape"):
        objs = select(scene, spec["filter"])
        return str(len(objs)), objs
    if family == "attribute":
        objs = select(scene, spec["filter"])
        return (getattr(objs[0], spec["ask"]) if objs else "none"), objs[:1]
    if family == "spatial":
        refs = select(scene, spec["ref"])
        if not refs:
            return "none", []
        cands = [o for o in scene.objects if o is not refs[0] and _in_relation(refs[0], o, spec["relation"]) > SPATIAL_MARGIN]
        cands.sort(key=lambda o: _in_relation(refs[0], o, spec["relation"]))
        return (getattr(cands[0], spec["ask"]) if cands else "none"), [refs[0], *cands[:1]]
    if family == "compare":
        a, b = select(scene, spec["a"]), select(scene, spec["b"])
        return ("yes" if len(a) > len(b) else "no"), a + b
    if family == "arithmetic":
        removed = select(scene, spec["remove"])
        return str(len(scene.objects) - len(removed)), removed
    raise ValueError(f"unknown family {family!r}")


# ---------------------------------------------------------------------------------------------
# Question text and stage texts.


def question_text(family: str, spec: dict) -> str:
    if family == "count_all":
        return "How many objects are there?"
    if family in ("count_color", "count_shape", "count_color_shape"):
        return f"How many {noun(spec['filter'], True)} are there?"
    if family == "attribute":
        return f"What {spec['ask']} is the {noun(spec['filter'], False)}?"
    if family == "spatial":
        return f"What {spec['ask']} is the object {_relation_phrase(spec['relation'])} the {noun(spec['ref'], False)}?"
    if family == "compare":
        return f"Are there more {noun(spec['a'], True)} than {noun(spec['b'], True)}?"
    if family == "arithmetic":
        return f"Remove all {noun(spec['remove'], True)}. How many objects are left?"
    raise ValueError(f"unknown family {family!r}")


def summary_text(family: str, spec: dict, form: str) -> str:
    if family == "count_all":
        s = "The question asks for the number of objects. I will describe the objects in the image and count them."
    elif family in ("count_color", "count_shape", "count_color_shape"):
        g = noun(spec["filter"], True)
        s = f"The question asks how many {g} there are. I will describe the objects, pick out the {g} and count them."
    elif family == "attribute":
        g = noun(spec["filter"], False)
        s = f"The question asks for the {spec['ask']} of the {g}. I will describe the objects, find the {g} and report its {spec['ask']}."
    elif family == "spatial":
        g, rel = noun(spec["ref"], False), _relation_phrase(spec["relation"])
        s = (f"The question asks for the {spec['ask']} of the object {rel} the {g}. I will describe the objects, "
             f"locate the {g}, find the object {rel} it and report its {spec['ask']}.")
    elif family == "compare":
        a, b = noun(spec["a"], True), noun(spec["b"], True)
        s = (f"The question asks whether there are more {a} than {b}. I will describe the objects, "
             f"count the {a} and the {b}, and compare the two counts.")
    elif family == "arithmetic":
        g = noun(spec["remove"], True)
        s = (f"The question asks how many objects are left after removing all {g}. I will describe the objects, "
             f"count all of them, count the {g} and subtract.")
    else:
        raise ValueError(f"unknown family {family!r}")
    return s + (" Then I will choose the matching option." if form == "mc" else "")


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _predicate(flt: dict) -> str:
    """What 'No object is ...' says: 'blue', 'small', 'a red circle'."""
    if "shape" in flt:
        return _a(noun(flt, False))
    return " ".join(flt[k] for k in ("size", "color") if k in flt)


def _sought(flt: dict, o: ShapeObject | None = None) -> str:
    """The filter's words in caption order ('red circle'); with `o`, that object's own values for the same keys."""
    return " ".join((getattr(o, k) if o else flt[k]) for k in ("size", "color", "shape") if k in flt)


def _scan(scene: Scene, flt: dict, style: str, first_only: bool = False) -> str:
    """'Going through the objects for red objects: a small green triangle at the left: red? no; a small red circle at
    the top: red? yes, 1.' - every object in caption order with a running count (first_only: stop at the match, no
    count). Each step restates what is sought next to the object's own words, so the yes/no compares nearby tokens;
    style "read" puts the object's own value between them: 'a small green triangle at the left is green: red? no'."""
    sought = _sought(flt)
    steps, found = [], 0
    for o in scene.listed():
        head = o.describe()
        if style == "read":
            value = _sought(flt, o)
            head += f" is {_a(value) if 'shape' in flt else value}"
        if not matches(o, flt):
            steps.append(f"{head}: {sought}? no")
            continue
        found += 1
        steps.append(f"{head}: {sought}? yes" + ("" if first_only else f", {found}"))
        if first_only:
            break
    target = f"the {noun(flt, False)}" if first_only else noun(flt, True)
    return f"Going through the objects for {target}: {'; '.join(steps)}."


def _count_steps(scene: Scene, flt: dict, style: str) -> str:
    objs, plural, singular = select(scene, flt), noun(flt, True), noun(flt, False)
    if style != "list":
        return f"{_scan(scene, flt, style)} {_are(len(objs), plural, singular)}"
    if not objs:
        return f"No object is {_predicate(flt)}. There are 0 {plural}."
    return f"The {plural} are: {_listing(objs)}. Counting them: {_counting(len(objs))}. {_are(len(objs), plural, singular)}"


def reasoning_text(family: str, spec: dict, scene: Scene, style: str = "list") -> str:
    if style not in REASONING_STYLES:
        raise ValueError(f"reasoning style must be one of {REASONING_STYLES}, got {style!r}")
    value, objs = solve(family, spec, scene)
    if family == "count_all":
        n = len(scene.objects)
        return f"Counting every object in the description: {_counting(n)}. {_are(n, 'objects', 'object')}"
    if family in ("count_color", "count_shape", "count_color_shape"):
        return _count_steps(scene, spec["filter"], style)
    if family == "attribute":
        g = noun(spec["filter"], False)
        if not objs:
            return f"No object is {_predicate(spec['filter'])}."
        if style != "list":
            return f"{_scan(scene, spec['filter'], style, first_only=True)} Its {spec['ask']} is {value}."
        return f"The only {g} is {objs[0].describe()}. Its {spec['ask']} is {value}."
    if family == "spatial":
        g, rel = noun(spec["ref"], False), _relation_phrase(spec["relation"])
        if not objs:
            return f"No object is {_predicate(spec['ref'])}."
        ref = objs[0]
        head = _scan(scene, spec["ref"], style, first_only=True) if style != "list" else f"The {g} is {ref.describe()}."
        if len(objs) == 1:
            return f"{head} No object is {rel} it."
        return f"{head} The only object {rel} it is {objs[1].describe()}. Its {spec['ask']} is {value}."
    if family == "compare":
        a, b = select(scene, spec["a"]), select(scene, spec["b"])
        pa, pb = noun(spec["a"], True), noun(spec["b"], True)
        cmp = "more than" if len(a) > len(b) else ("equal to" if len(a) == len(b) else "fewer than")
        verdict = "there are" if value == "yes" else "there are not"
        return (f"{_count_steps(scene, spec['a'], style)} {_count_steps(scene, spec['b'], style)} {len(a)} is {cmp} {len(b)}, "
                f"so {verdict} more {pa} than {pb}. The answer is {value}.")
    if family == "arithmetic":
        n, k = len(scene.objects), len(objs)
        left = f"{n - k} object is left." if n - k == 1 else f"{n - k} objects are left."
        return (f"There are {n} objects in total. {_count_steps(scene, spec['remove'], style)} "
                f"Removing {k} from {n} leaves {n} - {k} = {n - k}. {left}")
    raise ValueError(f"unknown family {family!r}")


def option_step(value: str, choices: dict[str, str], mc_step: str) -> tuple[str, str]:
    """(text ending the reasoning, conclusion) that names the option holding `value`."""
    letter = next((k for k, v in choices.items() if v == value), None)
    if mc_step == "match":
        if letter is None:
            return f"{MC_STEP_OPENINGS['match']} {value} is not among the options.", "none"
        return f"{MC_STEP_OPENINGS['match']} {value} matches option {letter}.", letter
    if mc_step != "check":
        raise ValueError(f"mc_step must be one of {MC_STEPS}, got {mc_step!r}")
    lines = []
    for k, v in choices.items():  # stop at the match: its letter starts the last line
        lines.append(f"{k}. {v} is {value}" if v == value else f"{k}. {v} is not {value}")
        if v == value:
            break
    end = f"The answer is option {letter}." if letter else "None of the options matches."
    return MC_STEP_OPENINGS["check"] + "\n" + "\n".join(lines) + "\n" + end, letter or "none"


_OPTION_LINE = re.compile(r"^([A-Z])\. (.+?) is (not )?(.+?)$", re.MULTILINE)  # a "check" step's line


def option_walk_check(reasoning: str, choices: dict[str, str]) -> dict:
    """A REASONING's "check" option step against the question's options: how many of its lines misquote
    their option ("A. purple is purple" where option A is yellow), the value it settled on (its "X. v is v"
    line) and the letter that value has among the options, i.e. what a walk quoting them right would name."""
    lines = _OPTION_LINE.findall(reasoning)
    misquoted = sum(1 for letter, text, _, _ in lines if choices.get(letter) != text)
    settled = [text for _, text, negated, value in lines if not negated and text == value]
    value = settled[-1] if settled else None
    letter = next((k for k, v in choices.items() if v == value), None) if value is not None else None
    return {"lines": len(lines), "misquoted": misquoted, "value": value, "letter": letter}


def render_stages(family: str, spec: dict, scene: Scene, form: str,
                  choices: dict[str, str] | None, mc_step: str = "match",
                  reasoning_style: str = "list") -> tuple[str, dict[str, str]]:
    """(value, stages) for a question on `scene`; deterministic."""
    value, _ = solve(family, spec, scene)
    reasoning = reasoning_text(family, spec, scene, reasoning_style)
    conclusion = value
    if form == "mc":
        assert choices is not None
        step, conclusion = option_step(value, choices, mc_step)
        reasoning += step
    stages = {
        "summary": summary_text(family, spec, form),
        "caption": caption_text(scene),
        "reasoning": reasoning,
        "conclusion": conclusion,
    }
    return value, stages


# ---------------------------------------------------------------------------------------------
# Picking a question for a scene.


def _pick_filter(rng: random.Random, scene: Scene, keys: tuple[str, ...], present_p: float = 0.8) -> dict:
    """A filter over `keys`, usually one that matches some object of the scene."""
    if rng.random() < present_p:
        o = rng.choice(scene.objects)
        return {k: getattr(o, k) for k in keys}
    pools = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES)}
    return {k: rng.choice(pools[k]) for k in keys}


def pick_spec(family: str, scene: Scene, rng: random.Random) -> dict | None:
    if family == "count_all":
        return {}
    if family == "count_color":
        return {"filter": _pick_filter(rng, scene, ("color",))}
    if family == "count_shape":
        return {"filter": _pick_filter(rng, scene, ("shape",))}
    if family == "count_color_shape":
        return {"filter": _pick_filter(rng, scene, ("color", "shape"))}
    if family == "attribute":
        options = []
        for ask, keys in (("color", ("shape",)), ("shape", ("color",)), ("size", ("color", "shape"))):
            for o in scene.objects:
                flt = {k: getattr(o, k) for k in keys}
                if len(select(scene, flt)) == 1:
                    options.append({"ask": ask, "filter": flt})
        return rng.choice(options) if options else None
    if family == "spatial":
        options = []
        for ref in scene.objects:
            flt = {"color": ref.color, "shape": ref.shape}
            if len(select(scene, flt)) != 1:
                continue
            for rel in RELATIONS:
                dists = [_in_relation(ref, o, rel) for o in scene.objects if o is not ref]
                inside = [d for d in dists if d > SPATIAL_MARGIN]
                ambiguous = [d for d in dists if abs(d) <= SPATIAL_MARGIN]
                if len(inside) == 1 and not ambiguous:
                    for ask in ("shape", "color"):
                        options.append({"relation": rel, "ref": flt, "ask": ask})
        return rng.choice(options) if options else None
    if family == "compare":
        key = rng.choice(("shape", "color"))
        pool = list(SHAPES) if key == "shape" else list(COLORS)
        a, b = rng.sample(pool, 2)
        return {"a": {key: a}, "b": {key: b}}
    if family == "arithmetic":
        keys = rng.choice((("color",), ("shape",), ("size",), ("color", "shape")))
        return {"remove": _pick_filter(rng, scene, keys, present_p=0.9)}
    raise ValueError(f"unknown family {family!r}")


def choices_for(value: str, rng: random.Random) -> dict[str, str]:
    """Lettered options for `value`: the value and distractors of its kind, shuffled."""
    if value.isdigit():
        n = int(value)
        pool = [str(v) for v in range(max(0, n - 3), n + 4) if v != n]
        opts = [value, *rng.sample(pool, 3)]
    elif value in ("yes", "no"):
        opts = ["yes", "no"]
    elif value in COLORS:
        opts = [value, *rng.sample([c for c in COLORS if c != value], 3)]
    elif value in SHAPES:
        opts = list(SHAPES)
    elif value in SIZES:
        opts = list(SIZES)
    else:
        raise ValueError(f"no options for answer {value!r}")
    rng.shuffle(opts)
    return dict(zip(_LETTERS, opts, strict=False))


def make_question(family: str, scene: Scene, rng: random.Random, form: str = "open",
                  mc_step: str = "match", reasoning_style: str = "list") -> Question | None:
    """A question of `family` about `scene` in `form` ("open" or "mc"), or None if the scene
    allows no unambiguous question of that family."""
    if form not in ("open", "mc"):
        raise ValueError(f"form must be 'open' or 'mc', got {form!r}")
    spec = pick_spec(family, scene, rng)
    if spec is None:
        return None
    value, _ = solve(family, spec, scene)
    text = question_text(family, spec)
    choices = None
    if form == "mc":
        choices = choices_for(value, rng)
    _, stages = render_stages(family, spec, scene, form, choices, mc_step, reasoning_style)
    return Question(family, spec, form, text, value, choices, stages, mc_step, reasoning_style)
