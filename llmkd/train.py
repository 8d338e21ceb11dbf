"""Stage 2: train LoRA on the NF4 student against the cached teacher (the transfer set).

    accelerate launch llmkd/train.py recipes/gsm8k.yaml [key=value ...] [--resume] [--dry-run]
    llmkd train recipes/gsm8k.yaml [key=value ...] [--resume] [--dry-run]
    python llmkd/train.py ...                     (one process, no launcher)

All three run `main` -> `train(recipe)` = `setup` -> `fit` -> final adapter. Plain functions, no
Trainer subclass. The teacher is never loaded: its top-k logprobs + tail mass come from the
transfer set at `transfer_set.out` (`llmkd build-transfer-set`).

Student: the base model quantised to NF4 on load (`models.quantization_config`), then
`peft.prepare_model_for_kbit_training` (which freezes the base and upcasts the non-quantised
parameters, embeddings, lm_head and norms, to fp32; gradient checkpointing only if the recipe asks),
then LoRA (r, alpha, dropout, target_modules) from peft. Dropout stays as set, in train mode. On the
CPU the NF4 weights are dequantized once for the run, not per forward and backward
(`models.dequantized_once`: the same numbers).

Data: transfer-set row i predicts token input_ids[response_start + i] from position
response_start + i - 1. A micro-batch is right-padded; only the positions that predict a response
token go through the lm_head (transformers' boolean `logits_to_keep`), giving student logits (N, V)
aligned row for row with labels (N,) and the teacher's top-k rows (N, K).

Data order: epoch e visits the examples in `np.random.default_rng([train.seed, e]).permutation(n)`.
With `train.group_by_length` that order is cut into windows of 16 effective batches, each window
sorted by example length, cut into effective batches, and those batches shuffled (seeded by seed and
epoch): similar lengths share a batch, so right padding wastes little (23% of the tokens of random
batches of 4 on the CPU recipe's set; under 3% grouped). An optimizer step takes the next
`batch_size * grad_accum * processes` examples of that order (the
effective batch): rank r gets its own contiguous share, `grad_accum` micro-batches of `batch_size`.
Examples left over at the end of an epoch (fewer than one effective batch) are skipped in that epoch
(another permutation next epoch). Nothing of this is state: a step's batches are a function of
(seed, epoch, step), so a checkpoint records only the position.

Steps: `train.max_steps` when set (cycling through epochs as needed), else epochs x steps per epoch.

Loss: `losses.sparse_kd_loss` with num_tokens = the response tokens of the whole effective batch
(all micro-batches, all ranks), so the micro-batch losses add up to the loss of one big batch.
DDP averages gradients over ranks, so each rank back-propagates `world_size * loss` (its share of
the global mean, times the number of ranks the average divides by). Non-final micro-batches run
under `no_sync`. Optimizer over the trainable (LoRA) parameters only: AdamW, or SGD with momentum;
weight decay is decoupled for both (SGD: p <- p * (1 - lr * wd) before the step). Learning rate:
linear warmup, factor (s + 1) / (warmup_steps + 1) at step s < warmup_steps, then constant or cosine
0.5 * (1 + cos(pi * (s - warmup) / (total - warmup))). Gradients clipped to max_grad_norm.
A non-finite loss (or gradient norm) stops training before the optimizer step, naming the step and
the last complete checkpoint, which is left as it is.

Output folder (train.out)

    metrics.jsonl                     one line per optimizer step (see `_metrics_line`)
    tensorboard/                      the same scalars through accelerate's tracker
    checkpoints/step-000020/          every checkpoint_every steps and at the last step; last 2 kept
        adapter_model.safetensors     LoRA weights (with adapter_config.json: a PEFT adapter folder)
        optimizer.pt, scheduler.pt    torch state dicts (GradScaler: scaler.pt under fp16)
        rng-rank0.pt ...              python, numpy, torch CPU (and CUDA) RNG states, one per rank
        state.json                    step, data position (epoch, step in epoch, seed), token counts,
                                      resolved recipe, training settings, transfer-set hashes
        COMPLETE                      written last: a folder without it does not count
    adapter/                          the final LoRA adapter, standard PEFT format (+ llmkd.json)
    summary.json                      steps, tokens/s, peak memory, final loss, recipe, provenance

A checkpoint is written to checkpoints/.tmp-step-XXXXXX, every file fsynced, renamed to
step-XXXXXX, then COMPLETE is written (fsynced). `--resume` restores the newest complete checkpoint:
adapter, optimizer, scheduler, every RNG state and the data position, so that (on CPU, which is
bitwise deterministic) the loss curve and the final adapter equal those of an uninterrupted run.
It refuses a checkpoint whose training settings (`_training_settings`) or transfer set differ,
naming the key. Without --resume, an out folder that holds checkpoints is refused.

Torch-format files are read with `torch.load(..., weights_only=True)`: no arbitrary unpickling.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import resource
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

if __name__ == "__main__":  # run as a script path: import llmkd from the repo, not siblings of this file
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch

from llmkd import __version__, atomic, models
from llmkd.config import Recipe, load_recipe
from llmkd.data import prompts
from llmkd.errors import LlmkdError
from llmkd.losses import KDTerms, sparse_kd_loss

CHECKPOINT_FORMAT = 1
KEEP_CHECKPOINTS = 2
COMPLETE = "COMPLETE"
CHECKPOINT_DIR = "checkpoints"
ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.jsonl"
TRACKER_NAME = "tensorboard"
SUMMARY_FILE = "summary.json"
GROUP_WINDOW_STEPS = 16  # train.group_by_length sorts within windows of this many effective batches
RUN_ENTRIES = {CHECKPOINT_DIR, ADAPTER_DIR, METRICS_FILE, TRACKER_NAME, SUMMARY_FILE}  # what a run writes in train.out

# Settings that may change between a checkpoint and its resume: where things go, how often
# checkpoints are written, and gradient checkpointing (recomputes the same forward, same values).
# model.teacher_dtype only shapes the transfer set, which is compared by its own hash.
_RESUMABLE_CHANGES = ("train.out", "train.checkpoint_every", "train.gradient_checkpointing", "model.teacher_dtype")


class TrainingDiverged(LlmkdError):
    """The loss or the gradient norm became non-finite; training stopped before the optimizer step."""

    exit_code = 1  # not a user mistake: the run itself failed


# --- Data -----------------------------------------------------------------------------------------


@dataclass
class Batch:
    """One right-padded micro-batch. B examples, T = longest example, N = response tokens in it."""

    input_ids: torch.Tensor  # (B, T) int64, pad id after each example
    attention_mask: torch.Tensor  # (B, T) int64
    predict: torch.Tensor  # (B, T) bool: positions whose next token is a response token (N True)
    labels: torch.Tensor  # (N,) int64: those response tokens, row-major like predict
    topk_ids: torch.Tensor  # (N, K) int64: the teacher's top-k ids for each label position
    topk_logprobs: torch.Tensor  # (N, K) fp32
    tail_logmass: torch.Tensor  # (N,) fp32

    @property
    def response_tokens(self) -> int:
        return int(self.labels.shape[0])

    @property
    def input_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


def collate(rows: Sequence[dict], pad_id: int) -> Batch:
    """Right-pad transfer-set rows (numpy-formatted) into a `Batch`.

    Row i of an example's targets belongs to token input_ids[s + i] (s = response_start), which the
    student predicts at position s + i - 1: those positions are `predict`, in the same order.
    """
    labels, topk_ids, topk_logprobs, tail = [], [], [], []
    for r in rows:
        ids, start = torch.as_tensor(r["input_ids"], dtype=torch.long), int(r["response_start"])
        length, responses = len(ids), len(ids) - start
        if start < 1 or responses < 1 or len(r["topk_ids"]) != responses or len(r["tail_logmass"]) != responses:
            raise LlmkdError(
                f"transfer-set example {r['id']}: response_start {start}, {length} tokens and "
                f"{len(r['topk_ids'])} teacher rows do not fit together; rebuild the transfer set"
            )
        labels.append(ids[start:])
        topk_ids.append(torch.as_tensor(r["topk_ids"], dtype=torch.long))
        topk_logprobs.append(torch.as_tensor(r["topk_logprobs"], dtype=torch.float32))
        tail.append(torch.as_tensor(r["tail_logmass"], dtype=torch.float32))
    input_ids, attention, predict = prompts.teacher_forced_batch(
        [r["input_ids"] for r in rows], [int(r["response_start"]) for r in rows], pad_id)
    return Batch(input_ids, attention, predict, torch.cat(labels), torch.cat(topk_ids),
                 torch.cat(topk_logprobs), torch.cat(tail))


@dataclass(frozen=True)
class DataPlan:
    """Which examples each optimizer step, rank and micro-batch sees (stateless; see module docstring)."""

    examples: int
    batch_size: int
    grad_accum: int
    processes: int
    seed: int
    lengths: tuple[int, ...] | None = None  # per-example tokens: group batches by length

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.grad_accum * self.processes

    @property
    def steps_per_epoch(self) -> int:
        return self.examples // self.effective_batch

    def order(self, epoch: int) -> np.ndarray:
        order = np.random.default_rng([self.seed, epoch]).permutation(self.examples)
        if self.lengths is None:
            return order
        g = self.effective_batch
        used = len(order) - len(order) % g  # the leftover is skipped this epoch either way
        lengths = np.asarray(self.lengths)
        shuffle = np.random.default_rng([self.seed, epoch, 1])
        grouped = []
        for w in range(0, used, GROUP_WINDOW_STEPS * g):
            window = order[w : min(w + GROUP_WINDOW_STEPS * g, used)]
            window = window[np.argsort(lengths[window], kind="stable")]
            batches = window.reshape(-1, g)
            grouped.append(batches[shuffle.permutation(len(batches))].reshape(-1))
        return np.concatenate([*grouped, order[used:]])

    def step_examples(self, step: int) -> np.ndarray:
        """(processes, grad_accum, batch_size) example indices of optimizer step `step` (0-based)."""
        epoch, i = divmod(step, self.steps_per_epoch)
        g = self.effective_batch
        return self.order(epoch)[i * g : (i + 1) * g].reshape(self.processes, self.grad_accum, self.batch_size)


@dataclass
class TrainingData:
    """The opened, verified transfer set, as a numpy-formatted `datasets.Dataset`, and per-example lengths."""

    path: Path
    dataset: Any
    input_lengths: np.ndarray  # (n,) tokens per example
    response_lengths: np.ndarray  # (n,) response tokens per example (= teacher rows)
    top_k: int
    vocab_size: int
    settings_hash: str
    content_sha256: str  # over the shards' sha256s, in order

    def rows(self, indices) -> list[dict]:
        return [self.dataset[int(i)] for i in indices]


def open_transfer_set(recipe: Recipe, tokenizer) -> TrainingData:
    from llmkd.transfer_set import MANIFEST, TransferSet, teacher_identity

    path = Path(recipe.transfer_set.out)
    if not (path / MANIFEST).is_file():
        state = "an unfinished build" if path.is_dir() else "missing"
        raise LlmkdError(
            f"no transfer set at {path} ({state}, no {MANIFEST}): run `llmkd build-transfer-set` with this "
            "recipe first, or set transfer_set.out to an existing one"
        )
    ts = TransferSet.open(path)
    ts.verify()
    ts.check_tokenizer(tokenizer)
    settings = ts.manifest.settings
    if teacher_identity(recipe.model)["sha256"] != settings.teacher_sha256:
        raise LlmkdError(
            f"{path}: built from another teacher than model.name={recipe.model.name!r} (weights differ); "
            "the student must be the teacher's own NF4 copy: rebuild the transfer set or fix model.name"
        )
    ds = ts.dataset()
    import pyarrow.compute as pc

    input_lengths = pc.list_value_length(ds.data.column("input_ids")).to_numpy().astype(np.int64)
    response_lengths = input_lengths - ds.data.column("response_start").to_numpy().astype(np.int64)
    content = hashlib.sha256("\n".join(s.sha256 for s in ts.manifest.shards).encode()).hexdigest()
    return TrainingData(path, ds.with_format("numpy"), input_lengths, response_lengths, settings.top_k,
                        settings.vocab_size, ts.manifest.settings_hash, content)


# --- Model, optimizer, schedule -------------------------------------------------------------------


def build_student(recipe: Recipe, device: torch.device):
    """NF4 base + prepare_model_for_kbit_training + LoRA, in train mode (LoRA dropout active)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    cfg, tr = recipe.model, recipe.train
    base = models.load_pretrained(
        cfg, quantization_config=models.quantization_config(cfg), dtype=getattr(torch, cfg.compute_dtype),
        device_map=models.device_map(device),
    )
    base.config.use_cache = False
    # prepare_model_for_kbit_training turns gradient checkpointing on by default: only if asked.
    base = prepare_model_for_kbit_training(
        base, use_gradient_checkpointing=tr.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},  # DDP-safe; no input-grad hook needed
    )
    lora = LoraConfig(
        r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
        target_modules=list(recipe.lora.target_modules), bias="none", task_type="CAUSAL_LM",
    )
    try:
        model = get_peft_model(base, lora)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise LlmkdError(f"lora.target_modules: {str(e).splitlines()[0]}") from None
    model.train()  # from_pretrained returns eval mode; train mode makes the LoRA dropout act
    return model


