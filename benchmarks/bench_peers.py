"""llmkd beside TRL, the tool users would pick instead, on the same work and the same wall-clock budget.

    pip install -e '.[bench]'                       # trl: this benchmark's only (llmkd never imports it)
    python benchmarks/bench_peers.py                # every entrant, the budget = llmkd's default training
    python benchmarks/bench_peers.py --entrants trl-sft llmkd-kd --budget 300 --lrs 2e-5
    python benchmarks/bench_peers.py --entrants trl-gkd --budget 60 --set eval.fidelity_count=8 eval.limit=2

The work: the main job's (`recipes/smollm2-cpu.yaml`): the embedded default's teacher and its NF4 student
with LoRA r16 on the same 7 module types, the same 480 GSM8K train examples in the same renderings
(llmkd's own tokenization), the same batch 4, cosine schedule, warm-up and clipping. Entrants:

    llmkd-default  `llmkd train`: activation init, then offline KD from the transfer set (the main job)
    llmkd-kd       `llmkd train lora.init=default`: plain offline KD, as many steps as the budget holds
    trl-distill    trl.DistillationTrainer: on-policy (the student samples), online teacher, full
                   vocabulary, beta 0 = forward KL (its default 1.0 is reverse KL)
    trl-distill-jsd  the same at beta 0.5 (generalised JSD), at trl-distill's better learning rate
    trl-gkd        trl.experimental.gkd.GKDTrainer at its documented lmbda 0.5, beta 0.5, temperature 0.9
    trl-sft        trl.SFTTrainer on the gold responses, no teacher

Each TRL entrant trains at its config's documented default learning rate and at llmkd's (`--lrs`), and
the table marks the better of the two in-format. Each entrant trains in a process of its own (`--run`),
for the budget: TRL's entrants first time 3 steps,
then train a fresh student for budget / (seconds per step) steps, so that their schedules end as llmkd's
do. Then llmkd's own evaluation scores every adapter: held-out KL and top-1 in-format and off-format, and
greedy generation against the teacher's on the first eval.limit test questions (0-shot); the NF4 base
and the teacher's held-out logits are scored once for all. The teacher's
time inside an online entrant is measured (forward hooks), to tell at how many training runs the
transfer set's one-time build pays for itself.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # every TRL trainer pings the hub when built
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

from transformers import TrainerCallback  # noqa: E402

from llmkd.config import load_recipe  # noqa: E402

ENTRANTS = ("llmkd-default", "llmkd-kd", "trl-distill", "trl-distill-jsd", "trl-gkd", "trl-sft")
RECIPE = str(REPO / "recipes/smollm2-cpu.yaml")
SETTINGS: list[str] = []  # --set: the recipe's overrides, for every entrant alike


def recipe_of(*more: str):
    return load_recipe(RECIPE, [*SETTINGS, *more])


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entrants", nargs="+", default=list(ENTRANTS), choices=ENTRANTS)
    parser.add_argument("--budget", type=float, help="training seconds per entrant (default: llmkd-default's)")
    parser.add_argument("--lrs", nargs="+", default=["recipe", "documented"], metavar="LR",
                        help="TRL entrants' learning rates: numbers, `recipe` (llmkd's train.lr) or `documented` "
                             "(the trainer's own default); default: both")
    parser.add_argument("--lr", type=float, help=argparse.SUPPRESS)  # one entrant's, with --run
    parser.add_argument("--root", default=str(REPO / "runs/bench-peers"))
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", dest="settings",
                        help="recipe overrides for every entrant, e.g. eval.fidelity_count=16 (a smaller check)")
    parser.add_argument("--run", choices=ENTRANTS, help=argparse.SUPPRESS)  # one entrant, in this process
    return parser


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# --- llmkd's entrants -----------------------------------------------------------------------------


def run_llmkd(name: str, out: Path, budget: float | None) -> dict:
    recipe = recipe_of()
    overrides = [*SETTINGS, f"name=bench-peers-{name}", f"train.out={out / 'train'}"]
    if name == "llmkd-kd":
        # As many plain-KD steps as the budget holds, at the default's measured seconds per step.
        default = json.loads((out.parent / "llmkd-default" / "result.json").read_text())
        steps = max(1, int(budget / (default["step_seconds"] / default["steps"])))
        overrides += ["lora.init=default", f"train.max_steps={steps}",
                      f"train.epochs={-(-steps * recipe.train.batch_size // recipe.transfer_set.count)}"]
    start = time.perf_counter()
    child = subprocess.run([sys.executable, "-m", "llmkd", "train", RECIPE, *overrides], cwd=REPO)
    if child.returncode:
        raise SystemExit(child.returncode)
    wall = time.perf_counter() - start
    summary = json.loads((out / "train" / "summary.json").read_text())
    init = out / "train" / "lora_init.json"
    return {"train_seconds": round(wall, 1), "step_seconds": summary["seconds"], "steps": summary["steps"],
            "input_tokens": summary["input_tokens"], "teacher_seconds": 0.0,
            "init_seconds": json.loads(init.read_text()).get("seconds") if init.is_file() else None,
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20, 2),
            "lr": recipe.train.lr, "adapter": str(out / "train" / "adapter")}


# --- TRL's entrants --------------------------------------------------------------------------------


def rows(recipe, tokenizer) -> list[dict]:
    """The transfer set's examples, the very tokens llmkd trains on: prompt text, ids, completion mask."""
    from llmkd.transfer_set import TransferSet

    out = []
    for row in TransferSet.open(recipe.layout.transfer_set).examples():
        ids, start = row["input_ids"].tolist(), row["response_start"]
        out.append({"prompt": tokenizer.decode(ids[:start]), "input_ids": ids,
                    "completion_mask": [0] * start + [1] * (len(ids) - start)})
    return out


