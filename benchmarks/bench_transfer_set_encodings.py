"""Transfer-set encodings: bytes per response token, build time, and the fidelity each one trains to.

    python benchmarks/bench_transfer_set_encodings.py             # the main job, 3 sets (about 70 min on 2 cores)
    python benchmarks/bench_transfer_set_encodings.py --no-train  # sizes and build times only (about 6 min)

For each (encoding, top_k), as subprocesses of this Python:
  `llmkd build-transfer-set RECIPE transfer_set.encoding=E transfer_set.top_k=K` into ROOT/E-top-K,
  `llmkd train RECIPE` on it (the recipe's own steps, activation init and seed: only the set differs),
then the distilled student's held-out fidelity (the recipe's eval.fidelity_*: KL to the teacher and top-1
agreement, per rendering), with `llmkd.evaluate.run_eval`. The default sets: fp16 at top-64 (the format
of earlier sets), compact at top-32 (the default), and fp16 at top-32, which tells what K alone costs
from what the byte per probability costs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from llmkd.config import load_recipe  # noqa: E402
from llmkd.transfer_set import read_manifest  # noqa: E402

SETS = ("fp16:64", "compact:32", "fp16:32")


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(REPO / "recipes/smollm2-cpu.yaml"))
    parser.add_argument("--sets", nargs="+", default=list(SETS), metavar="ENCODING:K", help=f"default: {' '.join(SETS)}")
    parser.add_argument("--root", default=str(REPO / "runs/bench-encodings"), help="sets and training runs go here")
    parser.add_argument("--no-train", action="store_true", help="build only: sizes and build times")
    return parser


def llmkd(*args: str) -> float:
    """Run `python -m llmkd ARGS`; its wall seconds (a failure stops the benchmark with its exit status)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "llmkd", *args], check=True, cwd=REPO)
    return time.perf_counter() - start


def held_out_fidelity(recipe_path: str, name: str, out: Path) -> dict[str, tuple[float, float]]:
    """{rendering: (KL, top-1)} of the distilled student of training run `out`."""
    from llmkd.evaluate import run_eval

    recipe = load_recipe(recipe_path, [f"name={name}", f"train.out={out}"])
    run = run_eval(recipe, shots=[], tags=["distilled"], adapter=recipe.layout.train / "adapter", with_fidelity=True,
                   out_dir=out.parent / "eval", progress=False)
    return {f.rendering: (f.kl, f.top1_agreement) for f in run.fidelity}


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    root, rows = Path(args.root), []
    for spec in args.sets:
        encoding, k = spec.split(":")
        name = f"{encoding}-top{k}"
        folder, run = root / name / "transfer_set", root / name / "train"
        overrides = [f"transfer_set.encoding={encoding}", f"transfer_set.top_k={k}", f"transfer_set.out={folder}"]
        build_wall = llmkd("build-transfer-set", args.recipe, *overrides)
        manifest = read_manifest(folder)
        row = {"set": f"{encoding}, top-{k}", "bytes_per_token": manifest.totals.bytes_per_token,
               "mean_topk_mass": manifest.totals.mean_topk_mass, "teacher_seconds": manifest.build.seconds,
               "build_wall_seconds": round(build_wall, 1)}
        if not args.no_train:
            row["train_wall_seconds"] = round(llmkd("train", args.recipe, *overrides, f"name=bench-{name}", f"train.out={run}"), 1)
            row["fidelity"] = held_out_fidelity(args.recipe, f"bench-{name}", run)
        rows.append(row)
        print(json.dumps(row), flush=True)

    renderings = sorted({r for row in rows for r in row.get("fidelity", {})})
    header = ["set", "bytes / response token", "top-k mass", "build s, wall (teacher)",
              *(f"{what} {r}" for r in renderings for what in ("KL", "top-1"))]
    print("\n| " + " | ".join(header) + " |\n|---|" + "---:|" * (len(header) - 1))
    for row in rows:
        fidelity = row.get("fidelity", {})
        cells = [row["set"], f"{row['bytes_per_token']:.1f}", f"{row['mean_topk_mass']:.4f}",
                 f"{row['build_wall_seconds']:.0f} ({row['teacher_seconds']:.0f})",
                 *(f"{fidelity[r][0]:.5f} | {100 * fidelity[r][1]:.1f}%" if r in fidelity else " | " for r in renderings)]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
