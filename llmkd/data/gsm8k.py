"""GSM8K (Cobbe et al., 2021, https://arxiv.org/abs/2110.14168): loading, ids and question ranges.

The dataset ships inside llmkd (`llmkd/data/files/gsm8k/{train,test}.jsonl`, MIT licence in the
same folder; the 7473 train and 1319 test questions of `openai/gsm8k` config `main`), so
`source="local"` works offline. `source="hub"` loads the same data from the Hugging Face hub.

Every loaded split gets these columns besides `question` and `answer`:

    index          int, the row's position in its split (0-based)
    id             "gsm8k-<split>-<index:05d>", e.g. "gsm8k-test-00042": stable across sources
    gold           the canonical gold number (`llmkd.data.answer.parse_gold`), e.g. "1080"
    question_hash  `question_hash(question)`: guards a transfer set against evaluation questions
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Sequence

from llmkd.data.answer import parse_gold
from llmkd.errors import LlmkdError

SPLITS = ("train", "test")
SOURCES = ("local", "hub")
HUB_ID = "openai/gsm8k"
HUB_CONFIG = "main"
LOCAL_DIR = Path(__file__).parent / "files" / "gsm8k"


def question_hash(question: str) -> str:
    """First 16 hex digits of the sha256 of `question`, whitespace runs collapsed and trimmed."""
    return hashlib.sha256(" ".join(question.split()).encode("utf-8")).hexdigest()[:16]


def load_gsm8k(split: str, source: str = "local") -> tuple[dict, ...]:
    """One GSM8K split: a row per question, each a dict with the keys described in the module docstring.

    Cached per (split, source) in the process: every caller gets the same rows, so never change them.
    The local copy is read as plain JSON lines, so building, training and evaluating need no `datasets`
    (nor its pyarrow and pandas); `source="hub"` goes through `datasets`.
    """
    if split not in SPLITS:
        raise LlmkdError(f"unknown GSM8K split {split!r}; choose one of {', '.join(SPLITS)}")
    if source not in SOURCES:
        raise LlmkdError(f"unknown GSM8K source {source!r}; choose one of {', '.join(SOURCES)}")
    return _load(split, source)


@functools.lru_cache(maxsize=None)
def _load(split: str, source: str) -> tuple[dict, ...]:
    if source == "local":
        path = LOCAL_DIR / f"{split}.jsonl"
        with path.open(encoding="utf-8") as f:
            raw = [json.loads(line) for line in f if line.strip()]
    else:
        try:
            import datasets

            raw = datasets.load_dataset(HUB_ID, HUB_CONFIG, split=split).to_list()
        except Exception as err:  # offline, DNS, no cache, auth: all mean "use the shipped copy"
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            raise LlmkdError(
                f"cannot load GSM8K {split!r} from the Hugging Face hub ({HUB_ID}, config "
                f"{HUB_CONFIG}): the hub cannot be reached and no cached copy was found "
                f"({reason}); use `source: local` (the copy shipped with llmkd)"
            ) from err
    rows = []
    for index, r in enumerate(raw):
        missing = {"question", "answer"} - set(r)
        if missing:
            raise LlmkdError(f"GSM8K {split} from {source} row {index} lacks the key(s) {sorted(missing)}")
        try:
            gold = parse_gold(r["answer"])
        except ValueError as err:
            raise LlmkdError(f"GSM8K {split} ({source}) row {index}: {err}") from err
        rows.append({"question": r["question"], "answer": r["answer"], "index": index,
                     "id": f"gsm8k-{split}-{index:05d}", "gold": gold, "question_hash": question_hash(r["question"])})
    return tuple(rows)


def select_range(ds: Sequence[dict], start: int, count: int | None) -> Sequence[dict]:
    """Rows [start, start + count) of `ds`; `count=None` means to the end.

    A range running past the end is cut at the end of the split (`len()` of the result says how
    many rows were taken); a range with no rows at all is an error.
    """
    if start < 0:
        raise LlmkdError(f"start must be >= 0, got {start}")
    if count is not None and count <= 0:
        raise LlmkdError(f"count must be > 0 (or null for 'to the end'), got {count}")
    if start >= len(ds):
        raise LlmkdError(f"start={start} is past the end: the split has {len(ds)} questions")
    stop = len(ds) if count is None else min(start + count, len(ds))
    return ds[start:stop]