class Budget(TrainerCallback):
    """Times the steps, and stops training once they took more than `seconds`."""

    def __init__(self, seconds: float):
        self.seconds, self.marks = seconds, []

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(time.perf_counter())
        if self.marks[-1] - self.marks[0] > self.seconds:
            control.should_training_stop = True


def teacher_clock(teacher) -> list[float]:
    """Seconds the teacher spends in forward, accumulated into the returned one-item list: its decoder
    layers' calls (DistillationTrainer runs the teacher's backbone, not its top module)."""
    spent, started = [0.0], []
    for layer in teacher.model.layers:
        layer.register_forward_pre_hook(lambda m, a: started.append(time.perf_counter()))
        layer.register_forward_hook(lambda m, a, o: spent.__setitem__(0, spent[0] + time.perf_counter() - started.pop()))
    return spent


def documented_lr(name: str) -> float:
    """The learning rate the entrant's TRL config defaults to (trl 1.16: 1e-6 DistillationConfig, 2e-5 GKD, SFT)."""
    import trl
    from trl.experimental.gkd import GKDConfig

    config = {"trl-gkd": GKDConfig, "trl-sft": trl.SFTConfig}.get(name, trl.DistillationConfig)
    return config.__dataclass_fields__["learning_rate"].default


def trl_trainer(name: str, recipe, tokenizer, data, lr: float, steps: int, out: Path, callbacks):
    """(trainer, teacher or None): the entrant's trainer on a fresh student (peft's own init)."""
    import torch
    from datasets import Dataset

    from llmkd import models
    from llmkd.train import build_student

    tr = recipe.train
    common = dict(output_dir=str(out / "trl"), use_cpu=True, bf16=False, fp16=False, learning_rate=lr,
                  lr_scheduler_type="cosine", warmup_steps=tr.warmup_steps, max_grad_norm=tr.max_grad_norm,
                  weight_decay=tr.weight_decay, optim="adamw_torch", per_device_train_batch_size=tr.batch_size,
                  gradient_accumulation_steps=1, max_steps=steps, gradient_checkpointing=False, seed=tr.seed,
                  logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0,
                  include_num_input_tokens_seen="non_padding")
    student = build_student(recipe, torch.device("cpu"))
    teacher = None if name == "trl-sft" else models.load_teacher(recipe.model)
    if name.startswith("trl-distill"):
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(beta=0.5 if name == "trl-distill-jsd" else 0.0, temperature=1.0, max_completion_length=recipe.eval.max_new_tokens, **common)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args, processing_class=tokenizer,
                                      train_dataset=Dataset.from_list([{"prompt": r["prompt"]} for r in data]),
                                      callbacks=callbacks)
    elif name == "trl-gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        trainer = GKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(**common), processing_class=tokenizer,
                             train_dataset=Dataset.from_list(data), callbacks=callbacks)
    else:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(completion_only_loss=True, packing=False, **common)
        trainer = SFTTrainer(model=student, args=args, processing_class=tokenizer, callbacks=callbacks,
                             train_dataset=Dataset.from_list([{k: r[k] for k in ("input_ids", "completion_mask")}
                                                              for r in data]))
    for p in trainer.model.parameters():  # TRL casts a 4-bit model's adapters to bf16: llmkd trains them in fp32
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return trainer, teacher


