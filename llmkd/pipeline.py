"""The main job, `llmkd run`: build the transfer set -> train -> evaluate three models -> report.

Each stage reuses what is finished: the transfer set by its settings (`builder.build` returns a
complete set of the same settings), training from its newest complete checkpoint (or the finished
adapter), evaluation and the report are redone. Outputs go where the recipe's layout says.

Under `accelerate launch --multi_gpu -m llmkd run` every process builds its share of the transfer set
and trains; then the main process alone evaluates and reports (evaluation runs in one process), and
the others end.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from llmkd import builder, checkpoint, launch, report, train, transfer_set
from llmkd.config import Recipe
from llmkd.evaluate import format_table, run_eval


def run(recipe: Recipe, *, progress: bool = True, say: Callable[[str], None] = print) -> Path | None:
    """Run the main job of `recipe`; returns the report's path (None on a process other than the main one)."""
    layout = recipe.layout
    main = launch.is_main_process()
    if not main:
        say = _silent
    say(f"[1/4] transfer set -> {layout.transfer_set}")
    manifest = builder.build(recipe, progress=progress)
    say("\n".join(transfer_set.summary_lines(manifest)))
    say(f"[2/4] training -> {layout.train}")
    resume = checkpoint.latest(layout.checkpoints) is not None
    result = train.train(recipe, resume=resume, progress=progress)
    say(train.summary_line(result))
    if not main:
        return None
    say(f"[3/4] evaluating teacher, {recipe.model.quant} base student and distilled student")
    evaluation = run_eval(recipe, shots=recipe.eval.shots, tags=["teacher", "student", "distilled"],
                          adapter=result.adapter, with_fidelity=True, out_dir=layout.eval, progress=progress)
    say(format_table(evaluation))
    say("[4/4] report")
    path = report.write_report(evaluation, layout.report, train_metrics=layout.metrics, quant=recipe.model.quant,
                               extra={"Training": train.summary_line(result),
                                      "Transfer set": "\n".join(transfer_set.summary_lines(manifest))})
    say(f"written: {path}")
    return path


def _silent(_: str) -> None:
    pass