def make_optimizer(params: list[torch.nn.Parameter], cfg) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    # SGD's own weight_decay is an L2 term through the momentum; ours is decoupled (`_decay_`).
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based)."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer, cfg, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    def factor(step: int) -> float:
        return lr_factor(step, warmup_steps=cfg.warmup_steps, total_steps=total_steps, schedule=cfg.schedule)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# --- One step -------------------------------------------------------------------------------------


def loss_step(model, batch: Batch, loss_cfg, num_tokens: float) -> KDTerms:
    """Student forward on `batch` (logits at the response-predicting positions only) and the KD loss."""
    logits = model(
        input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=batch.predict, use_cache=False
    ).logits  # (N, V)
    if logits.dim() != 2 or logits.shape[0] != batch.response_tokens:
        raise RuntimeError(f"the model ignored the boolean logits_to_keep: logits {tuple(logits.shape)}")
    return sparse_kd_loss(
        logits, batch.labels, batch.topk_ids, batch.topk_logprobs, batch.tail_logmass,
        torch.ones_like(batch.labels, dtype=torch.bool),
        alpha=loss_cfg.alpha, temperature=loss_cfg.temperature, divergence=loss_cfg.divergence,
        jsd_beta=loss_cfg.jsd_beta, num_tokens=num_tokens,
    )