def run_trl(name: str, out: Path, budget: float, lr: float | None) -> dict:
    from llmkd import models

    recipe = recipe_of()
    lr = lr or recipe.train.lr
    tokenizer = models.load_tokenizer(recipe.model)
    tokenizer.padding_side = "left"  # DistillationTrainer asks for it; the others pad themselves
    data = rows(recipe, tokenizer)
    start = time.perf_counter()
    clock = Budget(budget)  # 3 timed steps (after a first) give the seconds per step
    trainer, _ = trl_trainer(name, recipe, tokenizer, data, lr, 4, out, [clock])
    trainer.train()
    per_step = (clock.marks[-1] - clock.marks[0]) / (len(clock.marks) - 1)
    del trainer
    models.release_memory()
    steps = max(1, int(budget / per_step))
    clock = Budget(1.1 * budget)  # the guard: a step time that grows (longer samples) stops it there
    trainer, teacher = trl_trainer(name, recipe, tokenizer, data, lr, steps, out, [clock])
    spent = teacher_clock(teacher) if teacher is not None else [0.0]
    begin = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - begin
    adapter = out / "adapter"
    trainer.model.save_pretrained(adapter)
    return {"train_seconds": round(seconds, 1), "step_seconds": round(seconds, 1), "steps": trainer.state.global_step,
            "planned_steps": steps, "calibration_seconds": round(begin - start, 1),
            "input_tokens": int(trainer.state.num_input_tokens_seen), "teacher_seconds": round(spent[0], 1),
            "peak_rss_gib": round(peak_rss_gib(), 2), "lr": lr, "adapter": str(adapter)}


# --- scoring and the table -------------------------------------------------------------------------


def score(name: str, adapter: str, out: Path, teacher_cells: Path | None, teacher_logits, base: dict | None) -> dict:
    """The entrant's held-out fidelity and generation prefix; the base's (`base`, once scored) is shared."""
    from llmkd.evaluate import run_eval

    recipe = recipe_of(f"name=bench-peers-{name}")
    run = run_eval(recipe, shots=[0], tags=["teacher", "distilled"] if base else ["teacher", "student", "distilled"],
                   adapter=adapter, with_fidelity=True, out_dir=out / "eval", progress=False,
                   teacher_from=teacher_cells, teacher_logits=teacher_logits)
    fidelity = {f"{f.tag}/{f.rendering}": (f.kl, f.top1_agreement) for f in run.fidelity}
    prefix = {g.tag: g.prefix_tokens_mean for g in run.agreement}
    if base:
        fidelity |= {k: v for k, v in base["fidelity"].items() if k.startswith("student/")}
        prefix["student"] = base["prefix"]["student"]
    return {"fidelity": fidelity, "prefix": prefix}


def runs(entrants, lrs) -> list[tuple[str, float | None]]:
    """(entrant, learning rate) in order; None: llmkd's own (the recipe's), or trl-distill-jsd's (decided later)."""
    recipe_lr = recipe_of().train.lr
    out = []
    for name in entrants:
        if name.startswith("llmkd") or name == "trl-distill-jsd":
            out.append((name, None))
            continue
        values = [recipe_lr if x == "recipe" else documented_lr(name) if x == "documented" else float(x) for x in lrs]
        out += [(name, lr) for lr in dict.fromkeys(values)]
    return out


