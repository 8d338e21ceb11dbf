"""GSM8K through EleutherAI's lm-evaluation-harness, with llmkd's own prompt.

lm-eval is the second evaluator backend: the same questions, shown the same prompt text as the
in-house evaluator (`llmkd.data.prompts.render_prompt`), but generated, filtered and scored by
lm-eval's code, so a number can be checked against the harness the field reports.

How the prompt is made identical. `run_lm_eval` writes a local lm-eval task into `workdir` at run
time: the questions and the exemplars as JSONL, each row carrying two precomputed columns,
`user_turn` (`prompts.user_turn(question)`) and `assistant_turn` (`prompts.assistant_turn(answer)`),
which the task names as `doc_to_text` / `doc_to_target`. lm-eval 0.4.13 then builds (in
`ConfigurableTask.fewshot_context` / `build_qa_turn`) the message list

    [user: user_turn(ex1), assistant: assistant_turn(ex1), ..., user: user_turn(question)]

which is exactly `prompts.build_messages(question, exemplars)`; the `first_n` sampler takes the
exemplars in our order. With a chat template lm-eval renders that list with
`tokenizer.apply_chat_template(..., add_generation_prompt=True)` (no `gen_prefix`, no description,
no system instruction, `fewshot_as_multiturn`): the same call `render_prompt` makes. Without a
chat template it concatenates the turns with the task's delimiters; `target_delimiter` and
`fewshot_delimiter` = "\\n\\n" and `gen_prefix` = "Answer:" reproduce `prompts.render_plain`
("<turn>\\n\\nAnswer: <solution>\\n\\n...<turn>\\n\\nAnswer:"). The tests check both, string for
string, against lm-eval's logged context.

Generation and scoring are lm-eval's `gsm8k.yaml` (v3.0) contract: greedy, `until` =
`prompts.STOP_STRINGS` (lm-eval adds the tokenizer's EOS), the "strict-match" and
"flexible-extract" regex filters, and `exact_match` with gsm8k's `regexes_to_ignore`.

lm-eval's own `load_in_4bit` model argument fails under transformers 5, so the caller passes a
loaded model object (bf16/fp32, NF4, or a `PeftModel`), wrapped here in `HFLM(pretrained=model)`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import yaml

from llmkd.data import prompts
from llmkd.errors import LlmkdError

TASK_NAME = "llmkd_gsm8k"

# lm-eval's tasks/gsm8k/gsm8k.yaml (metadata version 3.0), verbatim: the filters and the metric.
STRICT_FILTER = "strict-match"
FLEXIBLE_FILTER = "flexible-extract"
_FILTER_LIST = [
    {
        "name": STRICT_FILTER,
        "filter": [
            {"function": "regex", "regex_pattern": "#### (\\-?[0-9\\.\\,]+)"},
            {"function": "take_first"},
        ],
    },
    {
        "name": FLEXIBLE_FILTER,
        "filter": [
            {"function": "regex", "group_select": -1, "regex_pattern": "(-?[$0-9.,]{2,})|(-?[0-9]+)"},
            {"function": "take_first"},
        ],
    },
]
_METRIC_LIST = [
    {
        "metric": "exact_match",
        "aggregation": "mean",
        "higher_is_better": True,
        "ignore_case": True,
        "ignore_punctuation": False,
        "regexes_to_ignore": [",", "\\$", "(?s).*#### ", "\\.$"],
    }
]

# Row columns the task reads (`doc_to_text` / `doc_to_target`): precomputed by llmkd.data.prompts.
_TEXT_COLUMN = "user_turn"
_TARGET_COLUMN = "assistant_turn"
# The plain (no chat template) rendering of `prompts.render_plain`, in lm-eval's terms.
_PLAIN_DELIMITER = "\n\n"
_PLAIN_GEN_PREFIX = "Answer:"


@dataclass(frozen=True)
class LmEvalResult:
    """What one lm-eval run returns.

    `samples`: one dict per question, in the order given:
        id        the question's `id`, as given
        prompt    the context string lm-eval fed the model, == `prompts.render_prompt(...)` (the
                  tokens are lm-eval's: no BOS added when the text already starts with one)
        output    the generation as lm-eval returned it: special tokens dropped, cut at the first
                  stop string, not stripped
        strict    lm-eval's "strict-match" answer (the first number after '#### '), or "[invalid]"
        flexible  lm-eval's "flexible-extract" answer (the last number in the output), or "[invalid]"
    `metrics`: lm-eval's `exact_match` (gsm8k's normalisation: ',' '$' trailing '.' ignored) as a
        fraction in [0, 1]: "strict_match", "flexible_extract", and "strict_match_stderr",
        "flexible_extract_stderr" when defined (more than one question).
    `task_dir`: the generated task (YAML + JSONL), kept for inspection and reruns.
    `lm_eval_version`: the installed lm-eval, for the results JSON.
    """

    samples: list[dict]
    metrics: dict[str, float]
    task_dir: Path
    lm_eval_version: str


def task_config(*, chat: bool, num_fewshot: int, max_new_tokens: int, data_files: dict[str, str],
                cache_dir: str) -> dict:
    """The lm-eval task as a dict (what `write_task` dumps to YAML).

    `chat`: whether the tokenizer has a chat template; only the plain rendering needs the
    delimiters and "Answer:" prefix (with a template, lm-eval ignores delimiters, and a
    `gen_prefix` would turn into a prefilled assistant message).
    """
    config = {
        "task": TASK_NAME,
        "dataset_path": "json",
        # cache_dir: datasets' Arrow cache goes inside the task directory, not ~/.cache.
        "dataset_kwargs": {"data_files": data_files, "cache_dir": cache_dir},
        "test_split": "test",
    }
    if num_fewshot:
        config["fewshot_split"] = "train"
        config["fewshot_config"] = {"sampler": "first_n"}  # the exemplars in the given order
    config |= {
        "output_type": "generate_until",
        "doc_to_text": _TEXT_COLUMN,
        "doc_to_target": _TARGET_COLUMN,
        "description": "",
        "target_delimiter": _PLAIN_DELIMITER,
        "fewshot_delimiter": _PLAIN_DELIMITER,
    }
    if not chat:
        config["gen_prefix"] = _PLAIN_GEN_PREFIX
    config |= {
        "num_fewshot": num_fewshot,
        "generation_kwargs": {
            "until": list(prompts.STOP_STRINGS),
            "do_sample": False,
            "temperature": 0.0,
            "max_gen_toks": max_new_tokens,
        },
        "repeats": 1,
        "filter_list": _FILTER_LIST,
        "metric_list": _METRIC_LIST,
        "metadata": {"version": 1.0},
    }
    return config


def _task_row(row: dict) -> dict:
    return {
        "id": str(row["id"]) if "id" in row else None,
        "question": row["question"],
        "answer": row["answer"],
        _TEXT_COLUMN: prompts.user_turn(row["question"]),
        _TARGET_COLUMN: prompts.assistant_turn(row["answer"]),
    }


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(_task_row(row), ensure_ascii=False) + "\n")


def write_task(task_dir: Path, questions: Sequence[dict], exemplars: Sequence[dict], *, chat: bool,
               max_new_tokens: int) -> Path:
    """Write the lm-eval task into `task_dir` (emptied first); return the YAML's path.

    Files: `<TASK_NAME>.yaml`, `test.jsonl` (the questions), `fewshot.jsonl` (the exemplars, in
    order; absent for 0-shot: lm-eval's json loader cannot read an empty file).
    """
    if task_dir.exists():
        shutil.rmtree(task_dir)
    task_dir.mkdir(parents=True)
    data_files = {"test": str(task_dir / "test.jsonl")}
    _write_jsonl(task_dir / "test.jsonl", questions)
    if exemplars:
        data_files["train"] = str(task_dir / "fewshot.jsonl")
        _write_jsonl(task_dir / "fewshot.jsonl", exemplars)
    config = task_config(chat=chat, num_fewshot=len(exemplars), max_new_tokens=max_new_tokens,
                         data_files=data_files, cache_dir=str(task_dir / "datasets_cache"))
    path = task_dir / f"{TASK_NAME}.yaml"
    path.write_text(yaml.dump(config, Dumper=_Dumper, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


class _Dumper(yaml.SafeDumper):
    """Writes strings holding a newline as "\\n\\n" (PyYAML's default folds them over blank lines)."""


_Dumper.add_representer(
    str,
    lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style='"' if "\n" in s else None),
)


def _check_rows(rows: Sequence[dict], what: str, keys: tuple[str, ...]) -> None:
    for i, row in enumerate(rows):
        missing = [k for k in keys if k not in row]
        if missing:
            raise LlmkdError(f"{what}[{i}] lacks {', '.join(missing)} (has: {', '.join(sorted(row))})")


@contextlib.contextmanager
def quiet_lm_eval(quiet: bool) -> Iterator[None]:
    """Hide lm-eval's noise while it runs; lm-eval's own tqdm bars stay (a long run's progress).

    - the "lm_eval" logger below ERROR: it WARNs on every run with a model object ("`pretrained`
      model kwarg is not of type `str`", "Overwriting default num_fewshot") and logs INFO lines
      when the application logs at INFO;
    - datasets' "Generating test split" progress bars;
    - `simple_evaluate` ends by running `git describe` in the current directory for its results
      JSON (which we drop): outside a git checkout git prints "fatal: not a git repository".
    """
    if not quiet:
        yield
        return
    import datasets
    import lm_eval.evaluator

    logger = logging.getLogger("lm_eval")
    old_level, bars_were_on = logger.level, datasets.is_progress_bar_enabled()
    old_git_hash = getattr(lm_eval.evaluator, "get_git_commit_hash", None)
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    if old_git_hash is not None:
        lm_eval.evaluator.get_git_commit_hash = lambda: None
    try:
        yield
    finally:
        logger.setLevel(old_level)
        if bars_were_on:
            datasets.enable_progress_bars()
        if old_git_hash is not None:
            lm_eval.evaluator.get_git_commit_hash = old_git_hash


@contextlib.contextmanager
def global_rng_kept() -> Iterator[None]:
    """Restore the python, numpy and torch global RNGs afterwards.

    `simple_evaluate` reseeds all three (random 0, numpy and torch 1234), and lm-eval 0.4.13 draws
    from `random` even with its seeds set to None (`task_name` evaluates `random_task_id()` as a
    getattr default). A training run that evaluates mid-way must not see its RNG streams move.
    """
    import numpy as np
    import torch

    py, npy, pt = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(pt)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


def run_lm_eval(model, tokenizer, questions: Sequence[dict], exemplars: Sequence[dict] = (), *,
                batch_size: int, max_new_tokens: int, workdir: Path, quiet: bool = True) -> LmEvalResult:
    """Generate and score `questions` with lm-eval, prompting exactly as `prompts.render_prompt`.

    `model`: a loaded transformers causal LM (any dtype, NF4 via bitsandbytes, or a `PeftModel`),
    used where it is (lm-eval moves nothing). lm-eval puts it in eval mode and re-ties its
    weights; its train/eval mode and the global python/numpy/torch RNG states are restored after.
    `tokenizer`: lm-eval gives it a pad token if it has none. `questions`: GSM8K rows with `id`,
    `question`, `answer` (extra keys ignored). `exemplars`: GSM8K rows (`question`, `answer`)
    shown as k-shot turns, in this order; k = len(exemplars). `batch_size`: lm-eval batches the
    prompts longest first. `workdir`: the task goes to `workdir/task/`, replaced on every call.
    `quiet`: see `quiet_lm_eval`. Needs no network (HF_DATASETS_OFFLINE=1 is enough).
    """
    if not questions:
        raise LlmkdError("run_lm_eval: no questions")
    _check_rows(questions, "questions", ("id", "question", "answer"))
    _check_rows(exemplars, "exemplars", ("question", "answer"))
    ids = [str(q["id"]) for q in questions]
    if len(set(ids)) != len(ids):
        raise LlmkdError("run_lm_eval: question ids are not unique")
    if batch_size < 1 or max_new_tokens < 1:
        raise LlmkdError(
            f"run_lm_eval: batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be >= 1"
        )

    import lm_eval
    from lm_eval.tasks import TaskManager

    chat = prompts.has_chat_template(tokenizer)
    task_dir = Path(workdir) / "task"
    write_task(task_dir, questions, exemplars, chat=chat, max_new_tokens=max_new_tokens)

    out = simple_evaluate(
        model, tokenizer, batch_size=batch_size, quiet=quiet, tasks=[TASK_NAME],
        # include_defaults=False: index only our task, not lm-eval's ~10k built-in YAMLs.
        task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
        num_fewshot=len(exemplars),
    )

    return LmEvalResult(
        samples=_collect_samples(out["samples"][TASK_NAME], [q["id"] for q in questions]),
        metrics=_collect_metrics(out["results"][TASK_NAME]),
        task_dir=task_dir,
        lm_eval_version=lm_eval.__version__,
    )


def simple_evaluate(model, tokenizer, *, batch_size: int, quiet: bool = True, **options) -> dict:
    """`lm_eval.simple_evaluate` on a loaded model, as llmkd runs it: BOS by `prompts.encode`'s rule, the
    tokenizer's chat template (earlier turns as multi-turn few-shot) where it has one, every sample logged;
    lm-eval's noise hidden (`quiet_lm_eval`), the global RNGs and the model's train/eval mode as they were.
    `options`: the rest of simple_evaluate's arguments (tasks, task_manager, limit, gen_kwargs, ...)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    chat = prompts.has_chat_template(tokenizer)
    was_training = getattr(model, "training", False)
    try:
        with quiet_lm_eval(quiet), global_rng_kept():
            # llmkd's BOS rule (prompts.encode): HFLM then adds BOS unless the text starts with it.
            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                      add_bos_token=prompts.adds_bos(tokenizer))
            # bootstrap_iters: exact_match and acc are means, their stderr closed-form; no bootstrap is drawn.
            return lm_eval.simple_evaluate(model=lm, apply_chat_template=chat, fewshot_as_multiturn=chat,
                                           log_samples=True, bootstrap_iters=1000, **options)
    finally:
        if was_training:
            model.train()


def _collect_samples(logged: list[dict], ids: list) -> list[dict]:
    """lm-eval logs one sample per (filter, question); merge them into one dict per question."""
    rows: list[dict | None] = [None] * len(ids)
    for s in logged:
        i = s["doc_id"]  # the row's position in test.jsonl, i.e. in `questions`
        if s["doc"]["id"] != str(ids[i]):
            raise RuntimeError(f"lm-eval sample {i} is question {s['doc']['id']!r}, expected {ids[i]!r}")
        (context, _gen_kwargs), = s["arguments"]
        (output,), = s["resps"]
        row = rows[i] or {"id": ids[i], "prompt": context, "output": output}
        key = {STRICT_FILTER: "strict", FLEXIBLE_FILTER: "flexible"}[s["filter"]]
        (row[key],) = s["filtered_resps"]
        row[f"{key}_correct"] = bool(s["exact_match"])  # the harness's own verdict, per question
        rows[i] = row
    missing = [ids[i] for i, r in enumerate(rows) if r is None or "strict_correct" not in r or "flexible_correct" not in r]
    if missing:
        raise RuntimeError(f"lm-eval returned no complete sample for questions {missing[:5]}")
    return rows  # type: ignore[return-value]


def _collect_metrics(task_results: dict) -> dict[str, float]:
    metrics = {}
    for filt, name in ((STRICT_FILTER, "strict_match"), (FLEXIBLE_FILTER, "flexible_extract")):
        metrics[name] = float(task_results[f"exact_match,{filt}"])
        stderr = task_results.get(f"exact_match_stderr,{filt}")
        if isinstance(stderr, (int, float)):
            metrics[f"{name}_stderr"] = float(stderr)
    return metrics
