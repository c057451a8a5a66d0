import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llavao1_edge.stages import (
    STAGE_NAMES,
    STAGES,
    StageEvent,
    StageStreamParser,
    parse_answer,
    render_answer,
    stream_stages,
)

CLEAN = {
    "summary": "Count the red objects.",
    "caption": "Two red circles and a blue square.",
    "reasoning": "Red objects: 1, 2. So 2.",
    "conclusion": "2",
}


def test_stage_order_and_tags_defined_once():
    assert STAGE_NAMES == ("summary", "caption", "reasoning", "conclusion")
    assert [s.open_tag for s in STAGES] == ["<SUMMARY>", "<CAPTION>", "<REASONING>", "<CONCLUSION>"]
    assert STAGES[3].close_tag == "</CONCLUSION>"


def test_render_then_parse_roundtrip():
    text = render_answer(CLEAN)
    assert text.startswith("<SUMMARY> Count") and text.endswith("</CONCLUSION>")
    parsed = parse_answer(text)
    assert parsed.stages == CLEAN
    assert parsed.well_formed and parsed.issues == []
    assert parsed.conclusion == "2"


def test_render_requires_all_stages():
    with pytest.raises(ValueError, match="missing stages"):
        render_answer({"summary": "x"})


def test_leading_and_trailing_text_and_whitespace():
    p = parse_answer("Sure! \n<SUMMARY>\n  plan  \n</SUMMARY> <CAPTION>c</CAPTION><REASONING>r</REASONING>"
                     "<CONCLUSION> B </CONCLUSION>\nHope this helps.")
    assert p.leading_text == "Sure!"
    assert p.trailing_text == "Hope this helps."
    assert p.stages["summary"] == "plan" and p.conclusion == "B"
    assert "text before the first stage" in p.issues and "text after the last stage" in p.issues


def test_truncated_output_keeps_partial_stage():
    p = parse_answer("<SUMMARY>s</SUMMARY><CAPTION>c</CAPTION><REASONING>step one, step tw")
    assert p.truncated
    assert p.unclosed == ["reasoning"]
    assert p.stages["reasoning"] == "step one, step tw"
    assert p.missing == ["conclusion"]


def test_missing_repeated_out_of_order_and_case():
    p = parse_answer("<caption>c</caption><SUMMARY>s</SUMMARY><SUMMARY>again</SUMMARY><CONCLUSION>x</CONCLUSION>")
    assert p.found == ["caption", "summary", "conclusion"]
    assert p.missing == ["reasoning"]
    assert p.repeated == ["summary"]
    assert p.out_of_order
    assert p.stages["summary"] == "s"  # the first occurrence wins


def test_unclosed_stage_ended_by_next_open_and_stray_close():
    p = parse_answer("<SUMMARY>s<CAPTION>c</CAPTION></REASONING> between <CONCLUSION>1</CONCLUSION>")
    assert p.unclosed == ["summary"]
    assert p.stray_close_tags == ["reasoning"]
    assert p.stray_text == ["between"]
    assert not p.well_formed


def test_no_tags_at_all():
    p = parse_answer("The answer is 3.")
    assert p.segments == [] and p.leading_text == "The answer is 3."
    assert p.missing == list(STAGE_NAMES)
    assert p.conclusion is None


def test_split_tag_across_chunks_events():
    events = list(stream_stages(["<SUMMARY>plan</SUMM", "ARY>\n<CONCL", "USION>4</CONCLUSION>"]))
    kinds = [(e.kind, e.stage) for e in events if e.kind != "text"]
    assert kinds == [("open", "summary"), ("close", "summary"), ("open", "conclusion"), ("close", "conclusion")]
    text = "".join(e.text for e in events if e.kind == "text" and e.stage == "conclusion")
    assert text == "4"


def test_text_is_emitted_before_close_when_safe():
    parser = StageStreamParser()
    assert parser.feed("<CONCLUSION>") == [StageEvent("open", "conclusion")]
    # "4 <" might become a tag: only "4 " is released.
    assert parser.feed("4 <") == [StageEvent("text", "conclusion", "4 ")]
    assert parser.feed("b>") == [StageEvent("text", "conclusion", "<b>")]
    assert parser.current_stage == "conclusion"


def test_feed_after_close_raises():
    parser = StageStreamParser()
    parser.close()
    with pytest.raises(RuntimeError):
        parser.feed("x")


# Answers built from stage tags, fragments of tags, angle brackets and plain text; then cut into
# chunks at arbitrary points. The streamed result must equal the batch result.
_pieces = st.sampled_from(
    [s.open_tag for s in STAGES] + [s.close_tag for s in STAGES]
    + ["<", ">", "</", "<SUM", "MARY>", "<conclusion>", "</Caption>", " ", "\n", "2", "red", "a < b", "x>y"]
)
_answers = st.lists(st.one_of(_pieces, st.text(max_size=6)), max_size=25).map("".join)


def _chunked(text: str, cuts: list[int]) -> list[str]:
    points = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0, *points, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


@settings(max_examples=400, deadline=None)
@given(_answers, st.lists(st.integers(min_value=0, max_value=10_000), max_size=12))
def test_streaming_equals_batch_for_any_chunking(text, cuts):
    chunks = _chunked(text, cuts)
    assert "".join(chunks) == text
    parser = StageStreamParser()
    events = []
    for chunk in chunks:
        events += parser.feed(chunk)
    events += parser.close()
    streamed, batch = parser.result(), parse_answer(text)
    assert streamed == batch
    # The events alone reassemble every stage's text.
    per_stage: dict[str, list[str]] = {}
    current: list[str] | None = None
    for e in events:
        if e.kind == "open":
            current = []
            per_stage.setdefault(e.stage, current)
        elif e.kind == "text" and e.stage is not None and current is not None:
            current.append(e.text)
        elif e.kind == "close":
            current = None
    assert {k: "".join(v).strip() for k, v in per_stage.items()} == batch.stages


@settings(max_examples=100, deadline=None)
@given(st.fixed_dictionaries({n: st.text(alphabet=st.characters(blacklist_characters="<>"), max_size=20)
                              for n in STAGE_NAMES}))
def test_render_parse_roundtrip_any_text(stages):
    parsed = parse_answer(render_answer(stages))
    assert parsed.stages == {k: v.strip() for k, v in stages.items()}
    assert not parsed.missing and not parsed.unclosed and not parsed.out_of_order
