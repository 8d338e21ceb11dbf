"""Stage 3: teacher, quantised base and distilled student evaluated side by side (`run_eval`).

Accuracy (GSM8K): greedy generation on the shared prompt format (`llmkd.data.prompts`), both answer
filters (strict `#### N` and flexible last-number, `llmkd.data.answer`) with Wilson 95% intervals.
Backends: llmkd's own batched generation, or lm-eval's gsm8k harness fed exactly the same prompts.
Other data (`llmkd.data.sources`) has no answer to score: its held-out prompts are generated on 0-shot
(`score_generations`) for agreement alone.

Fidelity to the teacher on held-out responses: `llmkd.fidelity`. Generation agreement with the
teacher, from the samples written here: `llmkd.agreement`. At most two models are loaded: the teacher,
then one quantised student that serves as base (adapter off) and distilled student.

Each evaluation writes `<out>/<tag>-<shots>shot/samples.jsonl` (prompt, output, and for GSM8K extracted,
gold, correct) and `summary.json` (metrics, recipe, prompt format, versions, git commit); a run writes
`<out>/eval-summary.json` (accuracy or generations, fidelity, agreement, data). `EvalRun` holds the same.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from llmkd import atomic, fastpath, models, quantize
from llmkd.agreement import GenerationAgreement, agreement_table, generation_agreement, read_samples
from llmkd.config import Recipe, eval_cell
from llmkd.data import answer, prompts, sources
from llmkd.data.gsm8k import load_gsm8k, select_range
from llmkd.errors import LlmkdError
from llmkd.fidelity import (FIDELITY_BATCH, Fidelity, TeacherLogits, adapter_off, fidelity_questions, fidelity_table,
                            score_fidelity, with_responses)
from llmkd.generation import decoding_settings, generate, generate_ids
from llmkd.lm_eval_tasks import TaskScore, paired_task_tests, run_tasks, tasks_table
from llmkd.provenance import provenance
from llmkd.stats import wilson_interval

log = logging.getLogger(__name__)


@dataclass
class Accuracy:
    tag: str
    shots: int
    backend: str
    questions: int
    strict: float
    flexible: float
    strict_ci95: tuple[float, float]
    flexible_ci95: tuple[float, float]
    generated_tokens: int
    seconds: float
    tokens_per_s: float


@dataclass
class Generations:
    """Greedy outputs on held-out prompts of data without an answer to score (not GSM8K): what
    generation agreement compares with the teacher's."""

    tag: str
    shots: int
    questions: int
    generated_tokens: int
    seconds: float
    tokens_per_s: float


@dataclass
class EvalRun:
    accuracy: list[Accuracy] = field(default_factory=list)
    fidelity: list[Fidelity] = field(default_factory=list)
    agreement: list[GenerationAgreement] = field(default_factory=list)
    generations: list[Generations] = field(default_factory=list)  # data other than GSM8K: no accuracy
    data: dict = field(default_factory=dict)  # what was evaluated on: source, format, rows, content hash
    # (tag, shots) -> the per-question rows of that cell's samples.jsonl, in the order scored
    samples: dict[tuple[str, int], list[dict]] = field(default_factory=dict)
    tasks: list[TaskScore] = field(default_factory=list)  # eval.tasks, every model
    # (tag, task) -> per-document 0/1 results of that model on that task (`lm_eval_tasks.run_tasks`)
    task_documents: dict[tuple[str, str], list[dict]] = field(default_factory=dict)
    student_quantization: dict | None = None  # `quantize.quantization_report` of the student evaluated
    student_load_seconds: float | None = None
    fast_paths: dict | None = None


def eval_questions(recipe: Recipe, limit: int | None = None):
    """The rows generated on: GSM8K's eval.split, or the held-out rows of other data (eval.split test)."""
    ev = recipe.eval
    if not recipe.data.is_gsm8k:
        return select_range(sources.load_rows(recipe.data, ev.split, gold=None).examples, ev.start, limit or ev.limit)
    return select_range(load_gsm8k(ev.split, sources.gsm8k_copy(recipe.data.source)), ev.start, limit or ev.limit)


def exemplars(recipe: Recipe, shots: int) -> list[dict]:
    if not recipe.data.is_gsm8k:
        if shots:
            raise LlmkdError(f"{shots}-shot: your own data is evaluated 0-shot")
        return []
    return prompts.select_exemplars(load_gsm8k("train", sources.gsm8k_copy(recipe.data.source)), shots,
                                    recipe.data.exemplar_seed)