def accumulate_gradients(model, batches: Sequence[Batch], loss_cfg, num_tokens: float, *, accelerator=None,
                         world_size: int = 1) -> torch.Tensor:
    """Forward + backward over one rank's micro-batches of an optimizer step; grads add up in .grad.

    num_tokens: response tokens of the whole effective batch (all micro-batches of all ranks).
    Returns this rank's (loss, ce, kl) share of the step's mean, fp32 (3,), detached.
    """
    totals = torch.zeros(3, dtype=torch.float32)
    for j, batch in enumerate(batches):
        last = j == len(batches) - 1
        sync = nullcontext() if last or accelerator is None else accelerator.no_sync(model)
        with sync:
            terms = loss_step(model, batch, loss_cfg, num_tokens)
            scaled = terms.loss * world_size  # DDP averages over ranks; each rank holds a share of the sum
            accelerator.backward(scaled) if accelerator is not None else scaled.backward()
        totals += torch.stack([terms.loss, terms.ce, terms.kl]).detach().float().cpu()
    return totals


# --- Setup ----------------------------------------------------------------------------------------


@dataclass
class Session:
    """Everything `fit` needs; built by `setup`."""

    recipe: Recipe
    out: Path
    accelerator: Any
    tokenizer: Any
    data: TrainingData
    plan: DataPlan
    total_steps: int
    model: Any  # possibly DDP-wrapped PeftModel
    optimizer: Any
    scheduler: Any
    params: list
    start_step: int = 0
    resumed_from: Path | None = None
    progress: bool = True


