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
from pathlib import Path

import datasets

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


def load_gsm8k(split: str, source: str = "local") -> datasets.Dataset:
    """One GSM8K split with the columns described in the module docstring.

    Cached per (split, source) in the process: every caller gets the same object, so use the
    copying methods (`select`, `map`, `with_format`), never the in-place `set_format`.
    """
    if split not in SPLITS:
        raise LlmkdError(f"unknown GSM8K split {split!r}; choose one of {', '.join(SPLITS)}")
    if source not in SOURCES:
        raise LlmkdError(f"unknown GSM8K source {source!r}; choose one of {', '.join(SOURCES)}")
    return _load(split, source)


@functools.lru_cache(maxsize=None)
def _load(split: str, source: str) -> datasets.Dataset:
    if source == "local":
        # Named after the split (not the json loader's default "train") so `ds.split` is right.
        ds = datasets.load_dataset(
            "json", data_files={split: str(LOCAL_DIR / f"{split}.jsonl")}, split=split
        )
    else:
        try:
            ds = datasets.load_dataset(HUB_ID, HUB_CONFIG, split=split)
        except Exception as err:  # offline, DNS, no cache, auth: all mean "use the shipped copy"
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            raise LlmkdError(
                f"cannot load GSM8K {split!r} from the Hugging Face hub ({HUB_ID}, config "
                f"{HUB_CONFIG}): the hub cannot be reached and no cached copy was found "
                f"({reason}); use `source: local` (the copy shipped with llmkd)"
            ) from err
    missing = {"question", "answer"} - set(ds.column_names)
    if missing:
        raise LlmkdError(f"GSM8K {split} from {source} lacks the column(s) {sorted(missing)}")

    questions, answers = list(ds["question"]), list(ds["answer"])
    golds = []
    for index, answer in enumerate(answers):
        try:
            golds.append(parse_gold(answer))
        except ValueError as err:
            raise LlmkdError(f"GSM8K {split} ({source}) row {index}: {err}") from err
    ds = ds.add_column("index", list(range(len(ds))))
    ds = ds.add_column("id", [f"gsm8k-{split}-{i:05d}" for i in range(len(ds))])
    ds = ds.add_column("gold", golds)
    return ds.add_column("question_hash", [question_hash(q) for q in questions])


def select_range(ds: datasets.Dataset, start: int, count: int | None) -> datasets.Dataset:
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
    return ds.select(range(start, stop))
