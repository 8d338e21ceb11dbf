"""Recovery methods side by side: which one wins back the most of the quantisation loss, in the
training format and on text the adapter never saw.

    python benchmarks/bench_methods.py                              # every method, NF4, the main job's recipe
    python benchmarks/bench_methods.py --methods kd mix --set train.max_steps=60 eval.fidelity_count=32
    python benchmarks/bench_methods.py --quant hqq3

Each method is the main job's recipe (recipes/smollm2-cpu.yaml) plus the overrides in METHODS, which
pin every knob the methods differ in, so a row means the same thing whatever the recipe's defaults
are. A method runs like a sweep point (`llmkd.sweep.run_point`): its own recipe `bench-<method>-<quant>`
under runs/, trained, then the quantised base and the distilled student scored against one teacher
evaluation: held-out KL(teacher || model) and top-1 agreement, teacher-forced, in every rendering of
`eval.fidelity_renderings` (here llmkd's format, plain_chat and plain_text: the last two are text no
method trains on), and greedy generation against the teacher's (exact match, common prefix). A
finished method is reused while its settings stay the same. The table goes into benchmarks/results.md
(its own section, which `run_all.py` keeps) and benchmarks/out/methods.json.

Time per method: its transfer set's build where it has its own (one teacher pass), the LoRA
initialisation, and training. Methods with the first init (INIT) train INIT_STEPS fewer steps: the same
budget; `default` trains the base's steps after its longer init, as the main job does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from llmkd import atomic, builder, checkpoint, sweep  # noqa: E402
from llmkd.config import Recipe, apply_override, load_recipe  # noqa: E402
from llmkd.evaluate import run_eval  # noqa: E402
from llmkd.fidelity import TeacherLogits  # noqa: E402

# The old default's transfer set (llmkd's format only) keeps its own folder.
PLAIN = ["transfer_set.out=transfer_sets/smollm2-cpu", "transfer_set.response=gold", "transfer_set.renderings=[llmkd]", "lora.init=default", "lora.r=16",
         "lora.alpha=32", "train.loss.divergence=forward_kl", "train.loss.alpha=0.0", "train.lr=1e-3"]
MIX = "transfer_set.renderings=[llmkd,bare,notes]"
# The first init measured here: 30 layers x 32 steps on 8k tokens at lr 1e-3 (76-101 s, 27-35 KD steps at batch 4).
INIT = ["lora.init=activations", "lora.init_steps=32", "lora.init_tokens=8192", "lora.init_lr=1e-3"]
INIT_STEPS = 35  # what INIT costs in KD steps: methods with it train that many fewer (the upper end)
# The main job's default: the mix, the init at its defaults (64 steps on 16k tokens, lr 3e-3), KD at lr 1e-4.
# It trains the base's steps: its init is part of the main job's 30 minutes, not taken from its KD.
DEFAULT = [MIX, "lora.init=activations", "lora.init_steps=64", "lora.init_tokens=16384", "lora.init_lr=3e-3",
           "train.lr=1e-4"]
ON_POLICY = ["train.on_policy.rounds=2", "train.on_policy.questions=32", "train.on_policy.fraction=0.5"]
# name -> (what it is, overrides on top of PLAIN)
METHODS = {
    "kd": ("offline top-64 forward KL, gold solutions in llmkd's format (the old default)", []),
    "mix": ("the same, the gold solutions in three renderings in turn (llmkd, bare, notes)", [MIX]),
    "init": ("activation-preserving LoRA init (32 steps per layer), then KD", INIT),
    "lr2e-3": ("peak learning rate 2e-3 instead of 1e-3", ["train.lr=2e-3"]),
    "batch2": ("batch 2 instead of 4 (twice the steps, the same examples)", ["train.batch_size=2"]),
    "r64": ("LoRA rank 64 (alpha 128)", ["lora.r=64", "lora.alpha=128"]),
    "tv": ("total variation instead of forward KL", ["train.loss.divergence=tv"]),
    "cakld": ("CAKLD (confidence-aware mix of reverse and forward KL)", ["train.loss.divergence=cakld"]),
    "dkd": ("decoupled KD (target and non-target terms)", ["train.loss.divergence=dkd"]),
    "teacher": ("the teacher's own greedy responses instead of gold", ["transfer_set.response=teacher",
                                                                        "transfer_set.max_new_tokens=256"]),
    "mix+init": ("renderings mix and activation-preserving init", [MIX, *INIT]),
    "mix+init+dkd": ("renderings mix, activation-preserving init and decoupled KD",
                     [MIX, *INIT, "train.loss.divergence=dkd"]),
    "default": ("the main job's default: the mix, a longer init at lr 3e-3, then KD at lr 1e-4", DEFAULT),
    "on-policy": ("renderings mix and init, plus 2 on-policy rounds of 32 sampled student answers (lambda 0.5)",
                  [MIX, *INIT, *ON_POLICY]),
}
FIDELITY_RENDERINGS = "eval.fidelity_renderings=[llmkd,plain_chat,plain_text]"
SECTION_PREFIX = "# methods"  # every section of results.md whose heading starts so is this script's or about it


def section_title(quant: str) -> str:
    return f"{SECTION_PREFIX}: recovery methods at the main job's budget, {quant} student"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes/smollm2-cpu.yaml"))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--quant", default="nf4", help="the student's quantizer (model.quant)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="overrides for every method, e.g. train.max_steps=60 eval.fidelity_count=32")
    parser.add_argument("--no-results", action="store_true", help="do not write benchmarks/results.md")
    return parser


def method_recipe(base: Recipe, name: str, quant: str, common: list[str]) -> Recipe:
    """The recipe of one method: its own name (its own runs/ folders); its own transfer set only if it
    changes how the set is built."""
    overrides = [*PLAIN, *METHODS[name][1]]
    raw = base.model_dump(exclude={"sweep"})
    raw["name"] = f"bench-{name.replace('+', '-')}-{quant}"
    raw["model"]["quant"] = quant
    raw["train"]["out"] = None
    for item in [*common, *overrides]:
        apply_override(raw, item, Recipe)
    wanted = Recipe.model_validate(raw).transfer_set.model_dump(exclude={"out"})
    own_set = wanted != \
        Recipe.model_validate({**raw, "transfer_set": base.transfer_set.model_dump()}).transfer_set.model_dump(exclude={"out"})
    # Methods that want the same other set share it: one folder per set of settings, beside the base's.
    key = hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:10]
    raw["transfer_set"]["out"] = str(base.layout.transfer_set.parent / f"bench-{key}") if own_set \
        else str(base.layout.transfer_set)
    # The same budget: as many training examples as the base recipe's steps see (a smaller batch takes more
    # steps), less what the LoRA initialisation costs.
    recipe = Recipe.model_validate(raw)
    examples = steps_of(base) * base.train.batch_size * base.train.grad_accum
    steps = examples // (recipe.train.batch_size * recipe.train.grad_accum)
    if set(INIT) <= set(METHODS[name][1]):  # the first init's cost comes out of the KD steps
        steps -= INIT_STEPS * steps // steps_of(base)
    raw["train"]["max_steps"] = steps
    return Recipe.model_validate(raw)


def discard_other_versions(recipe: Recipe) -> None:
    """A method whose settings changed since its outputs in runs/ were written starts afresh; a killed
    run of the same settings resumes."""
    stale = (recipe.layout.run / sweep.POINT_FILE).is_file() and sweep.finished_point(recipe) is None
    last = checkpoint.latest(recipe.layout.checkpoints)
    stale = stale or (last is not None and checkpoint.read_state(last)["training_settings"]
                      != checkpoint.training_settings(recipe, 1))
    if stale:
        for folder in {recipe.layout.run, recipe.layout.train}:
            shutil.rmtree(folder, ignore_errors=True)


def steps_of(recipe: Recipe) -> int:
    tr = recipe.train
    return tr.max_steps or recipe.transfer_set.count // (tr.batch_size * tr.grad_accum) * tr.epochs


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    common = ["eval.shots=[0]", FIDELITY_RENDERINGS, *args.set]
    base = load_recipe(args.recipe, [*PLAIN, *common])
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    out = ROOT / "benchmarks" / "out"
    builder.build(base)
    teacher_eval = out / "methods-teacher"
    run_eval(base, shots=base.eval.shots, tags=["teacher"], out_dir=teacher_eval, teacher_from=teacher_eval)
    teacher_logits = TeacherLogits()
    rows = []
    for name in args.methods:
        recipe = method_recipe(base, name, args.quant, common)
        print(f"[{name}] {METHODS[name][0]} -> runs/{recipe.name}", flush=True)
        t0 = time.perf_counter()
        build_seconds = 0.0
        if recipe.layout.transfer_set != base.layout.transfer_set:
            build_seconds = builder.build(recipe).build.seconds  # the teacher's time, also when reused
        discard_other_versions(recipe)
        figures = sweep.run_point(recipe, teacher_eval, teacher_logits, progress=True, say=print)
        summary = json.loads(recipe.layout.train_summary.read_text())
        init = (summary.get("lora_init") or {}).get("seconds", 0.0)
        rows.append({"method": name, "what": METHODS[name][0], "overrides": METHODS[name][1], **figures,
                     "init_seconds": init, "build_seconds": build_seconds,
                     "method_seconds": round(figures["train_seconds"] + init + build_seconds, 1),
                     "wall_seconds": round(time.perf_counter() - t0, 1)})
        print(format_table(rows, args, started), flush=True)
    atomic.write_json(out / "methods.json", {"rows": rows, "common": common, "recipe": args.recipe})
    table = format_table(rows, args, started)
    print(table)
    if not args.no_results:
        write_section(HERE / "results.md", section_title(args.quant), table)
    return 0


def format_table(rows: list[dict], args, started: str) -> str:
    lines = [section_title(args.quant), "", f"`python benchmarks/bench_methods.py {' '.join(sys.argv[1:])}` ({started}); "
             f"student {args.quant}; every method: the main job's recipe plus its overrides "
             f"(`METHODS` in the script). Held-out KL(teacher || model) in nats/token and top-1 agreement on "
             f"the evaluation's held-out questions, teacher-forced; gap closed = 1 - KL / base KL. "
             f"`llmkd` is the training format; `plain_chat` and `plain_text` are text no method trains on. "
             f"Generation: greedy 0-shot outputs against the teacher's (mean common-prefix tokens, exact match). "
             f"Time: the method's own transfer-set build + LoRA init + training. Machine: {machine()}.", "",
             "| method | llmkd KL (gap closed) | plain_chat KL (closed) | plain_text KL (closed) | top-1 llmkd / plain_chat | "
             "gen prefix | gen exact | time s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    if rows:
        b = rows[0]["base"]["fidelity"]
        lines.append(f"| {args.quant} base (no adapter) | {b['llmkd']['kl']:.4f} | {b['plain_chat']['kl']:.4f} | "
                     f"{b['plain_text']['kl']:.4f} | {100 * b['llmkd']['top1']:.1f}% / {100 * b['plain_chat']['top1']:.1f}% | "
                     f"{rows[0]['base'].get('gen_prefix_mean', float('nan')):.1f} | "
                     f"{100 * rows[0]['base'].get('gen_exact', 0):.0f}% | |")
    for r in rows:
        base, d = r["base"]["fidelity"], r["distilled"]["fidelity"]

        def cell(rendering):
            kl, kl0 = d[rendering]["kl"], base[rendering]["kl"]
            return f"{kl:.4f} ({100 * (1 - kl / kl0):.1f}%)"

        lines.append(f"| {r['method']}: {r['what']} | {cell('llmkd')} | {cell('plain_chat')} | {cell('plain_text')} | "
                     f"{100 * d['llmkd']['top1']:.1f}% / {100 * d['plain_chat']['top1']:.1f}% | "
                     f"{r['distilled'].get('gen_prefix_mean', float('nan')):.1f} | "
                     f"{100 * r['distilled'].get('gen_exact', 0):.0f}% | {r['method_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    from llmkd import models

    probe = models.cpu_matmul_probe()  # the probe the recipe's `auto` dtypes follow
    rates = probe["gflops"]
    return (f"{probe['cpu']}; matmul bf16 {rates['bfloat16']:.0f} / fp32 {rates['float32']:.0f} GFLOP/s, "
            f"so the student computes in {probe['choice']}")


def split_section(text: str, title: str) -> tuple[str, str, str]:
    """(before, the section headed `title`, after) of results.md's text; the section is "" if absent."""
    start = text.find(title + "\n")
    if start < 0:
        return text, "", ""
    end = text.find("\n# ", start + 1)
    end = len(text) if end < 0 else end + 1
    return text[:start], text[start:end], text[end:]


def write_section(path: Path, title: str, table: str) -> None:
    """Replace (or append) this run's section of results.md, leaving the others as they are."""
    head, _, tail = split_section(path.read_text() if path.is_file() else "", title)
    atomic.write_text(path, head.rstrip("\n") + "\n\n" + table + ("\n" + tail if tail else ""))


if __name__ == "__main__":
    sys.exit(main())
