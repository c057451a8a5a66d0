import hashlib
import json
import random
import re
import subprocess
import sys
from collections import Counter

import pytest
from PIL import Image

from llavao1_data.cli import main as data_main
from llavao1_data.cli import validate_file
from llavao1_data.records import mc_prompt, read_records, read_tsv
from llavao1_data.shapes import (
    FAMILIES,
    ShapesConfig,
    build_examples,
    generate_scene,
    render_scene,
    write_dataset,
)
from llavao1_data.shapes.questions import SPATIAL_MARGIN
from llavao1_data.shapes.scene import COLORS, SHAPES
from llavao1_edge.judge import parse_pairwise_verdict, parse_reasoning_check
from llavao1_edge.stages import parse_answer


def independent_answer(family: str, spec: dict, objects: list[dict]) -> str:
    """Re-derive the answer from the scene graph alone: no templates, no generator helpers."""
    def count(flt):
        return sum(all(o[k] == v for k, v in flt.items()) for o in objects)

    if family == "count_all":
        return str(len(objects))
    if family.startswith("count_"):
        return str(count(spec["filter"]))
    if family == "arithmetic":
        return str(len(objects) - count(spec["remove"]))
    if family == "compare":
        return "yes" if count(spec["a"]) > count(spec["b"]) else "no"
    if family == "attribute":
        hits = [o for o in objects if all(o[k] == v for k, v in spec["filter"].items())]
        assert len(hits) == 1, "attribute questions must be unambiguous"
        return hits[0][spec["ask"]]
    if family == "spatial":
        (ref,) = [o for o in objects if all(o[k] == v for k, v in spec["ref"].items())]
        axis, sign = {"left": ("x", -1), "right": ("x", 1), "above": ("y", -1), "below": ("y", 1)}[spec["relation"]]
        others = [o for o in objects if o is not ref]
        inside = [o for o in others if sign * (o[axis] - ref[axis]) > SPATIAL_MARGIN]
        assert len(inside) == 1, "spatial questions must have exactly one object in relation"
        assert all(abs(o[axis] - ref[axis]) > SPATIAL_MARGIN for o in others), "no borderline objects"
        return inside[0][spec["ask"]]
    raise AssertionError(family)


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes") / "train"
    write_dataset(ShapesConfig(n=240, seed=3), out, progress=False)
    return out


def test_every_conclusion_matches_the_scene_graph(train_set):
    families = Counter()
    forms = Counter()
    for rec in read_records(train_set / "records.jsonl"):
        if rec.meta["kind"] != "cot":
            continue
        m = rec.meta
        families[m["family"]] += 1
        forms[m["form"]] += 1
        want = independent_answer(m["family"], m["spec"], m["scene"])
        parsed = parse_answer(rec.answer)
        assert parsed.well_formed, (rec.id, parsed.issues)
        got = parsed.conclusion
        if m["form"] == "mc":
            assert rec.question.endswith("Answer with the option's letter from the given choices.")
            assert m["choices"][got] == want, rec.id
        else:
            assert got == want, rec.id
        # The caption names every object of the scene with its colour and shape.
        cap = parsed.stages["caption"]
        assert len(re.findall(r"\b(?:small|large) \w+ (?:circle|square|triangle)\b", cap)) == len(m["scene"])
    assert set(families) == set(FAMILIES) and min(families.values()) == 30
    assert forms["mc"] > 60 and forms["open"] > 60


def test_judge_examples_name_the_correct_response(train_set):
    records = list(read_records(train_set / "records.jsonl"))
    cot = {r.id.rsplit("-", 1)[0]: r for r in records if r.meta["kind"] == "cot"}
    units = Counter()
    for rec in records:
        if rec.meta["kind"] != "judge":
            continue
        unit = rec.meta["unit"]
        units[unit] += 1
        correct_stages = parse_answer(cot[rec.id.split("-judge")[0]].answer).stages
        if unit == "check":
            assert rec.image is None  # text-only, as in the paper
            verdict = parse_reasoning_check(rec.answer)
            reasoning = rec.question.split("Reasoning: ", 1)[1].split("\nReply in the form")[0]
            assert verdict is (reasoning == correct_stages["reasoning"])
            continue
        choice = parse_pairwise_verdict(rec.answer)
        r1 = re.search(r"\nResponse 1: (.*)\nResponse 2: ", rec.question, re.S).group(1)
        r2 = re.search(r"\nResponse 2: (.*)\nReply in the form", rec.question, re.S).group(1)
        assert r1 != r2
        assert (r1, r2)[choice - 1] == correct_stages[unit], rec.id
    assert set(units) == {"summary", "caption", "reasoning", "conclusion", "check"}


