"""The main job's report: teacher, NF4 base and distilled student side by side, with paired tests.

Every accuracy difference between two models is tested on the same questions with the exact
McNemar test (only the questions where the two disagree carry information). The reference study's
gains were inside one standard error: a difference is marked significant only at p < 0.05.

Writes `report.md` (tables), `report.json` (the same numbers), `loss.png` (training loss) and
`models.png` (accuracy and KL by model) into the report folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from itertools import combinations
from pathlib import Path

from llmkd import atomic
from llmkd.config import eval_cell
from llmkd.evaluate import EvalRun, format_table
from llmkd.provenance import provenance


def mcnemar_exact(a_correct: list[bool], b_correct: list[bool]) -> dict:
    """Two-sided exact McNemar test of paired outcomes: a binomial test on the discordant pairs."""
    if len(a_correct) != len(b_correct):
        raise ValueError("paired outcomes must cover the same questions")
    only_a = sum(a and not b for a, b in zip(a_correct, b_correct))
    only_b = sum(b and not a for a, b in zip(a_correct, b_correct))
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n if n else 1.0
    return {"only_a": only_a, "only_b": only_b, "p_value": min(1.0, 2 * tail)}


def _samples(eval_dir: Path, tag: str, shots: int) -> list[dict]:
    path = eval_cell(eval_dir, tag, shots) / "samples.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def paired_tests(run: EvalRun, eval_dir: Path) -> list[dict]:
    """McNemar between every two models at each shot count, for both answer filters."""
    rows = []
    shots = sorted({a.shots for a in run.accuracy})
    for k in shots:
        tags = [a.tag for a in run.accuracy if a.shots == k]
        for a, b in combinations(tags, 2):
            sa, sb = _samples(eval_dir, a, k), _samples(eval_dir, b, k)
            assert [s["id"] for s in sa] == [s["id"] for s in sb], "models were scored on different questions"
            for filt in ("strict", "flexible"):
                test = mcnemar_exact([s[f"{filt}_correct"] for s in sa], [s[f"{filt}_correct"] for s in sb])
                diff = (sum(s[f"{filt}_correct"] for s in sb) - sum(s[f"{filt}_correct"] for s in sa)) / len(sa)
                rows.append({"shots": k, "filter": filt, "a": a, "b": b, "b_minus_a": diff, **test})
    return rows


def _loss_curve(metrics_path: Path | None) -> list[dict]:
    if metrics_path is None or not metrics_path.exists():
        return []
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def write_report(run: EvalRun, eval_dir: Path, out_dir: Path, *, train_metrics: Path | None = None,
                 extra: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    tests = paired_tests(run, eval_dir)
    curve = _loss_curve(train_metrics)
    lines = ["# llmkd report", "", format_table(run), "", "## Paired differences (exact McNemar, same questions)", "",
             "| shots | filter | a → b | b − a | a-only / b-only correct | p | |", "|---:|---|---|---:|---|---:|---|"]
    for t in tests:
        mark = "significant" if t["p_value"] < 0.05 else "within noise"
        lines.append(f"| {t['shots']} | {t['filter']} | {t['a']} → {t['b']} | {100 * t['b_minus_a']:+.1f} pts | "
                     f"{t['only_a']} / {t['only_b']} | {t['p_value']:.3g} | {mark} |")
    for key, value in (extra or {}).items():
        lines += ["", f"## {key}", "", str(value)]
    if curve:
        lines += ["", "![training loss](loss.png)"]
    lines += ["", "![accuracy and KL by model](models.png)", ""]
    atomic.write_text(out_dir / "report.md", "\n".join(lines))
    atomic.write_json(out_dir / "report.json", {
        "accuracy": [asdict(a) for a in run.accuracy],
        "fidelity": [asdict(f) for f in run.fidelity],
        "paired_tests": tests,
        "extra": extra or {},
        **provenance(),
    })
    _plot(run, curve, out_dir)
    return out_dir / "report.md"


def _plot(run: EvalRun, curve: list[dict], out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if curve:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        steps = [m["step"] for m in curve]
        for key in ("loss", "kl", "ce"):
            if all(key in m for m in curve):
                ax.plot(steps, [m[key] for m in curve], label=key)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("per response token")
        ax.set_title("training")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=120)
        plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    labels = [f"{a.tag}\n{a.shots}-shot" for a in run.accuracy]
    xs = range(len(labels))
    for offset, filt in ((-0.2, "strict"), (0.2, "flexible")):
        values = [100 * getattr(a, filt) for a in run.accuracy]
        lo = [100 * (getattr(a, filt) - getattr(a, f"{filt}_ci95")[0]) for a in run.accuracy]
        hi = [100 * (getattr(a, f"{filt}_ci95")[1] - getattr(a, filt)) for a in run.accuracy]
        axes[0].bar([x + offset for x in xs], values, width=0.4, yerr=[lo, hi], capsize=3, label=filt)
    axes[0].set_xticks(list(xs), labels, fontsize=8)
    axes[0].set_ylabel("GSM8K accuracy (%)")
    axes[0].legend()
    if run.fidelity:
        axes[1].bar([f.tag for f in run.fidelity], [f.kl for f in run.fidelity])
        axes[1].set_ylabel("held-out KL(teacher‖model), nats/token")
    axes[1].set_title("fidelity to the teacher")
    fig.tight_layout()
    fig.savefig(out_dir / "models.png", dpi=120)
    plt.close(fig)
