"""Stage 2: train LoRA on the quantised student against the cached teacher (the transfer set).

    llmkd train RECIPE [key=value ...] [--resume] [--dry-run]
    accelerate launch llmkd/train.py RECIPE ...      (the same command through the launcher)

`train(recipe)` = `setup` -> `fit` -> the final adapter. Plain functions, no Trainer subclass; the
teacher is never loaded, its top-k + tail targets come from the transfer set.

Student: the base quantised as `model.quant` says (`models.load_quantized`), `prepare_model_for_kbit_training`
(gradient checkpointing only if asked), then LoRA from peft, in train mode (LoRA dropout acts).
Under `train.sharding` fsdp or zero3 there is no kbit fp32 upcast and llmkd shards the student itself
(`llmkd.sharding`, FSDP2 or DeepSpeed ZeRO-3); otherwise a multi-process launch runs DDP.

Data: an example's target row i belongs to token input_ids[response_start + i], predicted at the
position before it; only those positions go through the lm_head (boolean `logits_to_keep`). Epoch e
visits the examples in `np.random.default_rng([train.seed, e]).permutation(n)`, optionally grouped
by length (`DataPlan.order`); an optimizer step takes the next effective batch of that order, rank r
its own contiguous share. A step's batches are a function of (seed, epoch, step), so a checkpoint
records only the position (`llmkd.checkpoint`). With train.on_policy, some steps take their batch
from the student's own answers instead (`llmkd.on_policy`), again a function of (seed, step).

Loss: `losses.sparse_kd_loss`, normalised by the response tokens of the whole effective batch (all
micro-batches, all ranks); DDP and FSDP average over ranks, so each rank back-propagates world_size * loss.
A non-finite loss or gradient norm stops training before the optimizer step.

Outputs (train.out): metrics.jsonl (one row per step, `_metrics_line`), tensorboard/, checkpoints/,
adapter/ (the final LoRA adapter, plain PEFT format, + llmkd.json), summary.json.
"""

from __future__ import annotations

import json
import math
import resource
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, Sequence

if __name__ == "__main__":  # run as a script, sys.path[0] is llmkd/ itself: its evaluate.py would shadow
    sys.path[0] = str(Path(__file__).resolve().parents[1])  # the `evaluate` package; import from the repo

import numpy as np
import torch

from llmkd import atomic, checkpoint, fastpath, lora_init, models, on_policy, quantize, sharding
from llmkd.config import Recipe, RunLayout
from llmkd.data import prompts
from llmkd.errors import LlmkdError
from llmkd.losses import KDTerms, sparse_kd_loss
from llmkd.provenance import provenance
from llmkd.transfer_set import Examples, TransferSet

def _has_tensorboard() -> bool:
    """TensorBoard logging where it is installed (an offline GPU check may run without it)."""
    import importlib.util

    return importlib.util.find_spec("tensorboard") is not None


GROUP_WINDOW_STEPS = 16  # train.group_by_length sorts within windows of this many effective batches
TRACKER_NAME = "tensorboard"
SHARDED_BY = {"fsdp": ", the student sharded by FSDP2", "zero3": ", the student sharded by ZeRO-3"}


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
    """The opened, verified transfer set and its examples."""

    examples: Examples
    transfer_set: TransferSet

    @classmethod
    def open(cls, recipe: Recipe, tokenizer) -> "TrainingData":
        ts = TransferSet.for_recipe(recipe, tokenizer)
        return cls(examples=ts.examples(), transfer_set=ts)

    @property
    def path(self) -> Path:
        return self.transfer_set.path

    def teacher_confidence(self) -> float:
        """The teacher's mean probability of the response tokens (0 where a token is outside its
        top-k, so a lower bound there): BitDistiller's gamma for the cakld divergence."""
        total, tokens = 0.0, 0
        for r in self.examples:
            labels = np.asarray(r["input_ids"][int(r["response_start"]):])[:, None]
            hit = np.asarray(r["topk_ids"]) == labels  # (n, K)
            total += float(np.where(hit, np.exp(np.asarray(r["topk_logprobs"], dtype=np.float64)), 0.0).sum())
            tokens += len(labels)
        return total / max(tokens, 1)