def test_same_arguments_give_identical_bytes(tmp_path):
    def digest(folder):
        h = hashlib.sha256()
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                h.update(p.relative_to(folder).as_posix().encode() + p.read_bytes())
        return h.hexdigest()

    cfg = ShapesConfig(n=40, seed=11)
    write_dataset(cfg, tmp_path / "a", progress=False)
    write_dataset(cfg, tmp_path / "b", progress=False)
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    write_dataset(ShapesConfig(n=40, seed=12), tmp_path / "c", progress=False)
    assert digest(tmp_path / "a") != digest(tmp_path / "c")


def test_question_i_does_not_depend_on_n():
    first = [ex.question.prompt for ex in build_examples(ShapesConfig(n=5, seed=2))]
    more = [ex.question.prompt for ex in build_examples(ShapesConfig(n=20, seed=2))]
    assert more[:5] == first


def test_eval_split_has_questions_only(tmp_path):
    write_dataset(ShapesConfig(n=30, seed=5, split="eval", kinds=("cot",)), tmp_path / "ev", progress=False)
    kinds = Counter(r.meta["kind"] for r in read_records(tmp_path / "ev" / "records.jsonl"))
    assert kinds == {"cot": 30}
    with pytest.raises(ValueError, match="drop 'judge'"):
        ShapesConfig(split="eval", kinds=("cot", "judge")).validate()
    train = {ex.question.prompt + str(ex.scene) for ex in build_examples(ShapesConfig(n=30, seed=5))}
    evals = {ex.question.prompt + str(ex.scene) for ex in build_examples(ShapesConfig(n=30, seed=5, split="eval"))}
    assert not train & evals  # the split is part of the seed


def test_tsv_output(tmp_path):
    path = write_dataset(ShapesConfig(n=16, seed=1, split="eval", kinds=("cot",), format="tsv"), tmp_path / "t",
                         progress=False)
    rows = list(read_tsv(path))
    assert len(rows) == 16 and all(r.answer in r.options for r in rows)
    assert {r.category for r in rows} == set(FAMILIES)
    assert rows[0].image.startswith(b"\x89PNG")


def test_scene_objects_do_not_overlap_and_render():
    rng = random.Random(0)
    for _ in range(50):
        scene = generate_scene(rng)
        objs = scene.objects
        assert 1 <= len(objs) <= 8
        for i, a in enumerate(objs):
            assert a.color in COLORS and a.shape in SHAPES
            for b in objs[i + 1:]:
                assert ((a.x - b.x) ** 2 + (a.y - b.y) ** 2) ** 0.5 > a.radius + b.radius
    img = render_scene(scene, 96)
    assert isinstance(img, Image.Image) and img.size == (96, 96) and img.mode == "RGB"


