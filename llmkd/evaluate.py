"""Accuracy and teacher fidelity of the teacher, the quantised student and a distilled student.

Accuracy: greedy generation on the shared prompt format (`llmkd.data.prompts`), both answer filters
(strict `#### N` and flexible last-number, `llmkd.data.answer`) with Wilson 95% intervals. Backends:
llmkd's own batched generation, or lm-eval's gsm8k harness fed exactly the same prompts.

Fidelity: on held-out test questions, the gold solution is teacher-forced through teacher and
student (0-shot prompt, response tokens only); per-token KL(teacher || student) over the full
vocabulary and top-1 agreement (`llmkd.losses.dense_kd_metrics`). The teacher's logits of a batch
serve every student; the prompt prefix all questions share runs once per model and
adapter state (`shared_prefix`).

Generation agreement: each other model's greedy outputs (the accuracy generations, reread from the
samples either backend writes) against the teacher's on the same prompts: identical outputs, the
common token prefix, and the same extracted answer per filter, the last paired with the quantised base's
by the exact McNemar test. It shows behaviour where accuracy sits at the floor.

Other data than GSM8K (`llmkd.data.sources`) has no answer to score: its held-out rows are the
fidelity set (their own responses teacher-forced; for prompt-only rows, the teacher's greedy output)
and the prompts generated on (`score_generations`), 0-shot; agreement then has no answer columns.

Each evaluation writes `<out>/<tag>-<shots>shot/samples.jsonl` (prompt, output, extracted, gold,
correct) and `summary.json` (metrics, recipe, prompt format, versions, git commit); a run writes
`<out>/eval-summary.json` (accuracy, fidelity, agreement).
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from llmkd import atomic, fastpath, models, quantize
from llmkd.fastpath import shared_prefix
from llmkd.config import Recipe, eval_cell
from llmkd.errors import LlmkdError
from llmkd.data import answer, prompts, sources
from llmkd.data.gsm8k import load_gsm8k, select_range
from llmkd.generation import decoding_settings, generate, generate_ids
from llmkd.losses import dense_kd_metrics
from llmkd.progress import bar as progress_bar
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
class Fidelity:
    tag: str
    questions: int
    tokens: int
    kl: float  # mean per response token, nats, KL(teacher || model)
    top1_agreement: float
    rendering: str = "llmkd"  # prompts.RENDERINGS: llmkd's format (in-format), plain_chat (off-format), ...


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


@dataclass
class EvalRun:
    accuracy: list[Accuracy] = field(default_factory=list)
    fidelity: list[Fidelity] = field(default_factory=list)
    agreement: list[GenerationAgreement] = field(default_factory=list)
    generations: list[Generations] = field(default_factory=list)  # data other than GSM8K: no accuracy
    data: dict = field(default_factory=dict)  # what was evaluated on: source, format, rows, content hash

    @property
    def cells(self) -> list[tuple[str, int]]:
        """(tag, shots) of every model's greedy outputs (samples.jsonl)."""
        return [(a.tag, a.shots) for a in [*self.accuracy, *self.generations]]


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion: sane at 0% and 100%, unlike mean +- 1.96 SE."""
    if n == 0:
        return (0.0, 0.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(a_correct: Sequence[bool], b_correct: Sequence[bool]) -> dict:
    """Two-sided exact McNemar test of paired outcomes: a binomial test on the discordant pairs."""
    if len(a_correct) != len(b_correct):
        raise ValueError("paired outcomes must cover the same questions")
    only_a = sum(a and not b for a, b in zip(a_correct, b_correct))
    only_b = sum(b and not a for a, b in zip(a_correct, b_correct))
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": min(1.0, 2 * tail)}


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


def read_samples(eval_dir: Path, tag: str, shots: int) -> list[dict]:
    """The per-question rows `score_accuracy` wrote for one model and shot count (either backend)."""
    path = eval_cell(eval_dir, tag, shots) / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- Generation agreement with the teacher -----------------------------------------------------

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


def generation_agreement(cells: Sequence[tuple[str, int]], eval_dir: Path, tokenizer) -> list[GenerationAgreement]:
    """Each non-teacher model of `cells` ((tag, shots), `EvalRun.cells`) against the teacher, at every
    shot count the teacher was scored at, from the samples already written (no generation); in order."""
    def tokenize(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    teacher_shots = {k for tag, k in cells if tag == "teacher"}
    cells = [(tag, k) for tag, k in cells if tag != "teacher" and k in teacher_shots]
    teacher = {k: read_samples(eval_dir, "teacher", k) for k in teacher_shots}
    rows = {(tag, k): agreement_rows(teacher[k], read_samples(eval_dir, tag, k), tokenize) for tag, k in cells}
    return [summarise_agreement(tag, k, rows[tag, k], rows.get(("student", k)) if tag != "student" else None)
            for tag, k in cells]


FIDELITY_BATCH = 16  # teacher-forced batches: bigger ones only add padding and (N, V) logits memory


@dataclass
class TeacherLogits:
    """The teacher's logits at the response positions of the held-out fidelity batches, kept in CPU
    memory so that several students scored on the same questions (`llmkd sweep`) run the teacher once.
    Bitwise what the teacher's forward gives again: a forward is deterministic for the same batch."""

    max_bytes: int = 8 * 2**30  # beyond it the teacher runs again for each student
    batches: dict = field(default_factory=dict)  # (rendering, batch index) -> (input_ids, logits)
    complete: set = field(default_factory=set)  # renderings whose every batch is held
    held_bytes: int = 0

    def get(self, rendering: str, index: int, input_ids):
        hit = self.batches.get((rendering, index))
        return hit[1] if hit is not None and torch.equal(hit[0], input_ids.cpu()) else None

    def put(self, rendering: str, index: int, input_ids, logits) -> bool:
        size = logits.numel() * logits.element_size()
        if self.held_bytes + size > self.max_bytes:
            return False
        self.batches[rendering, index] = (input_ids.cpu(), logits.cpu())
        self.held_bytes += size
        return True


