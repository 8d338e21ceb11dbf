"""Generation agreement: each model's greedy outputs against the teacher's on the same prompts.

Read from the samples every evaluation cell writes (`<eval>/<tag>-<shots>shot/samples.jsonl`, either
backend): identical outputs, the common token prefix, and, where an answer extractor ran (GSM8K), the
same extracted answer per filter, paired with the quantised base's by the exact McNemar test. It shows
behaviour where accuracy sits at the floor, and is the measure of generation on data without answers.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from llmkd.config import eval_cell
from llmkd.data import answer
from llmkd.stats import mcnemar_exact


@dataclass
class GenerationAgreement:
    """A model's greedy outputs against the teacher's on the same prompts (the accuracy questions)."""

    tag: str
    shots: int
    questions: int
    exact_match: float  # share of outputs identical to the teacher's
    prefix_tokens_mean: float  # common token prefix with the teacher's output
    prefix_tokens_median: float
    teacher_tokens_mean: float  # the teacher's output length: the prefix of an identical output
    # Share with the teacher's extracted answer (both valid), strict and flexible filter; None on data
    # without an answer extractor (not GSM8K).
    strict_answer_agreement: float | None
    flexible_answer_agreement: float | None
    # Filter -> exact McNemar of per-question answer agreement, a = the quantised base ("student"), b = this
    # model; empty for the base itself or without it.
    vs_base: dict[str, dict] = field(default_factory=dict)


def read_samples(eval_dir: Path, tag: str, shots: int) -> list[dict]:
    """The per-question rows `score_accuracy` wrote for one model and shot count (either backend)."""
    path = eval_cell(eval_dir, tag, shots) / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


FILTERS = ("strict", "flexible")


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens `a` and `b` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def answers_agree(a: str, b: str) -> bool:
    """Two extracted answers name the same number; a failed extraction agrees with nothing. Compared
    as canonical numbers: lm-eval's extractions are raw text ("$18." is 18)."""
    number = answer.normalize_number(a)
    return number is not None and number == answer.normalize_number(b)


def agreement_rows(teacher: Sequence[dict], samples: Sequence[dict], tokenize: Callable[[str], list[int]]) -> list[dict]:
    """Per question, a model's sample against the teacher's: identical output, common token prefix,
    the teacher's length in tokens, and for each filter whether the extracted answers agree."""
    if [t["id"] for t in teacher] != [s["id"] for s in samples]:
        raise ValueError("teacher and model were scored on different questions")
    rows = []
    for t, s in zip(teacher, samples):
        t_ids, s_ids = tokenize(t["output"]), tokenize(s["output"])
        rows.append({"exact": t["output"] == s["output"], "prefix": common_prefix_length(t_ids, s_ids),
                     "teacher_tokens": len(t_ids), **{f: answers_agree(t[f], s[f]) for f in FILTERS if f in t}})
    return rows


def summarise_agreement(tag: str, shots: int, rows: Sequence[dict],
                        base_rows: Sequence[dict] | None = None) -> GenerationAgreement:
    """Rates and prefix lengths of `agreement_rows`; with `base_rows` (the quantised base's on the same
    questions), McNemar of answer agreement base vs this model, per filter."""
    n = max(len(rows), 1)
    prefixes = [r["prefix"] for r in rows]
    answered = bool(rows) and all(f in r for r in rows for f in FILTERS)  # an answer extractor ran (GSM8K)
    return GenerationAgreement(
        tag=tag, shots=shots, questions=len(rows),
        exact_match=sum(r["exact"] for r in rows) / n,
        prefix_tokens_mean=sum(prefixes) / n,
        prefix_tokens_median=float(statistics.median(prefixes)) if prefixes else 0.0,
        teacher_tokens_mean=sum(r["teacher_tokens"] for r in rows) / n,
        strict_answer_agreement=sum(r["strict"] for r in rows) / n if answered else None,
        flexible_answer_agreement=sum(r["flexible"] for r in rows) / n if answered else None,
        vs_base={f: mcnemar_exact([b[f] for b in base_rows], [r[f] for r in rows]) for f in FILTERS}
        if base_rows is not None and answered else {},
    )


def generation_agreement(samples: dict[tuple[str, int], list[dict]], tokenizer) -> list[GenerationAgreement]:
    """Each non-teacher model's samples ((tag, shots) -> rows, `EvalRun.samples`) against the teacher's, at
    every shot count the teacher was scored at (no generation); in the order of `samples`."""
    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    teacher_shots = {k for tag, k in samples if tag == "teacher"}
    cells = [(tag, k) for tag, k in samples if tag != "teacher" and k in teacher_shots]
    rows = {(tag, k): agreement_rows(samples["teacher", k], samples[tag, k], tokenize) for tag, k in cells}
    return [summarise_agreement(tag, k, rows[tag, k], rows.get(("student", k)) if tag != "student" else None)
            for tag, k in cells]


def agreement_table(agreement: Sequence[GenerationAgreement]) -> str:
    """Greedy outputs against the teacher's; the p-values pair each model's answer agreement with the base's.
    Without an answer extractor (data other than GSM8K) the answer columns are left out."""
    if not agreement:
        return ""
    answered = all(g.strict_answer_agreement is not None for g in agreement)
    head = "| model | shots | n | same output as teacher | common prefix, tokens: mean / median (teacher's length) |"
    lines = [head + (" same answer, strict | same answer, flexible | vs base: p strict / flexible |" if answered else ""),
             "|---|---:|---:|---:|---:|" + ("---:|---:|---|" if answered else "")]
    for g in agreement:
        line = (f"| {g.tag} | {g.shots} | {g.questions} | {100 * g.exact_match:.1f}% | "
                f"{g.prefix_tokens_mean:.1f} / {g.prefix_tokens_median:g} ({g.teacher_tokens_mean:.1f}) |")
        if answered:
            paired = " / ".join(f"{g.vs_base[f]['p_value']:.3g}" for f in FILTERS) if g.vs_base else ""
            line += f" {_share(g.strict_answer_agreement)} | {_share(g.flexible_answer_agreement)} | {paired} |"
        lines.append(line)
    return "\n".join(lines)


def _share(p: float | None) -> str:
    return "n/a" if p is None else f"{100 * p:.1f}%"