def contamination(recipe: Recipe, questions) -> int:
    """How many evaluation questions the recipe's transfer set holds (by question hash); warns if any.

    A student distilled on a question has seen the teacher answer it: its score there is not a test.
    """
    from llmkd.transfer_set import MANIFEST, TransferSet

    path = recipe.layout.transfer_set
    if not (path / MANIFEST).is_file():
        return 0
    overlap = len({q["question_hash"] for q in questions} & TransferSet.open(path).question_hashes)
    if overlap:
        log.warning("warning: %d of %d evaluation questions are in the transfer set %s: the distilled "
                    "student's score on them is contaminated", overlap, len(questions), path)
    return overlap


def score_accuracy(
    model, tokenizer, questions, shots_exemplars: Sequence[dict], *, tag: str, recipe: Recipe, out_dir: Path,
    backend: str = "llmkd", progress: bool = True,
) -> Accuracy:
    ev = recipe.eval
    rows = list(questions)
    if backend == "lm-eval":
        from llmkd.lm_eval_backend import run_lm_eval

        t0 = time.perf_counter()
        lm = run_lm_eval(
            model, tokenizer, rows, list(shots_exemplars), batch_size=ev.batch_size,
            max_new_tokens=ev.max_new_tokens, workdir=out_dir / "lm-eval-task",
        )
        seconds = time.perf_counter() - t0
        outputs = [s["output"] for s in lm.samples]
        prompt_texts = [s["prompt"] for s in lm.samples]
        generated = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
    else:
        prompt_texts = [prompts.render_prompt(tokenizer, r["question"], shots_exemplars) for r in rows]
        completions, stats = generate(
            model, tokenizer, prompt_texts, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
            stop_strings=prompts.STOP_STRINGS, desc=f"{tag} {len(shots_exemplars)}-shot", progress=progress,
            share_prefix=recipe.fast_paths,
        )
        outputs = [c.text for c in completions]
        seconds, generated = stats.seconds, stats.generated_tokens

    samples = []
    for i, (r, prompt, output) in enumerate(zip(rows, prompt_texts, outputs)):
        scored = answer.score(output, r["gold"])
        row = {"id": r["id"], "question_hash": r["question_hash"], "prompt": prompt, "output": output,
               "gold": r["gold"], **scored}
        if backend == "lm-eval":
            # The harness's verdicts are this backend's answer, in the table and the paired tests
            # alike; llmkd's own filters stay beside them for comparison.
            h = lm.samples[i]
            row.update(llmkd_strict_correct=row["strict_correct"], llmkd_flexible_correct=row["flexible_correct"],
                       strict=h["strict"], flexible=h["flexible"],
                       strict_correct=h["strict_correct"], flexible_correct=h["flexible_correct"])
        samples.append(row)
    n = len(samples)
    k_strict = sum(s["strict_correct"] for s in samples)
    k_flex = sum(s["flexible_correct"] for s in samples)
    result = Accuracy(
        tag=tag, shots=len(shots_exemplars), backend=backend, questions=n,
        strict=k_strict / n, flexible=k_flex / n,
        strict_ci95=wilson_interval(k_strict, n), flexible_ci95=wilson_interval(k_flex, n),
        generated_tokens=generated, seconds=round(seconds, 2),
        tokens_per_s=round(generated / seconds, 1) if seconds else 0.0,
    )
    folder = eval_cell(out_dir, tag, result.shots)
    atomic.write_jsonl(folder / "samples.jsonl", samples)
    atomic.write_json(folder / "summary.json", {
        "metrics": asdict(result),
        "prompt_format": prompt_format(tokenizer, shots_exemplars),
        "decoding": (decoding_settings(max_new_tokens=ev.max_new_tokens, stop_strings=prompts.STOP_STRINGS)
                     if backend == "llmkd" else {"backend": "lm-eval", "max_new_tokens": ev.max_new_tokens,
                                                 "harness": "gsm8k task generation_kwargs (greedy, until the stop strings)"}),
        "recipe": recipe.model_dump(),
        **provenance(),
    })
    return result


def prompt_format(tokenizer, shots_exemplars: Sequence[dict]) -> dict:
    """Exactly what the model was shown, so a number can be reproduced or compared."""
    return {
        "style": "chat template" if prompts.has_chat_template(tokenizer) else "plain",
        "instruction": prompts.INSTRUCTION,
        "exemplar_ids": [e.get("id") for e in shots_exemplars],
        "stop_strings": list(prompts.STOP_STRINGS),
        "example": prompts.render_prompt(tokenizer, "<question>", shots_exemplars),
    }


