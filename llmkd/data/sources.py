"""Any data: where the rows come from, what format they are in, which are bad, which are held out.

Every stage reads its examples from the recipe's `data` section. GSM8K (`data.source: gsm8k`, the
default) keeps its own loader and prompt format (`llmkd.data.gsm8k`, `llmkd.data.prompts`); every
other source goes through this module:

    source    a local file (JSON Lines, JSON, CSV, Parquet), a folder written by `datasets.save_to_disk`,
              or `hub:NAME` (data.hub_config, data.hub_split, data.revision); all read through `datasets`
    format    detected from the columns (after data.columns renames them), or data.format:
                messages            a list of {role, content}, roles system / user / assistant;
                                    every assistant turn is a response
                prompt_completion   TRL's convention; each a string or a messages list; the
                                    completion's assistant turns are the responses
                prompt              the prompt alone; the teacher writes the response
    bad rows  a missing column, an empty prompt or turn, an unknown role, no user turn, no assistant
              turn where the responses are gold: a one-line error naming the source, the row
              (numbered from 1, as an editor numbers JSON Lines) and the field; with
              data.on_bad_row: skip they are left out and counted (the manifest and the summary say so)
    split     a row is held out for evaluation when its content hash falls below data.eval_fraction
              (or every row of data.eval_source is), so held-out rows stay put when rows are appended

A conversation with several responses gives one example per response: the turns before it are the
prompt (earlier assistant turns as written), so every assistant token is a target exactly once.
An example is a dict: id, question_hash (its conversation's content hash: the contamination guard
compares these), messages (the prompt turns), response (the gold assistant text, None for teacher
responses).
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llmkd.errors import LlmkdError

GSM8K = "gsm8k"
GSM8K_HUB = "hub:openai/gsm8k"
# What `data.source` meant before any data: GSM8K's shipped copy or the hub's.
LEGACY_SOURCES = {"local": GSM8K, "hub": GSM8K_HUB}
FORMATS = ("messages", "prompt_completion", "prompt")
ROLES = ("system", "user", "assistant")
FILE_READERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
# Generation ends at the chat templates' end-of-turn markers (and the tokenizer's EOS); GSM8K adds its
# own (`prompts.STOP_STRINGS`): a model inventing the next exemplar.
END_OF_TURN = ("</s>", "<|im_end|>", "<|eot_id|>")


def gsm8k_copy(source: str) -> str | None:
    """"local" (the shipped copy) or "hub" for GSM8K, as `load_gsm8k` names them; None for other data."""
    return {GSM8K: "local", GSM8K_HUB: "hub"}.get(source)


def stop_strings(data) -> tuple[str, ...]:
    """Where generation ends on this data (besides the tokenizer's EOS)."""
    from llmkd.data import prompts

    return prompts.STOP_STRINGS if gsm8k_copy(data.source) else END_OF_TURN


@dataclass(frozen=True)
class BadRow:
    row: int  # from 1
    field: str
    reason: str


@dataclass
class Rows:
    """The usable examples of one part of a source, and what was left out."""

    name: str  # the source as the user wrote it
    format: str
    examples: list[dict]
    conversations: int
    skipped: Counter = field(default_factory=Counter)  # reason -> rows
    content_sha256: str = ""  # over the kept conversations' hashes, in order

    def describe(self) -> dict:
        return {"source": self.name, "format": self.format, "conversations": self.conversations,
                "examples": len(self.examples), "skipped": dict(self.skipped), "content_sha256": self.content_sha256}


def _raw_rows(source: str, data) -> tuple[dict, ...]:
    """The rows of `source` as dicts, through `datasets`; a one-line LlmkdError if it cannot be read.
    Read once per process (build, train and eval of `llmkd run` share them): never change them."""
    return _read(source, data.hub_config, data.hub_split, data.revision)


@functools.lru_cache(maxsize=4)
def _read(source: str, hub_config: str | None, hub_split: str, revision: str | None) -> tuple[dict, ...]:
    import datasets

    datasets.disable_progress_bars()
    try:
        if source.startswith("hub:"):
            ds = datasets.load_dataset(source[4:], hub_config, split=hub_split, revision=revision)
        else:
            path = Path(source).expanduser()
            if path.is_dir() and any((path / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    if hub_split not in ds:
                        raise LlmkdError(f"data.source {source}: no split {hub_split!r} (data.hub_split); it has "
                                         f"{', '.join(ds)}")
                    ds = ds[hub_split]
            elif path.is_file() and path.suffix.lower() in FILE_READERS:
                ds = datasets.load_dataset(FILE_READERS[path.suffix.lower()], data_files=str(path), split="train")
            elif path.exists():
                raise LlmkdError(f"data.source {source}: not a {', '.join(FILE_READERS)} file or a folder written by "
                                 "datasets' save_to_disk")
            else:
                raise LlmkdError(f"data.source {source}: no such file or folder (or write gsm8k, or hub:NAME for a "
                                 "hub dataset)")
        return tuple(ds.to_list())
    except LlmkdError:
        raise
    except Exception as err:  # datasets' parse, network and format errors: one line naming the source
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise LlmkdError(f"data.source {source}: cannot be read ({type(err).__name__}: {first})") from err


def _turns(value, field_name: str, default_role: str) -> tuple[list[dict] | None, BadRow | None]:
    """A string (one turn of `default_role`) or a messages list, checked; (turns, None) or (None, bad)."""
    if isinstance(value, str):
        if not value.strip():
            return None, BadRow(0, field_name, "empty")
        return [{"role": default_role, "content": value}], None
    if not isinstance(value, list) or not value:
        return None, BadRow(0, field_name, "neither a string nor a non-empty list of {role, content} turns")
    turns = []
    for i, turn in enumerate(value):
        where = f"{field_name}[{i}]"
        if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
            return None, BadRow(0, where, "not a {role, content} turn")
        if turn["role"] not in ROLES:
            return None, BadRow(0, f"{where}.role", f"unknown role {turn['role']!r} (expected {', '.join(ROLES)})")
        if not isinstance(turn["content"], str) or not turn["content"].strip():
            return None, BadRow(0, f"{where}.content", "empty or not a string")
        turns.append({"role": turn["role"], "content": turn["content"]})
    return turns, None


def detect_format(columns, data) -> str:
    """data.format, or the format the (renamed) columns say; a one-line error if they say none."""
    if data.format != "auto":
        return data.format
    if "messages" in columns:
        return "messages"
    if "prompt" in columns:
        return "prompt_completion" if "completion" in columns else "prompt"
    raise LlmkdError(f"data.source {data.source}: cannot tell the format from the columns {sorted(columns)}: expected "
                     "messages, prompt and completion, or prompt; map yours with data.columns (e.g. "
                     "{prompt: question, completion: answer}) or set data.format")


def conversation(raw: dict, fmt: str, *, gold: bool | None) -> tuple[list[dict], int] | BadRow:
    """(turns, first response turn) of one renamed row, or what is wrong with it. Responses are the
    assistant turns from the first response turn on; teacher responses also follow a last user turn."""
    needed = {"messages": ("messages",), "prompt_completion": ("prompt", "completion"), "prompt": ("prompt",)}[fmt]
    for name in needed:
        if raw.get(name) is None:
            return BadRow(0, name, "missing")
    if fmt == "messages":
        turns, bad = _turns(raw["messages"], "messages", "user")
        start = 0
    else:
        turns, bad = _turns(raw["prompt"], "prompt", "user")
        if bad is None and fmt == "prompt_completion":
            completion, bad = _turns(raw["completion"], "completion", "assistant")
            if bad is None and any(t["role"] != "assistant" for t in completion):
                bad = BadRow(0, "completion", "holds turns other than the assistant's")
            if bad is None:
                start, turns = len(turns), turns + completion
        else:
            start = len(turns or [])
    if bad is not None:
        return bad
    if not any(t["role"] == "user" for t in turns):
        return BadRow(0, "messages" if fmt == "messages" else "prompt", "no user turn")
    first_assistant = next((i for i, t in enumerate(turns) if t["role"] == "assistant" and i >= start), None)
    if gold and first_assistant is None:
        return BadRow(0, "messages" if fmt == "messages" else "completion", "no assistant turn to learn from")
    if first_assistant is not None and not any(t["role"] == "user" for t in turns[:first_assistant]):
        return BadRow(0, "messages", "an assistant turn before any user turn")
    return turns, start


def content_hash(turns: list[dict], start: int) -> str:
    """First 16 hex digits of the sha256 of a conversation's turns (whitespace runs collapsed) and
    where its responses start: the same content always gives the same hash, wherever the row is."""
    canonical = [[t["role"], " ".join(t["content"].split())] for t in turns]
    return hashlib.sha256(json.dumps([canonical, start], ensure_ascii=False).encode("utf-8")).hexdigest()[:16]


def held_out(digest: str, fraction: float) -> bool:
    """Whether a conversation of this content hash is an evaluation row: a uniform draw fixed by its content."""
    return int(digest[:8], 16) / 16**8 < fraction


def examples_of(turns: list[dict], start: int, *, gold: bool | None, id_: str, digest: str) -> list[dict]:
    """One example per response of a conversation (see the module docstring). gold True: at each of its
    assistant turns; False (the teacher responds): there and after a last user turn, response None;
    None (evaluation): at its assistant turns, or after its last turn when it has none."""
    positions = [i for i, t in enumerate(turns) if t["role"] == "assistant" and i >= start]
    if (gold is False and turns[-1]["role"] == "user") or (gold is None and not positions):
        positions.append(len(turns))
    out = []
    for n, i in enumerate(positions):
        out.append({"id": id_ if len(positions) == 1 else f"{id_}-turn{n + 1}", "question_hash": digest,
                    "messages": tuple(turns[:i]),
                    "response": turns[i]["content"] if gold is not False and i < len(turns) else None})
    return out


def _renamed(raw: dict, columns: dict) -> dict:
    if not columns:
        return raw
    out = {k: v for k, v in raw.items() if k not in columns.values()}
    out.update({ours: raw[theirs] for ours, theirs in columns.items() if theirs in raw})
    return out


def load_rows(data, part: str, *, gold: bool | None) -> Rows:
    """The examples of `part` ("train": the rows not held out; "test": the held-out ones) of a source
    other than GSM8K, checked row by row before anything runs. gold: the responses are the rows' own
    (True), the teacher's (False), or the rows' own where the format has them (None, evaluation)."""
    if part not in ("train", "test"):
        raise LlmkdError(f"unknown part {part!r}: train or test")
    source = data.eval_source if part == "test" and data.eval_source else data.source
    raw_rows = _raw_rows(source, data)
    if not raw_rows:
        raise LlmkdError(f"data.source {source}: no rows")
    columns = set(_renamed(raw_rows[0], data.columns))
    missing = [theirs for theirs in data.columns.values() if not any(theirs in r for r in raw_rows[:1])]
    if missing:
        raise LlmkdError(f"data.columns: {source} has no column {missing[0]!r} (it has {', '.join(sorted(raw_rows[0]))})")
    fmt = detect_format(columns, data)
    if gold and fmt == "prompt":
        raise LlmkdError(f"data.source {source} holds prompts only (format prompt): there is no gold response to "
                         "teacher-force; set transfer_set.response: teacher")
    split_here = not data.eval_source  # else: every row of source trains, every row of eval_source is held out
    name = Path(source).stem if not source.startswith("hub:") else source[4:].replace("/", "-")
    rows = Rows(name=source, format=fmt, examples=[], conversations=0)
    digests = []
    for number, raw in enumerate(raw_rows, start=1):
        result = conversation(_renamed(raw, data.columns), fmt, gold=gold)
        if isinstance(result, BadRow):
            if data.on_bad_row == "error":
                raise LlmkdError(f"{source} row {number}: {result.field}: {result.reason} (data.on_bad_row: skip "
                                 "leaves such rows out)")
            rows.skipped[f"{result.field.split('[')[0]}: {result.reason}"] += 1
            continue
        turns, start = result
        digest = content_hash(turns, start)
        if split_here and held_out(digest, data.eval_fraction) != (part == "test"):
            continue
        rows.conversations += 1
        digests.append(digest)
        rows.examples += examples_of(turns, start, gold=gold, id_=f"{name}-{number:05d}", digest=digest)
    if not rows.examples:
        raise LlmkdError(f"data.source {source}: no {'held-out' if part == 'test' else 'training'} rows "
                         f"(data.eval_fraction {data.eval_fraction}, {sum(rows.skipped.values())} bad row(s) skipped)")
    rows.content_sha256 = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    return rows


def skip_long(rows: Rows, response_tokens: list[int], max_length: int | None, on_bad_row: str) -> None:
    """Leave out (or refuse, by data.on_bad_row) the examples whose response alone reaches max_length
    tokens: prompts are cut from the left to fit (`fit`), a response is never cut."""
    if max_length is None:
        return
    kept = []
    for example, n in zip(rows.examples, response_tokens):
        if n >= max_length:
            if on_bad_row == "error":
                raise LlmkdError(f"{rows.name} {example['id']}: response: {n} tokens, not below data.max_length "
                                 f"{max_length} (a response is never cut; data.on_bad_row: skip leaves such rows out)")
            rows.skipped[f"response: {max_length} tokens or more"] += 1
            continue
        kept.append(example)
    if not kept:
        raise LlmkdError(f"data.max_length {max_length}: every response of {rows.name} is that long or longer")
    rows.examples = kept


def fit(prompt_ids: list[int], room: int) -> list[int]:
    """The prompt cut from the left to at most `room` tokens (its end, next to the response, stays)."""
    return prompt_ids[len(prompt_ids) - room:] if len(prompt_ids) > room else prompt_ids


def fit_example(ids: list[int], start: int, max_length: int | None) -> tuple[list[int], int]:
    """(ids, response start) of prompt + response within `max_length` tokens: the prompt cut from the left
    (to one token at least), the response whole."""
    if max_length is None or len(ids) <= max_length:
        return ids, start
    prompt = fit(ids[:start], max(1, max_length - (len(ids) - start)))
    return prompt + ids[start:], len(prompt)