def fidelity_batches(tokenizer, questions, batch_size: int, rendering: str = "llmkd", max_length: int | None = None):
    """Right-padded (input_ids, attention_mask, keep) batches of 0-shot prompt + gold solution in
    `rendering` (`prompts.render_row`; rows of other data as written), sorted by length so that little
    is padding (the metrics are sums: order does not matter). `keep` marks the positions whose next token
    is a response token. With `max_length`, prompts are cut from the left as the builder cuts them."""
    examples = []
    for r in questions:
        ids, mask = prompts.tokenize_example(tokenizer, *prompts.render_row(tokenizer, r, rendering))
        start = mask.index(1)
        if max_length is not None and len(ids) > max_length:
            prompt_ids = sources.fit(ids[:start], max(1, max_length - (len(ids) - start)))
            ids, start = prompt_ids + ids[start:], len(prompt_ids)
        examples.append((ids, start))
    examples.sort(key=lambda e: len(e[0]))
    for b in range(0, len(examples), batch_size):
        chunk = examples[b : b + batch_size]
        yield prompts.teacher_forced_batch([ids for ids, _ in chunk], [s for _, s in chunk], tokenizer.pad_token_id)


def adapter_off(model, tag: str):
    """The quantised base student is the distilled student with its adapter disabled: one model, two tags."""
    return model.disable_adapter() if tag == "student" and hasattr(model, "disable_adapter") else nullcontext()


