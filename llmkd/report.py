"""The main job's report: teacher, quantised base and distilled student side by side, with paired tests.

It leads with what distillation moves: fidelity to the teacher (held-out KL and top-1 agreement)
and generation agreement (does the student say what the teacher says?), base against distilled,
the teacher being the reference. Accuracy follows: for a small model it often sits at the floor.

Every difference between two models on the same questions is tested with the exact McNemar test
(only the questions where the two disagree carry information): accuracy between every two models,
answer agreement with the teacher between base and distilled. A difference is marked significant
only at p < 0.05.

Writes `report.md` (tables), `report.json` (the same numbers), `loss.png` (training loss, one axis
per part) and `models.png` (fidelity, agreement and, unless every model is at 0%, accuracy).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from itertools import combinations
from pathlib import Path

from llmkd import atomic
from llmkd.agreement import FILTERS, agreement_table
from llmkd.evaluate import EvalRun, accuracy_table
from llmkd.fidelity import fidelity_table, gap_closed_table
from llmkd.lm_eval_tasks import paired_task_tests, tasks_table
from llmkd.stats import mcnemar_exact
from llmkd.provenance import provenance

BASE = "student"  # the tag of the quantised base (the student without its adapter)
LABELS = {"teacher": "teacher", BASE: "base", "distilled": "distilled"}
COLORS = {"teacher": "0.55", BASE: "tab:orange", "distilled": "tab:blue"}


def paired_tests(run: EvalRun) -> list[dict]:
    """McNemar between every two models at each shot count, for both answer filters."""
    rows = []
    shots = sorted({a.shots for a in run.accuracy})
    for k in shots:
        tags = [a.tag for a in run.accuracy if a.shots == k]
        for a, b in combinations(tags, 2):
            sa, sb = run.samples[a, k], run.samples[b, k]
            assert [s["id"] for s in sa] == [s["id"] for s in sb], "models were scored on different questions"
            for filt in FILTERS:
                test = mcnemar_exact([s[f"{filt}_correct"] for s in sa], [s[f"{filt}_correct"] for s in sb])
                diff = (sum(s[f"{filt}_correct"] for s in sb) - sum(s[f"{filt}_correct"] for s in sa)) / len(sa)
                rows.append({"shots": k, "filter": filt, "a": a, "b": b, "b_minus_a": diff, **test})
    return rows


def agreement_tests(run: EvalRun) -> list[dict]:
    """Answer agreement with the teacher, base (a) against each other model (b), per shot count and filter."""
    base = {g.shots: g for g in run.agreement if g.tag == BASE}
    rows = []
    for g in run.agreement:
        for filt, test in g.vs_base.items():
            diff = getattr(g, f"{filt}_answer_agreement") - getattr(base[g.shots], f"{filt}_answer_agreement")
            rows.append({"shots": g.shots, "filter": filt, "a": BASE, "b": g.tag, "b_minus_a": diff, **test})
    return rows


def at_floor(run: EvalRun) -> bool:
    """Every model scores 0% under both filters: accuracy bars would be empty."""
    return bool(run.accuracy) and all(a.strict == 0 and a.flexible == 0 for a in run.accuracy)


def _loss_curve(metrics_path: Path | None) -> list[dict]:
    if metrics_path is None or not metrics_path.exists():
        return []
    return [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]


def write_report(run: EvalRun, out_dir: Path, *, train_metrics: Path | None = None,
                 extra: dict | None = None, quant: str = "nf4") -> Path:
    """`quant`: the student's quantizer (model.quant), as the base is named."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tests = paired_tests(run)
    agreeing = agreement_tests(run)
    curve = _loss_curve(train_metrics)
    lines = ["# llmkd report"]
    if run.data:
        lines += ["", f"Data: {data_line(run.data)}. Student: the teacher's {quant} copy (base) and that copy with "
                  "the distilled adapter."]
    if run.fidelity:
        lines += ["", "## Fidelity to the teacher (held-out responses, teacher-forced)", "",
                  "The teacher's KL to itself is 0 and its top-1 agreement 100%.", "", fidelity_table(run.fidelity)]
        gaps = gap_closed_table(run.fidelity)
        if gaps:
            lines += ["", f"Gap closed: the share of the {quant} base's KL the adapter wins back, 1 - KL(distilled) / "
                      "KL(base), on each text:", "", gaps]
    if run.agreement:
        lines += ["", "## Generation agreement with the teacher (greedy, same prompts)", "",
                  "Identical outputs, the common token prefix (the teacher's own output length in brackets) "
                  "and the same final answer as the teacher; the teacher agrees with itself 100%.", "",
                  agreement_table(run.agreement)]
        if agreeing:
            lines += ["", "Answer agreement with the teacher, base → distilled (exact McNemar, same questions):", "",
                      *_test_table(agreeing, "a-only / b-only agreeing")]
    if run.accuracy:
        lines += ["", "## GSM8K accuracy", ""]  # the only task with an answer extractor
        if at_floor(run):
            lines += ["Every model scores 0% under both filters: accuracy cannot separate them here "
                      "(see fidelity and agreement above).", ""]
        lines += [accuracy_table(run)]
    if tests:
        lines += ["", "Paired accuracy differences (exact McNemar, same questions):", "",
                  *_test_table(tests, "a-only / b-only correct")]
    task_tests = paired_task_tests(run.task_documents)
    if run.tasks:
        lines += ["", "## lm-eval tasks (eval.tasks)", "", "Each model on each task with llmkd's decoding (greedy) "
                  "and BOS rule; value ± lm-eval's stderr.", "", tasks_table(run.tasks)]
    if task_tests:
        lines += ["", "Paired differences on the same documents, base → each model (exact McNemar):", "",
                  "| task | metric | a → b | b − a | a-only / b-only | p | |", "|---|---|---|---:|---|---:|---|",
                  *(f"| {t['task']} | {t['metric']} | {t['a']} → {t['b']} | {100 * t['b_minus_a']:+.1f} pts | "
                    f"{t['only_a']} / {t['only_b']} | {t['p_value']:.3g} | "
                    f"{'significant' if t['p_value'] < 0.05 else 'within noise'} |" for t in task_tests)]
    for key, value in (extra or {}).items():
        lines += ["", f"## {key}", "", str(value)]
    figures = _plot(run, curve, out_dir)
    if "loss.png" in figures:
        lines += ["", "![training loss, one axis per part](loss.png)"]
    if "models.png" in figures:
        lines += ["", "![fidelity, agreement and accuracy by model](models.png)"]
    atomic.write_text(out_dir / "report.md", "\n".join(lines) + "\n")
    atomic.write_json(out_dir / "report.json", {
        "fidelity": [asdict(f) for f in run.fidelity],
        "agreement": [asdict(g) for g in run.agreement],
        "agreement_tests": agreeing,
        "accuracy": [asdict(a) for a in run.accuracy],
        "accuracy_at_floor": at_floor(run),
        "paired_tests": tests,
        "tasks": [asdict(t) for t in run.tasks],
        "task_tests": task_tests,
        "data": run.data,
        "quant": quant,
        "extra": extra or {},
        **provenance(),
    })
    return out_dir / "report.md"