def setup(recipe: Recipe, *, resume: bool = False, progress: bool = True) -> Session:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    tr = recipe.train
    if tr.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise LlmkdError("train.mixed_precision fp16 needs a GPU; use bf16 or no")
    out = Path(tr.out)
    resume_from = _starting_checkpoint(out, resume)
    # cpu=True on a machine without CUDA: otherwise accelerate (1.15) leaves torchrun's ranks
    # unconnected (each one "NO" distributed, world size 1) instead of joining them over gloo.
    accelerator = Accelerator(cpu=models.device().type == "cpu", mixed_precision=tr.mixed_precision,
                              log_with="tensorboard", project_dir=str(out))
    world = accelerator.num_processes
    tokenizer = models.load_tokenizer(recipe.model)
    data = open_transfer_set(recipe, tokenizer)
    plan = DataPlan(len(data.input_lengths), tr.batch_size, tr.grad_accum, world, tr.seed,
                    tuple(int(n) for n in data.input_lengths) if tr.group_by_length else None)
    if plan.steps_per_epoch == 0:
        raise LlmkdError(
            f"{data.path}: {plan.examples} examples, fewer than one effective batch (train.batch_size "
            f"{tr.batch_size} x train.grad_accum {tr.grad_accum} x {world} processes = {plan.effective_batch})"
        )
    total_steps = tr.max_steps if tr.max_steps is not None else tr.epochs * plan.steps_per_epoch
    state = None
    if resume_from is not None:
        state = _read_state(resume_from)
        _check_resumable(state, recipe, data, world, resume_from)

    set_seed(tr.seed)  # LoRA initialisation: the same on every rank
    model = build_student(recipe, accelerator.device)
    out_features = model.get_output_embeddings().weight.shape[0]
    if out_features != data.vocab_size:
        raise LlmkdError(f"{data.path}: teacher vocabulary {data.vocab_size}, the student's lm_head has {out_features}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tr)
    scheduler = make_scheduler(optimizer, tr, total_steps)
    # The scheduler stays unprepared: accelerate's wrapper would step it once per process.
    model, optimizer = accelerator.prepare(model, optimizer)
    set_seed(tr.seed, device_specific=True)  # dropout: a stream per rank
    start_step = 0
    if resume_from is not None:
        _restore(resume_from, accelerator, model, optimizer, scheduler)
        start_step = state["step"]
    return Session(recipe, out, accelerator, tokenizer, data, plan, total_steps, model, optimizer, scheduler,
                   params, start_step, resume_from, progress)


# --- Fit ------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    out: Path
    adapter: Path
    steps: int  # optimizer steps done in total (including those before a resume)
    steps_this_run: int
    input_tokens: int  # student tokens processed in this run, all ranks
    response_tokens: int
    seconds: float
    tokens_per_s: float  # input tokens / s, all ranks
    peak_memory_bytes: int
    final_loss: float | None
    resumed_from: Path | None = None
    processes: int = 1


def train(recipe: Recipe, *, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or resume) per `recipe`; returns once the final adapter is written to train.out/adapter."""
    session = setup(recipe, resume=resume, progress=progress)
    try:
        return fit(session)
    finally:
        session.accelerator.end_training()


def fit(s: Session) -> TrainResult:
    from tqdm.auto import tqdm

    acc, tr, plan = s.accelerator, s.recipe.train, s.plan
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    metrics_path = s.out / METRICS_FILE
    if main:
        s.out.mkdir(parents=True, exist_ok=True)
        _trim_metrics(metrics_path, s.start_step)
        _print_header(s)
    acc.init_trackers(TRACKER_NAME, config=_tracker_config(s.recipe))
    acc.wait_for_everyone()

    # disable=None: no bar when stderr is not a terminal (logs to a file stay readable).
    bar = tqdm(total=s.total_steps, initial=s.start_step, desc="train", unit="step",
               disable=None if (s.progress and main) else True, dynamic_ncols=True)
    run_start = time.perf_counter()
    input_total = response_total = 0
    final_loss = None
    step = s.start_step
    try:
        with models.dequantized_once(s.model):  # CPU: the NF4 weights dequantized once, not per call
            while step < s.total_steps:
                t0 = time.perf_counter()
                examples = plan.step_examples(step)  # (W, A, B)
                num_tokens = int(s.data.response_lengths[examples].sum())  # the whole effective batch
                input_tokens = int(s.data.input_lengths[examples].sum())
                batches = [collate(s.data.rows(mb), s.tokenizer.pad_token_id).to(acc.device) for mb in examples[rank]]
                lr = s.scheduler.get_last_lr()[0]
                local = accumulate_gradients(s.model, batches, tr.loss, num_tokens, accelerator=acc,
                                             world_size=world)
                loss, ce, kl = acc.reduce(local.to(acc.device), reduction="sum").cpu().tolist()
                grad_norm = _clip(acc, s.params, tr.max_grad_norm)
                if not math.isfinite(loss) or (tr.mixed_precision != "fp16" and not math.isfinite(grad_norm)):
                    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
                    last = latest_checkpoint(s.out)
                    where = f"last good checkpoint {last} (intact)" if last else "no checkpoint was written yet"
                    raise TrainingDiverged(
                        f"non-finite {what} at step {step + 1}: training stopped before the update; {where}; "
                        "lower train.lr or check the transfer set, then train into another train.out or --resume"
                    )
                if tr.optimizer == "sgd" and tr.weight_decay > 0:
                    _decay_(s.params, lr * tr.weight_decay)
                s.optimizer.step()
                s.scheduler.step()
                s.optimizer.zero_grad(set_to_none=True)
                step += 1
                seconds = time.perf_counter() - t0
                input_total += input_tokens
                response_total += num_tokens
                final_loss = loss
                if main:
                    line = _metrics_line(step, step / plan.steps_per_epoch, loss, ce, kl, lr, grad_norm, num_tokens,
                                         input_tokens, seconds, acc.device)
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(line) + "\n")
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{line['tokens_per_s']:.0f}")
                    acc.log({f"train/{k}": line[k] for k in ("loss", "ce", "kl", "lr", "grad_norm", "tokens_per_s")},
                            step=step)
                if step % tr.checkpoint_every == 0 or step == s.total_steps:
                    save_checkpoint(s, step)
    finally:
        bar.close()

    seconds = time.perf_counter() - run_start
    adapter = s.out / ADAPTER_DIR
    if main:
        if final_loss is None:  # resumed at the end: the loss of the last logged step
            final_loss = _last_logged_loss(metrics_path)
        _write_adapter(acc.unwrap_model(s.model), adapter, s, step, final_loss)
    acc.wait_for_everyone()
    result = TrainResult(
        out=s.out, adapter=adapter, steps=step, steps_this_run=step - s.start_step, input_tokens=input_total,
        response_tokens=response_total, seconds=round(seconds, 2),
        tokens_per_s=round(input_total / seconds, 1) if seconds > 0 else 0.0,
        peak_memory_bytes=peak_memory_bytes(acc.device), final_loss=final_loss, resumed_from=s.resumed_from,
        processes=world,
    )
    if main:
        atomic.write_json(s.out / SUMMARY_FILE, {**_jsonable(asdict(result)), "recipe": s.recipe.model_dump(),
                                                    **_provenance()})
        print(summary_line(result), flush=True)
    return result


def _clip(accelerator, params, max_norm: float | None) -> float:
    """Clip to max_norm (None: only measure) and return the total norm before clipping."""
    norm = accelerator.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    return float(norm)


@torch.no_grad()
def _decay_(params, amount: float) -> None:
    for p in params:
        p.mul_(1.0 - amount)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated by torch, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _metrics_line(step, epoch, loss, ce, kl, lr, grad_norm, tokens, input_tokens, seconds, device) -> dict:
    """A metrics.jsonl row. tokens: response tokens in the loss; input_tokens: tokens the student ran
    (prompt + response, no padding); both over all ranks. tokens_per_s counts input tokens."""
    return {
        "step": step, "epoch": round(epoch, 4), "loss": loss, "ce": ce, "kl": kl, "lr": lr, "grad_norm": grad_norm,
        "tokens": tokens, "input_tokens": input_tokens, "seconds": round(seconds, 3),
        "tokens_per_s": round(input_tokens / seconds, 1) if seconds > 0 else 0.0,
        "response_tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else 0.0,
        "peak_memory_mb": round(peak_memory_bytes(device) / 2**20, 1),
    }


def _trim_metrics(path: Path, step: int) -> None:
    """Keep the rows of steps <= `step` (a resumed run rewrites the ones after its checkpoint; a fresh
    run starts empty). Unparseable rows (a write cut by a kill) are dropped."""
    keep = []
    if step > 0 and path.is_file():
        for text in path.read_text().splitlines():
            try:
                row = json.loads(text)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("step", step + 1) <= step:
                keep.append(text + "\n")
    atomic.write_text(path, "".join(keep))


def _last_logged_loss(path: Path) -> float | None:
    rows = [json.loads(t) for t in path.read_text().splitlines() if t.strip()] if path.is_file() else []
    return rows[-1]["loss"] if rows else None


def _tracker_config(recipe: Recipe) -> dict:
    """Flat scalar hyperparameters for TensorBoard's hparams (lists and None as text)."""
    flat = _flatten(recipe.model_dump())
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def _print_header(s: Session) -> None:
    tr, plan, acc = s.recipe.train, s.plan, s.accelerator
    dropped = plan.examples - plan.steps_per_epoch * plan.effective_batch
    print(
        f"llmkd train: {plan.examples} examples from {s.data.path} (top-{s.data.top_k}); "
        f"{acc.num_processes} process(es) on {acc.device} ({acc.distributed_type.value}); effective batch "
        f"{tr.batch_size} x {tr.grad_accum} x {acc.num_processes} = {plan.effective_batch}; "
        f"{plan.steps_per_epoch} steps/epoch, {s.total_steps} steps"
        + (f"; {dropped} example(s) per epoch left out (less than one batch)" if dropped else "")
        + (f"; resuming from {s.resumed_from} at step {s.start_step}" if s.resumed_from else ""),
        flush=True,
    )


def summary_line(r: TrainResult) -> str:
    loss = f"{r.final_loss:.4f}" if r.final_loss is not None else "n/a"
    resumed = f" (resumed at step {r.steps - r.steps_this_run})" if r.resumed_from else ""
    return (
        f"trained {r.steps} steps{resumed} on {r.processes} process(es): {r.input_tokens:,} tokens "
        f"({r.response_tokens:,} in the loss) in {r.seconds:.0f} s = {r.tokens_per_s:,.0f} tokens/s; "
        f"peak memory {r.peak_memory_bytes / 2**30:.2f} GiB; final loss {loss}; adapter: {r.adapter}"
    )


# --- Checkpoints ----------------------------------------------------------------------------------


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def _checkpoint_step(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-") or not name[5:].isdigit():
        return None
    return int(name[5:])


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints (with the COMPLETE marker), oldest first."""
    folder = Path(out) / CHECKPOINT_DIR
    found = [p for p in folder.iterdir() if p.is_dir() and _checkpoint_step(p) is not None] if folder.is_dir() else []
    return sorted((p for p in found if (p / COMPLETE).is_file()), key=_checkpoint_step)


def latest_checkpoint(out: Path) -> Path | None:
    done = complete_checkpoints(out)
    return done[-1] if done else None


def _starting_checkpoint(out: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: from scratch). Without --resume, a folder with
    checkpoints is refused; with --resume and no complete checkpoint, training starts from scratch."""
    if out.exists() and not out.is_dir():
        raise LlmkdError(f"{out}: exists and is not a folder; choose another train.out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES and not atomic.is_temporary(p)) \
        if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise LlmkdError(f"{out}: holds files that are not a training run's ({shown}); choose another train.out")
    folder = out / CHECKPOINT_DIR
    existing = [p for p in folder.iterdir() if _checkpoint_step(p) is not None] if folder.is_dir() else []
    if not resume:
        if existing or (out / ADAPTER_DIR).exists():
            raise LlmkdError(
                f"{out} already holds a training run ({len(existing)} checkpoint folder(s)"
                f"{', an adapter' if (out / ADAPTER_DIR).exists() else ''}): use --resume, or another train.out"
            )
        return None
    last = latest_checkpoint(out)
    if last is None:
        print(f"llmkd train: no complete checkpoint in {folder}: starting from step 0", flush=True)
    return last


def _training_settings(recipe: Recipe, processes: int) -> dict:
    """The dotted recipe keys that shape the training trajectory, plus the process count."""
    dump = recipe.model_dump()
    flat = _flatten({"model": dump["model"], "lora": dump["lora"], "train": dump["train"]})
    flat = {k: v for k, v in flat.items() if k not in _RESUMABLE_CHANGES}
    flat["processes"] = processes
    return flat


def _check_resumable(state: dict, recipe: Recipe, data: TrainingData, processes: int, path: Path) -> None:
    if state.get("format") != CHECKPOINT_FORMAT:
        raise LlmkdError(f"{path}: checkpoint format {state.get('format')!r}, this llmkd reads {CHECKPOINT_FORMAT}")
    old, new = state["training_settings"], _training_settings(recipe, processes)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise LlmkdError(
                f"cannot resume from {path}: {key} was {old.get(key)!r}, now {new.get(key)!r}; "
                "restore it, or train into another train.out"
            )
    ts = state["transfer_set"]
    if ts["settings_hash"] != data.settings_hash or ts["content_sha256"] != data.content_sha256:
        raise LlmkdError(
            f"cannot resume from {path}: the transfer set at {data.path} is not the one it was trained on "
            f"(manifest hash {data.settings_hash[:12]}, checkpoint {ts['settings_hash'][:12]}); "
            "point transfer_set.out at that set, or train into another train.out"
        )


def _read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise LlmkdError(f"{path}: unreadable checkpoint state.json ({type(e).__name__})") from None


def _rng_state() -> dict:
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": np_state[0], "key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for p in sorted(folder.rglob("*")):
        _fsync_path(p)
    _fsync_path(folder)


def save_checkpoint(s: Session, step: int) -> Path:
    """Write checkpoints/step-XXXXXX (all ranks take part: each writes its RNG state)."""
    acc = s.accelerator
    folder = s.out / CHECKPOINT_DIR
    final, tmp = folder / checkpoint_name(step), folder / f".tmp-{checkpoint_name(step)}"
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    acc.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng-rank{acc.process_index}.pt")
    acc.wait_for_everyone()
    if acc.is_main_process:
        acc.unwrap_model(s.model).save_pretrained(str(tmp))
        torch.save(s.optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(s.scheduler.state_dict(), tmp / "scheduler.pt")
        if acc.scaler is not None:
            torch.save(acc.scaler.state_dict(), tmp / "scaler.pt")
        plan = s.plan
        epoch, in_epoch = divmod(step, plan.steps_per_epoch)
        atomic.write_json(tmp / "state.json", {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "data_position": {"epoch": epoch, "step_in_epoch": in_epoch, "steps_per_epoch": plan.steps_per_epoch,
                              "permutation_seed": plan.seed, "effective_batch": plan.effective_batch},
            "total_steps": s.total_steps,
            "processes": acc.num_processes,
            "transfer_set": {"path": str(s.data.path), "settings_hash": s.data.settings_hash,
                             "content_sha256": s.data.content_sha256},
            "training_settings": _training_settings(s.recipe, acc.num_processes),
            "recipe": s.recipe.model_dump(),
            "llmkd_version": __version__,
        })
        _fsync_tree(tmp)
        if final.exists():  # a leftover without COMPLETE (a crash between rename and marker)
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_path(folder)
        atomic.write_text(final / COMPLETE, f"step {step}\n")
        _fsync_path(final)
        _prune_checkpoints(s.out)
    acc.wait_for_everyone()
    return final


def _prune_checkpoints(out: Path, keep: int = KEEP_CHECKPOINTS) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and every incomplete leftover.
    The marker goes first, so a crash mid-delete leaves a folder that no longer counts."""
    folder = out / CHECKPOINT_DIR
    complete = complete_checkpoints(out)
    for p in complete[:-keep]:
        (p / COMPLETE).unlink()
        shutil.rmtree(p)
    kept = set(complete[-keep:])
    for p in folder.iterdir():
        if p.is_dir() and p not in kept and (_checkpoint_step(p) is not None or p.name.startswith(".tmp-")):
            shutil.rmtree(p, ignore_errors=True)


def _restore(path: Path, accelerator, model, optimizer, scheduler) -> None:
    """Load a checkpoint into the prepared model/optimizer and the scheduler; RNG states last."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"), device=str(accelerator.device))
    result = set_peft_model_state_dict(accelerator.unwrap_model(model), weights)
    if getattr(result, "unexpected_keys", None):
        raise LlmkdError(f"{path}: adapter weights do not fit this model (e.g. {result.unexpected_keys[0]})")
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location=accelerator.device, weights_only=True))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng = path / f"rng-rank{accelerator.process_index}.pt"
    if not rng.is_file():
        raise LlmkdError(f"{path}: no {rng.name} (the checkpoint was written by fewer processes)")
    _set_rng_state(torch.load(rng, weights_only=True))


