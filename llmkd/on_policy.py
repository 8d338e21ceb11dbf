"""On-policy rounds (`train.on_policy`), as in GKD (Agarwal et al. 2024): the student answers, the teacher scores.

Round r (r = 0 .. rounds-1) runs before optimizer step `round_steps(total, rounds)[r]` = r * total // rounds.
The student as trained so far (eval mode for the round) answers `questions` prompts of the transfer
set: the prompt tokens of examples drawn by (train.seed, r), each in its own rendering, sampled at
`temperature` up to `max_new_tokens` or llmkd's stop strings. The 16-bit teacher, loaded for the round
and freed after it, is teacher-forced on prompt + response, and its top-k + tail targets go into
`train/on_policy/round-RRR.safetensors`, a shard of the transfer-set format (`transfer_set.write_shard`).
`round-RRR.json` (the shard's size and sha256, the step, the training settings' hash, the decoding)
is written after it: a round counts only once its record is there and matches.

From round r on, until the next one, an optimizer step takes its whole effective batch from round
r with probability `fraction` (GKD's lambda, drawn from (train.seed, step)), its examples drawn from
(train.seed, step); otherwise the transfer set's batch that the data plan gives that step, so the
cached set is visited as without rounds, some of its batches skipped. The trajectory is therefore a
function of the seed and the step, and a resume reuses every round whose record matches: a round cut
by a crash is made again when its step comes, the student then being where it was the first time.
The sampling runs in a forked RNG, so dropout draws the same numbers whether a round ran or was reused.

One process only: under a multi-process launch each rank would have to answer its share (not written).
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkd import atomic, checkpoint, models, teacher_scoring
from llmkd.config import Recipe, RunLayout
from llmkd.data import sources
from llmkd.errors import LlmkdError
from llmkd.generation import decoding_settings, generate_ids
from llmkd.transfer_set import Examples, check_file, sha256_text, write_shard

STEP_STREAM, ROUND_STREAM = 0x6F70, 0x6F71  # the rounds' random streams, apart from the data plan's and each other


def round_steps(total_steps: int, rounds: int) -> list[int]:
    """The optimizer step (0-based) before which each round runs."""
    return [r * total_steps // rounds for r in range(rounds)]


@dataclass
class Round:
    """One finished round: its shard's examples."""

    examples: Examples
    index: int
    record: dict