def data_line(data: dict) -> str:
    """The evaluated data in one line: source, format, rows, content hash."""
    if data.get("format") in (None, "gsm8k"):
        return f"GSM8K ({data['source']}), {data.get('questions', '?')} question(s) generated on"
    skipped = sum((data.get("skipped") or {}).values())
    return (f"{data['source']} ({data['format']}), {data['conversations']} held-out conversation(s), "
            f"{data['examples']} response(s), content sha256 {data['content_sha256'][:12]}"
            + (f", {skipped} bad row(s) skipped" if skipped else ""))


def _test_table(tests: list[dict], counts: str) -> list[str]:
    lines = [f"| shots | filter | a → b | b − a | {counts} | p | |", "|---:|---|---|---:|---|---:|---|"]
    for t in tests:
        mark = "significant" if t["p_value"] < 0.05 else "within noise"
        lines.append(f"| {t['shots']} | {t['filter']} | {t['a']} → {t['b']} | {100 * t['b_minus_a']:+.1f} pts | "
                     f"{t['only_a']} / {t['only_b']} | {t['p_value']:.3g} | {mark} |")
    return lines


# --- Figures ------------------------------------------------------------------------------------


def _plot(run: EvalRun, curve: list[dict], out_dir: Path) -> list[str]:
    """Write loss.png (if there is a curve) and models.png (if there is anything to draw); their names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    parts = [key for key in ("loss", "kl", "ce") if curve and all(key in m for m in curve)]
    if parts:
        fig, axes = plt.subplots(1, len(parts), figsize=(3.6 * len(parts), 3.2), squeeze=False)
        steps = [m["step"] for m in curve]
        for ax, key in zip(axes[0], parts):  # each part on its own scale
            ax.plot(steps, [m[key] for m in curve])
            ax.set_title(key)
            ax.set_xlabel("optimizer step")
        axes[0][0].set_ylabel("per response token (nats)")
        fig.suptitle("training")
        fig.tight_layout()
        fig.savefig(out_dir / "loss.png", dpi=120)
        plt.close(fig)
        written.append("loss.png")

    panels = []
    if run.fidelity:
        panels += [_kl_panel, _top1_panel]
    if run.agreement:
        panels += [_agreement_panel, _prefix_panel]
    if run.accuracy and not at_floor(run):
        panels.append(_accuracy_panel)
    if not panels:
        return written
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.8 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        panel(ax, run)
    for ax in list(axes.flat)[len(panels):]:
        ax.remove()
    drawn = [f.tag for f in run.fidelity] + [g.tag for g in run.agreement]
    drawn += [a.tag for a in run.accuracy] if _accuracy_panel in panels else []
    tags = list(dict.fromkeys(sorted(drawn, key=lambda t: list(COLORS).index(t) if t in COLORS else len(COLORS))))
    handles = [plt.Rectangle((0, 0), 1, 1, color=_color(t)) for t in tags]
    fig.legend(handles, [LABELS.get(t, t) for t in tags], loc="upper center", ncol=len(tags), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))  # the legend above the panels, over no bar
    fig.savefig(out_dir / "models.png", dpi=120)
    plt.close(fig)
    written.append("models.png")
    return written


def _color(tag: str) -> str:
    return COLORS.get(tag, "tab:green")


def _reference(ax, y: float, text: str, x0: float | None = None, x1: float | None = None) -> None:
    """The teacher's value as a dashed line (across the axis, or from x0 to x1), named in place."""
    if x0 is None:
        ax.axhline(y, color="0.3", linestyle="--", linewidth=1)
        ax.annotate(text, (1, y), xycoords=("axes fraction", "data"), xytext=(-2, 2), textcoords="offset points",
                    ha="right", va="bottom", fontsize=7, color="0.3")
    else:
        ax.hlines(y, x0, x1, color="0.3", linestyle="--", linewidth=1)
        ax.annotate(text, (x1, y), xytext=(0, 2), textcoords="offset points", ha="right", va="bottom",
                    fontsize=7, color="0.3")