@torch.no_grad()
def score_fidelity(teacher, student, tokenizer, questions, *, tags: Sequence[str], batch_size: int = FIDELITY_BATCH,
                   share_prefix: bool = True, progress: bool = True, rendering: str = "llmkd",
                   teacher_logits: TeacherLogits | None = None, max_length: int | None = None) -> list[Fidelity]:
    """KL(teacher || model) and top-1 agreement of `student` as each of `tags` ("student": adapter off,
    "distilled"/other: as given) on `questions` in `rendering`; the teacher's forward runs once per
    batch for all of them, or not at all for the batches `teacher_logits` holds (then `teacher` may be
    None if it holds them all)."""
    sums = {tag: [0.0, 0] for tag in tags}  # KL sum, agreements
    tokens = 0
    device = next(student.parameters()).device
    batches = list(fidelity_batches(tokenizer, questions, batch_size, rendering, max_length))
    rows = [row for input_ids, _, _ in batches for row in input_ids.tolist()]
    first_kept = min(int(keep.float().argmax(1).min()) for _, _, keep in batches)  # a prefix keeps no logits
    prefix = shared_prefix.usable_prefix_length(rows, student, limit=first_kept) if share_prefix else 0
    caches: dict = {}  # the prefix's KV per model (and adapter state), computed once

    def forward(model, key, input_ids, attention, keep):
        if prefix and key not in caches:
            caches[key] = shared_prefix.prefix_cache(model, rows[0][:prefix])
        return shared_prefix.forward(model, input_ids, attention, keep, prefix, caches.get(key)).logits

    desc = f"fidelity {'/'.join(tags)} ({rendering})"
    with progress_bar(total=len(batches), desc=desc, unit="batch", disable=not progress) as bar:
        held = teacher_logits is not None
        for i, (input_ids, attention, keep) in enumerate(batches):
            t_logits = teacher_logits.get(rendering, i, input_ids) if held else None
            input_ids, attention, keep = input_ids.to(device), attention.to(device), keep.to(device)
            if t_logits is None:
                if teacher is None:
                    raise ValueError(f"score_fidelity: no teacher, and no held logits for {rendering} batch {i}")
                t_logits = forward(teacher, None, input_ids, attention, keep)  # (N, V) at the response positions
                held = held and teacher_logits.put(rendering, i, input_ids, t_logits)
            t_logits = t_logits.to(device)
            mask = torch.ones(t_logits.shape[0], dtype=torch.bool, device=device)
            for tag in tags:
                with adapter_off(student, tag):
                    k, a, n = dense_kd_metrics(t_logits, forward(student, tag, input_ids, attention, keep), mask)
                sums[tag][0] += float(k)
                sums[tag][1] += int(a)
            tokens += int(n)
            bar.update(1)
    if held:
        teacher_logits.complete.add(rendering)
    return [Fidelity(tag=tag, questions=len(questions), tokens=tokens, kl=kl / max(tokens, 1),
                     top1_agreement=agree / max(tokens, 1), rendering=rendering) for tag, (kl, agree) in sums.items()]


def fidelity_questions(recipe: Recipe):
    """GSM8K's test questions from eval.fidelity_start, or the first held-out rows of other data; both
    eval.fidelity_count of them. Rows of prompt-only data have no response yet (`with_responses`)."""
    ev = recipe.eval
    if not recipe.data.is_gsm8k:
        return select_range(sources.load_rows(recipe.data, "test", gold=None).examples, 0, ev.fidelity_count)
    return select_range(load_gsm8k("test", sources.gsm8k_copy(recipe.data.source)), ev.fidelity_start, ev.fidelity_count)


def with_responses(rows, eval_dir: Path) -> list[dict]:
    """Held-out rows of prompt-only data, each given the teacher's greedy output (its samples in
    `eval_dir`) as the response to teacher-force; rows it has not answered are left out."""
    def answered(r: dict) -> bool:
        return "messages" not in r or r["response"] is not None  # GSM8K rows carry their answer

    if all(answered(r) for r in rows):
        return list(rows)
    path = eval_cell(eval_dir, "teacher", 0) / "samples.jsonl"
    written = {s["id"]: s["output"] for s in read_samples(eval_dir, "teacher", 0)} if path.is_file() else {}
    return [r if answered(r) else {**r, "response": written[r["id"]]}
            for r in rows if answered(r) or r["id"] in written]


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
    fast, quantization = None, None

    def accuracy(model, tag):
        if not gsm8k:  # no answer to score: the outputs, for agreement with the teacher
            run.generations.append(score_generations(model, tokenizer, questions, tag=tag, recipe=recipe,
                                                     out_dir=out_dir, progress=progress))
            return
        for ex in shot_sets.values():
            run.accuracy.append(score_accuracy(model, tokenizer, questions, ex, tag=tag, recipe=recipe,
                                               out_dir=out_dir, backend=backend, progress=progress))

    reused = reuse_teacher_cells(Path(teacher_from), out_dir, recipe, shots, backend) \
        if teacher_from is not None and "teacher" in tags else None
    if reused is not None:
        run.accuracy += [c for c in reused if isinstance(c, Accuracy)]
        run.generations += [c for c in reused if isinstance(c, Generations)]
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
    load_seconds = None
    if students:
        start = time.perf_counter()
        student = models.load_student(recipe.model, adapter=adapter if "distilled" in students else None)
        load_seconds = round(time.perf_counter() - start, 1)
        with fastpath.dequantized_once(student, enabled=recipe.fast_paths) as fast:
            quantization = quantize.quantization_report(student)
            for tag in students:
                with adapter_off(student, tag):
                    accuracy(student, tag)
            if held_out is not None:
                held_out = with_responses(held_out, out_dir)
                if not held_out:
                    log.warning("no held-out fidelity: prompt-only data is teacher-forced on the teacher's outputs, "
                                "and the teacher was not evaluated here")
                for rendering in renderings if held_out else ():
                    run.fidelity += score_fidelity(teacher, student, tokenizer, held_out, tags=students,
                                                   batch_size=min(recipe.eval.batch_size, FIDELITY_BATCH),
                                                   share_prefix=recipe.fast_paths, progress=progress,
                                                   rendering=rendering, teacher_logits=teacher_logits,
                                                   max_length=recipe.data.max_length)
    run.agreement = generation_agreement(run.cells, out_dir, tokenizer)
    atomic.write_json(out_dir / "eval-summary.json", {
        "accuracy": [asdict(a) for a in run.accuracy],
        "fidelity": [asdict(f) for f in run.fidelity],
        "agreement": [asdict(g) for g in run.agreement],
        "generations": [asdict(g) for g in run.generations],
        "questions": {"split": recipe.eval.split, "start": recipe.eval.start, "count": len(questions),
                      "in_transfer_set": overlap},
        "data": run.data,
        "fast_paths": fast, "student_quantization": quantization, "student_load_seconds": load_seconds,
        **provenance(),
    })
    return run


