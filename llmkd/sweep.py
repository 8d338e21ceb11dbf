"""`llmkd sweep RECIPE --quant nf4,fp4,int8,hqq2,hqq3,hqq4,hqq8`: the bit-width frontier.

One transfer set (it depends only on the teacher) and one teacher evaluation serve every point. A
point is the recipe with `model.quant` set, run as its own recipe `<name>-<quant>` (outputs under
runs/<name>-<quant>/): train, then score the quantised base (PTQ) and the distilled student, with
fidelity and generation agreement. A finished point records its settings and figures in
`runs/<name>-<quant>/sweep-point.json` and is reused while its settings stay the same; a killed
point resumes its training from its newest checkpoint. The sweep's own outputs go to
runs/<name>/sweep/: sweep.json, sweep.md and frontier.png.

With `sweep.baseline`, every point trains a second student with the baseline's overrides (plain KD,
say) on the same transfer set, run as `<name>-<quant>-<baseline>`, scored against the same base without
scoring that base again: sweep.md then shows the recipe's gap closed beside the baseline's.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Sequence

from pydantic import ValidationError

from llmkd import atomic, builder, checkpoint, models, plan, quantize, train
from llmkd.config import Recipe, apply_override, describe
from llmkd.errors import LlmkdError
from llmkd.data.prompts import DATA_RENDERING
from llmkd.evaluate import run_eval
from llmkd.fidelity import TeacherLogits
from llmkd.provenance import provenance

POINT_FILE = "sweep-point.json"


def parse_quants(text: str) -> list[str]:
    quants = [q.strip() for q in text.split(",") if q.strip()]
    unknown = [q for q in quants if q not in quantize.QUANTIZERS]
    if unknown or not quants:
        raise LlmkdError(f"--quant: unknown quantizer {unknown[0] if unknown else text!r}; "
                         f"choose from {','.join(quantize.QUANTIZERS)}")
    return list(dict.fromkeys(quants))


def point_recipe(recipe: Recipe, quant: str, baseline: bool = False) -> Recipe:
    """The recipe of one point: its own name (so its own train/eval folders), the sweep's transfer set,
    and its `sweep.point_overrides`; with `baseline`, `sweep.baseline`'s overrides and point overrides
    instead. The point's recipe holds no sweep section: its settings are its own."""
    raw = recipe.model_dump(exclude={"sweep"})
    raw["name"] = f"{recipe.name}-{quant}"
    raw["model"]["quant"] = quant
    raw["transfer_set"]["out"] = str(recipe.layout.transfer_set)
    raw["train"]["out"] = None
    where, items = "sweep.point_overrides", recipe.sweep.point_overrides.get(quant, [])
    if baseline:
        raw["name"] += f"-{recipe.sweep.baseline.name}"
        where, items = "sweep.baseline", [*recipe.sweep.baseline.overrides,
                                         *recipe.sweep.baseline.point_overrides.get(quant, [])]
    for item in items:
        try:
            apply_override(raw, item, Recipe)
        except LlmkdError as e:
            raise LlmkdError(f"{where}.{quant}: {e}") from None
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise LlmkdError(f"{where}.{quant}: {describe(e)}") from None


def dry_run(recipe: Recipe, quants: Sequence[str], processes: int = 1) -> str:
    """Each point's training memory plan, loading no weights."""
    gib = 2**30
    lines = [f"llmkd sweep --dry-run: {recipe.model.name}, nothing loaded, nothing written", "",
             f"| quant | bits | quantised weights GiB | estimated training peak GiB per process (of {processes}, "
             f"sharding {recipe.train.sharding}) |", "|---|---:|---:|---:|"]
    for q in quants:
        point = point_recipe(recipe, q)
        model_plan = plan.plan_model(point)
        lines.append(f"| {q} | {quantize.QUANTIZERS[q].bits} | {model_plan.quantized_bytes / gib:.2f} | "
                     f"{plan.estimated_peak_bytes(point, model_plan, processes) / gib:.2f} |")
    lines += ["", "each point's full plan: llmkd train RECIPE model.quant=QUANT --dry-run"]
    return "\n".join(lines)


