"""GSM8K accuracy and teacher fidelity of the teacher, the NF4 student and a distilled student.

Accuracy: greedy generation on the shared prompt format (`llmkd.data.prompts`), both answer filters
(strict `#### N` and flexible last-number, `llmkd.data.answer`) with Wilson 95% intervals. Backends:
llmkd's own batched generation, or lm-eval's gsm8k harness fed exactly the same prompts.

Fidelity: on held-out test questions, the gold solution is teacher-forced through teacher and
student (0-shot prompt, response tokens only); per-token KL(teacher || student) over the full
vocabulary and top-1 agreement (`llmkd.losses.dense_kd_metrics`). The teacher's logits of a batch
serve every student; the prompt prefix all questions share runs once per model and
adapter state (`shared_prefix`).

Each evaluation writes `<out>/<tag>-<shots>shot/samples.jsonl` (prompt, output, extracted, gold,
correct) and `summary.json` (metrics, recipe, prompt format, versions, git commit).
"""

from __future__ import annotations

import gc
import logging
import math
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from llmkd import atomic, fastpath, models
from llmkd.fastpath import shared_prefix
from llmkd.config import Recipe, eval_cell
from llmkd.data import answer, prompts
from llmkd.data.gsm8k import load_gsm8k, select_range
from llmkd.generation import decoding_settings, generate
from llmkd.losses import dense_kd_metrics
from llmkd.provenance import provenance

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
class Fidelity:
    tag: str
    questions: int
    tokens: int
    kl: float  # mean per response token, nats, KL(teacher || model)
    top1_agreement: float


@dataclass
class EvalRun:
    accuracy: list[Accuracy] = field(default_factory=list)
    fidelity: list[Fidelity] = field(default_factory=list)


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sane at 0% and 100%, unlike mean +- 1.96 SE."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def eval_questions(recipe: Recipe, limit: int | None = None):
    ev = recipe.eval
    return select_range(load_gsm8k(ev.split, recipe.data.source), ev.start, limit or ev.limit)


def exemplars(recipe: Recipe, shots: int) -> list[dict]:
    return prompts.select_exemplars(load_gsm8k("train", recipe.data.source), shots, recipe.data.exemplar_seed)


def contamination(recipe: Recipe, questions) -> int:
    """How many evaluation questions the recipe's transfer set holds (by question hash); warns if any.

    A student distilled on a question has seen the teacher answer it: its score there is not a test.
    """
    from llmkd.transfer_set import MANIFEST, TransferSet

    path = recipe.layout.transfer_set
    if not (path / MANIFEST).is_file():
        return 0
    overlap = len(set(questions["question_hash"]) & TransferSet.open(path).question_hashes)
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


FIDELITY_BATCH = 16  # teacher-forced batches: bigger ones only add padding and (N, V) logits memory


def fidelity_batches(tokenizer, questions, batch_size: int):
    """Right-padded (input_ids, attention_mask, keep) batches of 0-shot prompt + gold solution, sorted
    by length so that little is padding (the metrics are sums: order does not matter). `keep` marks
    the positions whose next token is a response token."""
    examples = []
    for r in questions:
        prompt = prompts.render_prompt(tokenizer, r["question"])
        response = prompts.render_response(tokenizer, r["question"], prompts.assistant_turn(r["answer"]))
        ids, mask = prompts.tokenize_example(tokenizer, prompt, response)
        examples.append((ids, mask.index(1)))
    examples.sort(key=lambda e: len(e[0]))
    for b in range(0, len(examples), batch_size):
        chunk = examples[b : b + batch_size]
        yield prompts.teacher_forced_batch([ids for ids, _ in chunk], [s for _, s in chunk], tokenizer.pad_token_id)


def adapter_off(model, tag: str):
    """The NF4 base student is the distilled student with its adapter disabled: one model, two tags."""
    return model.disable_adapter() if tag == "student" and hasattr(model, "disable_adapter") else nullcontext()


