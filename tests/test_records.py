import base64
import json

import pytest

from llavao1_data.records import (
    MCQuestion,
    Record,
    RecordError,
    Turn,
    mc_prompt,
    read_records,
    read_tsv,
    write_records,
    write_tsv,
)

GOOD = {"id": "1", "image": "img/a.png",
        "conversations": [{"from": "human", "value": "<image>\nHow many?"},
                          {"from": "gpt", "value": "<CONCLUSION> 2 </CONCLUSION>"}]}


@pytest.fixture
def root(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(b"png")
    return tmp_path


def _write_lines(root, lines):
    path = root / "records.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_good_record_and_multi_turn(root):
    multi = dict(GOOD, id=2, conversations=GOOD["conversations"] + [
        {"from": "human", "value": "And blue?"}, {"from": "gpt", "value": "1"}])
    path = _write_lines(root, [json.dumps(GOOD), "", json.dumps(multi)])
    recs = list(read_records(path))
    assert [r.id for r in recs] == ["1", "2"]
    assert recs[0].question == "How many?" and recs[0].answer.startswith("<CONCLUSION>")
    assert len(recs[1].conversations) == 4


def test_text_only_record_allowed(root):
    obj = {"id": "t", "conversations": [{"from": "human", "value": "Is 2 > 1?"}, {"from": "gpt", "value": "yes"}]}
    (rec,) = read_records(_write_lines(root, [json.dumps(obj)]))
    assert rec.image is None


BAD = [
    ("{not json", "invalid JSON"),
    (json.dumps({"id": "1"}), "missing field 'conversations'"),
    (json.dumps({k: v for k, v in GOOD.items() if k != "id"}), "missing field 'id'"),
    (json.dumps(dict(GOOD, image="../outside.png")), "escapes the dataset root"),
    (json.dumps(dict(GOOD, image="/etc/passwd")), "escapes the dataset root"),
    (json.dumps(dict(GOOD, image="img/missing.png")), "image file not found"),
    (json.dumps(dict(GOOD, conversations=[GOOD["conversations"][0], {"from": "gpt", "value": "  "}])), "empty answer"),
    (json.dumps(dict(GOOD, image=["img/a.png", "img/a.png"])), "more than one image"),
    (json.dumps(dict(GOOD, conversations=[{"from": "human", "value": "<image><image>q"}, GOOD["conversations"][1]])),
     "more than one image"),
    (json.dumps(dict(GOOD, conversations=[GOOD["conversations"][1], GOOD["conversations"][0]])), "alternate"),
    (json.dumps(dict(GOOD, conversations=[GOOD["conversations"][0]])), "at least two turns"),
    (json.dumps([1, 2]), "expected a JSON object"),
]


@pytest.mark.parametrize(("line", "problem"), BAD)
def test_bad_record_names_file_line_and_problem(root, line, problem):
    path = _write_lines(root, [json.dumps(GOOD), line])
    with pytest.raises(RecordError) as err:
        list(read_records(path))
    assert str(err.value).startswith(f"{path}:2: ")
    assert problem in str(err.value)
    assert err.value.line == 2


def test_missing_file():
    with pytest.raises(RecordError, match="file not found"):
        list(read_records("/nonexistent/records.jsonl"))


def test_write_records_roundtrip_and_atomic(root):
    recs = [Record("a", "img/a.png", [Turn("human", "<image>\nq"), Turn("gpt", "x")], {"family": "f"})]
    path = root / "out.jsonl"
    assert write_records(path, recs) == 1
    (back,) = read_records(path)
    assert back == recs[0]
    assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == []

    def failing():
        yield recs[0]
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        write_records(path, failing())
    assert list(read_records(path)) == recs  # the old file is untouched, no temp left behind
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def _mcq(i=0, answer="B"):
    return MCQuestion(str(i), "What color?", {"A": "red", "B": "blue", "C": "green"}, answer, b"\x89PNG fake",
                      "attribute", "")


def test_tsv_roundtrip(tmp_path):
    path = tmp_path / "bench.tsv"
    write_tsv(path, [_mcq(0), _mcq(1, "C")])
    rows = list(read_tsv(path))
    assert [r.answer for r in rows] == ["B", "C"]
    assert rows[0].options == {"A": "red", "B": "blue", "C": "green"}  # empty D left out
    assert rows[0].image == b"\x89PNG fake"
    assert rows[0].prompt().endswith("Answer with the option's letter from the given choices.")


def _tsv(tmp_path, header, row):
    path = tmp_path / "b.tsv"
    path.write_text("\t".join(header) + "\n" + "\t".join(row) + "\n")
    return path


def test_tsv_errors(tmp_path):
    img = base64.b64encode(b"x").decode()
    header = ["index", "question", "A", "B", "answer", "image"]
    with pytest.raises(RecordError, match="missing column"):
        list(read_tsv(_tsv(tmp_path, ["index", "question", "A", "B"], ["0", "q", "x", "y"])))
    with pytest.raises(RecordError, match=r"b\.tsv:2: answer 'C' is not one of"):
        list(read_tsv(_tsv(tmp_path, header, ["0", "q", "x", "y", "C", img])))
    with pytest.raises(RecordError, match="not valid base64"):
        list(read_tsv(_tsv(tmp_path, header, ["0", "q", "x", "y", "A", "@@@"])))
    with pytest.raises(RecordError, match="fewer than two"):
        list(read_tsv(_tsv(tmp_path, header, ["0", "q", "x", "", "A", img])))


def test_mc_prompt_with_hint():
    text = mc_prompt("Which?", {"A": "1", "B": "2"}, hint="Look closely.")
    assert text.splitlines() == ["Hint: Look closely.", "Which?", "Options:", "A. 1", "B. 2",
                                 "Answer with the option's letter from the given choices."]