def run(recipe: Recipe, quants: Sequence[str], *, progress: bool = True, say: Callable[[str], None] = print) -> Path:
    """Every point of the sweep (reusing finished ones); returns sweep.md's path."""
    if "llmkd" not in recipe.eval.fidelity_renderings:
        raise LlmkdError("eval.fidelity_renderings: a sweep compares points in-format, so it must include llmkd")
    out = recipe.layout.sweep
    baseline = recipe.sweep.baseline
    # A bad override fails before any work.
    point_recipes = [(point_recipe(recipe, q), point_recipe(recipe, q, baseline=True) if baseline else None)
                     for q in quants]
    say(f"[sweep] transfer set -> {recipe.layout.transfer_set}")
    builder.build(recipe, progress=progress)
    teacher_eval = out / "teacher"
    say(f"[sweep] teacher -> {teacher_eval}")
    teacher_run = run_eval(recipe, shots=recipe.eval.shots, tags=["teacher"], out_dir=teacher_eval,
                           progress=progress, teacher_from=teacher_eval)
    points = []
    teacher_logits = TeacherLogits()  # every point is scored on the same held-out batches
    for i, (q, (point, beside)) in enumerate(zip(quants, point_recipes), 1):
        say(f"[sweep {i}/{len(quants)}] {q}")
        points.append(run_point(point, teacher_eval, teacher_logits, progress=progress, say=say))
        if beside is not None:
            say(f"[sweep {i}/{len(quants)}] {q}, {baseline.name}")
            figures = run_point(beside, teacher_eval, teacher_logits, progress=progress, say=say, base=points[-1])
            points[-1] = points[-1] | {"baseline": figures | {"method": baseline.name}}
    teacher = _teacher_figures(recipe, teacher_run)
    lengths = [p["distilled"]["teacher_tokens_mean"] for p in points if "teacher_tokens_mean" in p["distilled"]]
    if lengths:  # the teacher's common prefix with itself is its whole output
        teacher["gen_prefix_mean"] = lengths[0]
    result = {
        "points": points,
        "teacher": teacher,
        "recipe": recipe.model_dump(),
        **provenance(),
    }
    atomic.write_json(out / "sweep.json", result)
    atomic.write_text(out / "sweep.md", format_sweep(result))
    _plot(result, out / "frontier.png")
    say(format_sweep(result))
    say(f"written: {out / 'sweep.md'}")
    return out / "sweep.md"


def finished_point(point: Recipe) -> dict | None:
    """The recorded figures of `point` if it finished with exactly these settings, else None."""
    try:
        done = json.loads((point.layout.run / POINT_FILE).read_text())
        return done["point"] if done["settings"] == json.loads(json.dumps(point.flat())) else None
    except (OSError, ValueError, KeyError):
        return None


def run_point(point: Recipe, teacher_eval: Path, teacher_logits: TeacherLogits, *, progress: bool,
              say: Callable[[str], None], base: dict | None = None) -> dict:
    """Train and score one point. With `base` (a baseline beside the point `base`), the quantised base
    is not scored again: its figures are `base`'s, and the gaps closed are measured against them."""
    marker = point.layout.run / POINT_FILE
    settings = point.flat()
    done = finished_point(point)
    if done is not None:
        say(f"  finished earlier: {marker}")
        return done
    resume = checkpoint.latest(point.layout.checkpoints) is not None
    trained = train.train(point, resume=resume, progress=progress)
    say("  " + train.summary_line(trained))
    start = time.perf_counter()
    evaluation = run_eval(point, shots=point.eval.shots, tags=["teacher", "distilled"] if base else
                          ["teacher", "student", "distilled"], adapter=trained.adapter, with_fidelity=True,
                          out_dir=point.layout.eval, progress=progress, teacher_from=teacher_eval,
                          teacher_logits=teacher_logits)
    figures = point_figures(point, evaluation, trained, time.perf_counter() - start, base=base and base["base"])
    if base:  # the base's own figures stay in the point beside it
        figures = {k: v for k, v in figures.items() if k not in ("base", "weight_bytes", "quantized_linear_bytes")}
    atomic.write_json(marker, {"settings": settings, "point": figures})
    return figures