def gap_closed(r: dict, rendering: str) -> float:
    f = r["fidelity"]
    return 1 - f[f"distilled/{rendering}"][0] / f[f"student/{rendering}"][0]


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    SETTINGS[:] = args.settings
    root = Path(args.root)
    if args.run:
        out = root / (args.run if args.lr is None else f"{args.run}-lr{args.lr:g}")
        out.mkdir(parents=True, exist_ok=True)
        result = run_llmkd(args.run, out, args.budget) if args.run.startswith("llmkd") \
            else run_trl(args.run, out, args.budget, args.lr)
        (out / "result.json").write_text(json.dumps(result, indent=1))
        return 0

    from llmkd.fidelity import TeacherLogits

    # The transfer set first, so that llmkd's training time holds no build (its one-time cost is reported apart).
    subprocess.run([sys.executable, "-m", "llmkd", "build-transfer-set", RECIPE, *SETTINGS], cwd=REPO, check=True)
    budget, results, teacher_cells, teacher_logits, base = args.budget, {}, None, TeacherLogits(), None
    for name, lr in runs(args.entrants, args.lrs):
        if name == "llmkd-kd" and not (root / "llmkd-default" / "result.json").is_file():
            raise SystemExit("llmkd-kd sizes its steps by llmkd-default's: run that entrant first")
        if budget is None and name != "llmkd-default":
            budget = json.loads((root / "llmkd-default" / "result.json").read_text())["train_seconds"]
        if name == "trl-distill-jsd":  # at the forward-KL entrant's better learning rate
            tried = [r for r in results.values() if r["entrant"] == "trl-distill"]
            lr = max(tried, key=lambda r: gap_closed(r, "llmkd"))["lr"] if tried else documented_lr(name)
        command = [sys.executable, __file__, "--run", name, "--root", str(root)]
        command += [f"--budget={budget}"] if budget is not None else []
        command += [f"--lr={lr}"] if lr is not None else []
        command += ["--set", *SETTINGS] if SETTINGS else []
        subprocess.run(command, cwd=REPO, check=True)
        out = root / (name if lr is None else f"{name}-lr{lr:g}")
        key = out.name
        results[key] = json.loads((out / "result.json").read_text()) | {"entrant": name}
        if name == "llmkd-default" and budget is None:
            budget = results[key]["train_seconds"]
        results[key] |= score(key, results[key]["adapter"], out, teacher_cells, teacher_logits, base)
        teacher_cells, base = teacher_cells or out / "eval", base or results[key]
        print(json.dumps({key: results[key]}), flush=True)
    (root / "results.json").write_text(json.dumps(results, indent=1))

    from llmkd.transfer_set import read_manifest

    build = read_manifest(REPO / recipe_of().transfer_set.out).build.seconds
    best = {}  # entrant -> its run with the larger in-format gap closed
    for key, r in results.items():
        if r["entrant"] not in best or gap_closed(r, "llmkd") > gap_closed(results[best[r["entrant"]]], "llmkd"):
            best[r["entrant"]] = key
    print(f"\nbudget {budget:.0f} s of training per entrant; the transfer set's build: {build:.0f} s of teacher time; "
          f"* = the entrant's better learning rate\n")
    print("| entrant | lr | steps | gap closed in-format | off-format | top-1 in / off | common prefix (base) | "
          "train s | teacher s in it | input tokens/s | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, r in results.items():
        f = r["fidelity"]
        mark = "*" if best[r["entrant"]] == key and sum(x["entrant"] == r["entrant"] for x in results.values()) > 1 else ""
        print(f"| {key}{mark} | {r['lr']:g} | {r['steps']} | {100 * gap_closed(r, 'llmkd'):.1f}% | "
              f"{100 * gap_closed(r, 'plain_chat'):.1f}% | "
              f"{100 * f['distilled/llmkd'][1]:.1f}% / {100 * f['distilled/plain_chat'][1]:.1f}% | "
              f"{r['prefix'].get('distilled', 0):.1f} ({r['prefix'].get('student', 0):.1f}) | {r['train_seconds']:.0f} | "
              f"{r['teacher_seconds']:.0f} | {r['input_tokens'] / r['train_seconds']:.0f} | {r['peak_rss_gib']:.2f} |")
        if r["teacher_seconds"]:
            print(f"  {key}: the build ({build:.0f} s) pays for itself after {build / r['teacher_seconds']:.1f} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