def _fidelity_cells(run: EvalRun):
    """(tags, renderings, value lookup) of the fidelity rows: one bar group per rendering."""
    tags = list(dict.fromkeys(f.tag for f in run.fidelity))
    renderings = list(dict.fromkeys(f.rendering for f in run.fidelity))
    cell = {(f.tag, f.rendering): f for f in run.fidelity}
    names = [{"llmkd": "in-format", "plain_chat": "off-format"}.get(r, r) for r in renderings]
    return tags, renderings, cell, names


def _kl_panel(ax, run: EvalRun) -> None:
    tags, renderings, cell, names = _fidelity_cells(run)
    _grouped(ax, names, tags, lambda tag, i: cell[tag, renderings[i]].kl if (tag, renderings[i]) in cell else 0.0,
             fmt="%.3f")
    _reference(ax, 0.0, "teacher = 0")
    ax.set_ylim(0, 1.2 * max(f.kl for f in run.fidelity) or 1)
    ax.set_ylabel("nats / response token")
    ax.set_title("held-out KL(teacher‖model), lower is better", fontsize=9)


def _top1_panel(ax, run: EvalRun) -> None:
    tags, renderings, cell, names = _fidelity_cells(run)
    _grouped(ax, names, tags,
             lambda tag, i: 100 * cell[tag, renderings[i]].top1_agreement if (tag, renderings[i]) in cell else 0.0)
    _reference(ax, 100.0, "teacher = 100%")
    ax.set_ylim(0, 112)
    ax.set_ylabel("% of response tokens")
    ax.set_title("held-out top-1 agreement with the teacher", fontsize=9)