def _model_figures(evaluation, tag: str) -> dict:
    cells = {f.rendering: f for f in evaluation.fidelity if f.tag == tag}
    trained_on = cells.get("llmkd") or cells[DATA_RENDERING]  # in-format: the training format
    figures = {"kl": trained_on.kl, "top1": trained_on.top1_agreement}
    if "plain_chat" in cells:
        figures.update(kl_off_format=cells["plain_chat"].kl, top1_off_format=cells["plain_chat"].top1_agreement)
    figures["fidelity"] = {r: {"kl": f.kl, "top1": f.top1_agreement} for r, f in cells.items()}  # every rendering
    agreement = [g for g in evaluation.agreement if g.tag == tag]
    if agreement:  # the lowest shot count the teacher was scored at
        g = agreement[0]
        figures.update(gen_shots=g.shots, gen_exact=g.exact_match, gen_prefix_mean=g.prefix_tokens_mean,
                       gen_prefix_median=g.prefix_tokens_median, teacher_tokens_mean=g.teacher_tokens_mean,
                       answer_agreement_flexible=g.flexible_answer_agreement,
                       answer_agreement_strict=g.strict_answer_agreement)
    accuracy = [a for a in evaluation.accuracy if a.tag == tag]
    figures["accuracy"] = {f"{a.shots}shot": {"strict": a.strict, "flexible": a.flexible} for a in accuracy}
    figures["eval_tokens_per_s"] = accuracy[0].tokens_per_s if accuracy else None
    return figures


def point_figures(point: Recipe, evaluation, trained, eval_seconds: float, base: dict | None = None) -> dict:
    q = quantize.quantizer(point.model)
    held = evaluation.student_quantization["weight_bytes"]
    base = base or _model_figures(evaluation, "student")
    distilled = _model_figures(evaluation, "distilled")
    agreement = next((g for g in evaluation.agreement if g.tag == "distilled"), None)
    return {
        "quant": q.name, "bits": q.bits, "name": point.name,
        "weight_bytes": held["total"], "quantized_linear_bytes": held["quantized_linears"],
        "load_seconds": evaluation.student_load_seconds,
        "train_tokens_per_s": trained.tokens_per_s, "train_seconds": trained.seconds, "eval_seconds": round(eval_seconds, 1),
        "init_seconds": json.loads(point.layout.lora_init.read_text())["seconds"] if point.layout.lora_init.is_file() else 0.0,
        "base": base, "distilled": distilled,
        "gap_closed": 1 - distilled["kl"] / base["kl"] if base["kl"] > 0 else None,
        "gap_closed_off_format": 1 - distilled["kl_off_format"] / base["kl_off_format"]
        if base.get("kl_off_format") else None,
        "answer_agreement_vs_base": agreement.vs_base if agreement else None,
    }


def _teacher_figures(recipe: Recipe, teacher_run) -> dict:
    model_plan = plan.plan_model(recipe)  # parameter count without loading; teacher bytes = params x dtype
    dtype = models.teacher_dtype(recipe.model)
    return {
        "kl": 0.0, "top1": 1.0, "gen_exact": 1.0, "dtype": str(dtype).removeprefix("torch."),
        "weight_bytes": model_plan.total_params * dtype.itemsize,
        "accuracy": {f"{a.shots}shot": {"strict": a.strict, "flexible": a.flexible} for a in teacher_run.accuracy},
    }


