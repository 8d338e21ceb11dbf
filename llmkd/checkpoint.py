"""Training checkpoints: what one holds, when it counts, and when a run may resume from it.

    train.out/checkpoints/step-000020/
        adapter_model.safetensors     LoRA weights (with adapter_config.json: a PEFT adapter folder)
        optimizer.pt, scheduler.pt    torch state dicts (GradScaler: scaler.pt under fp16)
        rng-rank0.pt ...              python, numpy, torch CPU (and CUDA) RNG states, one per rank
        state.json                    step, data position, resolved recipe, training settings,
                                      the transfer set's identity
        COMPLETE                      written last: a folder without it does not count

A checkpoint is filled under a temporary name and published with `atomic.publish_dir` (every file
fsynced, one rename, then COMPLETE). Resuming restores adapter, optimizer, scheduler, every RNG
state and the data position, so that on CPU (bitwise deterministic) the loss curve and the final
adapter equal those of an uninterrupted run. A checkpoint whose training settings or transfer set
differ from the run's is refused, naming the key. Torch files are read with `weights_only=True`.

Under `train.sharding` fsdp or zero3 every rank joins in gathering the LoRA weights and the optimizer
state into full tensors (`llmkd.sharding`); the adapter is then the same PEFT folder, optimizer.pt the
full state keyed by parameter name (under zero3 with DeepSpeed's fp32 master weights beside it). Such
a checkpoint resumes with the same sharding and number of processes (both are training settings).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from llmkd import __version__, atomic, models, sharding
from llmkd.config import Recipe, RunLayout
from llmkd.errors import LlmkdError

FORMAT = 1
KEEP = 2  # newest complete checkpoints kept
COMPLETE = "COMPLETE"

# Settings that may change between a checkpoint and its resume: where things go, how often
# checkpoints are written, and gradient checkpointing (recomputes the same forward, same values).
# model.teacher_dtype only shapes the transfer set, which is compared by its own identity.
RESUMABLE_CHANGES = ("train.out", "train.checkpoint_every", "train.gradient_checkpointing", "model.teacher_dtype")


def name(step: int) -> str:
    return f"step-{step:06d}"


def step_of(path: Path) -> int | None:
    """The step of a checkpoint folder's name, None for anything else."""
    n = path.name
    return int(n[5:]) if n.startswith("step-") and n[5:].isdigit() else None


def complete(folder: Path) -> list[Path]:
    """Complete checkpoints (with the COMPLETE marker) in `folder`, oldest first."""
    folder = Path(folder)
    found = [p for p in folder.iterdir() if p.is_dir() and step_of(p) is not None] if folder.is_dir() else []
    return sorted((p for p in found if (p / COMPLETE).is_file()), key=step_of)


def latest(folder: Path) -> Path | None:
    done = complete(folder)
    return done[-1] if done else None


def starting_checkpoint(layout: RunLayout, resume: bool) -> Path | None:
    """The checkpoint to resume from (None: from scratch). Without --resume, a folder with
    checkpoints is refused; with --resume and no complete checkpoint, training starts from scratch."""
    out, folder = layout.train, layout.checkpoints
    if out.exists() and not out.is_dir():
        raise LlmkdError(f"{out}: exists and is not a folder; choose another train.out")
    ours = {p.name for p in (folder, layout.adapter, layout.metrics, layout.train_summary, layout.tensorboard,
                             layout.lora_init, layout.on_policy)}
    foreign = sorted(p.name for p in out.iterdir() if p.name not in ours and not atomic.is_temporary(p)) \
        if out.is_dir() else []
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise LlmkdError(f"{out}: holds files that are not a training run's ({shown}); choose another train.out")
    existing = [p for p in folder.iterdir() if step_of(p) is not None] if folder.is_dir() else []
    if not resume:
        if existing or layout.adapter.exists():
            raise LlmkdError(
                f"{out} already holds a training run ({len(existing)} checkpoint folder(s)"
                f"{', an adapter' if layout.adapter.exists() else ''}): use --resume, or another train.out"
            )
        return None
    last = latest(folder)
    if last is None:
        print(f"llmkd train: no complete checkpoint in {folder}: starting from step 0", flush=True)
    return last


def training_settings(recipe: Recipe, processes: int) -> dict:
    """The dotted recipe keys that shape the training trajectory, plus the process count."""
    flat = {k: v for k, v in recipe.flat().items()
            if k.split(".")[0] in ("model", "lora", "train") and k not in RESUMABLE_CHANGES}
    flat["model.compute_dtype"] = str(models.compute_dtype(recipe.model)).removeprefix("torch.")  # auto: as resolved
    flat["processes"] = processes
    return flat


