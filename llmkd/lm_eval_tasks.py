"""Task accuracy from lm-eval: `eval.tasks` run for teacher, base and distilled side by side.

Each entry of `eval.tasks` is an lm-eval task name (`gsm8k`, `arc_easy`, ...: lm-eval fetches their data
from the hub) or the path of a task YAML of your own (its folder is indexed, so a YAML may `include`
its neighbours and read local `data_files`). Every model runs them with llmkd's decoding and BOS rule:
greedy (`do_sample` off, temperature 0, at most `eval.max_new_tokens` new tokens; the task keeps its
own stop sequences), BOS as `prompts.encode` adds it, the chat template where the tokenizer has one
(with earlier turns as multi-turn few-shot). `eval.task_limit` caps the documents of each task.

Per model and task: every metric lm-eval reports, with its stderr. Where per-document results are 0/1
(accuracy, exact match), models are paired on the same documents by the exact McNemar test, base
against each other model. The built-in GSM8K accuracy (`llmkd.evaluate`) is separate and stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from llmkd.errors import LlmkdError
from llmkd.lm_eval_backend import simple_evaluate
from llmkd.stats import mcnemar_exact


@dataclass
class TaskScore:
    tag: str  # teacher, student (the quantised base), distilled
    task: str  # lm-eval's name of the task (a YAML's `task:`)
    metric: str  # "<metric>,<filter>" as lm-eval keys it, e.g. "exact_match,strict-match", "acc,none"
    value: float
    stderr: float | None
    documents: int


@dataclass(frozen=True)
class TaskRef:
    name: str  # what lm-eval calls it
    include: Path | None  # the folder to index for a task YAML of your own; None: lm-eval's own tasks


def task_refs(entries: Sequence[str]) -> list[TaskRef]:
    """`eval.tasks` resolved: a path ending in .yaml/.yml is a task file (its `task:` names it), anything
    else an lm-eval task name. A one-line error for a file that is missing or names no task."""
    refs = []
    for entry in entries:
        path = Path(entry).expanduser()
        if path.suffix not in (".yaml", ".yml"):
            refs.append(TaskRef(entry, None))
            continue
        if not path.is_file():
            raise LlmkdError(f"eval.tasks: {entry}: no such task file")
        try:
            # lm-eval's YAMLs may carry `!function` tags: read the one key with a loader that ignores them.
            name = yaml.load(path.read_text(encoding="utf-8"), Loader=_TagTolerantLoader).get("task")
        except (yaml.YAMLError, AttributeError, UnicodeDecodeError) as e:
            raise LlmkdError(f"eval.tasks: {entry}: not a task YAML ({type(e).__name__})") from None
        if not isinstance(name, str):
            raise LlmkdError(f"eval.tasks: {entry}: no `task:` name in it")
        refs.append(TaskRef(name, path.resolve().parent))
    return refs


class _TagTolerantLoader(yaml.SafeLoader):
    pass


_TagTolerantLoader.add_multi_constructor("!", lambda loader, suffix, node: None)


def run_tasks(model, tokenizer, entries: Sequence[str], *, tag: str, batch_size: int, max_new_tokens: int,
              limit: int | None, quiet: bool = True) -> tuple[list[TaskScore], dict[str, list[dict]]]:
    """Run `entries` (eval.tasks) on one model; (scores, per task its per-document 0/1 results as
    [{"doc_id", metric: 0/1, ...}] in document order)."""
    from lm_eval.tasks import TaskManager

    refs = task_refs(entries)
    folders = sorted({str(r.include) for r in refs if r.include is not None})
    manager = TaskManager(include_path=folders or None, include_defaults=any(r.include is None for r in refs))
    unknown = [r.name for r in refs if r.name not in manager.all_tasks]
    if unknown:
        raise LlmkdError(f"eval.tasks: lm-eval knows no task {unknown[0]!r} (a name lm-eval lists, or a task YAML's path)")
    try:
        out = simple_evaluate(model, tokenizer, batch_size=batch_size, quiet=quiet, tasks=[r.name for r in refs],
                              task_manager=manager, limit=limit,
                              gen_kwargs={"do_sample": False, "temperature": 0.0, "max_gen_toks": max_new_tokens})
    except Exception as err:  # a task's data missing offline, a malformed task: one line naming the tasks
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise LlmkdError(f"eval.tasks {', '.join(entries)}: lm-eval failed ({type(err).__name__}: {first})") from err
    scores, per_doc = [], {}
    for ref in refs:
        results = out["results"][ref.name]
        samples = out["samples"].get(ref.name, [])
        documents = len({s["doc_id"] for s in samples})
        for key, value in results.items():
            if "," not in key or "_stderr," in key or not isinstance(value, (int, float)):
                continue  # "alias", "sample_len": not metrics
            stderr = results.get(key.replace(",", "_stderr,", 1))
            scores.append(TaskScore(tag=tag, task=ref.name, metric=key, value=float(value),
                                    stderr=float(stderr) if isinstance(stderr, (int, float)) else None,
                                    documents=documents))
        per_doc[ref.name] = _per_document(samples)
    return scores, per_doc


def _per_document(samples: list[dict]) -> list[dict]:
    """One row per document: its 0/1 results, keyed "<metric>,<filter>" as the aggregate results are, and
    for generated answers the prompt and the output as lm-eval logged them."""
    rows: dict[int, dict] = {}
    for s in samples:
        row = rows.setdefault(s["doc_id"], {"doc_id": s["doc_id"]})
        args, resps = s.get("arguments") or [], s.get("resps") or []
        if len(args) == 1 and len(resps) == 1 and isinstance(resps[0][0], str):  # generate_until: (context, kwargs)
            row.update(prompt=args[0][0], output=resps[0][0])
        for metric in s.get("metrics", []):
            value = s.get(metric)
            if isinstance(value, (bool, int, float)) and float(value) in (0.0, 1.0):
                row[f"{metric},{s.get('filter', 'none')}"] = float(value)
    return [rows[k] for k in sorted(rows)]


def paired_task_tests(per_doc: dict[tuple[str, str], list[dict]], base: str = "student") -> list[dict]:
    """Exact McNemar per task and 0/1 metric, `base` (a) against each other model but the teacher (b)."""
    rows = []
    for (tag, task), docs in per_doc.items():
        base_docs = per_doc.get((base, task))
        if tag in (base, "teacher") or base_docs is None or [d["doc_id"] for d in docs] != [d["doc_id"] for d in base_docs]:
            continue
        for metric in [k for k, v in docs[0].items() if k != "doc_id" and isinstance(v, float)] if docs else []:
            if not all(metric in d for d in docs + base_docs):
                continue
            a, b = [d[metric] == 1.0 for d in base_docs], [d[metric] == 1.0 for d in docs]
            rows.append({"task": task, "metric": metric, "a": base, "b": tag,
                         "b_minus_a": (sum(b) - sum(a)) / len(a), **mcnemar_exact(a, b)})
    return rows


def tasks_table(scores: Sequence[TaskScore]) -> str:
    """One row per task and metric, one column per model (value ± stderr)."""
    if not scores:
        return ""
    tags = list(dict.fromkeys(s.tag for s in scores))
    cells = {(s.task, s.metric, s.tag): s for s in scores}
    lines = ["| task | metric | documents | " + " | ".join(tags) + " |", "|---|---|---:|" + "---:|" * len(tags)]
    for task, metric in dict.fromkeys((s.task, s.metric) for s in scores):
        shown = [cells.get((task, metric, t)) for t in tags]
        n = next(s.documents for s in shown if s is not None)
        lines.append(f"| {task} | {metric} | {n} | " + " | ".join(_value(s) for s in shown) + " |")
    return "\n".join(lines)


def _value(s: TaskScore | None) -> str:
    if s is None:
        return ""
    return f"{s.value:.4f}" + (f" ± {s.stderr:.4f}" if s.stderr is not None else "")