def _grouped(ax, groups: list[str], tags: list[str], value, fmt: str = "%.1f") -> list[float]:
    """Bars of `value(tag, group_index)` for each tag side by side in each group; the group centres."""
    width = 0.8 / len(tags)
    xs = list(range(len(groups)))
    for j, tag in enumerate(tags):
        offsets = [x - 0.4 + width * (j + 0.5) for x in xs]
        bars = ax.bar(offsets, [value(tag, i) for i in xs], width=width, color=_color(tag))
        ax.bar_label(bars, fmt=fmt, fontsize=7)
    ax.set_xticks(xs, groups, fontsize=8)
    return xs


def _agreement_panel(ax, run: EvalRun) -> None:
    tags = list(dict.fromkeys(g.tag for g in run.agreement))
    shots = sorted({g.shots for g in run.agreement})
    cell = {(g.tag, g.shots): g for g in run.agreement}
    measures = [("exact_match", "same output")]
    if all(g.strict_answer_agreement is not None for g in run.agreement):  # an answer extractor ran (GSM8K)
        measures += [("strict_answer_agreement", "answer\nstrict"), ("flexible_answer_agreement", "answer\nflexible")]
    groups = [(k, attr, name) for k in shots for attr, name in measures]
    many = len(shots) > 1

    def value(tag, i):
        k, attr, _ = groups[i]
        g = cell.get((tag, k))
        return 100 * getattr(g, attr) if g else 0.0

    _grouped(ax, [f"{name}\n{k}-shot" if many else name for k, _, name in groups], tags, value)
    _reference(ax, 100.0, "teacher = 100%")
    ax.set_ylim(0, 112)
    ax.set_ylabel("% of questions")
    ax.set_title("generation agreement with the teacher", fontsize=9)


def _prefix_panel(ax, run: EvalRun) -> None:
    tags = list(dict.fromkeys(g.tag for g in run.agreement))
    shots = sorted({g.shots for g in run.agreement})
    cell = {(g.tag, g.shots): g for g in run.agreement}

    def value(tag, i):
        g = cell.get((tag, shots[i]))
        return g.prefix_tokens_mean if g else 0.0

    xs = _grouped(ax, [f"{k}-shot" for k in shots], tags, value)
    for x, k in zip(xs, shots):  # the teacher's prefix with itself is its whole output
        teacher_len = next(g.teacher_tokens_mean for g in run.agreement if g.shots == k)
        _reference(ax, teacher_len, f"teacher {teacher_len:.0f}", x - 0.4, x + 0.4)
    top = max([g.teacher_tokens_mean for g in run.agreement] + [g.prefix_tokens_mean for g in run.agreement])
    ax.set_ylim(0, 1.15 * top or 1)
    ax.set_ylabel("tokens (mean)")
    ax.set_title("common prefix with the teacher's output", fontsize=9)


def _accuracy_panel(ax, run: EvalRun) -> None:
    xs = range(len(run.accuracy))
    for offset, filt, hatch in ((-0.2, "strict", None), (0.2, "flexible", "//")):
        values = [100 * getattr(a, filt) for a in run.accuracy]
        lo = [100 * (getattr(a, filt) - getattr(a, f"{filt}_ci95")[0]) for a in run.accuracy]
        hi = [100 * (getattr(a, f"{filt}_ci95")[1] - getattr(a, filt)) for a in run.accuracy]
        bars = ax.bar([x + offset for x in xs], values, width=0.4, yerr=[lo, hi], capsize=3, hatch=hatch,
                      color=[_color(a.tag) for a in run.accuracy], edgecolor="white")
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=2)
    ax.set_xticks(list(xs), [f"{LABELS.get(a.tag, a.tag)}\n{a.shots}-shot" for a in run.accuracy], fontsize=8)
    ax.set_ylabel("% of questions (95% CI)")
    ax.set_title("GSM8K accuracy: strict plain, flexible hatched", fontsize=9)