def score_generations(model, tokenizer, rows, *, tag: str, recipe: Recipe, out_dir: Path,
                      progress: bool = True) -> Generations:
    """Greedy outputs on the rows of data other than GSM8K, written as a cell's samples (no answer to score)."""
    ev, data = recipe.eval, recipe.data
    stops = sources.stop_strings(data)
    prompt_texts = [prompts.render_row(tokenizer, r)[0] for r in rows]
    ids = [prompts.encode(tokenizer, p) for p in prompt_texts]
    if data.max_length is not None:
        ids = [sources.fit(i, max(1, data.max_length - ev.max_new_tokens)) for i in ids]
    completions, stats = generate_ids(model, tokenizer, ids, batch_size=ev.batch_size, max_new_tokens=ev.max_new_tokens,
                                      stop_strings=stops, desc=f"{tag} held-out", progress=progress,
                                      share_prefix=recipe.fast_paths)
    samples = [{"id": r["id"], "question_hash": r["question_hash"], "prompt": p, "output": c.text, "finish": c.finish}
               for r, p, c in zip(rows, prompt_texts, completions)]
    result = Generations(tag=tag, shots=0, questions=len(samples), generated_tokens=stats.generated_tokens,
                         seconds=round(stats.seconds, 2),
                         tokens_per_s=round(stats.generated_tokens / stats.seconds, 1) if stats.seconds else 0.0)
    folder = eval_cell(out_dir, tag, 0)
    atomic.write_jsonl(folder / "samples.jsonl", samples)
    atomic.write_json(folder / "summary.json", {
        "metrics": asdict(result),
        "decoding": decoding_settings(max_new_tokens=ev.max_new_tokens, stop_strings=stops),
        "recipe": recipe.model_dump(),
        **provenance(),
    })
    return result


# What a teacher cell's generations depend on, beyond llmkd's code: reused only where all are equal.
_TEACHER_CELL_KEYS = ("model.name", "model.revision", "model.trust_remote_code", "model.teacher_dtype", "data.", "eval.")


def reuse_teacher_cells(src: Path, out_dir: Path, recipe: Recipe, shots: Sequence[int], backend: str):
    """The teacher's cells at `shots` scored earlier in `src` under this recipe's teacher, data and eval
    settings, copied into `out_dir`; None (nothing copied) if any is missing or was scored otherwise."""
    def relevant(flat: dict) -> dict:
        return {k: v for k, v in flat.items() if k.startswith(_TEACHER_CELL_KEYS)}

    cells = []
    for k in shots:
        cell = eval_cell(src, "teacher", k)
        try:
            summary = json.loads((cell / "summary.json").read_text())
            earlier = Recipe.model_validate(summary["recipe"])
        except (OSError, ValueError, KeyError):
            return None
        metrics = summary["metrics"]
        if relevant(earlier.flat()) != relevant(recipe.flat()) or metrics.get("backend", backend) != backend \
                or not (cell / "samples.jsonl").is_file():
            return None
        cells.append((cell, metrics))
    reused = []
    for cell, metrics in cells:
        target = eval_cell(out_dir, "teacher", metrics["shots"])
        if target.resolve() != cell.resolve():
            tmp = atomic.temporary_dir(target)
            for name in ("samples.jsonl", "summary.json"):
                (tmp / name).write_bytes((cell / name).read_bytes())
            atomic.publish_dir(tmp, target)
        reused.append(Accuracy(**{**metrics, "strict_ci95": tuple(metrics["strict_ci95"]),
                                  "flexible_ci95": tuple(metrics["flexible_ci95"])})
                      if "strict" in metrics else Generations(**metrics))
    return reused