def format_table(run: EvalRun) -> str:
    """Side by side: accuracy (one row per model and shot count), then fidelity, then agreement."""
    return "\n\n".join(t for t in (accuracy_table(run), fidelity_table(run), agreement_table(run)) if t)


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


def fidelity_table(run: EvalRun) -> str:
    if not run.fidelity:
        return ""
    lines = ["| model | text | held-out tokens | KL(teacher‖model) | top-1 agreement |", "|---|---|---:|---:|---:|"]
    for f in run.fidelity:
        lines.append(f"| {f.tag} | {prompts.rendering_label(f.rendering)} | {f.tokens} | {f.kl:.4f} | "
                     f"{100 * f.top1_agreement:.1f}% |")
    return "\n".join(lines)


def gap_closed_table(run: EvalRun) -> str:
    """Per text: how much of the quantised base's KL the adapter wins back, 1 - KL(distilled) / KL(base)."""
    cells = {(f.tag, f.rendering): f for f in run.fidelity}
    rows = []
    for r in dict.fromkeys(f.rendering for f in run.fidelity):
        base, distilled = cells.get(("student", r)), cells.get(("distilled", r))
        if base is not None and distilled is not None and base.kl > 0:
            rows.append(f"| {prompts.rendering_label(r)} | {base.kl:.4f} | {distilled.kl:.4f} | "
                        f"{100 * (1 - distilled.kl / base.kl):.1f}% | {100 * base.top1_agreement:.1f}% → "
                        f"{100 * distilled.top1_agreement:.1f}% |")
    if not rows:
        return ""
    return "\n".join(["| text | base KL | distilled KL | gap closed | top-1 base → distilled |",
                      "|---|---:|---:|---:|---:|", *rows])


def in_format(fidelity: Sequence[Fidelity]) -> list[Fidelity]:
    """The fidelity rows measured in the training format (llmkd's on GSM8K, the rows' own on other data)."""
    return [f for f in fidelity if f.rendering in ("llmkd", prompts.DATA_RENDERING)]


def agreement_table(run: EvalRun) -> str:
    """Greedy outputs against the teacher's; the p-values pair each model's answer agreement with the base's.
    Without an answer extractor (data other than GSM8K) the answer columns are left out."""
    if not run.agreement:
        return ""
    answered = all(g.strict_answer_agreement is not None for g in run.agreement)
    head = "| model | shots | n | same output as teacher | common prefix, tokens: mean / median (teacher's length) |"
    lines = [head + (" same answer, strict | same answer, flexible | vs base: p strict / flexible |" if answered else ""),
             "|---|---:|---:|---:|---:|" + ("---:|---:|---|" if answered else "")]
    for g in run.agreement:
        line = (f"| {g.tag} | {g.shots} | {g.questions} | {100 * g.exact_match:.1f}% | "
                f"{g.prefix_tokens_mean:.1f} / {g.prefix_tokens_median:g} ({g.teacher_tokens_mean:.1f}) |")
        if answered:
            paired = " / ".join(f"{g.vs_base[f]['p_value']:.3g}" for f in FILTERS) if g.vs_base else ""
            line += f" {_share(g.strict_answer_agreement)} | {_share(g.flexible_answer_agreement)} | {paired} |"
        lines.append(line)
    return "\n".join(lines)


def _share(p: float | None) -> str:
    return "n/a" if p is None else f"{100 * p:.1f}%"


def _pct(p: float, ci: tuple[float, float]) -> str:
    return f"{100 * p:.1f}% [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
