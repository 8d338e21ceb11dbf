"""Evaluation speed: llmkd's evaluator vs lm-eval's HF backend on the same questions and prompts.

    python benchmarks/bench_eval.py                       # teacher, 0-shot x8 and 8-shot x8 questions, 96 new tokens
    python benchmarks/bench_eval.py --student             # the NF4 student instead

Both generate greedily with the same model object, batch size, stop strings and token budget:

  llmkd    `llmkd.generation.generate`: one batch per `--batch-size` questions, the k-shot exemplars'
           keys and values computed once and shared by every row (`llmkd.fastpath.shared_prefix`).
  plain    the same function with sharing off: what batched `generate` costs without it.
  lm-eval  `lm_eval.simple_evaluate` with `HFLM(pretrained=model)` on a task generated from our prompt
           module (`llmkd.lm_eval_backend`), i.e. the harness's own batching, stopping and filters.

Reported per shot count: generated tokens/s (kept tokens, i.e. up to the stop string, counted with
the model's tokenizer for all three), the speed-up of llmkd over each, and how many questions got
the same flexible-extracted answer as llmkd (near-ties in floating point can flip a greedy token).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/smollm2-cpu.yaml")
    parser.add_argument("--student", action="store_true", help="time the NF4 student instead of the teacher")
    parser.add_argument("--questions", type=int, nargs=2, default=(8, 8), metavar=("ZERO_SHOT", "EIGHT_SHOT"),
                        help="test questions for 0-shot and 8-shot (default 8 8)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    return parser


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    from llmkd import config, models
    from llmkd.data import answer, prompts
    from llmkd.evaluate import eval_questions, exemplars
    from llmkd.generation import generate
    from llmkd.lm_eval_backend import run_lm_eval

    recipe = config.load_recipe(args.recipe)
    tokenizer = models.load_tokenizer(recipe.model)
    model = models.load_student(recipe.model) if args.student else models.load_teacher(recipe.model)
    name = "NF4 student" if args.student else f"teacher ({models.teacher_dtype(recipe.model)})".replace("torch.", "")
    print(f"## Evaluation: llmkd vs lm-eval HF backend ({recipe.model.name}, {name})\n")
    print(f"Greedy, batch {args.batch_size}, up to {args.max_new_tokens} new tokens, chat template, "
          "stop strings of `llmkd.data.prompts`; tokens/s counts the tokens kept up to the stop.\n")
    # Warm-up (first-call allocations, thread start-up), so that the variant timed first is not penalised.
    generate(model, tokenizer, [prompts.render_prompt(tokenizer, "What is 1 + 1?")], batch_size=1,
             max_new_tokens=8, progress=False)
    print("| shots | questions | prompt tokens | llmkd tok/s | plain generate tok/s | lm-eval tok/s "
          "| llmkd / plain | llmkd / lm-eval | same answer as llmkd (plain, lm-eval) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for shots, n in zip((0, 8), args.questions):
        rows = eval_questions(recipe, n)
        shot_rows = exemplars(recipe, shots)
        texts = [prompts.render_prompt(tokenizer, r["question"], shot_rows) for r in rows]
        prompt_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts) // len(texts)
        runs = {}
        for variant, share in (("llmkd", True), ("plain", False)):
            done, stats = generate(model, tokenizer, texts, batch_size=args.batch_size,
                                   max_new_tokens=args.max_new_tokens, stop_strings=prompts.STOP_STRINGS,
                                   share_prefix=share, progress=False)
            runs[variant] = ([c.text for c in done], stats.seconds)
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            lm = run_lm_eval(model, tokenizer, rows, shot_rows, batch_size=args.batch_size,
                             max_new_tokens=args.max_new_tokens, workdir=Path(tmp))
            runs["lm-eval"] = ([s["output"] for s in lm.samples], time.perf_counter() - start)
        speed, answers = {}, {}
        for variant, (outputs, seconds) in runs.items():
            # Both cut their outputs at the stop strings already.
            tokens = sum(len(tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outputs)
            speed[variant] = tokens / seconds
            answers[variant] = [answer.extract_flexible(o) for o in outputs]
        same = {v: sum(a == b for a, b in zip(answers["llmkd"], answers[v])) for v in ("plain", "lm-eval")}
        print(f"| {shots} | {n} | {prompt_tokens} | {speed['llmkd']:.1f} | {speed['plain']:.1f} | "
              f"{speed['lm-eval']:.1f} | {speed['llmkd'] / speed['plain']:.2f}x | "
              f"{speed['llmkd'] / speed['lm-eval']:.2f}x | {same['plain']}/{n}, {same['lm-eval']}/{n} |", flush=True)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