def _write_adapter(model, adapter: Path, s: Session, step: int, final_loss: float | None) -> None:
    """The final adapter in PEFT format, published atomically (tmp folder, fsync, rename)."""
    tmp = adapter.with_name(f".tmp-{adapter.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp))
    atomic.write_json(tmp / "llmkd.json", {
        "steps": step, "final_loss": final_loss, "recipe": s.recipe.model_dump(),
        "transfer_set": {"path": str(s.data.path), "settings_hash": s.data.settings_hash,
                         "content_sha256": s.data.content_sha256},
        **_provenance(),
    })
    _fsync_tree(tmp)
    old = adapter.with_name(f".old-{adapter.name}-{os.getpid()}")
    if adapter.exists():
        os.rename(adapter, old)
    os.rename(tmp, adapter)
    _fsync_path(adapter.parent)
    shutil.rmtree(old, ignore_errors=True)


def _provenance() -> dict:
    from llmkd.provenance import provenance

    return provenance()


def _flatten(d: dict, prefix: str = "") -> dict:
    flat = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = v
    return flat


def _jsonable(d: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


# --- Dry run --------------------------------------------------------------------------------------

# Architectures for a dry run when the hub is unreachable (and for the embedded default, whose
# config a dry run does not convert the GGUF to read). transformers config kwargs.
_LLAMA31_8B = dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, intermediate_size=14336,
                   num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                   tie_word_embeddings=False)
_SMOLLM2_135M = dict(model_type="llama", hidden_size=576, num_hidden_layers=30, intermediate_size=1536,
                     num_attention_heads=9, num_key_value_heads=3, head_dim=64, vocab_size=49152,
                     tie_word_embeddings=True)
KNOWN_CONFIGS = {
    "meta-llama/Llama-3.1-8B-Instruct": _LLAMA31_8B,
    "meta-llama/Llama-3.1-8B": _LLAMA31_8B,
    models.EMBEDDED_ALIAS: _SMOLLM2_135M,
    "HuggingFaceTB/SmolLM2-135M-Instruct": _SMOLLM2_135M,
}


def model_config(cfg) -> tuple[Any, str]:
    """(transformers config, where it came from) without loading weights or converting the GGUF."""
    from transformers import AutoConfig

    if cfg.name == models.EMBEDDED_ALIAS:
        return _table_config(cfg.name), "built-in table (the embedded default)"
    # Not models.resolve: it takes hub ids with a dot ("Llama-3.1-...") for missing folders.
    path = Path(cfg.name).expanduser()
    ref = str(path) if path.is_dir() else cfg.name
    try:
        return AutoConfig.from_pretrained(ref, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code), ref
    except (OSError, ValueError) as e:
        if cfg.name in KNOWN_CONFIGS:
            return _table_config(cfg.name), f"built-in table (hub unreachable: {type(e).__name__})"
        raise LlmkdError(
            f"cannot read the config of {cfg.name!r} ({type(e).__name__}) and it is not in the built-in table "
            f"({', '.join(KNOWN_CONFIGS)}); download it and set model.name to the folder"
        ) from None


def _table_config(name: str):
    from transformers import AutoConfig

    kwargs = dict(KNOWN_CONFIGS[name])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


@dataclass
class ModelPlan:
    config: Any
    source: str
    total_params: int
    quantized_params: int  # in the Linear layers bitsandbytes converts (all but lm_head)
    kept_params: int  # embeddings, lm_head, norms: not quantised
    lora_modules: int
    lora_params: int
    lora_targets_missing: list[str] = field(default_factory=list)


def plan_model(recipe: Recipe) -> ModelPlan:
    """Parameter counts from the architecture instantiated on the meta device (no weights)."""
    from transformers import AutoModelForCausalLM

    config, source = model_config(recipe.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=recipe.model.trust_remote_code)
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    quantized = sum(m.weight.numel() for m in linears.values())
    targets = list(recipe.lora.target_modules)
    hit = {n: m for n, m in linears.items() if any(n == t or n.endswith("." + t) for t in targets)}
    missing = [t for t in targets if not any(n == t or n.endswith("." + t) for n in hit)]
    lora = sum(recipe.lora.r * (m.in_features + m.out_features) for m in hit.values())
    return ModelPlan(config, source, total, quantized, total - quantized, len(hit), lora, missing)


def _sequence_plan(recipe: Recipe) -> tuple[int, int, int | None, str]:
    """(longest example, longest response, examples or None, how known): from the transfer set if built."""
    from llmkd.transfer_set import MANIFEST, read_manifest

    path = Path(recipe.transfer_set.out)
    if (path / MANIFEST).is_file():
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        manifest = read_manifest(path)
        longest = longest_response = 0
        for entry in manifest.shards:
            table = pq.read_table(path / entry.file, columns=["input_ids", "response_start"])
            lengths = pc.list_value_length(table.column("input_ids")).to_numpy()
            responses = lengths - table.column("response_start").to_numpy()
            longest, longest_response = max(longest, int(lengths.max())), max(longest_response, int(responses.max()))
        return longest, longest_response, manifest.totals.examples, f"measured in {path}"
    ts = recipe.transfer_set
    prompt = 160 * (1 + ts.shots)  # GSM8K: ~160 tokens per question turn with the chat template
    response = ts.max_new_tokens if ts.response == "teacher" else 320
    return prompt + response, response, ts.count, f"estimated (no transfer set at {path} yet): " \
        f"~{prompt} prompt tokens ({ts.shots}-shot) + {response} response tokens"


def memory_estimate(recipe: Recipe, plan: ModelPlan, seq_len: int, response_len: int) -> list[tuple[str, float, str]]:
    """(part, bytes, how) rows of a per-process training memory estimate."""
    c, tr, lora = plan.config, recipe.train, recipe.lora
    hidden, layers, inter = c.hidden_size, c.num_hidden_layers, c.intermediate_size
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv = (getattr(c, "num_key_value_heads", None) or heads) * head_dim
    vocab = c.vocab_size
    act = 2 if tr.mixed_precision in ("bf16", "fp16") else 4  # activation bytes under autocast, else fp32
    # NF4: 4 bits per weight + one absmax per 64-weight block: fp32 (4 B), or with double quantisation
    # 1 byte plus one fp32 constant per 256 blocks.
    const = (1 + 4 / 256) / 64 if recipe.model.double_quant else 4 / 64
    tokens = tr.batch_size * seq_len
    opt_bytes = 8 if tr.optimizer == "adamw" else (4 if tr.momentum > 0 else 0)
    # Activations per token per layer at the backward's peak, Llama-like block with SwiGLU: what
    # autograd saves (norm outputs, q/k/v, rotated q/k, GQA-expanded k/v, attention output, gate, up,
    # act, product: ~11H + 4kv + 4I) plus the gradients alive next to it at the start of the backward:
    # 12H + 4kv + 8I elements at `act` bytes, plus the two fp32 RMSNorm inputs (peft upcasts the norms).
    # Calibrated on SmolLM2-135M (fp32, batch 4 x 210 tokens): estimate 2.18 GiB, measured peak RSS
    # increase of a training step 2.08 GiB. LoRA dropout adds its output and a bool mask per input.
    per_token_layer = (12 * hidden + 4 * kv + 8 * inter) * act + 2 * hidden * 4
    if lora.dropout > 0:
        per_token_layer += (3 * hidden + heads * head_dim + 2 * hidden + inter) * (act + 1)
    full = tokens * layers * per_token_layer
    if tr.gradient_checkpointing:  # layer inputs (fp32 residual stream) + one layer recomputed at a time
        activations = tokens * layers * hidden * 4 + tokens * per_token_layer
        how_act = f"checkpointing on: {tokens:,} tokens x {layers} layer inputs fp32 + one layer recomputed"
    else:
        activations = full
        how_act = f"{tokens:,} tokens x {layers} layers x ~{per_token_layer / 1024:.0f} KiB"
    logits_rows = tr.batch_size * response_len
    logits_bytes = act if tr.mixed_precision in ("bf16", "fp16") else 4
    return [
        ("NF4 weights + quant constants", plan.quantized_params * (0.5 + const),
         f"{plan.quantized_params:,} params x {0.5 + const:.4f} B"),
        ("embeddings, lm_head, norms (fp32)", plan.kept_params * 4,
         f"{plan.kept_params:,} params; prepare_model_for_kbit_training upcasts them to fp32"),
        ("LoRA weights + grads + optimizer", plan.lora_params * (4 + 4 + opt_bytes),
         f"{plan.lora_params:,} fp32 params x (4 + 4 + {opt_bytes} {tr.optimizer}) B"),
        ("activations", activations, how_act),
        ("logits + their gradient", 2 * logits_rows * vocab * logits_bytes + (32 << 20),
         f"{logits_rows:,} response positions x {vocab:,} x {logits_bytes} B x 2, + loss tiles"),
    ]


def dry_run(recipe: Recipe) -> str:
    """The resolved recipe, the model plan and a memory estimate; loads no weights."""
    import yaml

    tr, lora = recipe.train, recipe.lora
    plan = plan_model(recipe)
    c = plan.config
    seq_len, response_len, examples, seq_source = _sequence_plan(recipe)
    rows = memory_estimate(recipe, plan, seq_len, response_len)
    total = sum(b for _, b, _ in rows)
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    gib = 2**30
    lines = [
        "llmkd train --dry-run: nothing loaded, nothing written",
        "",
        "resolved recipe:",
        *("  " + line for line in yaml.safe_dump(recipe.model_dump(), sort_keys=False).splitlines()),
        "",
        f"model plan: {recipe.model.name}",
        f"  config from {plan.source}",
        f"  {c.model_type}: hidden {c.hidden_size}, {c.num_hidden_layers} layers, intermediate {c.intermediate_size}, "
        f"{heads} heads ({kv_heads} KV, head dim {head_dim}), vocab {c.vocab_size:,}, "
        f"tied embeddings {bool(getattr(c, 'tie_word_embeddings', False))}",
        f"  parameters {plan.total_params:,}: {plan.quantized_params:,} in linear layers -> {recipe.model.quant_type} "
        f"(double quant {recipe.model.double_quant}, compute {recipe.model.compute_dtype}); "
        f"{plan.kept_params:,} not quantised",
        f"  LoRA r={lora.r} alpha={lora.alpha:g} dropout={lora.dropout:g} on {plan.lora_modules} modules "
        f"({', '.join(lora.target_modules)}): {plan.lora_params:,} trainable parameters "
        f"({100 * plan.lora_params / plan.total_params:.3f}%)",
    ]
    if plan.lora_targets_missing:
        lines.append(f"  WARNING: no module matches {', '.join(plan.lora_targets_missing)} (peft would refuse)")
    steps = f"{examples:,} examples" if examples else "examples unknown"
    lines += [
        f"  training: {steps}; effective batch {tr.batch_size} x {tr.grad_accum} x processes; "
        f"{tr.optimizer} lr {tr.lr:g}, {tr.schedule} after {tr.warmup_steps} warmup steps; "
        f"gradient checkpointing {tr.gradient_checkpointing}; mixed precision {tr.mixed_precision}",
        "",
        f"memory estimate per process: micro-batch {tr.batch_size} x {seq_len} tokens ({seq_source})",
        "  | part | GiB | how |",
        "  |---|---:|---|",
        *(f"  | {name} | {b / gib:.2f} | {how} |" for name, b, how in rows),
        f"  | total | {total / gib:.2f} | plus framework overhead (CUDA context, allocator: ~1 GiB) |",
        f"  not counted: attention probabilities if SDPA falls back to its math kernel, "
        f"{tr.batch_size * heads * seq_len**2 * 4 / gib:.2f} GiB per layer (fp32)",
    ]
    return "\n".join(lines)


# --- Command line ---------------------------------------------------------------------------------


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="*", metavar="RECIPE [key=value ...]",
                   help="recipe YAML (default: built-in defaults = the embedded model) and dotted overrides")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in train.out (refused if the settings differ)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved recipe, the model plan and a memory estimate; load nothing")


