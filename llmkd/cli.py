"""`llmkd` command line: one sub-command per stage, plain argparse.

Every command takes an optional RECIPE (YAML) followed by dotted overrides, e.g.

    llmkd eval recipes/smollm2-cpu.yaml eval.batch_size=8 --shots 8 --limit 50

A user mistake (bad recipe key, missing file, unreachable model) prints one line and exits 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable

from llmkd import launch
from llmkd.config import MERGE_CALIBRATION_TOKENS, RECOVERY_LR, RECOVERY_STEPS, recipe_from_cli
from llmkd.errors import LlmkdError

EPILOG = "Overrides: dotted recipe keys after the recipe, e.g. train.lr=1e-4 eval.limit=50. " \
         "`llmkd recipe --keys` lists every key with its default and meaning."


def add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="*", metavar="RECIPE [key=value ...]",
                   help="recipe YAML (default: built-in defaults = the embedded model) and dotted overrides")


# ---- llmkd eval ------------------------------------------------------------------------------

def add_eval_args(p: argparse.ArgumentParser) -> None:
    add_recipe_args(p)
    p.add_argument("--shots", type=int, action="append",
                   help="exemplars per prompt; repeat for several (default: the recipe's eval.shots)")
    p.add_argument("--model", help="model reference, overriding model.name (hub id, folder or alias)")
    p.add_argument("--teacher", action="store_true", help="score the 16-bit teacher")
    p.add_argument("--student", action="store_true", help="score the quantised student, model.quant (with --adapter: the distilled one)")
    p.add_argument("--adapter", help="LoRA adapter folder to put on the quantised student")
    p.add_argument("--limit", type=int, help="score only the first N questions (overrides eval.limit)")
    p.add_argument("--fidelity", action="store_true",
                   help="also report KL(teacher||student) and top-1 agreement on held-out gold solutions")
    p.add_argument("--backend", choices=["llmkd", "lm-eval"], help="generation backend (default: eval.backend)")
    p.add_argument("--out", help="output folder (default: runs/<recipe name>/eval)")


def cmd_eval(args) -> int:
    from llmkd.evaluate import format_table, run_eval

    launch.refuse_several_processes("eval", "start it as `llmkd eval ...`, without accelerate launch or torchrun")
    recipe = recipe_from_cli(args.recipe, [f"model.name={args.model}"] if args.model else [])
    if args.limit is not None and args.limit <= 0:
        raise LlmkdError(f"--limit must be > 0, got {args.limit}")
    if any(s < 0 for s in args.shots or []):
        raise LlmkdError(f"--shots must be >= 0, got {args.shots}")
    if args.teacher or args.student:
        tags = (["teacher"] if args.teacher else []) + (["distilled" if args.adapter else "student"] if args.student else [])
    else:
        tags = ["teacher", "distilled" if args.adapter else "student"]
    if args.fidelity and tags == ["teacher"]:
        raise LlmkdError("--fidelity compares a student to the teacher: add --student")
    run = run_eval(recipe, shots=args.shots or recipe.eval.shots, tags=tags, adapter=args.adapter,
                   limit=args.limit, with_fidelity=args.fidelity, backend=args.backend, out_dir=args.out)
    print(format_table(run))
    print(f"\nwritten: {args.out or recipe.layout.eval}")
    return 0


# ---- llmkd build-transfer-set ----------------------------------------------------------------

def add_build_args(p: argparse.ArgumentParser) -> None:
    add_recipe_args(p)
    p.add_argument("--limit", type=int, help="at most N questions (caps transfer_set.count)")
    p.add_argument("--out", help="output folder (default: transfer_set.out)")
    p.add_argument("--allow-eval-split", action="store_true",
                   help="permit transfer_set.split=test (contaminates any evaluation on those questions)")


def cmd_build(args) -> int:
    from llmkd import builder, transfer_set

    recipe = recipe_from_cli(args.recipe)
    if args.limit is not None and args.limit <= 0:
        raise LlmkdError(f"--limit must be > 0, got {args.limit}")
    manifest = builder.build(recipe, out=args.out, limit=args.limit, allow_eval_split=args.allow_eval_split)
    print("\n".join(transfer_set.summary_lines(manifest)))
    return 0


# ---- llmkd train -------------------------------------------------------------------------------

def add_train_args(p: argparse.ArgumentParser) -> None:
    add_recipe_args(p)
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest complete checkpoint in train.out (refused if the settings differ)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved recipe, the model plan and a memory estimate; load nothing")
    add_processes_arg(p)


def add_processes_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="with --dry-run: the number of training processes planned for (default: the launch's "
                        "WORLD_SIZE, else 1); train.sharding fsdp or zero3 divides the student's weights among them")


def planned_processes(args) -> int:
    n = args.processes if args.processes is not None else launch.world_size()
    if n < 1:
        raise LlmkdError(f"--processes: {n}; plan for at least 1 process")
    return n


def cmd_train(args) -> int:
    recipe = recipe_from_cli(args.recipe)
    if args.dry_run:
        from llmkd.plan import dry_run

        print(dry_run(recipe, planned_processes(args)))
        return 0
    from llmkd.train import summary_line, train

    result = train(recipe, resume=args.resume)
    if launch.is_main_process():  # once, not per process
        print(summary_line(result), flush=True)
    return 0


# ---- llmkd run --------------------------------------------------------------------------------

def cmd_run(args) -> int:
    from llmkd import pipeline

    pipeline.run(recipe_from_cli(args.recipe))
    return 0


# ---- llmkd sweep ------------------------------------------------------------------------------

def add_sweep_args(p: argparse.ArgumentParser) -> None:
    import typing

    from llmkd.config import Quant  # not llmkd.quantize: it imports hqq, seconds of start-up for every command

    add_recipe_args(p)
    p.add_argument("--quant", default=None, metavar="Q1,Q2,...",
                   help=f"student quantizers, one point each, from {','.join(typing.get_args(Quant))} "
                        "(default: the recipe's sweep.quants, all of them unless set)")
    p.add_argument("--dry-run", action="store_true", help="print each point's memory plan; load nothing")
    add_processes_arg(p)


def cmd_sweep(args) -> int:
    from llmkd import sweep

    recipe = recipe_from_cli(args.recipe)
    quants = sweep.parse_quants(args.quant) if args.quant is not None else list(recipe.sweep.quants)
    if args.dry_run:
        print(sweep.dry_run(recipe, quants, planned_processes(args)))
        return 0
    launch.refuse_several_processes("sweep", "train a point on several with `accelerate launch -m llmkd train RECIPE "
                                    "model.quant=QUANT`, or run the sweep as `llmkd sweep ...` in one process")
    sweep.run(recipe, quants)
    return 0


# ---- llmkd export ------------------------------------------------------------------------------

def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", nargs="*", metavar="RUN_OR_RECIPE [key=value ...]",
                   help="a finished run folder (runs/<name>) or its recipe, and dotted overrides")
    p.add_argument("--to", default=None, metavar="FORMAT",
                   help="transformers: the student in its library's serialization (bitsandbytes: nf4, fp4, int8; "
                        "HQQ: hqq*) + the unmerged adapter (their default); gguf: llama.cpp's base file + LoRA file "
                        "(the default for gguf-* students); merged: one model, no adapter, the adapter merged and the "
                        "format's scales recovered against the teacher (gguf-* students: one GGUF file; nf4, fp4, hqq*: "
                        "one checkpoint in their library's serialization)")
    p.add_argument("--out", required=True, help="the folder to publish (new, or an earlier export of the same run)")
    p.add_argument("--check", type=int, default=32,
                   help="held-out rows the fidelity gate scores in llmkd and in the engine (default 32)")
    p.add_argument("--gguf-metadata", default=None, metavar="FILE",
                   help="--to gguf: a GGUF of the same model to copy its tokenizer from "
                        "(the embedded default brings its own; llama.cpp's convert_hf_to_gguf.py makes one)")
    p.add_argument("--recovery-steps", type=int, default=None, metavar="N",
                   help=f"--to merged: steps of training the scales after merging (default {RECOVERY_STEPS}; "
                        "longer keeps more of the adapter's gain, benchmarks/results.md)")
    p.add_argument("--recovery-lr", type=float, default=None, metavar="LR",
                   help=f"--to merged: Adam's learning rate for the scales (default {RECOVERY_LR['scales']:g}; "
                        f"{RECOVERY_LR['absmax']:g} for nf4 and fp4, whose block absmax is about 8x a block scale)")
    p.add_argument("--merge-tokens", type=int, default=None, metavar="N",
                   help=f"--to merged: transfer-set tokens whose layer inputs choose the merged weights' codes, GPTQ's "
                        f"way, before recovery (default {MERGE_CALIBRATION_TOKENS}; 0 rounds to nearest)")


def cmd_export(args) -> int:
    from llmkd import export

    launch.refuse_several_processes("export", "start it as `llmkd export ...`")
    export.export(export.recipe_of(args.recipe), to=args.to, out=args.out, check=args.check,
                  gguf_metadata=args.gguf_metadata, recovery_steps=args.recovery_steps, recovery_lr=args.recovery_lr,
                  merge_tokens=args.merge_tokens)
    return 0


# ---- llmkd recipe ----------------------------------------------------------------------------

def add_recipe_cmd_args(p: argparse.ArgumentParser) -> None:
    add_recipe_args(p)
    p.add_argument("--keys", action="store_true", help="list every recipe key with its default and meaning")


def cmd_recipe(args) -> int:
    import yaml

    from llmkd.config import field_docs

    if args.keys:
        for key, doc, default in field_docs():
            print(f"{key} = {default!r}\n    {doc}")
        return 0
    print(yaml.safe_dump(recipe_from_cli(args.recipe).model_dump(), sort_keys=False), end="")
    return 0


COMMANDS: dict[str, tuple[str, Callable, Callable]] = {
    "build-transfer-set": ("stage 1: cache the teacher's top-k distributions on the data's prompts (GSM8K by default)", add_build_args, cmd_build),
    "train": ("stage 2: LoRA on the quantised student against the transfer set (also: accelerate launch llmkd/train.py)",
              add_train_args, cmd_train),
    "eval": ("held-out fidelity, generation agreement and (GSM8K) accuracy of teacher and students", add_eval_args, cmd_eval),
    "run": ("the main job: build -> train -> eval (teacher, quantised base, distilled) -> report", add_recipe_args, cmd_run),
    "sweep": ("the bit-width frontier: one transfer set, then base and distilled student per quantizer "
              "(--quant nf4,fp4,int8,hqq2,hqq3,hqq4,hqq8)", add_sweep_args, cmd_sweep),
    "export": ("publish a run as a folder an engine serves (transformers + peft, vLLM; llama.cpp), checked there first",
               add_export_args, cmd_export),
    "recipe": ("validate a recipe and print it resolved, or list every key (--keys)", add_recipe_cmd_args, cmd_recipe),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmkd", description="Distil a 16-bit LLM into its own quantised (NF4 by default) copy.", epilog=EPILOG)
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs and warnings")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add_args, _) in COMMANDS.items():
        add_args(sub.add_parser(name, help=help_text, description=help_text, epilog=EPILOG))
    return parser


def quiet_libraries(verbose: bool) -> None:
    """Our own progress bars and tables, without the libraries' per-shard bars and advisories."""
    from llmkd import sharding

    sharding.name_deepspeed_device()  # before accelerate imports it, wherever DeepSpeed is installed
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(message)s")
    if verbose:
        return
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import warnings

    # The libraries' own advisories only (deprecations, "kernels" missing, ...); ours and the user's stay.
    warnings.filterwarnings("ignore", module=r"(transformers|peft|bitsandbytes|accelerate|datasets|torch|lm_eval)(\.|$)")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    # bitsandbytes' CPU backend tries a hub kernel when imported on AVX512-BF16 CPUs and logs each failure.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    # datasets (lm-eval's backend, the hub's GSM8K; nothing else) reads these when imported: no import here.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DATASETS_VERBOSITY", "error")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
        sys.modules["datasets"].logging.set_verbosity_error()


def parse_with_overrides(parser: argparse.ArgumentParser, argv: list[str] | None):
    """Parse, letting `key=value` overrides stand anywhere (`--limit 5 eval.batch_size=8` too)."""
    args, extra = parser.parse_known_args(argv)
    unknown = [x for x in extra if x.startswith("-") or "=" not in x]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "recipe"):
        args.recipe = [*args.recipe, *extra]
    return args


def run_command(name: str, command: Callable, args) -> int:
    """Run a command; a user mistake prints one line and exits 2, a diverged training run exits 1."""
    try:
        quiet_libraries(args.verbose)
        return command(args)
    except LlmkdError as e:
        print(f"llmkd {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"llmkd {name}: interrupted", file=sys.stderr)
        return 130


def main(argv: list[str] | None = None) -> int:
    # Idle OpenMP threads sleep instead of spinning: with any other load on the cores, spinning
    # threads stall torch 20-30x here. Read when torch first runs a parallel region, i.e. later.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = parse_with_overrides(make_parser(), argv)
    return run_command(args.command, COMMANDS[args.command][2], args)


if __name__ == "__main__":
    sys.exit(main())