def test_cli_writes_and_validates(tmp_path, capsys):
    assert data_main(["shapes", "--out", str(tmp_path / "d"), "--n", "24", "--seed", "1", "-q"]) == 0
    assert "wrote" in capsys.readouterr().out
    report = validate_file(str(tmp_path / "d" / "records.jsonl"))
    assert report["problems"] == [] and report["records"]["cot"] == 24
    assert data_main(["validate", str(tmp_path / "d" / "records.jsonl")]) == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert data_main(["shapes", "--out", str(tmp_path / "x"), "--n", "0"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--n must be at least 1" in err
    assert data_main(["shapes", "--out", str(tmp_path / "x"), "--kinds", "cot,bogus"]) == 1
    assert "--kinds" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert data_main(["shapes", "--out", str(tmp_path / "mine"), "--n", "2"]) == 1
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert data_main(["validate", str(tmp_path / "nope.jsonl")]) == 1
    assert "file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        data_main(["shapes"])
    assert e.value.code == 2


def test_merge_joins_records_in_order_with_their_images_and_refuses_clashes(tmp_path, capsys):
    a, b, out = tmp_path / "a", tmp_path / "b", tmp_path / "m"
    assert data_main(["shapes", "--out", str(a), "--n", "6", "--seed", "1", "-q"]) == 0
    assert data_main(["shapes", "--out", str(b), "--n", "4", "--seed", "2", "--kinds", "cot,reasoning", "-q"]) == 0
    assert data_main(["merge", "--out", str(out), str(a), str(b)]) == 0
    assert "from 2 datasets" in capsys.readouterr().out
    lines = (out / "records.jsonl").read_text().splitlines()
    assert lines == (a / "records.jsonl").read_text().splitlines() + (b / "records.jsonl").read_text().splitlines()
    merged = list(read_records(out / "records.jsonl"))  # every image resolves inside the merged folder
    assert {r.image for r in merged if r.image} == {p.relative_to(out).as_posix() for p in (out / "images").iterdir()}
    assert any(r.image is None for r in merged)  # text-only drills keep no image
    # the same record twice, a dataset missing, one input: one line each, nothing written
    assert data_main(["merge", "--out", str(tmp_path / "x"), str(a), str(a)]) == 1
    assert "is also in" in capsys.readouterr().err
    assert data_main(["merge", "--out", str(tmp_path / "x"), str(a), str(tmp_path / "nope")]) == 1
    assert "file not found" in capsys.readouterr().err
    assert data_main(["merge", "--out", str(tmp_path / "x"), str(a)]) == 1
    assert "at least two" in capsys.readouterr().err and not (tmp_path / "x").exists()
    # an image path two inputs share must hold the same picture
    c = tmp_path / "c"
    assert data_main(["shapes", "--out", str(c), "--n", "6", "--seed", "1", "--kinds", "caption", "-q"]) == 0
    assert data_main(["merge", "--out", str(tmp_path / "ac"), str(a), str(c)]) == 0  # same seed: same pictures
    first = sorted((c / "images").iterdir())[0]
    first.unlink()
    first.write_bytes((a / "images" / sorted(p.name for p in (a / "images").iterdir())[1]).read_bytes())
    assert data_main(["merge", "--out", str(tmp_path / "ac2"), str(a), str(c)]) == 1
    assert "differs from" in capsys.readouterr().err and not (tmp_path / "ac2").exists()


def test_print_config(capsys):
    assert data_main(["shapes", "--out", "unused", "--n", "7", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["n"] == 7 and cfg["kinds"] == ["cot", "direct", "judge"]


def test_console_script_installed(tmp_path):
    out = subprocess.run([sys.executable, "-m", "llavao1_data.cli", "shapes", "--out", str(tmp_path / "s"),
                          "--n", "3", "-q"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_caption_check_reads_the_caption_wording():
    from llavao1_data.shapes.questions import caption_check, caption_text
    from llavao1_data.shapes.scene import generate_scene

    scene = generate_scene(random.Random(4), n_objects=5)
    objs = scene.to_json()
    right = caption_text(scene)
    assert caption_check(right, objs) == {"count_right": 1, "objects_right": 1, "objects": 5, "objects_wrong": 0,
                                          "left_out": 0, "made_up": 0, "wrong_size": 0, "wrong_color": 0,
                                          "wrong_shape": 0}
    o = objs[2]
    wrong_colour = "red" if o["color"] != "red" else "blue"
    bad = right.replace(f"{o['size']} {o['color']} {o['shape']}", f"{o['size']} {wrong_colour} {o['shape']}", 1)
    check = caption_check(bad, objs)
    assert check["objects_right"] == 0 and check["objects_wrong"] >= 1
    assert (check["wrong_color"], check["wrong_size"], check["wrong_shape"], check["left_out"]) == (1, 0, 0, 0)
    assert caption_check(right.replace("5 objects", "4 objects"), objs)["count_right"] == 0


def test_option_walk_check_finds_an_option_misquoted():
    from llavao1_data.shapes.questions import option_step, option_walk_check

    choices = {"A": "yellow", "B": "blue", "C": "purple", "D": "green"}
    step, letter = option_step("purple", choices, "check")
    assert letter == "C" and option_walk_check(step, choices) == {"lines": 3, "misquoted": 0, "value": "purple",
                                                                  "letter": "C"}
    # the answer value written where option A's text belongs: the walk stops at A, the letter is wrong
    short = "Its color is purple. Checking the options:\nA. purple is purple\nThe answer is option A."
    assert option_walk_check(short, choices) == {"lines": 1, "misquoted": 1, "value": "purple", "letter": "C"}
    assert option_walk_check("Its color is purple.", choices)["lines"] == 0


def test_caption_check_pairs_objects_to_name_what_is_wrong():
    from llavao1_data.shapes.questions import caption_check

    scene = [{"size": "small", "color": "red", "shape": "circle"}, {"size": "large", "color": "blue", "shape": "square"},
             {"size": "small", "color": "green", "shape": "triangle"}]
    # listed out of order, the square's size wrong, the triangle left out, a made-up object is not added
    cap = "The image shows 2 objects. From left to right: a small blue square and a small red circle."
    check = caption_check(cap, scene)
    assert (check["left_out"], check["made_up"], check["wrong_size"], check["wrong_color"], check["wrong_shape"]) \
        == (1, 0, 1, 0, 0)
    # one object too many: the best pairing leaves the extra one unpaired, whichever position it has
    cap = ("The image shows 4 objects. From left to right: a large yellow circle, a small red circle, a large blue "
           "square and a small green triangle.")
    check = caption_check(cap, scene)
    assert (check["left_out"], check["made_up"], check["wrong_size"], check["wrong_color"], check["wrong_shape"]) \
        == (0, 1, 0, 0, 0)
    assert caption_check("no objects named", scene)["left_out"] == 3
    many = "The image shows 20 objects: " + ", ".join(["a small red circle"] * 20) + "."
    assert caption_check(many, scene)["made_up"] == 17  # a rambling caption is paired without blowing up


def test_caption_order_regions_walks_the_grid_and_reasoning_lists_in_the_same_order():
    from llavao1_data.shapes.questions import caption_text, select
    from llavao1_data.shapes.scene import REGIONS, Scene, ShapeObject

    # Two objects share the top left (listed left to right), one sits at the bottom left, one at the
    # top right; the scene itself is stored left to right.
    objs = (ShapeObject("red", "circle", "small", 0.1, 0.9), ShapeObject("blue", "square", "small", 0.12, 0.2),
            ShapeObject("red", "triangle", "large", 0.28, 0.15), ShapeObject("red", "square", "small", 0.9, 0.1))
    plain = Scene(objs)  # the default, the shipped model's wording
    assert caption_text(plain) == ("The image shows 4 objects. From left to right: a small red circle at the bottom "
                                   "left, a small blue square at the top left, a large red triangle at the top left "
                                   "and a small red square at the top right.")
    assert [o.shape for o in select(plain, {"color": "red"})] == ["circle", "triangle", "square"]
    scene = Scene(objs, caption_order="regions")
    assert caption_text(scene) == ("The image shows 4 objects. Top left: a small blue square and a large red triangle. "
                                   "Top right: a small red square. Bottom left: a small red circle.")
    reds = select(scene, {"color": "red"})
    assert [o.shape for o in reds] == ["triangle", "square", "circle"]
    assert [REGIONS.index(o.region) for o in reds] == sorted(REGIONS.index(o.region) for o in reds)
    one = (ShapeObject("green", "circle", "large", 0.5, 0.5),)
    assert caption_text(Scene(one, "regions")) == "The image shows 1 object. Center: a large green circle."
    assert caption_text(Scene(one)) == "The image shows 1 object: a large green circle in the center."
    with pytest.raises(ValueError, match="caption_order"):
        Scene(one, "top-down").listed()


def test_caption_order_reaches_the_records(tmp_path):
    for order, marker in (("left-to-right", "From left to right"), ("regions", "Top left:")):
        write_dataset(ShapesConfig(n=40, seed=3, kinds=("cot", "judge"), caption_order=order), tmp_path / order,
                      progress=False)
        answers = [r.answer for r in read_records(tmp_path / order / "records.jsonl") if r.meta["kind"] == "cot"]
        assert any(marker in a for a in answers)
    with pytest.raises(ValueError, match="--caption-order"):
        ShapesConfig(caption_order="diagonal").validate()


def test_mc_step_check_lists_the_options_as_the_question_does_and_stops_at_the_match(tmp_path):
    from llavao1_data.shapes.questions import render_stages
    from llavao1_data.shapes.scene import Scene, ShapeObject

    scene = Scene((ShapeObject("red", "circle", "small", 0.2, 0.5), ShapeObject("blue", "square", "large", 0.7, 0.5)))
    choices = {"A": "3", "B": "2", "C": "1", "D": "4"}
    _, match = render_stages("count_all", {}, scene, "mc", choices)  # default: the shipped wording
    assert match["reasoning"].endswith("There are 2 objects. The answer 2 matches option B.")
    _, check = render_stages("count_all", {}, scene, "mc", choices, "check")
    assert check["reasoning"].endswith("There are 2 objects. Checking the options:\nA. 3 is not 2\nB. 2 is 2\n"
                                       "The answer is option B.")
    assert match["conclusion"] == check["conclusion"] == "B"
    # each option line repeats the question's own "\nB. 2" so the value is a copy of the same tokens
    question = mc_prompt("How many objects are there?", choices)
    assert "\nB. 2\n" in question and "\nB. 2 is 2\n" in check["reasoning"]
    _, missing = render_stages("count_all", {}, scene, "mc", {"A": "3", "B": "1"}, "check")
    assert missing["conclusion"] == "none" and missing["reasoning"].endswith("B. 1 is not 2\nNone of the options matches.")
    with pytest.raises(ValueError, match="mc_step"):
        render_stages("count_all", {}, scene, "mc", choices, "vote")


def test_mc_step_reaches_records_and_judge_examples_but_not_the_questions(tmp_path):
    runs = {}
    for step in ("match", "check"):
        write_dataset(ShapesConfig(n=40, seed=3, kinds=("cot", "judge"), mc_step=step), tmp_path / step, progress=False)
        runs[step] = list(read_records(tmp_path / step / "records.jsonl"))
    cot = {s: [r for r in recs if r.meta["kind"] == "cot"] for s, recs in runs.items()}
    # same questions, same answers: only the reasoning's last step differs
    assert [(r.question, r.meta["answer"]) for r in cot["match"]] == [(r.question, r.meta["answer"]) for r in cot["check"]]
    mc = [r for r in cot["check"] if r.meta["form"] == "mc"]
    assert mc and all("Checking the options:\n" in r.answer for r in mc)
    judged = [r for r in runs["check"] if r.meta["kind"] == "judge" and r.meta["unit"] == "reasoning"]
    assert any("Checking the options:" in r.question for r in judged)  # corrupted reasoning re-rendered in kind
    assert not any("matches option" in r.question for r in judged)
    with pytest.raises(ValueError, match="--mc-step"):
        ShapesConfig(mc_step="vote").validate()


def test_reasoning_style_scan_walks_the_caption_in_order_with_a_running_count():
    from llavao1_data.shapes.questions import caption_text, render_stages
    from llavao1_data.shapes.scene import Scene, ShapeObject

    scene = Scene((ShapeObject("red", "circle", "small", 0.1, 0.5), ShapeObject("blue", "square", "large", 0.4, 0.2),
                   ShapeObject("red", "square", "large", 0.8, 0.8)))
    _, listed = render_stages("count_color", {"filter": {"color": "red"}}, scene, "open", None)  # default: shipped
    assert listed["reasoning"].startswith("The red objects are: a small red circle at the left and ")
    _, scan = render_stages("count_color", {"filter": {"color": "red"}}, scene, "open", None, "match", "scan")
    assert scan["reasoning"] == ("Going through the objects for red objects: a small red circle at the left: red? yes, "
                                 "1; a large blue square at the top: red? no; a large red square at the bottom right: "
                                 "red? yes, 2. There are 2 red objects.")
    assert scan["conclusion"] == listed["conclusion"] == "2" and scan["caption"] == caption_text(scene)
    # every step copies the caption's phrase for the object, in the caption's order
    steps = re.findall(r"(a (?:small|large) \w+ \w+ (?:at|in) the [a-z ]+?): red\? (?:yes|no)", scan["reasoning"])
    where = [caption_text(scene).find(step) for step in steps]
    assert len(steps) == 3 and -1 not in where and where == sorted(where)
    _, none = render_stages("count_shape", {"filter": {"shape": "triangle"}}, scene, "open", None, "match", "scan")
    assert none["reasoning"].endswith("bottom right: triangle? no. There are 0 triangles.") and none["conclusion"] == "0"
    # a unique object: the walk stops at it, without a count
    _, attr = render_stages("attribute", {"ask": "size", "filter": {"color": "blue", "shape": "square"}}, scene,
                            "open", None, "match", "scan")
    assert attr["reasoning"] == ("Going through the objects for the blue square: a small red circle at the left: blue "
                                 "square? no; a large blue square at the top: blue square? yes. Its size is large.")
    _, arith = render_stages("arithmetic", {"remove": {"shape": "square"}}, scene, "open", None, "match", "scan")
    assert "square at the top: square? yes, 1; " in arith["reasoning"] and arith["reasoning"].endswith("3 - 2 = 1. 1 object is left.")
    with pytest.raises(ValueError, match="reasoning style"):
        render_stages("count_all", {}, scene, "open", None, "match", "table")


def test_reasoning_style_read_states_each_objects_own_value_before_the_check():
    from llavao1_data.shapes.questions import render_stages
    from llavao1_data.shapes.scene import Scene, ShapeObject

    scene = Scene((ShapeObject("red", "circle", "small", 0.1, 0.5), ShapeObject("blue", "square", "large", 0.4, 0.2),
                   ShapeObject("red", "square", "large", 0.8, 0.8)))
    _, read = render_stages("count_color", {"filter": {"color": "red"}}, scene, "open", None, "match", "read")
    assert read["reasoning"] == ("Going through the objects for red objects: a small red circle at the left is red: "
                                 "red? yes, 1; a large blue square at the top is blue: red? no; a large red square at "
                                 "the bottom right is red: red? yes, 2. There are 2 red objects.")
    _, scan = render_stages("count_color", {"filter": {"color": "red"}}, scene, "open", None, "match", "scan")
    assert re.sub(r" is \w+:", ":", read["reasoning"]) == scan["reasoning"]  # the scan plus the reads, nothing else
    # a shape (with its article) and a two-word filter read in the filter's word order
    _, shape = render_stages("count_shape", {"filter": {"shape": "circle"}}, scene, "open", None, "match", "read")
    assert "a large blue square at the top is a square: circle? no;" in shape["reasoning"]
    _, attr = render_stages("attribute", {"ask": "size", "filter": {"color": "blue", "shape": "square"}}, scene,
                            "open", None, "match", "read")
    assert attr["reasoning"] == ("Going through the objects for the blue square: a small red circle at the left is a "
                                 "red circle: blue square? no; a large blue square at the top is a blue square: blue "
                                 "square? yes. Its size is large.")
    _, arith = render_stages("arithmetic", {"remove": {"size": "small"}}, scene, "open", None, "match", "read")
    assert "a large blue square at the top is large: small? no;" in arith["reasoning"]


def test_reasoning_style_reaches_records_and_judge_examples_but_not_the_questions(tmp_path):
    runs = {}
    for style in ("list", "scan", "read"):
        write_dataset(ShapesConfig(n=48, seed=3, kinds=("cot", "judge"), reasoning_style=style), tmp_path / style,
                      progress=False)
        runs[style] = list(read_records(tmp_path / style / "records.jsonl"))
    cot = {s: [r for r in recs if r.meta["kind"] == "cot"] for s, recs in runs.items()}
    reads = {"scan": 0, "read": 0}
    for style in ("scan", "read"):
        assert [(r.question, r.meta["answer"]) for r in cot["list"]] == [(r.question, r.meta["answer"]) for r in cot[style]]
        for rec in cot[style]:
            m, reasoning = rec.meta, parse_answer(rec.answer).stages["reasoning"]
            if m["family"] in ("count_color", "count_shape", "count_color_shape"):
                # the walk names every object once and marks exactly the ones the scene graph counts
                assert reasoning.count("? no") + reasoning.count("? yes") == len(m["scene"]), rec.id
                assert str(reasoning.count("? yes")) == independent_answer(m["family"], m["spec"], m["scene"]), rec.id
            # a read value equals what is sought exactly where the check says yes
            for value, sought, verdict in re.findall(r" is (?:an? )?([a-z ]+?): ([a-z ]+)\? (yes|no)", reasoning):
                assert (value == sought) == (verdict == "yes"), rec.id
                reads[style] += 1
        judged = [r for r in runs[style] if r.meta["kind"] == "judge" and r.meta["unit"] == "reasoning"]
        assert any("Going through the objects" in r.question for r in judged)  # corrupted reasoning re-rendered in kind
    assert reads["scan"] == 0 and reads["read"] > 20
    with pytest.raises(ValueError, match="--reasoning-style"):
        ShapesConfig(reasoning_style="table").validate()


@pytest.mark.parametrize("mc_step", ["check", "match"])
def test_option_drill_gives_the_value_and_asks_only_for_the_option_step(tmp_path, mc_step):
    write_dataset(ShapesConfig(n=200, seed=5, kinds=("cot", "option"), mc_step=mc_step), tmp_path, progress=False)
    recs = list(read_records(tmp_path / "records.jsonl"))
    cot = [r for r in recs if r.meta["kind"] == "cot"]
    drills = [r for r in recs if r.meta["kind"] == "option"]
    assert len(drills) == len(cot) == 200 and all(r.image is None for r in drills)  # one per question, text only
    for c, d in zip(cot, drills, strict=True):
        question, reply = d.question, d.answer
        choices = dict(re.findall(r"\n([A-D])\. (\S+)", question))
        assert question.endswith(f"\nThe answer is {c.meta['value']}. Which option is it?")
        assert choices[d.meta["answer"]] == c.meta["value"]  # the named letter holds the given value
        assert reply.startswith("Checking the options:\n" if mc_step == "check" else "The answer ")
        assert reply.endswith(f"option {d.meta['answer']}.")
        if c.meta["form"] == "mc":  # the same options and the same step as the question's reasoning
            assert c.meta["choices"] == choices and c.answer.split("</REASONING>")[0].rstrip().endswith(reply)
    assert {c.meta["form"] for c in cot} == {"mc", "open"}  # open questions get options of their own
    # filler of random length between the options and the ask: the options sit at no fixed distance
    fillers = [d.question.split("given choices.")[1].split("The answer is")[0] for d in drills]
    assert len({len(f) for f in fillers}) > 12
    for f in fillers:  # no part of the option step (the reply) leaks into the filler
        assert "Checking the options:" not in f and "The answer" not in f and not re.search(r"[A-D]\. \S+ is", f)
    for c, f in zip(cot, fillers, strict=True):  # the opening words of the question's own answer
        words = re.sub(r"</?[A-Z]+>", " ", c.answer).split()
        assert words[:len(f.split())] == f.split()
    with pytest.raises(ValueError, match="--kinds"):
        ShapesConfig(split="eval", kinds=("cot", "option")).validate()


def test_caption_records_hold_the_image_and_the_caption_stage_alone(tmp_path):
    kinds = ("cot", "option")
    write_dataset(ShapesConfig(n=120, seed=6, kinds=kinds, option_fraction=0.5), tmp_path / "a", progress=False)
    write_dataset(ShapesConfig(n=120, seed=6, kinds=(*kinds, "caption"), option_fraction=0.5, caption_fraction=0.5),
                  tmp_path / "b", progress=False)
    recs = list(read_records(tmp_path / "b" / "records.jsonl"))
    caps = [r for r in recs if r.meta["kind"] == "caption"]
    assert 40 < len(caps) < 80  # about half the questions
    cot = {r.id.removesuffix("-cot"): r for r in recs if r.meta["kind"] == "cot"}
    for c in caps:
        q = cot[c.id.removesuffix("-caption")]
        assert c.image == q.image and c.question == "Describe the image."  # no question to copy a colour from
        assert c.answer == "<CAPTION> " + parse_answer(q.answer).stages["caption"] + " </CAPTION>"
        assert c.meta["scene"] == q.meta["scene"]
    # adding captions leaves every other record byte-identical (each kind draws from its own RNG)
    other = [line for line in (tmp_path / "b" / "records.jsonl").read_text().splitlines()
             if json.loads(line)["meta"]["kind"] != "caption"]
    assert other == (tmp_path / "a" / "records.jsonl").read_text().splitlines()
    with pytest.raises(ValueError, match="--kinds"):
        ShapesConfig(split="eval", kinds=("cot", "caption")).validate()


def test_reasoning_drill_gives_summary_and_caption_and_asks_for_the_rest(tmp_path):
    write_dataset(ShapesConfig(n=80, seed=7, kinds=("cot", "reasoning"), reasoning_fraction=1.0), tmp_path,
                  progress=False)
    recs = list(read_records(tmp_path / "records.jsonl"))
    cot = [r for r in recs if r.meta["kind"] == "cot"]
    drills = [r for r in recs if r.meta["kind"] == "reasoning"]
    assert len(drills) == len(cot) == 80 and all(d.image is None for d in drills)  # text only: no image to look at
    listed = 0
    for c, d in zip(cot, drills, strict=True):
        head, tail = c.answer.split("<REASONING>")
        assert d.question == c.question + "\n" + head.rstrip()  # the question, then SUMMARY and CAPTION as answered
        assert d.answer == "<REASONING>" + tail  # the reply: REASONING and CONCLUSION, the same text
        caption = parse_answer(c.answer).stages["caption"]
        for obj in re.findall(r"(?:small|large) \w+ (?:circle|square|triangle) (?:at|in) the [a-z ]+?(?=[,.]| and )",
                              parse_answer(d.answer).stages["reasoning"]):
            assert obj in caption  # every object the reasoning lists can be copied from the given caption
            listed += 1
    assert listed > 40
    assert ShapesConfig(kinds=("cot",), reasoning_fraction=0.3).kinds == ("cot",)
    with pytest.raises(ValueError, match="--reasoning-fraction"):
        ShapesConfig(reasoning_fraction=1.5).validate()


def test_reasoning_check_counts_the_objects_taken_from_the_caption():
    from llavao1_data.shapes.questions import reasoning_check

    named = checked = 0
    for ex in build_examples(ShapesConfig(n=120, seed=8)):  # the reference answers take every object from the caption
        check = reasoning_check(ex.question.stages["reasoning"], ex.question.stages["caption"])
        assert check["reasoning_from_caption"] == check["reasoning_objects"]
        named += check["reasoning_objects"]
        checked += ex.question.family == "count_color"
    assert named > 100 and checked > 0
    caption = ("The image shows 3 objects. From left to right: a large red circle at the top left, a small red "
               "square in the center and a small blue square at the bottom right.")
    looked_again = "The red objects are: a large red circle at the top left and a large red square at the bottom."
    assert reasoning_check(looked_again, caption) == {"reasoning_objects": 2, "reasoning_from_caption": 1}
    twice = "a large red circle at the top left, a large red circle at the top left"  # only as often as the caption
    assert reasoning_check(twice, caption) == {"reasoning_objects": 2, "reasoning_from_caption": 1}
