"""The adapter merged into its quantised student: what merging keeps, and what recovery wins back.

    python benchmarks/bench_merged.py runs/smollm2-gguf-q4_0           # a finished GGUF, nf4/fp4 or HQQ run
    python benchmarks/bench_merged.py runs/smollm2-hqq4 --check 32 --steps 64 --lr 1e-5 3e-5

Four models on the run's first `--check` held-out fidelity rows, scored by llmkd's evaluator against
the teacher (KL and top-1, `llmkd.export.score_rows`):

  base          the quantised student, no adapter
  distilled     base + the run's adapter, unmerged
  requantized   the adapter merged into the weights, quantised again by the same quantizer
  recovered     requantized, then its continuous parameters (GGUF block scales, bitsandbytes block
                absmax, HQQ group scales and zeros) trained `--steps` steps against the transfer set,
                codes fixed (`llmkd.merge`); one row for each `--lr`, each from the same merge

and the share of the adapter's gain (the base's KL gap closed) that each merged model keeps.
`llmkd export --to merged` ships the recovered model and checks it in its engine; this script measures
the merge alone, nothing written.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_parser() -> argparse.ArgumentParser:
    from llmkd.config import MERGE_CALIBRATION_TOKENS, RECOVERY_LR, RECOVERY_STEPS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="a finished run folder (runs/<name>) of a GGUF, nf4/fp4 or HQQ student")
    parser.add_argument("--check", type=int, default=32, help="held-out rows scored (default 32)")
    parser.add_argument("--steps", type=int, default=RECOVERY_STEPS, help=f"recovery steps (default {RECOVERY_STEPS})")
    parser.add_argument("--lr", type=float, nargs="+", default=[None],
                        help=f"recovery lr, one or more: each recovers a copy of the same merge (default "
                             f"{RECOVERY_LR['scales']:g}; {RECOVERY_LR['absmax']:g} for nf4, fp4)")
    parser.add_argument("--merge-tokens", type=int, default=MERGE_CALIBRATION_TOKENS,
                        help=f"transfer-set tokens that choose the merged codes (default {MERGE_CALIBRATION_TOKENS}; 0: nearest)")
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    from llmkd import export, fastpath, merge, models
    from llmkd.cli import quiet_libraries

    quiet_libraries(verbose=False)

    t0 = time.perf_counter()
    recipe = export.recipe_of([args.run])
    adapter = recipe.layout.adapter
    tokenizer = models.load_tokenizer(recipe.model)
    rows = export.held_out_rows(recipe, tokenizer, args.check)
    teacher = models.load_teacher(recipe.model)

    def score(model, tags):
        with fastpath.dequantized_once(model):  # bitwise the layers' own forward (tests/test_models.py)
            return export.score_rows(recipe, teacher, model, tokenizer, rows, tags)

    figures = score(models.load_student(recipe.model, adapter=adapter), ["student", "distilled"])
    models.release_memory()
    requantized, recovered, recovery = merge.merged_students(recipe, adapter, tokenizer, steps=args.steps,
                                                             lr=args.lr[0], calibration_tokens=args.merge_tokens)
    recoveries = {"recovered": recovery}
    for i, lr in enumerate(args.lr[1:], 1):  # the same merge, recovered again at another rate
        more = copy.deepcopy(requantized)
        recoveries[f"recovered {i}"] = merge.recover(more, recipe, tokenizer, steps=args.steps, lr=lr)
        figures[f"recovered {i}"] = score(more, ["merged"])["merged"]
        del more
    figures["requantized"] = score(requantized, ["merged"])["merged"]
    figures["recovered"] = score(recovered, ["merged"])["merged"]
    for r in recoveries.values():
        print(r.line())

    closed = {tag: export.gap_closed({"student": figures["student"], "distilled": f}) for tag, f in figures.items()}
    print(f"\n## merged: {recipe.name} ({recipe.model.quant}), {len(rows)} held-out rows, "
          f"{figures['student']['tokens']} response tokens\n")
    print("| model | KL to the teacher | top-1 | gap closed | adapter's gain kept |")
    print("|---|---:|---:|---:|---:|")
    codes = f"codes chosen on {recovery.calibration_tokens:,} tokens" if recovery.calibration_tokens else "rounded to nearest"
    labels = {"student": f"base ({recipe.model.quant})", "distilled": "base + adapter (unmerged)",
              "requantized": f"merged, quantized again ({codes})",
              **{tag: f"merged + recovered ({r.steps} steps, lr {r.lr:g}, {r.seconds:.0f} s)"
                 for tag, r in recoveries.items()}}
    for tag, label in labels.items():
        f = figures[tag]
        kept = "" if tag == "student" else f"{100 * closed[tag] / closed['distilled']:.0f}%"
        print(f"| {label} | {f['kl']:.4f} | {100 * f['top1_agreement']:.1f}% | "
              f"{'' if tag == 'student' else f'{100 * closed[tag]:.1f}%'} | {kept} |")
    print(f"\nwhole script {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