def check_resumable(state: dict, recipe: Recipe, transfer_set: dict, processes: int, path: Path) -> None:
    """Refuse a checkpoint of another format, other training settings or another transfer set."""
    if state.get("format") != FORMAT:
        raise LlmkdError(f"{path}: checkpoint format {state.get('format')!r}, this llmkd reads {FORMAT}")
    old, new = state["training_settings"], training_settings(recipe, processes)
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise LlmkdError(
                f"cannot resume from {path}: {key} was {old.get(key)!r}, now {new.get(key)!r}; "
                "restore it, or train into another train.out"
            )
    ts = state["transfer_set"]
    if ts["settings_hash"] != transfer_set["settings_hash"] or ts["content_sha256"] != transfer_set["content_sha256"]:
        raise LlmkdError(
            f"cannot resume from {path}: the transfer set at {transfer_set['path']} is not the one it was trained on "
            f"(manifest hash {transfer_set['settings_hash'][:12]}, checkpoint {ts['settings_hash'][:12]}); "
            "point transfer_set.out at that set, or train into another train.out"
        )


def read_state(path: Path) -> dict:
    try:
        return json.loads((path / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise LlmkdError(f"{path}: unreadable checkpoint state.json ({type(e).__name__})") from None


def rng_state() -> dict:
    """Every RNG state of this process, as tensors and plain values (loadable with weights_only)."""
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


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["internal"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(folder: Path, step: int, *, accelerator, model, optimizer, scheduler, state: dict) -> Path:
    """Write `folder`/step-XXXXXX; every rank calls this (each writes its own RNG state).

    state: the run's description for state.json (data position, transfer set, recipe, ...);
    format, step and llmkd's version are added here.
    """
    final = Path(folder) / name(step)
    tmp = atomic.temporary_name(final, "ranks")  # one name all ranks agree on
    if accelerator.is_main_process:
        atomic.temporary_dir(final, "ranks")
    accelerator.wait_for_everyone()
    torch.save(rng_state(), tmp / f"rng-rank{accelerator.process_index}.pt")
    weights = sharding.adapter_state_dict(model)  # collectives when sharded: on every rank
    optimizer_state = sharding.optimizer_state_dict(model, optimizer)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(str(tmp), state_dict=weights)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        if accelerator.scaler is not None:
            torch.save(accelerator.scaler.state_dict(), tmp / "scaler.pt")
        atomic.write_json(tmp / "state.json", {"format": FORMAT, "step": step, **state, "llmkd_version": __version__})
        # A leftover step-XXXXXX without COMPLETE (a crash between rename and marker) is replaced.
        atomic.publish_dir(tmp, final, marker=COMPLETE, marker_text=f"step {step}\n")
        prune(folder)
    accelerator.wait_for_everyone()
    return final


def prune(folder: Path, keep: int = KEEP) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and every incomplete leftover.
    The marker goes first, so a crash mid-delete leaves a folder that no longer counts."""
    done = complete(folder)
    for p in done[:-keep]:
        (p / COMPLETE).unlink()
        shutil.rmtree(p)
    kept = set(done[-keep:])
    for p in Path(folder).iterdir():
        if p.is_dir() and p not in kept and (step_of(p) is not None or atomic.is_temporary(p)):
            shutil.rmtree(p, ignore_errors=True)


def restore_adapter(path: Path, model) -> None:
    """Load a checkpoint's LoRA weights into the student before it is wrapped or sharded (read on the
    CPU, copied to wherever the parameters are)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(str(path / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, weights)
    if getattr(result, "unexpected_keys", None):
        raise LlmkdError(f"{path}: adapter weights do not fit this model (e.g. {result.unexpected_keys[0]})")


def restore(path: Path, accelerator, model, optimizer, scheduler) -> None:
    """Load a checkpoint's optimizer, scheduler (and scaler) into the prepared run; RNG states last.
    The adapter went in before (`restore_adapter`); every rank calls this."""
    state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)  # loading moves it to the params
    sharding.load_optimizer_state_dict(model, optimizer, state)
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    if accelerator.scaler is not None and (path / "scaler.pt").is_file():
        accelerator.scaler.load_state_dict(torch.load(path / "scaler.pt", weights_only=True))
    rng = path / f"rng-rank{accelerator.process_index}.pt"
    if not rng.is_file():
        raise LlmkdError(f"{path}: no {rng.name} (the checkpoint was written by fewer processes)")
    set_rng_state(torch.load(rng, weights_only=True))