def recipe_from_args(items: Sequence[str]) -> Recipe:
    """RECIPE [key=value ...] or only key=value items (the built-in defaults)."""
    items = list(items)
    path = items.pop(0) if items and "=" not in items[0] else None
    bad = [x for x in items if "=" not in x]
    if bad:
        raise LlmkdError(f"expected key=value overrides after the recipe, got {bad[0]!r}")
    return load_recipe(path, items)


def cmd_train(args) -> int:
    """`llmkd train`: the umbrella CLI's entry (COMMANDS["train"] = (help, add_train_args, cmd_train))."""
    recipe = recipe_from_args(args.recipe)
    if args.dry_run:
        print(dry_run(recipe))
        return 0
    train(recipe, resume=args.resume)
    return 0


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmkd train", description="Train LoRA on the NF4 student against the cached teacher (stage 2).",
        epilog="Overrides: dotted recipe keys after the recipe, e.g. train.lr=1e-4 train.max_steps=50.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and warnings")
    add_train_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = make_parser()
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.recipe = [*args.recipe, *extra]
    try:
        from llmkd.cli import quiet_libraries

        quiet_libraries(args.verbose)
        return cmd_train(args)
    except TrainingDiverged as e:
        print(f"llmkd train: error: {e}", file=sys.stderr)
        return 1
    except LlmkdError as e:
        print(f"llmkd train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmkd train: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