# --- Model, optimizer, schedule -------------------------------------------------------------------


def build_student(recipe: Recipe, device: torch.device):
    """Quantised base + prepare_model_for_kbit_training (not under FSDP) + LoRA, in train mode (LoRA
    dropout active). Not yet sharded."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    cfg, tr = recipe.model, recipe.train
    base = models.load_quantized(cfg, {"": str(device)})
    base.config.use_cache = False
    checkpointing = {"use_reentrant": False}  # DDP- and FSDP-safe; no input-grad hook needed
    if tr.sharding != "none":
        # As the peft and TRL FSDP-QLoRA recipes: norms and embeddings keep the compute dtype (no fp32
        # upcast); get_peft_model freezes the base.
        if tr.gradient_checkpointing:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpointing)
    else:
        # prepare_model_for_kbit_training turns gradient checkpointing on by default: only if asked.
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=tr.gradient_checkpointing, gradient_checkpointing_kwargs=checkpointing)
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


def prepare(accelerator, model, optimizer):
    """accelerator.prepare, without its fp32 outputs under mixed precision; a sharded model is not
    handed to accelerate at all (only its optimizer).

    accelerate wraps the forward of a bf16/fp16 run in autocast plus a conversion of every output
    to fp32: an fp32 (N, V) copy of the logits, and in backward fp32 and half gradients side by
    side. `unwrap_model(keep_fp32_wrapper=False)` puts the plain forward back; `loss_step` runs it
    in the same autocast itself.

    It puts it back as an attribute of the model, a method bound to the model itself: a reference
    cycle that would keep the trained student (on a GPU, gigabytes) alive after `train` returns,
    until the garbage collector happens to run. The class's own forward is the same function.
    """
    if sharding.is_sharded(model):
        return model, accelerator.prepare(optimizer)
    model, optimizer = accelerator.prepare(model, optimizer)
    plain = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    forward = plain.__dict__.get("forward")
    if getattr(forward, "__self__", None) is plain and getattr(forward, "__func__", None) is type(plain).forward:
        del plain.forward
    return model, optimizer


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


def loss_step(model, batch: Batch, loss_cfg, num_tokens: float, accelerator=None) -> KDTerms:
    """Student forward on `batch` (logits at the response-predicting positions only) and the KD loss.

    Under mixed precision the forward runs in the accelerator's autocast and the logits stay in the
    compute dtype (see `prepare`): the loss upcasts them tile by tile.
    """
    with accelerator.autocast() if accelerator is not None else nullcontext():
        logits = model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=batch.predict,
            use_cache=False,
        ).logits  # (N, V)
    if logits.dim() != 2 or logits.shape[0] != batch.response_tokens:
        raise RuntimeError(f"the model ignored the boolean logits_to_keep: logits {tuple(logits.shape)}")
    return sparse_kd_loss(
        logits, batch.labels, batch.topk_ids, batch.topk_logprobs, batch.tail_logmass,
        torch.ones_like(batch.labels, dtype=torch.bool),
        alpha=loss_cfg.alpha, temperature=loss_cfg.temperature, divergence=loss_cfg.divergence,
        jsd_beta=loss_cfg.jsd_beta, dkd_alpha=loss_cfg.dkd_alpha, dkd_beta=loss_cfg.dkd_beta, num_tokens=num_tokens,
        **({"cakld_gamma": loss_cfg.cakld_gamma} if loss_cfg.divergence == "cakld" else {}),
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
        sync = nullcontext() if last or accelerator is None else sharding.no_sync(model, accelerator)
        with sync:
            terms = loss_step(model, batch, loss_cfg, num_tokens, accelerator)
            scaled = terms.loss * world_size  # DDP, FSDP and ZeRO-3 average over ranks; each rank holds a share of the sum
            sharding.backward(model, accelerator, scaled, last) if accelerator is not None else scaled.backward()
        totals += torch.stack([terms.loss, terms.ce, terms.kl]).detach().float().cpu()
    return totals


# --- Setup ----------------------------------------------------------------------------------------


@dataclass
class Session:
    """Everything `fit` needs; built by `setup`."""

    recipe: Recipe
    layout: RunLayout
    accelerator: Any
    tokenizer: Any
    data: TrainingData
    plan: DataPlan
    total_steps: int
    model: Any  # PeftModel: DDP-wrapped, sharded in place (fsdp), a DeepSpeed engine (zero3), or plain
    optimizer: Any
    scheduler: Any
    params: list
    start_step: int = 0
    resumed_from: Path | None = None
    progress: bool = True
    loss: Any = None  # train.loss with cakld_gamma resolved from the data where it is null
    quantization: dict | None = None  # quantize.quantization_report of the student as loaded
    rounds: on_policy.Rounds | None = None  # train.on_policy: the student answers, the teacher scores


def activation_init(recipe: Recipe, model, examples, init_text, accelerator, *, progress: bool) -> None:
    """lora.init activations, computed once by the main process, the only one to load the teacher, and
    handed to the other ranks: every rank starts from the same LoRA tensors, bit for bit, which FSDP2
    (no broadcast of its own) needs and which GPU kernels on several ranks would not promise."""
    if accelerator.is_main_process:
        with fastpath.dequantized_once(model, enabled=recipe.fast_paths):
            report = lora_init.initialise_from_recipe(recipe, model, examples, init_text, progress=progress)
        atomic.write_json(recipe.layout.lora_init, report.as_dict())  # a resumed run's summary reads it
        print(report.line(), flush=True)
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        # The others wait here for as long as the init takes: a group of its own, with a timeout to match.
        group = dist.new_group(timeout=timedelta(hours=12))
        for p in model.parameters():  # the same order on every rank
            if p.requires_grad:
                dist.broadcast(p.data, src=0, group=group)
        dist.destroy_process_group(group)


def setup(recipe: Recipe, *, resume: bool = False, progress: bool = True) -> Session:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    tr = recipe.train
    if tr.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise LlmkdError("train.mixed_precision fp16 needs a GPU; use bf16 or no")
    sharding.check(recipe)
    layout = recipe.layout
    out = layout.train
    resume_from = checkpoint.starting_checkpoint(layout, resume)
    # cpu=True on a machine without CUDA: otherwise accelerate (1.15) leaves torchrun's ranks
    # unconnected (each one "NO" distributed, world size 1) instead of joining them over gloo.
    accelerator = Accelerator(cpu=models.device().type == "cpu", mixed_precision=tr.mixed_precision,
                              log_with=TRACKER_NAME if _has_tensorboard() else None, project_dir=str(out))
    world = accelerator.num_processes
    if resume and accelerator.is_main_process and layout.checkpoints.is_dir():
        # A crash mid-save leaves a temporary or unmarked folder; a resume with no step left to run
        # writes no checkpoint that would prune it.
        checkpoint.prune(layout.checkpoints)
    accelerator.wait_for_everyone()
    tokenizer = models.load_tokenizer(recipe.model)
    data = TrainingData.open(recipe, tokenizer)
    plan = DataPlan(len(data.examples), tr.batch_size, tr.grad_accum, world, tr.seed,
                    tuple(int(n) for n in data.examples.input_lengths) if tr.group_by_length else None)
    if plan.steps_per_epoch == 0:
        raise LlmkdError(
            f"{data.path}: {plan.examples} examples, fewer than one effective batch (train.batch_size "
            f"{tr.batch_size} x train.grad_accum {tr.grad_accum} x {world} processes = {plan.effective_batch})"
        )
    total_steps = tr.max_steps if tr.max_steps is not None else tr.epochs * plan.steps_per_epoch
    loss = tr.loss
    if loss.divergence == "cakld" and loss.cakld_gamma is None:
        loss = loss.model_copy(update={"cakld_gamma": data.teacher_confidence()})
    state = None
    if resume_from is not None:
        state = checkpoint.read_state(resume_from)
        checkpoint.check_resumable(state, recipe, data.transfer_set.identity(), world, resume_from)
    rounds = on_policy.Rounds.for_run(recipe, layout, data, tokenizer, total_steps, world,
                                      resumed=resume_from is not None, progress=progress)
    init_text = lora_init.text_tokens(recipe.lora.init_text, tokenizer) \
        if recipe.lora.init_text is not None and resume_from is None else None  # read before any work

    set_seed(tr.seed)  # LoRA initialisation: the same on every rank
    model = build_student(recipe, accelerator.device)
    out_features = model.get_output_embeddings().weight.shape[0]
    vocab = data.transfer_set.manifest.settings.vocab_size
    if out_features != vocab:
        raise LlmkdError(f"{data.path}: teacher vocabulary {vocab}, the student's lm_head has {out_features}")
    quantization = quantize.quantization_report(model)  # training never repacks: what runs throughout
    if resume_from is not None:
        checkpoint.restore_adapter(resume_from, model)  # into the whole, unsharded model
    elif recipe.lora.init == "activations":  # before sharding, into the whole model
        activation_init(recipe, model, data.examples, init_text, accelerator, progress=progress)
    if tr.sharding == "fsdp" and world > 1:
        model = sharding.shard_fsdp(model, accelerator.device, world)
    # After sharding, which replaces the parameters (optimizer, clipping and weight decay act on the shards).
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, tr)
    scheduler = make_scheduler(optimizer, tr, total_steps)
    # The scheduler stays unprepared: accelerate's wrapper would step it once per process.
    if tr.sharding == "zero3" and world > 1:  # the engine partitions the student and the optimizer state
        model, optimizer = sharding.shard_zero3(model, optimizer, tr, world)
    else:
        model, optimizer = prepare(accelerator, model, optimizer)
    set_seed(tr.seed, device_specific=True)  # dropout: a stream per rank
    start_step = 0
    if resume_from is not None:
        checkpoint.restore(resume_from, accelerator, model, optimizer, scheduler)
        start_step = state["step"]
    return Session(recipe, layout, accelerator, tokenizer, data, plan, total_steps, model, optimizer, scheduler,
                   params, start_step, resume_from, progress, loss, quantization, rounds)


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
    try:
        session = setup(recipe, resume=resume, progress=progress)
        try:
            return fit(session)
        finally:
            session.accelerator.end_training()  # also destroys the process group
            del session
    finally:
        forget_accelerator_state()
        models.release_memory()  # the student, its optimizer state and gradients: freed before what comes next


def forget_accelerator_state() -> None:
    """Clear accelerate's process-wide state once a training run has ended.

    accelerate keeps one state per process and refuses an Accelerator with other settings
    ("AcceleratorState has already been initialized and cannot be changed"): without this, a sweep
    point with its own train.mixed_precision would fail after the points before it had trained.
    end_training has destroyed the process group the state describes, so nothing valid is lost.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def fit(s: Session) -> TrainResult:
    from llmkd.progress import bar as progress_bar

    acc, tr, plan = s.accelerator, s.recipe.train, s.plan
    rank, world, main = acc.process_index, acc.num_processes, acc.is_main_process
    metrics_path = s.layout.metrics
    if main:
        s.layout.train.mkdir(parents=True, exist_ok=True)
        _trim_metrics(metrics_path, s.start_step)
        _print_header(s)
    acc.init_trackers(TRACKER_NAME, config=_tracker_config(s.recipe))
    acc.wait_for_everyone()

    # A bar on a terminal; in a log file, one line when training ends.
    bar = progress_bar(total=s.total_steps, initial=s.start_step, desc="train", unit="step",
                       disable=not (s.progress and main), dynamic_ncols=True)
    run_start = time.perf_counter()
    input_total = response_total = 0
    final_loss = None
    step = s.start_step
    try:
        with fastpath.dequantized_once(s.model, enabled=s.recipe.fast_paths) as fast:
            while step < s.total_steps:
                if s.rounds is not None:
                    s.rounds.before_step(step, acc.unwrap_model(s.model))
                t0 = time.perf_counter()
                source, examples, source_name = s.rounds.step_batch(step, plan) if s.rounds is not None \
                    else (s.data, plan.step_examples(step), "transfer_set")  # examples: (W, A, B)
                num_tokens = int(source.examples.response_lengths[examples].sum())  # the whole effective batch
                input_tokens = int(source.examples.input_lengths[examples].sum())
                batches = [collate(source.examples.rows(mb), s.tokenizer.pad_token_id).to(acc.device) for mb in examples[rank]]
                lr = s.scheduler.get_last_lr()[0]
                local = accumulate_gradients(s.model, batches, s.loss, num_tokens, accelerator=acc,
                                             world_size=world)
                loss, ce, kl = acc.reduce(local.to(acc.device), reduction="sum").cpu().tolist()
                grad_norm = sharding.clip_grad_norm(s.model, acc, s.params, tr.max_grad_norm)
                if not math.isfinite(loss) or (tr.mixed_precision != "fp16" and not math.isfinite(grad_norm)):
                    what = f"loss {loss}" if not math.isfinite(loss) else f"gradient norm {grad_norm}"
                    last = checkpoint.latest(s.layout.checkpoints)
                    where = f"last good checkpoint {last} (intact)" if last else "no checkpoint was written yet"
                    raise TrainingDiverged(
                        f"non-finite {what} at step {step + 1}: training stopped before the update; {where}; "
                        "lower train.lr or check the transfer set, then train into another train.out or --resume"
                    )
                if tr.optimizer == "sgd" and tr.weight_decay > 0:
                    _decay_(s.params, lr * tr.weight_decay)
                sharding.optimizer_step(s.model, s.optimizer)
                s.scheduler.step()
                step += 1
                seconds = time.perf_counter() - t0
                input_total += input_tokens
                response_total += num_tokens
                final_loss = loss
                if main:
                    line = _metrics_line(step, step / plan.steps_per_epoch, loss, ce, kl, lr, grad_norm, num_tokens,
                                         input_tokens, seconds, acc.device, source_name)
                    with open(metrics_path, "a") as f:
                        f.write(json.dumps(line) + "\n")
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{line['tokens_per_s']:.0f}")
                    acc.log({f"train/{k}": line[k] for k in ("loss", "ce", "kl", "lr", "grad_norm", "tokens_per_s")},
                            step=step)
                if step % tr.checkpoint_every == 0 or step == s.total_steps:
                    save_checkpoint(s, step)
    except BaseException:
        bar.disable = True  # no summary line for a failed run: its one-line error says what happened
        raise
    finally:
        bar.close()

    seconds = time.perf_counter() - run_start
    adapter = s.layout.adapter
    weights = sharding.adapter_state_dict(s.model)  # every rank: gathers the shards when sharded
    if main:
        if final_loss is None:  # resumed at the end: the loss of the last logged step
            final_loss = _last_logged_loss(metrics_path)
        _write_adapter(acc.unwrap_model(s.model), weights, adapter, s, step, final_loss)
    acc.wait_for_everyone()
    result = TrainResult(
        out=s.layout.train, adapter=adapter, steps=step, steps_this_run=step - s.start_step, input_tokens=input_total,
        response_tokens=response_total, seconds=round(seconds, 2),
        tokens_per_s=round(input_total / seconds, 1) if seconds > 0 else 0.0,
        peak_memory_bytes=peak_memory_bytes(acc.device), final_loss=final_loss, resumed_from=s.resumed_from,
        processes=world,
    )
    if main:
        atomic.write_json(s.layout.train_summary, {
            **_jsonable(asdict(result)), "fast_paths": fast, "loss": s.loss.model_dump(),
            "student_quantization": s.quantization,
            "lora_init": json.loads(s.layout.lora_init.read_text())
            if s.recipe.lora.init == "activations" and s.layout.lora_init.is_file() else None,
            "on_policy": s.rounds.done if s.rounds is not None else None,
            "recipe": s.recipe.model_dump(), **provenance()})
    return result


