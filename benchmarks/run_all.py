"""Run every benchmark and write benchmarks/results.md.

    make bench                          # or: python benchmarks/run_all.py
    python benchmarks/run_all.py --only loss eval

Each benchmark is a script in this folder that prints markdown; each runs in its own process, one
after another (they time things: nothing else of ours runs beside them). Every figure in them is a
ratio against a baseline measured in the same run; absolute times drift on a shared machine. The
machine's matmul peak heads the file for context. results.md is replaced only once every selected
benchmark has finished (a failed one is reported in its section and makes the exit code non-zero).
Only the head and the sections of the benchmarks run are replaced: every other section is kept as it
is (those `bench_methods.py`, `bench_unseen_text.py` and `bench_peers.py` write, hours of runs of their
own; the data examples'; notes written by hand).
"""

from __future__ import annotations

import argparse
import os
import re
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

# name -> (script, arguments, what it compares)
BENCHMARKS = {
    "transfer-set": ("bench_transfer_set.py", [], "builder vs one-at-a-time generate with full-vocab logits"),
    "loss": ("bench_loss.py", [], "sparse top-k KD loss vs dense full-vocab KL at V=128,256"),
    "train": ("bench_train.py", [], "offline KD from the cache vs online KD with a live teacher"),
    "eval": ("bench_eval.py", [], "our evaluator vs plain batched generate vs lm-eval's HF backend"),
}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=list(BENCHMARKS), help="run these only")
    parser.add_argument("--out", default=str(HERE / "results.md"))
    return parser


def machine_lines() -> list[str]:
    import torch

    from bench_train import matmul_peak

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    peaks = {name: matmul_peak(getattr(torch, name)) / 1e9 for name in ("float32", "bfloat16")}
    return [
        f"- Machine: {cpu or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}",
        f"- Matmul peak (best of square matmuls): fp32 {peaks['float32']:.1f} GFLOP/s, "
        f"bf16 {peaks['bfloat16']:.1f} GFLOP/s",
    ]


def kept_sections(text: str, rewritten: list[str]) -> list[str]:
    """The sections of results.md this run does not write: the methods' (hours of runs of their own), the
    peers', the data examples', notes. Only the head and the sections of the benchmarks run now are replaced."""
    parts = re.split(r"(?m)^(?=# )", text)
    return [p.rstrip("\n") + "\n" for p in parts if p.startswith("# ") and not p.startswith("# Benchmarks\n")
            and not any(p.startswith(f"# {name}: ") for name in rewritten)]


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    names = args.only or list(BENCHMARKS)
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
           "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(ROOT)}
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    sections, failed, t_all = [], [], time.perf_counter()
    for name in names:
        script, extra, what = BENCHMARKS[name]
        print(f"[{names.index(name) + 1}/{len(names)}] {name}: {what}", flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(HERE / script), *extra], cwd=ROOT, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        body = proc.stdout.strip()
        if proc.returncode != 0:
            failed.append(name)
            body += f"\n\n**Failed** (exit {proc.returncode}):\n\n```\n{proc.stderr.strip()[-2000:]}\n```"
        print(body + f"\n({seconds:.0f} s)\n", flush=True)
        sections.append(f"# {name}: {what}\n\n`python benchmarks/{script}` ({seconds:.0f} s)\n\n{body}\n")
    head = ["# Benchmarks", "", f"Written by `benchmarks/run_all.py` on {started} in "
            f"{(time.perf_counter() - t_all) / 60:.1f} minutes.", "", *machine_lines(), ""]
    from llmkd import atomic

    out = Path(args.out)
    kept = kept_sections(out.read_text() if out.is_file() else "", names)
    atomic.write_text(out, "\n".join(head) + "\n" + "\n".join([*sections, *kept]))
    print(f"written: {args.out}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
