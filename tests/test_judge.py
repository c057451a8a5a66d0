import pytest

from llavao1_edge.judge import (
    pairwise_prompt,
    pairwise_verdict,
    parse_pairwise_verdict,
    parse_reasoning_check,
    reasoning_check_prompt,
    reasoning_check_verdict,
)


def test_pairwise_prompt_contains_everything():
    text = pairwise_prompt("caption", "How many?", "one", "two", {"summary": "Count them."})
    assert "CAPTION stage" in text
    assert "Question: How many?" in text and "Summary: Count them." in text
    assert "Response 1: one\nResponse 2: two" in text
    assert text.endswith("I choose response [1 or 2].")


def test_unknown_unit():
    with pytest.raises(ValueError, match="unknown judged unit"):
        pairwise_prompt("verdict", "q", "a", "b")


@pytest.mark.parametrize(("text", "want"), [
    (pairwise_verdict("response 2 miscounts", 1), 1),
    (pairwise_verdict("it is right", 2), 2),
    ("Since blah, I choose response [2].", 2),
    ("i choose Response 1", 1),
    ("Response 1 is better.", None),
    ("", None),
])
def test_parse_pairwise(text, want):
    assert parse_pairwise_verdict(text) == want


def test_reasoning_check_roundtrip():
    assert "Reasoning: r" in reasoning_check_prompt("q", "c", "r")
    assert parse_reasoning_check(reasoning_check_verdict("All good", True)) is True
    assert parse_reasoning_check(reasoning_check_verdict("It skips a step", False)) is False
    assert parse_reasoning_check("looks fine") is None