def format_sweep(result: dict) -> str:
    t = result["teacher"]
    lines = [
        "# Bit-width frontier", "",
        f"Teacher: {result['recipe']['model']['name']} ({t['dtype']}, {t['weight_bytes'] / 2**20:.0f} MiB of weights).",
        "Held-out fidelity: per-token KL(teacher || model) and top-1 agreement, teacher-forced "
        + ("in llmkd's prompt format (off-format: the bare question with GSM8K's answer as shipped)"
           if Recipe.model_validate(result["recipe"]).data.is_gsm8k else
           f"on the held-out rows of {result['recipe']['data']['source']}")
        + "; generation: greedy outputs against the teacher's on the evaluation prompts.", "",
        "| quant | bits | MiB held | base KL | distilled KL | gap closed | off-format gap closed | base top-1 | "
        "distilled top-1 | base gen prefix | distilled gen prefix | base exact | distilled exact | train s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for p in result["points"]:
        b, d = p["base"], p["distilled"]
        lines.append(
            f"| {p['quant']} | {p['bits']} | {p['weight_bytes'] / 2**20:.0f} | {b['kl']:.4f} | {d['kl']:.4f} | "
            f"{_share(p['gap_closed'])} | {_share(p.get('gap_closed_off_format'))} | "
            f"{100 * b['top1']:.1f}% | {100 * d['top1']:.1f}% | {b.get('gen_prefix_mean', float('nan')):.1f} | "
            f"{d.get('gen_prefix_mean', float('nan')):.1f} | {100 * b.get('gen_exact', 0):.0f}% | "
            f"{100 * d.get('gen_exact', 0):.0f}% | {p.get('init_seconds', 0) + p['train_seconds']:.0f} |")
    beside = [p for p in result["points"] if "baseline" in p]
    if beside:
        name = beside[0]["baseline"]["method"]
        lines += ["", f"Beside it, `{name}` (sweep.baseline: {', '.join(result['recipe']['sweep']['baseline']['overrides'])})"
                  " on the same transfer set, against the same base:", "",
                  f"| quant | gap closed: recipe | {name} | off-format: recipe | {name} | distilled top-1: recipe | "
                  f"{name} | gen prefix: recipe | {name} | train s: recipe | {name} |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for p in beside:
            d, o = p["distilled"], p["baseline"]
            lines.append(
                f"| {p['quant']} | {_share(p['gap_closed'])} | {_share(o['gap_closed'])} | "
                f"{_share(p.get('gap_closed_off_format'))} | {_share(o.get('gap_closed_off_format'))} | "
                f"{100 * d['top1']:.1f}% | {100 * o['distilled']['top1']:.1f}% | "
                f"{d.get('gen_prefix_mean', float('nan')):.1f} | {o['distilled'].get('gen_prefix_mean', float('nan')):.1f} | "
                f"{p.get('init_seconds', 0) + p['train_seconds']:.0f} | {o.get('init_seconds', 0) + o['train_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sorted(result["points"], key=lambda p: (p["bits"], p["weight_bytes"]))
    if not points:
        return
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    panels = [("bits", "bits per weight", "kl", "held-out KL(teacher‖model), nats/token", 0.0),
              ("bits", "bits per weight", "top1", "top-1 agreement with the teacher", 1.0),
              ("weight_bytes", "model bytes held (MiB)", "kl", "held-out KL(teacher‖model), nats/token", 0.0)]
    for ax, (xkey, xlabel, ykey, ylabel, teacher) in zip(axes, panels):
        xs = [p[xkey] / 2**20 if xkey == "weight_bytes" else p[xkey] for p in points]
        for which, marker in (("base", "o"), ("distilled", "s")):
            ys = [p[which][ykey] for p in points]
            ax.scatter(xs, ys, marker=marker, label="PTQ base" if which == "base" else "distilled")
            for x, y, p in zip(xs, ys, points):
                ax.annotate(p["quant"], (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        beside = [(x, p["baseline"]) for x, p in zip(xs, points) if "baseline" in p]
        if beside:
            ax.scatter([x for x, _ in beside], [b["distilled"][ykey] for _, b in beside], marker="^",
                       label=f"distilled, {beside[0][1]['method']}")
        ax.axhline(teacher, color="grey", linestyle="--", linewidth=1)
        ax.text(ax.get_xlim()[0], teacher, " teacher", va="bottom", fontsize=8, color="grey")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    axes[0].legend(loc="upper right", fontsize=8)
    fig.suptitle("bit-width frontier: quantised base vs distilled student")
    fig.tight_layout()
    with atomic.open_for_write(path) as f:
        fig.savefig(f, dpi=120, format="png")
    plt.close(fig)