@torch.no_grad()
def score_fidelity(teacher, student, tokenizer, questions, *, tags: Sequence[str], batch_size: int = FIDELITY_BATCH,
                   share_prefix: bool = True, progress: bool = True) -> list[Fidelity]:
    """KL(teacher || model) and top-1 agreement of `student` as each of `tags` ("student": adapter off,
    "distilled"/other: as given); the teacher's forward runs once per batch for all of them."""
    sums = {tag: [0.0, 0] for tag in tags}  # KL sum, agreements
    tokens = 0
    device = next(student.parameters()).device
    batches = list(fidelity_batches(tokenizer, questions, batch_size))
    rows = [row for input_ids, _, _ in batches for row in input_ids.tolist()]
    first_kept = min(int(keep.float().argmax(1).min()) for _, _, keep in batches)  # a prefix keeps no logits
    prefix = shared_prefix.usable_prefix_length(rows, teacher, limit=first_kept) if share_prefix else 0
    caches: dict = {}  # the prefix's KV per model (and adapter state), computed once

    def forward(model, key, input_ids, attention, keep):
        if prefix and key not in caches:
            caches[key] = shared_prefix.prefix_cache(model, rows[0][:prefix])
        return shared_prefix.forward(model, input_ids, attention, keep, prefix, caches.get(key)).logits

    for input_ids, attention, keep in tqdm(batches, desc=f"fidelity {'/'.join(tags)}", disable=not progress):
        input_ids, attention, keep = input_ids.to(device), attention.to(device), keep.to(device)
        t_logits = forward(teacher, None, input_ids, attention, keep)  # (N, V) at the response positions
        mask = torch.ones(t_logits.shape[0], dtype=torch.bool, device=device)
        for tag in tags:
            with adapter_off(student, tag):
                k, a, n = dense_kd_metrics(t_logits, forward(student, tag, input_ids, attention, keep), mask)
            sums[tag][0] += float(k)
            sums[tag][1] += int(a)
        tokens += int(n)
    return [Fidelity(tag=tag, questions=len(questions), tokens=tokens, kl=kl / max(tokens, 1),
                     top1_agreement=agree / max(tokens, 1)) for tag, (kl, agree) in sums.items()]


def fidelity_questions(recipe: Recipe):
    ev = recipe.eval
    return select_range(load_gsm8k("test", recipe.data.source), ev.fidelity_start, ev.fidelity_count)


def run_eval(
    recipe: Recipe, *, shots: Sequence[int], tags: Sequence[str], adapter: str | Path | None = None,
    limit: int | None = None, with_fidelity: bool = False, backend: str | None = None,
    out_dir: Path | None = None, progress: bool = True,
) -> EvalRun:
    """Score each model in `tags` ("teacher", "student", "distilled" = student + `adapter`) at each shot count.

    At most two models are loaded: the teacher, then one NF4 student. With an adapter, the NF4 base
    student is that model with its adapter disabled. The teacher is kept only for fidelity.
    """
    out_dir = Path(out_dir or recipe.layout.eval)
    atomic.remove_temporaries(out_dir, recursive=True)  # a killed earlier run's unfinished writes
    backend = backend or recipe.eval.backend
    questions = eval_questions(recipe, limit)
    overlap = contamination(recipe, questions)
    tokenizer = models.load_tokenizer(recipe.model)
    shot_sets = {k: exemplars(recipe, k) for k in shots}
    students = [t for t in tags if t != "teacher"]
    held_out = fidelity_questions(recipe) if with_fidelity and students else None
    run = EvalRun()
    fast, quantization = None, None

    def accuracy(model, tag):
        for ex in shot_sets.values():
            run.accuracy.append(score_accuracy(model, tokenizer, questions, ex, tag=tag, recipe=recipe,
                                               out_dir=out_dir, backend=backend, progress=progress))

    teacher = models.load_teacher(recipe.model) if "teacher" in tags or held_out is not None else None
    if "teacher" in tags:
        accuracy(teacher, "teacher")
    if held_out is None:
        teacher = None
        gc.collect()
    if students:
        student = models.load_student(recipe.model, adapter=adapter if "distilled" in students else None)
        with fastpath.dequantized_once(student, enabled=recipe.fast_paths) as fast:
            quantization = models.quantization_report(student)
            for tag in students:
                with adapter_off(student, tag):
                    accuracy(student, tag)
            if held_out is not None:
                run.fidelity = score_fidelity(teacher, student, tokenizer, held_out, tags=students,
                                              batch_size=min(recipe.eval.batch_size, FIDELITY_BATCH),
                                              share_prefix=recipe.fast_paths, progress=progress)
    atomic.write_json(out_dir / "eval-summary.json", {
        "accuracy": [asdict(a) for a in run.accuracy],
        "fidelity": [asdict(f) for f in run.fidelity],
        "questions": {"split": recipe.eval.split, "start": recipe.eval.start, "count": len(questions),
                      "in_transfer_set": overlap},
        "fast_paths": fast, "student_quantization": quantization,
        **provenance(),
    })
    return run


def format_table(run: EvalRun) -> str:
    """Side by side: one row per model and shot count, both filters, CIs, speed; then fidelity."""
    lines = [
        "| model | shots | n | strict | flexible | tokens/s |",
        "|---|---:|---:|---|---|---:|",
    ]
    for a in run.accuracy:
        lines.append(
            f"| {a.tag} | {a.shots} | {a.questions} | {_pct(a.strict, a.strict_ci95)} | "
            f"{_pct(a.flexible, a.flexible_ci95)} | {a.tokens_per_s:.0f} |"
        )
    if run.fidelity:
        lines += ["", "| model | held-out tokens | KL(teacher‖model) | top-1 agreement |", "|---|---:|---:|---:|"]
        for f in run.fidelity:
            lines.append(f"| {f.tag} | {f.tokens} | {f.kl:.4f} | {100 * f.top1_agreement:.1f}% |")
    return "\n".join(lines)


def _pct(p: float, ci: tuple[float, float]) -> str:
    return f"{100 * p:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