def run_eval(
    recipe: Recipe, *, shots: Sequence[int], tags: Sequence[str], adapter: str | Path | None = None,
    limit: int | None = None, with_fidelity: bool = False, backend: str | None = None,
    out_dir: Path | None = None, progress: bool = True, teacher_from: Path | None = None,
    teacher_logits: TeacherLogits | None = None,
) -> EvalRun:
    """Score each model in `tags` ("teacher", "student", "distilled" = student + `adapter`) at each shot count.

    At most two models are loaded: the teacher, then one quantised student. With an adapter, the base
    student is that model with its adapter disabled. The teacher is kept only for fidelity.
    `teacher_from`: an evaluation folder whose teacher cells, scored under the same settings, are
    copied instead of generated again (`llmkd sweep` scores the teacher once for every point);
    `teacher_logits`: the teacher's fidelity logits held from an earlier student's evaluation, and
    filled by this one.
    """
    out_dir = Path(out_dir or recipe.layout.eval)
    atomic.remove_temporaries(out_dir, recursive=True)  # a killed earlier run's unfinished writes
    backend = backend or recipe.eval.backend
    questions = eval_questions(recipe, limit)
    overlap = contamination(recipe, questions)
    tokenizer = models.load_tokenizer(recipe.model)
    gsm8k = recipe.data.is_gsm8k
    shots = shots if gsm8k else [0]  # other data: its held-out prompts as written
    shot_sets = {k: exemplars(recipe, k) for k in shots}
    students = [t for t in tags if t != "teacher"]
    held_out = fidelity_questions(recipe) if with_fidelity and students else None
    run = EvalRun(data={"source": recipe.data.source, "questions": len(questions)} if gsm8k else
                  sources.load_rows(recipe.data, recipe.eval.split, gold=None).describe())

    def add(cell: Accuracy | Generations) -> None:
        (run.accuracy if isinstance(cell, Accuracy) else run.generations).append(cell)
        run.samples[cell.tag, cell.shots] = read_samples(out_dir, cell.tag, cell.shots)  # as written, either backend

    def accuracy(model, tag):
        if recipe.eval.tasks:
            scores, documents = run_tasks(model, tokenizer, recipe.eval.tasks, tag=tag, batch_size=recipe.eval.batch_size,
                                          max_new_tokens=recipe.eval.max_new_tokens, limit=recipe.eval.task_limit)
            run.tasks += scores
            run.task_documents.update({(tag, task): docs for task, docs in documents.items()})
        if not gsm8k:  # no answer to score: the outputs, for agreement with the teacher
            add(score_generations(model, tokenizer, questions, tag=tag, recipe=recipe, out_dir=out_dir,
                                  progress=progress))
            return
        for ex in shot_sets.values():
            add(score_accuracy(model, tokenizer, questions, ex, tag=tag, recipe=recipe, out_dir=out_dir,
                               backend=backend, progress=progress))

    reused = reuse_teacher_cells(Path(teacher_from), out_dir, recipe, shots, backend) \
        if teacher_from is not None and "teacher" in tags else None
    for cell in reused or ():
        add(cell)
    generate_teacher = "teacher" in tags and reused is None
    renderings = recipe.eval.fidelity_renderings if gsm8k else [prompts.DATA_RENDERING]
    held = teacher_logits is not None and set(renderings) <= teacher_logits.complete
    teacher_forward = held_out is not None and not held
    teacher = models.load_teacher(recipe.model) if generate_teacher or teacher_forward else None
    if generate_teacher:
        accuracy(teacher, "teacher")
    if not teacher_forward:
        teacher = None
        models.release_memory()
    if students:
        start = time.perf_counter()
        student = models.load_student(recipe.model, adapter=adapter if "distilled" in students else None)
        run.student_load_seconds = round(time.perf_counter() - start, 1)
        with fastpath.dequantized_once(student, enabled=recipe.fast_paths) as fast:
            run.fast_paths = fast
            run.student_quantization = quantize.quantization_report(student)
            for tag in students:
                with adapter_off(student, tag):
                    accuracy(student, tag)
            if held_out is not None:
                held_out = with_responses(held_out, run.samples.get(("teacher", 0)))
                if not held_out:
                    log.warning("no held-out fidelity: prompt-only data is teacher-forced on the teacher's outputs, "
                                "and the teacher was not evaluated here")
                for rendering in renderings if held_out else ():
                    run.fidelity += score_fidelity(teacher, student, tokenizer, held_out, tags=students,
                                                   batch_size=min(recipe.eval.batch_size, FIDELITY_BATCH),
                                                   share_prefix=recipe.fast_paths, progress=progress,
                                                   rendering=rendering, teacher_logits=teacher_logits,
                                                   max_length=recipe.data.max_length)
    run.agreement = generation_agreement(run.samples, tokenizer)
    atomic.write_json(out_dir / "eval-summary.json", {
        "accuracy": [asdict(a) for a in run.accuracy],
        "fidelity": [asdict(f) for f in run.fidelity],
        "agreement": [asdict(g) for g in run.agreement],
        "generations": [asdict(g) for g in run.generations],
        "tasks": [asdict(t) for t in run.tasks],
        "task_tests": paired_task_tests(run.task_documents),
        "questions": {"split": recipe.eval.split, "start": recipe.eval.start, "count": len(questions),
                      "in_transfer_set": overlap},
        "data": run.data,
        "fast_paths": run.fast_paths, "student_quantization": run.student_quantization,
        "student_load_seconds": run.student_load_seconds,
        **provenance(),
    })
    return run


def format_table(run: EvalRun) -> str:
    """Side by side: accuracy (one row per model and shot count), then fidelity, then agreement."""
    tables = (accuracy_table(run), tasks_table(run.tasks), fidelity_table(run.fidelity), agreement_table(run.agreement))
    return "\n\n".join(t for t in tables if t)


def accuracy_table(run: EvalRun) -> str:
    """Both filters with Wilson 95% intervals, and generation speed."""
    if not run.accuracy:
        return ""
    lines = [
        "| model | shots | n | strict | flexible | tokens/s |",
        "|---|---:|---:|---|---|---:|",
    ]
    for a in run.accuracy:
        lines.append(
            f"| {a.tag} | {a.shots} | {a.questions} | {_pct(a.strict, a.strict_ci95)} | "
            f"{_pct(a.flexible, a.flexible_ci95)} | {a.tokens_per_s:.0f} |"
        )
    return "\n".join(lines)


def _pct(p: float, ci: tuple[float, float]) -> str:
    return f"{100 * p:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
