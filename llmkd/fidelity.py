"""Fidelity to the teacher: KL(teacher || model) over the full vocabulary and top-1 agreement, per
response token, on held-out responses teacher-forced through teacher and students.

The held-out set is GSM8K's test questions from eval.fidelity_start with their gold solutions (in each
of eval.fidelity_renderings), or the held-out rows of other data with their own responses (prompt-only
rows: the teacher's greedy output). The teacher's logits of a batch serve every student and may be held
in memory for the next student (`TeacherLogits`, `llmkd sweep`); the prompt prefix all rows share runs
once per model and adapter state (`shared_prefix`).
"""

from __future__ import annotations

import logging
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Sequence

import torch

from llmkd.config import Recipe
from llmkd.data import prompts, sources
from llmkd.data.gsm8k import load_gsm8k, select_range
from llmkd.fastpath import shared_prefix
from llmkd.losses import dense_kd_metrics
from llmkd.progress import bar as progress_bar

log = logging.getLogger(__name__)


@dataclass
class Fidelity:
    tag: str
    questions: int
    tokens: int
    kl: float  # mean per response token, nats, KL(teacher || model)
    top1_agreement: float
    rendering: str = "llmkd"  # prompts.RENDERINGS: llmkd's format (in-format), plain_chat (off-format), ...


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


def fidelity_example(tokenizer, row: dict, rendering: str = "llmkd", max_length: int | None = None):
    """(token ids, response start) of one held-out row with its response, as the builder would write it."""
    ids, mask = prompts.tokenize_example(tokenizer, *prompts.render_row(tokenizer, row, rendering))
    return sources.fit_example(ids, mask.index(1), max_length)


def fidelity_batches(tokenizer, questions, batch_size: int, rendering: str = "llmkd", max_length: int | None = None):
    """Right-padded (input_ids, attention_mask, keep) batches of 0-shot prompt + gold solution in
    `rendering` (`prompts.render_row`; rows of other data as written), sorted by length so that little
    is padding (the metrics are sums: order does not matter). `keep` marks the positions whose next token
    is a response token. With `max_length`, prompts are cut from the left as the builder cuts them."""
    examples = [fidelity_example(tokenizer, r, rendering, max_length) for r in questions]
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


def with_responses(rows, teacher_samples: list[dict] | None) -> list[dict]:
    """Held-out rows of prompt-only data, each given the teacher's greedy output on its prompt (its 0-shot
    samples) as the response to teacher-force; rows it has not answered are left out."""
    def answered(r: dict) -> bool:
        return "messages" not in r or r["response"] is not None  # GSM8K rows carry their answer

    if all(answered(r) for r in rows):
        return list(rows)
    written = {s["id"]: s["output"] for s in teacher_samples or ()}
    return [r if answered(r) else {**r, "response": written[r["id"]]} for r in rows if answered(r) or r["id"] in written]


def fidelity_table(fidelity: Sequence[Fidelity]) -> str:
    if not fidelity:
        return ""
    lines = ["| model | text | held-out tokens | KL(teacher‖model) | top-1 agreement |", "|---|---|---:|---:|---:|"]
    for f in fidelity:
        lines.append(f"| {f.tag} | {prompts.rendering_label(f.rendering)} | {f.tokens} | {f.kl:.4f} | "
                     f"{100 * f.top1_agreement:.1f}% |")
    return "\n".join(lines)


def gap_closed_table(fidelity: Sequence[Fidelity]) -> str:
    """Per text: how much of the quantised base's KL the adapter wins back, 1 - KL(distilled) / KL(base)."""
    cells = {(f.tag, f.rendering): f for f in fidelity}
    rows = []
    for r in dict.fromkeys(f.rendering for f in fidelity):
        base, distilled = cells.get(("student", r)), cells.get(("distilled", r))
        if base is not None and distilled is not None and base.kl > 0:
            rows.append(f"| {prompts.rendering_label(r)} | {base.kl:.4f} | {distilled.kl:.4f} | "
                        f"{100 * (1 - distilled.kl / base.kl):.1f}% | {100 * base.top1_agreement:.1f}% → "
                        f"{100 * distilled.top1_agreement:.1f}% |")
    if not rows:
        return ""
    return "\n".join(["| text | base KL | distilled KL | gap closed | top-1 base → distilled |",
                      "|---|---:|---:|---:|---:|", *rows])