@torch.no_grad()
def _decay_(params, amount: float) -> None:
    for p in params:
        p.mul_(1.0 - amount)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak GPU memory allocated by torch, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def _metrics_line(step, epoch, loss, ce, kl, lr, grad_norm, tokens, input_tokens, seconds, device,
                  source: str = "transfer_set") -> dict:
    """A metrics.jsonl row. tokens: response tokens in the loss; input_tokens: tokens the student ran
    (prompt + response, no padding); both over all ranks. tokens_per_s counts input tokens. source:
    transfer_set, or on_policy (the newest round's responses)."""
    return {
        "step": step, "epoch": round(epoch, 4), "source": source, "loss": loss, "ce": ce, "kl": kl, "lr": lr, "grad_norm": grad_norm,
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
    flat = recipe.flat()
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flat.items()}


def _print_header(s: Session) -> None:
    tr, plan, acc, settings = s.recipe.train, s.plan, s.accelerator, s.data.transfer_set.manifest.settings
    dropped = plan.examples - plan.steps_per_epoch * plan.effective_batch
    print(
        f"llmkd train: {plan.examples} examples from {s.data.path} (top-{settings.top_k}, {settings.encoding}); "
        f"{acc.num_processes} process(es) on {acc.device} ({acc.distributed_type.value}"
        f"{SHARDED_BY[s.recipe.train.sharding] if sharding.is_sharded(s.model) else ''}); effective batch "
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



def save_checkpoint(s: Session, step: int) -> Path:
    """A checkpoint of the run at `step` (every rank calls this)."""
    plan = s.plan
    epoch, in_epoch = divmod(step, plan.steps_per_epoch)
    processes = s.accelerator.num_processes
    return checkpoint.save(s.layout.checkpoints, step, accelerator=s.accelerator, model=s.model,
                           optimizer=s.optimizer, scheduler=s.scheduler, state={
        "data_position": {"epoch": epoch, "step_in_epoch": in_epoch, "steps_per_epoch": plan.steps_per_epoch,
                          "permutation_seed": plan.seed, "effective_batch": plan.effective_batch},
        "total_steps": s.total_steps,
        "processes": processes,
        "transfer_set": s.data.transfer_set.identity(),
        "training_settings": checkpoint.training_settings(s.recipe, processes),
        "recipe": s.recipe.model_dump(),
    })


def _write_adapter(model, weights: dict | None, adapter: Path, s: Session, step: int, final_loss: float | None) -> None:
    """The final adapter in PEFT format (+ llmkd.json), published atomically. weights: the gathered
    `sharding.adapter_state_dict` (None: the model's own)."""
    tmp = atomic.temporary_dir(adapter)
    model.save_pretrained(str(tmp), state_dict=weights)
    atomic.write_json(tmp / "llmkd.json", {
        "steps": step, "final_loss": final_loss, "recipe": s.recipe.model_dump(),
        "transfer_set": s.data.transfer_set.identity(), **provenance(),
    })
    atomic.publish_dir(tmp, adapter)


def _jsonable(d: dict) -> dict:
    return {k: str(v) if isinstance(v, Path) else v for k, v in d.items()}


if __name__ == "__main__":  # `accelerate launch llmkd/train.py ARGS` is `python -m llmkd train ARGS`
    import runpy

    sys.argv = ["llmkd", "train", *sys.argv[1:]]
    runpy.run_module("llmkd", run_name="__main__", alter_sys=True)
