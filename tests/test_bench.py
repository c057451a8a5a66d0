"""Bench commands on the tiny trained model: accuracy (JSONL and TSV), latency, paper baseline, sweep."""

import json
import statistics
from collections import defaultdict

import pytest

from llavao1_bench.accuracy import Answer, _score_caption_step, run_accuracy
from llavao1_bench.cli import main as bench_main
from llavao1_bench.common import BenchError, load_items, wilson_interval
from llavao1_bench.compare import compare_reports, load_accuracy, mcnemar_exact
from llavao1_bench.paper_search import PaperStyleSearch
from llavao1_bench.plots import pareto_front
from llavao1_data.records import read_records
from llavao1_data.shapes import ShapesConfig, write_dataset
from llavao1_edge.api import Reasoner
from llavao1_edge.options import parse_spec, spec_label
from llavao1_edge.search import SearchConfig


def _model_args(trained):
    return ["--model", str(trained.gguf), "--mmproj", str(trained.mmproj), "--threads", "2", "-q"]


def test_accuracy_on_jsonl(trained, capsys):
    assert bench_main(["accuracy", *_model_args(trained), "--data", str(trained.data / "records.jsonl"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert 0.0 <= doc["accuracy"] <= 1.0 and doc["n"] == 12
    assert doc["accuracy"] >= 0.5  # the model memorised these questions
    lo, hi = doc["ci95"]
    assert lo <= doc["accuracy"] <= hi
    assert set(doc["by_category"]) == {"count_color", "attribute", "compare"}
    assert all({"question", "expected", "got"} <= set(f) for f in doc["failures"])
    cap = doc["captions"]  # the memorised captions, checked against the records' scene graphs
    assert cap["checked"] == 12 and cap["objects"] >= 12
    assert cap["count_right"] >= 6 and cap["objects_wrong"] < cap["objects"]
    paired = cap["objects"] - cap["left_out"]  # what goes wrong, over the objects paired with the scene's
    assert all(0 <= cap[f"wrong_{a}"] <= paired for a in ("size", "color", "shape")) and cap["made_up"] >= 0
    assert 0 <= cap["reasoning_from_caption"] <= cap["reasoning_objects"] > 0  # count_color reasoning names objects
    by_n = doc["captions_by_objects"]  # the same checks split by how many objects the scene has
    assert sum(n for _, n in by_n.values()) == 12 and sum(r for r, _ in by_n.values()) == cap["objects_right"]
    forms = doc["by_form"]  # multiple choice (options A-D) and open questions, each counted once
    recs = [json.loads(line) for line in (trained.data / "records.jsonl").read_text().splitlines()]
    mc = sum(1 for r in recs if r["meta"].get("form") == "mc")
    assert 0 < mc < 12 and forms["mc"][1] == mc and sum(n for _, n in forms.values()) == 12
    assert sum(k for k, _ in forms.values()) == doc["correct"]
    assert len(doc["questions_sha256"]) == 64  # what `compare` checks before pairing two reports


def test_accuracy_reports_which_response_the_judge_picks_and_its_checks(trained, capsys):
    assert bench_main(["accuracy", *_model_args(trained), "--data", str(trained.data / "records.jsonl"),
                       "--search", "stage:4:judge", "--limit", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    picks, checks = doc["judge_picks"], doc["reasoning_checks"]
    assert set(picks) == {"first", "second"} and all(v >= 0 for v in picks.values())
    assert set(checks) == {"correct", "incorrect"} and all(v >= 0 for v in checks.values())
    cs = doc["caption_search"]  # one CAPTION selection per question, its 4 candidates scored against the scene
    assert cs["steps"] == 4 and cs["candidates"] == 16 and 0 <= cs["candidates_right"] <= 16
    assert cs["chosen_right"] <= cs["any_right"] <= cs["steps"] and cs["judge_right"] <= cs["decisive_pairs"]
    assert bench_main(["accuracy", *_model_args(trained), "--data", str(trained.data / "records.jsonl"),
                       "--search", "greedy", "--limit", "2", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["judge_picks"] == {"first": 0, "second": 0}  # greedy judges nothing
    assert doc["reasoning_checks"] == {"correct": 0, "incorrect": 0}
    assert doc["caption_search"] == {}  # greedy selects nothing


def test_accuracy_counts_the_runtime_flags(trained, capsys):
    args = [*_model_args(trained), "--data", str(trained.data / "records.jsonl"), "--search", "stage:4:judge", "--limit", "3"]
    assert bench_main(["accuracy", *args, "--json"]) == 0
    assert not any("KV cache" in f for f in json.loads(capsys.readouterr().out)["flags"])
    assert bench_main(["accuracy", *args, "--ctx", "512", "--json"]) == 0  # too small for 4 candidates and judges
    flags = json.loads(capsys.readouterr().out)["flags"]
    full = {f: n for f, n in flags.items() if "KV cache (n_ctx N)" in f}  # numbers folded, so answers add up
    assert full and all(1 <= n <= 3 for n in full.values()), flags


def test_caption_selection_is_scored_against_the_scene():
    scene = [{"size": "small", "color": "red", "shape": "square", "x": 0.5, "y": 0.2}]
    right = "The image shows 1 object: a small red square at the top."
    wrong = "The image shows 1 object: a small blue square at the top."
    counts = defaultdict(int)
    step = {"candidates": [wrong, right, wrong, wrong], "chosen": 0, "judgements": [(0, 1, 0), (2, 3, 2), (0, 2, 0)]}
    _score_caption_step(step, scene, counts)
    assert dict(counts) == {"steps": 1, "candidates": 4, "candidates_right": 1, "any_right": 1, "chosen_right": 0,
                            "decisive_pairs": 1, "judge_right": 0}  # only (0, 1) had a right caption, and lost it


def test_accuracy_counts_answers_lost_to_a_misquoted_option(tmp_path):
    write_dataset(ShapesConfig(n=40, seed=3, split="eval", kinds=("cot",), mc_fraction=1.0, mc_step="check",
                               families=("attribute", "spatial")), tmp_path, progress=False)
    gold = {r.id: r.answer for r in read_records(tmp_path / "records.jsonl")}
    items = load_items(tmp_path / "records.jsonl")
    lost = {it.id for it in items if it.choices and it.reference != "A"}
    assert len(lost) >= 10

    def answer(item):  # the reference answer; where it is not A, the walk writes the value in option A's place
        text = gold[item.id]
        if item.id in lost:
            value = item.choices[item.reference]
            walk = text[text.index("Checking the options:"):text.index("</REASONING>")]
            text = text.replace(walk, f"Checking the options:\nA. {value} is {value}\nThe answer is option A. ")
            text = text.replace(f"<CONCLUSION> {item.reference} </CONCLUSION>", "<CONCLUSION> A </CONCLUSION>")
        return Answer(text, 0.0)

    report = run_accuracy(items, answer, progress=False)
    assert report.correct == len(items) - len(lost)
    assert report.option_steps == {"walks": len(items), "misquoted": len(lost), "lost_by_misquote": len(lost)}
    assert f"{len(lost)} wrong answers had settled on the right value" in report.table()


def test_mcnemar_exact_matches_the_binomial_tail():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 0) == pytest.approx(2 / 32)  # five of five the same way: 2 * 0.5**5
    assert mcnemar_exact(33, 23) == mcnemar_exact(23, 33) == pytest.approx(0.2288, abs=1e-4)
    assert mcnemar_exact(3, 3) == 1.0  # capped: an even split is no evidence either way


def _report(n, wrong, fingerprint="q1", cats=None):
    failures = [{"id": i, "category": c, "question": "q", "expected": "1", "got": "2"} for i, c in wrong]
    cats = cats or {"a": 2, "b": 2}
    by_cat = {c: {"n": k, "correct": k - sum(fc == c for _, fc in wrong)} for c, k in cats.items()}
    return {"n": n, "correct": n - len(wrong), "failures": failures, "by_category": by_cat,
            "questions_sha256": fingerprint}


def test_compare_pairs_reports_question_by_question(tmp_path, capsys):
    a = _report(4, [("q1", "a"), ("q3", "b")])
    b = _report(4, [("q3", "b"), ("q4", "b")])
    res = compare_reports(("A", a), ("B", b))
    assert [f["id"] for f in res.fixed] == ["q1"] and [f["id"] for f in res.broken] == ["q4"]
    assert res.correct == (2, 2) and res.same_questions is True and res.p_value == 1.0
    assert res.by_category["a"] == {"n": 2, "a": 0.5, "b": 1.0, "fixed": 1, "broken": 0}
    assert res.by_category["b"]["broken"] == 1
    (tmp_path / "a.json").write_text(json.dumps(a))
    (tmp_path / "sweep.json").write_text(json.dumps({"cells": {"gguf|F16|F16|stage:4": b}}))
    assert bench_main(["compare", str(tmp_path / "a.json"), f"{tmp_path / 'sweep.json'}#gguf|F16|F16|stage:4",
                       "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert (doc["fixed"], doc["broken"], doc["fixed_ids"], doc["b"]) == (1, 1, ["q1"], "gguf|F16|F16|stage:4")


@pytest.mark.parametrize("b, message", [
    (_report(5, [("q3", "b")]), "B 5: not the same"),
    (_report(4, [("q3", "b")], fingerprint="other"), "different questions"),
    (_report(4, [("q3", "b")], cats={"a": 1, "b": 3}), "per category"),
])
def test_compare_refuses_reports_on_different_questions(b, message):
    with pytest.raises(BenchError, match=message):
        compare_reports(("A", _report(4, [("q1", "a")])), ("B", b))


def test_compare_reads_sweep_cells_that_kept_only_category_accuracies():
    old = {**_report(4, [("q1", "a")]), "by_category": {"a": 0.5, "b": 1.0}}
    res = compare_reports(("A", old), ("B", _report(4, [])))
    assert (len(res.fixed), len(res.broken), res.by_category) == (1, 0, {})
    assert "category" not in res.table()


def test_compare_refuses_what_it_cannot_pair(tmp_path, capsys):
    truncated = {**_report(4, [("q1", "a"), ("q3", "b")]), "correct": 1}  # three failures, two listed
    (tmp_path / "t.json").write_text(json.dumps(truncated))
    (tmp_path / "s.json").write_text(json.dumps({"cells": {"x": truncated}}))
    (tmp_path / "bad.json").write_text("{not json")
    for spec, message in ((tmp_path / "t.json", "lists 2 of its 3 failures"), (tmp_path / "s.json", "name a cell"),
                          (f"{tmp_path / 's.json'}#y", "no cell 'y'"), (tmp_path / "bad.json", "not a JSON report"),
                          (tmp_path / "missing.json", "file not found")):
        with pytest.raises(BenchError, match=message):
            load_accuracy(str(spec))
    assert bench_main(["compare", str(tmp_path / "t.json"), str(tmp_path / "t.json")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "t.json" in err  # one line naming the file, no traceback


def test_accuracy_on_vlmevalkit_tsv(trained, tmp_path, capsys):
    path = write_dataset(ShapesConfig(n=6, seed=7, split="eval", kinds=("cot",), format="tsv",
                                      families=("count_color", "attribute", "compare")), tmp_path / "tsv", progress=False)
    assert bench_main(["accuracy", *_model_args(trained), "--data", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("accuracy ") and "95% CI" in out


def test_latency_with_reference(trained, capsys):
    assert bench_main(["latency", *_model_args(trained), "--data", str(trained.data / "records.jsonl"),
                       "--search", "stage:2:judge", "--limit", "2", "--repeats", "1", "--compare-reference", "--compare-greedy",
                       "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    for key in ("image_encode_s", "prefill_tok_s", "decode_tok_s", "ttft_s", "decode_s", "total_s", "cached_ttft_s"):
        assert doc[key]["median"] > 0, key
    assert doc["judge_s"]["median"] >= 0
    assert doc["n_runs"] == 2 and doc["peak_rss_mb"] > 0
    prov = doc["provenance"]  # what a reader needs to repeat the numbers
    assert len(prov["model_sha256"]) == 64 and prov["commit"] and prov["cpu"] and prov["threads"] >= 1
    # Which is faster is the bench's claim, not a test's (timings on a shared CI runner are noise):
    # the test holds the report's arithmetic.
    ref = doc["reference_total_s"]
    assert 0 < ref["min"] <= ref["median"] <= ref["max"]
    assert doc["speedup_vs_reference"] == pytest.approx(ref["median"] / doc["total_s"]["median"])
    ratios = sorted(run["total_s"] / run["greedy_total_s"] for run in doc["runs"])  # paired, run by run
    assert doc["x_greedy"]["min"] == pytest.approx(ratios[0]) and doc["x_greedy"]["max"] == pytest.approx(ratios[-1])
    assert doc["x_greedy"]["median"] == pytest.approx(statistics.median(ratios))
    for unit, median in doc.get("judge_prompt_tokens", {}).items():  # where the judge's prefill goes
        assert median == statistics.median(run["tokens"].get(f"judge_prompt_{unit}", 0) for run in doc["runs"])


def test_paper_style_baseline_call_count(trained):
    rec = load_items(trained.data / "records.jsonl", 1)[0]
    with Reasoner(trained.gguf, trained.mmproj, n_threads=2) as r:
        res = PaperStyleSearch(r.engine, SearchConfig(candidates=2)).run(rec.image, rec.question)
    # 2 candidates x 4 stages + 1 judgement per stage + 2 reasoning checks: the reference's ~14 calls
    assert res.calls == 14
    assert res.text


def test_sweep_writes_everything_and_resumes(trained, tmp_path, capsys):
    out = tmp_path / "sweep"
    args = ["sweep", "--data", str(trained.data / "records.jsonl"), "--gguf", str(trained.gguf), "--mmproj",
            str(trained.mmproj), "--quants", "F16,Q4_K_M", "--mmproj-quants", "F16", "--search", "greedy,stage:2:judge",
            "--limit", "3", "--out", str(out), "--threads", "2", "-q"]
    assert bench_main(args) == 0
    for name in ("results.csv", "results.json", "report.md", "accuracy_vs_latency.png", "accuracy_vs_size.png",
                 "time_per_stage.png"):
        assert (out / name).is_file(), name
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert len(cells) == 4
    row = next(iter(cells.values()))
    for key in ("commit", "model_sha256", "quant_types", "search_config", "threads", "cpu", "versions", "date"):
        assert row[key], key
    report = (out / "report.md").read_text()
    assert "| gguf | Q4_K_M | F16 | stage:2:judge |" in report and "![accuracy_vs_latency]" in report
    capsys.readouterr()  # every failure is kept, so two cells pair question by question
    assert bench_main(["compare", f"{out}/results.json#gguf|F16|F16|greedy", f"{out}/results.json#gguf|Q4_K_M|F16|stage:2:judge",
                       "--json"]) == 0
    pair = json.loads(capsys.readouterr().out)
    assert pair["same_questions_checked"] and pair["n"] == 3
    assert pair["accuracy_b"] - pair["accuracy_a"] == pytest.approx((pair["fixed"] - pair["broken"]) / 3)
    assert bench_main(args) == 0
    assert capsys.readouterr().err.count("(done)") == 4  # finished cells are skipped


def test_sweep_validates_before_work(trained, tmp_path, capsys):
    bad_tsv = tmp_path / "b.tsv"
    bad_tsv.write_text("index\tquestion\n0\tq\n")
    rc = bench_main(["sweep", "--data", str(bad_tsv), "--gguf", str(trained.gguf), "--mmproj", str(trained.mmproj),
                     "--quants", "F16,Q9_X", "--search", "greedy,beam:2", "--out", str(tmp_path / "o")])
    assert rc == 1
    err = capsys.readouterr().err
    assert "missing column" in err and "Q9_X" in err and "beam:2" in err
    assert not (tmp_path / "o").exists()  # nothing started


def test_search_specs_mean_what_the_runtime_means_and_always_name_the_selector():
    assert parse_spec("stage:4").candidates == 4
    assert parse_spec("stage:4") == SearchConfig(strategy="stage", candidates=4)  # the runtime's defaults
    assert spec_label(parse_spec("stage:4")) == f"stage:4:{SearchConfig().selector}"
    assert parse_spec("best-of-n:3:vote").selector == "vote"
    assert parse_spec("greedy").strategy == "greedy" and spec_label(parse_spec("greedy")) == "greedy"
    anchored = parse_spec("stage:4:logprob+greedy")
    assert anchored.greedy_candidate and anchored.selector == "logprob" and not parse_spec("stage:4").greedy_candidate
    assert spec_label(anchored) == "stage:4:logprob+greedy"
    assert spec_label(parse_spec("stage:4:judge+swap+greedy")) == "stage:4:judge+greedy+swap"
    unchecked = parse_spec("stage:4:judge+nocheck")
    assert not unchecked.reasoning_check and parse_spec("stage:4").reasoning_check
    assert spec_label(unchecked) == "stage:4:judge+nocheck"
    assert not parse_spec("stage:4+nodraft").draft_verdicts and parse_spec("stage:4").draft_verdicts
    for spec in ("stage:2:judge+swap", "best-of-n:4:vote", "sentence:3:logprob", "stage:4:judge+greedy+nocheck"):
        assert spec_label(parse_spec(spec)) == spec
    for bad in ("stage:x", "greedy+greedy", "sentence:4+greedy", "stage:4+fast", "stage:4:best"):
        with pytest.raises(ValueError):
            parse_spec(bad)
    lo, hi = wilson_interval(45, 50)
    assert 0.78 < lo < 0.9 < hi < 0.97
    assert wilson_interval(0, 10)[0] == 0.0
    assert pareto_front([(1, 0.5), (2, 0.9), (3, 0.8), (0.5, 0.4)]) == [3, 0, 1]


def test_sweep_with_hf_adds_onnx_and_transformers_rows(trained, tmp_path):
    out = tmp_path / "hf"
    assert bench_main(["sweep", "--data", str(trained.data / "records.jsonl"), "--checkpoint", str(trained.hf),
                       "--quants", "Q8_0", "--search", "greedy", "--onnx-quants", "none,int8", "--limit", "3",
                       "--out", str(out), "--threads", "2", "-q"]) == 0
    cells = json.loads((out / "results.json").read_text())["cells"]
    assert set(cells) == {"gguf|Q8_0|F16|greedy", "onnx|fp32|-|greedy", "onnx|int8|-|greedy",
                          "transformers|fp32|-|greedy"}
    # the same greedy decoding three ways: ONNX fp32 and transformers agree exactly
    assert cells["onnx|fp32|-|greedy"]["accuracy"] == cells["transformers|fp32|-|greedy"]["accuracy"]


def test_latency_defaults_to_the_shipped_model_and_examples(capsys):
    assert bench_main(["latency", "--limit", "1", "--repeats", "1", "--threads", "2", "--flash-attn", "off",
                       "-q", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_runs"] == 1


def test_batching_reports_step_cost_per_row_count(trained, tmp_path, capsys):
    assert bench_main(["batching", "--model", str(trained.gguf), "--threads", "2", "--rows", "1,2,4",
                       "--prefix", "32", "--steps", "8", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [r["rows"] for r in doc["rows"]] == [1, 2, 4] and doc["prefill_tok_s"] > 0
    assert doc["rows"][0]["x_one_row"] == 1.0
    for r in doc["rows"]:
        assert r["ms_per_step"] > 0 and r["ms_per_row"] == pytest.approx(r["ms_per_step"] / r["rows"])
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    assert bench_main(["batching", "--model", str(bad)]) == 1
    assert "bad.gguf" in capsys.readouterr().err
    assert bench_main(["batching", "--rows", "0,2"]) == 1
    assert bench_main(["batching", "--random", "2048"]) == 1
    capsys.readouterr()
    # a random-weight Llama of another size, written and loaded offline (tokenizer from --model)
    assert bench_main(["batching", "--model", str(trained.gguf), "--random", "128x2", "--rows", "2",
                       "--prefix", "16", "--steps", "4", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert "random-llama-128x2" in doc["model"] and [r["rows"] for r in doc["rows"]] == [1, 2]