class Rounds:
    """The on-policy rounds of one training run: when each runs, and which source each step takes."""

    def __init__(self, recipe: Recipe, layout: RunLayout, data, tokenizer, total_steps: int, *, resumed: bool,
                 progress: bool = True):
        self.cfg, self.recipe, self.layout = recipe.train.on_policy, recipe, layout
        self.data, self.tokenizer, self.progress = data, tokenizer, progress
        self.seed = recipe.train.seed
        self.steps = round_steps(total_steps, self.cfg.rounds)
        self.current: Round | None = None
        self.done: list[dict] = []  # the records of the rounds this run made or reused, in order
        # What a round's content depends on: the training settings (the student's state at its step),
        # the transfer set (its prompts) and the teacher's dtype (its scores; a resumable change for training).
        settings = {**checkpoint.training_settings(recipe, 1),
                    "teacher_dtype": str(models.teacher_dtype(recipe.model)),
                    "transfer_set": data.transfer_set.identity()["content_sha256"]}
        self.settings_hash = sha256_text(json.dumps(settings, sort_keys=True, default=str))
        if not resumed and layout.on_policy.exists():
            shutil.rmtree(layout.on_policy)  # rounds of an earlier attempt that left no checkpoint

    @classmethod
    def for_run(cls, recipe: Recipe, layout: RunLayout, data, tokenizer, total_steps: int, processes: int, *,
                resumed: bool, progress: bool = True) -> "Rounds | None":
        """The run's rounds, or None when train.on_policy.rounds is 0."""
        cfg = recipe.train.on_policy
        if cfg.rounds == 0:
            return None
        if processes > 1:
            raise LlmkdError(f"train.on_policy.rounds {cfg.rounds} needs one process ({processes} launched): "
                             "each rank would have to answer its share; launch one process or set rounds 0")
        if recipe.train.sharding != "none":
            raise LlmkdError("train.on_policy needs train.sharding none (the student generates whole)")
        if cfg.rounds > total_steps:
            raise LlmkdError(f"train.on_policy.rounds {cfg.rounds} is more than the run's {total_steps} steps")
        return cls(recipe, layout, data, tokenizer, total_steps, resumed=resumed, progress=progress)

    # --- Which batch a step takes ----------------------------------------------------------------

    def before_step(self, step: int, model) -> None:
        """Make (or reuse) the round that starts at `step`; on the first step of a resumed run, load the
        newest round before it."""
        starting = [r for r, s in enumerate(self.steps) if s == step]
        if starting:
            self.current = self._reuse(starting[0], step) or self._make(starting[0], step, model)
        elif self.current is None:
            r = max(r for r, s in enumerate(self.steps) if s <= step)
            self.current = self._reuse(r, self.steps[r])
            if self.current is None:
                raise LlmkdError(f"{self._record_path(r)}: missing or not matching its shard, and the student of step "
                                 f"{self.steps[r]} is gone: resume from a checkpoint before that step, or train afresh")

    def step_batch(self, step: int, plan) -> tuple[Any, np.ndarray, str]:
        """(source, (W, A, B) example indices into it, "on_policy" or "transfer_set") of step `step`."""
        if np.random.default_rng([self.seed, STEP_STREAM, step]).random() < self.cfg.fraction:
            n, g = len(self.current.examples), plan.effective_batch
            picks = np.random.default_rng([self.seed, STEP_STREAM, step, 1]).choice(n, size=g, replace=g > n)
            return self.current, picks.reshape(plan.processes, plan.grad_accum, plan.batch_size), "on_policy"
        return self.data, plan.step_examples(step), "transfer_set"

    # --- Making and reusing a round ----------------------------------------------------------------

    def _shard_path(self, r: int) -> Path:
        return self.layout.on_policy / f"round-{r:03d}.safetensors"

    def _record_path(self, r: int) -> Path:
        return self.layout.on_policy / f"round-{r:03d}.json"

    def _reuse(self, r: int, step: int) -> Round | None:
        try:
            record = json.loads(self._record_path(r).read_text())
            if record["step"] != step or record["settings_hash"] != self.settings_hash:
                return None
            check_file(self._shard_path(r), record["bytes"], record["sha256"])
        except (OSError, ValueError, KeyError, TypeError, LlmkdError):
            return None
        print(f"llmkd train: on-policy round {r} of step {step} reused ({self._record_path(r)})", flush=True)
        return self._open(r, {**record, "reused": True})

    def _open(self, r: int, record: dict) -> Round:
        settings = self.data.transfer_set.manifest.settings
        examples = Examples.read([self._shard_path(r)], settings.top_k, settings.encoding)
        self.done.append(record)
        return Round(examples=examples, index=r, record=record)

    def _make(self, r: int, step: int, student) -> Round:
        """Round r at `step`: `student` (the unwrapped PeftModel) answers, a freshly loaded teacher scores."""
        cfg, tok, settings = self.cfg, self.tokenizer, self.data.transfer_set.manifest.settings
        k = settings.top_k
        n = len(self.data.examples)
        picks = np.random.default_rng([self.seed, ROUND_STREAM, r]).choice(
            n, size=min(cfg.questions, n), replace=False)
        rows = self.data.examples.rows(picks)
        prompt_ids = [[int(t) for t in row["input_ids"][: int(row["response_start"])]] for row in rows]
        seed = int(np.random.default_rng([self.seed, ROUND_STREAM, r, 1]).integers(2**31))
        fast = self.recipe.fast_paths

        t0 = time.perf_counter()
        was_training = student.training
        student.eval()
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices):
                completions, stats = generate_ids(
                    student, tok, prompt_ids, batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens,
                    stop_strings=sources.stop_strings(self.recipe.data), do_sample=cfg.do_sample,
                    temperature=cfg.temperature, seed=seed, desc=f"on-policy round {r}", progress=self.progress, share_prefix=fast)
        finally:
            student.train(was_training)
        generated = time.perf_counter() - t0

        sequences = [p + c.token_ids for p, c in zip(prompt_ids, completions)]
        starts = [len(p) for p in prompt_ids]
        finishes = [c.finish for c in completions]
        t1 = time.perf_counter()
        teacher = models.load_teacher(self.recipe.model)
        try:
            targets = teacher_scoring.teacher_targets(teacher, sequences, starts, k, pad_id=tok.pad_token_id,
                                              batch_size=cfg.batch_size, share_prefix=fast)
        finally:
            del teacher
            models.release_memory()
        meta = [{"id": str(row["id"]), "question_hash": str(row["question_hash"])} for row in rows]
        columns, masses = teacher_scoring.shard_columns(meta, sequences, starts, finishes, targets, where=f"on-policy round {r}",
                                                encoding=settings.encoding, vocab_size=settings.vocab_size)
        path = self._shard_path(r)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_shard(path, columns, k, settings.encoding, settings.vocab_size)
        record = {
            "round": r, "step": step, "file": path.name, "bytes": path.stat().st_size,
            "sha256": models.sha256_file(path), "examples": len(rows), "response_tokens": int(masses.size),
            "mean_response_tokens": round(masses.size / len(rows), 1),
            "finish": {f: finishes.count(f) for f in sorted(set(finishes))},
            "mean_topk_mass": round(float(masses.mean()), 6),
            "generation_seconds": round(generated, 2), "scoring_seconds": round(time.perf_counter() - t1, 2),
            "decoding": decoding_settings(max_new_tokens=cfg.max_new_tokens, stop_strings=sources.stop_strings(self.recipe.data),
                                          do_sample=cfg.do_sample, temperature=cfg.temperature, seed=seed),
            "settings_hash": self.settings_hash,
        }
        atomic.write_json(self._record_path(r), record)  # the marker: written after the shard
        print(f"llmkd train: on-policy round {r} at step {step}: {len(rows)} responses, "
              f"{record['mean_response_tokens']:.0f} tokens on average ({', '.join(f'{v} {f}' for f, v in record['finish'].items())}); "
              f"generated in {generated:.0f} s ({stats.generated_tokens / max(generated, 1e-9):.0f} tok/s), "
              f"scored in {record['scoring_seconds']:.0f} s", flush=True)
        return self._open(r, {**record, "reused": False})
