import pytest

from llavao1_edge.answers import answer_kind, extract_answer, is_correct

# (conclusion text as models write it, reference, expected correctness)
CASES = [
    # option letters
    ("B", "B", True),
    ("(B)", "B", True),
    ("B.", "B", True),
    ("[C]", "C", True),
    ("**D**", "D", True),
    ("Answer: B", "B", True),
    ("The answer is B.", "B", True),
    ("The answer is (C).", "C", True),
    ("The correct option is A", "A", True),
    ("Option D", "D", True),
    ("B) red", "B", True),
    ("C. 4 objects", "C", True),
    ("the answer is b.", "B", True),
    ("The answer is a circle.", "A", False),  # the article "a" is not option A
    ("B", "C", False),
    ("I cannot tell from the image.", "A", False),
    # numbers
    ("3", "3", True),
    ("3.", "3", True),
    ("There are 3 objects.", "3", True),
    ("The answer is 7", "7", True),
    ("5 - 2 = 3", "3", True),
    ("three", "3", True),
    ("3.0", "3", True),
    ("1,000", "1000", True),
    ("2.50", "2.5", True),
    ("There are no red objects.", "0", True),
    ("4", "3", False),
    ("There are 3 objects, so 4 are left.", "3", False),
    # yes / no
    ("Yes", "yes", True),
    ("yes.", "yes", True),
    ("No, there are fewer circles.", "no", True),
    ("Yes, there are more circles than squares.", "no", False),
    ("True", "yes", True),
    # short words
    ("red", "red", True),
    ("Red.", "red", True),
    ("The triangle is red.", "red", True),
    ("**Blue**", "blue", True),
    ("The color is green", "red", False),
    ("square", "circle", False),
    ("A square.", "square", True),
    ("", "3", False),
]


@pytest.mark.parametrize(("text", "reference", "expected"), CASES)
def test_is_correct(text, reference, expected):
    assert is_correct(text, reference) is expected


def test_kinds():
    assert answer_kind("B") == "choice"
    assert answer_kind("12") == "number"
    assert answer_kind("-1.5") == "number"
    assert answer_kind("No") == "yesno"
    assert answer_kind("red") == "text"
    assert answer_kind("a") == "text"  # lower-case single letters are words, not options


def test_choice_by_option_text():
    choices = {"A": "yellow", "B": "red", "C": "blue", "D": "green"}
    assert extract_answer("red", "choice", choices) == "B"
    assert is_correct("Red.", "B", choices)
    assert extract_answer("purple", "choice", choices) is None


def test_none_prediction():
    assert not is_correct(None, "A")
