"""Answer extraction: the evaluation contract of llmkd, modelled on lm-eval's `gsm8k` task.

Both filters are reported for every evaluation, because extraction alone moves GSM8K scores by
points (see the lm-eval issues about `strict-match` vs `flexible-extract`).

A *number* is, in this order:

    optional sign      "-", "+" or the unicode minus "\u2212"; "-$5" and "$-5" both mean -5
    optional "$"
    digits             either "1234" or correctly grouped thousands "1,234,567"
    optional fraction  ".5" (also a bare ".5" with no integer part)

and must not run on into another digit: "12,34", "5.5.5" and "1/2" are not numbers (a comma,
period or slash followed by a digit is not an ending). Anything else after the number is ignored:
a sentence-final period ("5."), a percent sign ("30%"), units ("12 apples"), markdown ("**").
A sign only counts when it does not follow a letter or digit, so "10-4" reads as 10 and 4, and
"- 5" (a bullet) as 5. A number never starts right after a digit, "." , "," or "/", so neither
"2345" in "1,2345" nor the "4" of "3/4" is read as a number. Not understood (rare in GSM8K):
fractions, decimal commas ("12,5"), scientific notation ("1e5" reads as 1).

`normalize_number` turns a number into its canonical decimal string (via `decimal.Decimal`,
exact): no commas, no "$", no trailing zeros after the point, no "-0", integers without a point.
"1,234" -> "1234", "12.50" -> "12.5", "12.0" -> "12", ".5" -> "0.5", "-0" -> "0", "007" -> "7".
Two canonical strings are equal exactly when the numbers are.

Strict filter (`extract_strict`): the number written immediately after an answer marker, the
marker being "####" or "the answer is" (case-insensitive). Between the marker and the number only
spaces, newlines, ":" and "*" may stand ("**The answer is:** $1,234." -> "1234"). When several
markers are followed by a number, the LAST one wins; a marker followed by no number is skipped
(so an echoed "as '#### <number>'" does not void an earlier "#### 18"). No such marker: invalid.
lm-eval's `strict-match` takes the FIRST "#### <number>" and knows no "the answer is".

Flexible filter (`extract_flexible`): the LAST number anywhere in the text (lm-eval's
`flexible-extract` idea, `-?[$0-9.,]{2,}|-?[0-9]+` with `group_select: -1`), but parsed with the
number rules above, so a sentence-final period, a thousands comma or a lone "." or "," never
changes the value: "It costs $1,000.50." -> "1000.5". No number at all: invalid.

Gold (`parse_gold`): the number after the last "####" of a GSM8K `answer` field, normalised.

A prediction is correct when its canonical string equals the gold's. A failed extraction is
reported as `INVALID` ("[invalid]", lm-eval's fallback) and is never correct.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import TypedDict

INVALID = "[invalid]"

_MINUS = "\u2212-"  # "-" last: literal inside a character class
# One number, as described in the module docstring. Groups: sign, sign_after_dollar, value.
_NUMBER = (
    rf"(?:(?P<sign>(?<![0-9A-Za-z])[+{_MINUS}])?\$?|\$(?P<sign_after_dollar>[{_MINUS}]))"
    r"(?P<value>(?:[0-9]{1,3}(?:,[0-9]{3})+(?![0-9])|[0-9]+)(?:\.[0-9]+)?|\.[0-9]+)"
    r"(?![.,/]?[0-9])"
)
_NUMBER_RE = re.compile(_NUMBER)
# A number may not start inside another one or a fraction ("1,2345" must not yield "2345").
_ANY_NUMBER_RE = re.compile(r"(?<![0-9.,/])" + _NUMBER)
_MARKED_NUMBER_RE = re.compile(r"(?:####|\bthe answer is)[\s:*]*" + _NUMBER, re.IGNORECASE)


class Score(TypedDict):
    """One completion scored against its gold answer (JSON-ready)."""

    strict: str
    """The strict filter's canonical number, or `INVALID`."""
    flexible: str
    """The flexible filter's canonical number, or `INVALID`."""
    strict_correct: bool
    flexible_correct: bool


def _canonical(match: re.Match) -> str:
    value = Decimal(match["value"].replace(",", ""))
    if match["sign"] in ("-", "\u2212") or match["sign_after_dollar"]:
        value = -value
    if value == value.to_integral_value():
        return str(int(value))  # also turns -0 into 0
    return format(value.normalize(), "f")


def normalize_number(text: str) -> str | None:
    """The canonical decimal string of the number `text` starts with (after spaces), or None.

    >>> normalize_number(" $1,234.50. "), normalize_number("30%"), normalize_number("many")
    ('1234.5', '30', None)
    """
    match = _NUMBER_RE.match(text.strip())
    return _canonical(match) if match else None


def extract_strict(completion: str) -> str | None:
    """The number after the last "####" / "the answer is" marker that has one, or None."""
    last = None
    for last in _MARKED_NUMBER_RE.finditer(completion):
        pass
    return _canonical(last) if last else None


def extract_flexible(completion: str) -> str | None:
    """The last number in `completion`, or None."""
    last = None
    for last in _ANY_NUMBER_RE.finditer(completion):
        pass
    return _canonical(last) if last else None


def parse_gold(answer_field: str) -> str:
    """The canonical gold number of a GSM8K `answer` field ("...\\n#### 1,080" -> "1080")."""
    if "####" not in answer_field:
        raise ValueError(f"no '####' in GSM8K answer field {answer_field[-80:]!r}")
    tail = answer_field.rsplit("####", 1)[1]
    gold = normalize_number(tail)
    if gold is None:
        raise ValueError(f"no number after '####' in GSM8K answer field: {tail.strip()[:80]!r}")
    return gold


def score(completion: str, gold: str) -> Score:
    """Both filters' predictions for `completion` and whether each equals `gold` (a number)."""
    gold_number = normalize_number(gold)
    if gold_number is None:
        raise ValueError(f"gold answer {gold!r} is not a number")
    strict = extract_strict(completion)
    flexible = extract_flexible(completion)
    return Score(
        strict=strict or INVALID,
        flexible=flexible or INVALID,
        strict_correct=strict == gold_number,
        flexible_correct=flexible == gold_number,
    )
