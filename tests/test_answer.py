import json
from pathlib import Path

import pytest

from llmkd.data.answer import (
    INVALID,
    extract_flexible,
    extract_strict,
    normalize_number,
    parse_gold,
    score,
)
from llmkd.data.prompts import assistant_turn

GSM8K_DIR = Path(__file__).resolve().parents[1] / "llmkd" / "data" / "files" / "gsm8k"


def _rows(split):
    with open(GSM8K_DIR / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("72", "72"),
        ("1,234", "1234"),
        ("109,200,000", "109200000"),
        ("$5", "5"),
        ("  7 ", "7"),
        ("5.", "5"),
        ("12.50", "12.5"),
        ("12.0", "12"),
        ("-3", "-3"),
        ("\u22123", "-3"),  # unicode minus
        ("-$5", "-5"),
        ("$-5", "-5"),
        ("+4", "4"),
        (".5", "0.5"),
        ("-0", "0"),
        ("-0.0", "0"),
        ("007", "7"),
        ("30%", "30"),
        ("12 apples", "12"),
        ("$1,000.50.", "1000.5"),
        ("0.000010", "0.00001"),
        ("1000000000000000000000001", "1000000000000000000000001"),  # exact, no float rounding
        ("0.1", "0.1"),
    ],
)
def test_normalize_number(text, expected):
    assert normalize_number(text) == expected


@pytest.mark.parametrize(
    "text", ["", "abc", ".", ",", "$", "- 5", "1,2345", "12,34", "5.5.5", "1/2", "apples 5"]
)
def test_normalize_number_rejects_non_numbers(text):
    assert normalize_number(text) is None


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Natalia sold 72 clips.\n#### 72", "72"),
        ("####72", "72"),
        ("#### 1,080", "1080"),
        ("#### $1,234.", "1234"),
        ("#### -5", "-5"),
        ("#### $-5", "-5"),
        ("#### 12.50", "12.5"),
        ("#### 30%", "30"),
        ("#### 5\nWait, I made a mistake.\n#### 7", "7"),  # the last marker wins
        ("The answer is 18.", "18"),
        ("So the ANSWER IS 18", "18"),
        ("The answer is: $1,234.", "1234"),
        ("**The answer is: $1,234.**", "1234"),
        ("**The answer is:** 42", "42"),
        ("The answer is **42**.", "42"),
        ("**#### 42**", "42"),
        ("#### 3, 4", "3"),
        ("The answer is 5.\n#### 6", "6"),  # both markers count; the last one wins
        ("#### 6\nThe answer is 5.", "5"),
        # A marker without a number (an echoed instruction) does not void an earlier answer.
        ("#### 18\nWrite the final answer on the last line, as '#### <number>'.", "18"),
    ],
)
def test_extract_strict(completion, expected):
    assert extract_strict(completion) == expected


@pytest.mark.parametrize(
    "completion",
    [
        "She sold 72 clips.",  # a number, but no marker
        "no number here",
        "#### ",
        "The answer is unclear.",
        "#### 3/4",
        "theanswer is 5",
        "",
    ],
)
def test_extract_strict_none(completion):
    assert extract_strict(completion) is None


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("The total is 72.", "72"),
        ("She paid $1,000.50.", "1000.5"),
        ("He has 3 apples and 5 pears", "5"),
        ("48/2 = 24 clips. 48 + 24 = 72 clips altogether.\n#### 72", "72"),
        ("It is -5 degrees.", "-5"),
        ("10-4", "4"),  # subtraction, not a negative number
        ("in the COVID-19 year", "19"),  # a hyphen after a letter is not a sign
        ("- 5 apples", "5"),  # a bullet, not a sign
        ("is **42**.", "42"),
        ("That costs 2,500, right?", "2500"),
        ("30% of them", "30"),
        ("First 7. The answer is 3/4", "7"),  # a fraction is not a number
        ("The answer is 12.0", "12"),
        ("Value: .5", "0.5"),
        ("First 5, then a lone . and a lone , at the end.", "5"),
    ],
)
def test_extract_flexible(completion, expected):
    assert extract_flexible(completion) == expected


@pytest.mark.parametrize("completion", ["", "no number here", "Done. Really, done.", "$", "1,2345"])
def test_extract_flexible_none(completion):
    assert extract_flexible(completion) is None


def test_parse_gold_real_rows():
    train, test = _rows("train"), _rows("test")
    assert parse_gold(train[0]["answer"]) == "72"  # Natalia's clips
    assert parse_gold(test[0]["answer"]) == "18"  # Janet's ducks
    comma = next(r for r in train if r["answer"].endswith("#### 1,080"))
    assert parse_gold(comma["answer"]) == "1080"


@pytest.mark.parametrize("field", ["She sold 72 clips.", "#### ", "#### many", ""])
def test_parse_gold_errors(field):
    with pytest.raises(ValueError):
        parse_gold(field)


def test_score():
    assert score("so 72 in total.\n#### 72", "72") == {
        "strict": "72",
        "flexible": "72",
        "strict_correct": True,
        "flexible_correct": True,
    }
    assert score("so 72 in total.", "72.0") == {
        "strict": INVALID,
        "flexible": "72",
        "strict_correct": False,
        "flexible_correct": True,
    }
    assert score("#### 18\nor maybe 19", "18") == {
        "strict": "18",
        "flexible": "19",
        "strict_correct": True,
        "flexible_correct": False,
    }
    nothing = score("I don't know", "5")
    assert nothing["strict"] == nothing["flexible"] == INVALID
    assert not nothing["strict_correct"] and not nothing["flexible_correct"]
    assert score("#### 1,080", "1080")["strict_correct"]  # gold may be given unnormalised too
    with pytest.raises(ValueError):
        score("#### 5", "five")


def test_every_shipped_solution_extracts_to_its_gold():
    """The reference solutions, as shown to the model, score 100% under both filters."""
    counts = {}
    for split in ("train", "test"):
        rows = _rows(split)
        golds = [parse_gold(r["answer"]) for r in rows]
        turns = [assistant_turn(r["answer"]) for r in rows]
        counts[split] = (
            len(rows),
            sum(extract_strict(t) == g for t, g in zip(turns, golds)),
            sum(extract_flexible(t) == g for t, g in zip(turns, golds)),
        )
    assert counts == {"train": (7473, 7473, 7473), "test": (1319, 1319, 1319)}
