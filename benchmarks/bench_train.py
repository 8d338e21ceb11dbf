"""Training throughput: offline KD from the cached transfer set vs online KD with a live teacher.

    python benchmarks/bench_train.py                          # recipes/smollm2-cpu.yaml, batch 4, 3 timed steps
    python benchmarks/bench_train.py --compute-dtype float32  # NF4 matmuls in fp32 (CPUs without fast bf16)

Both variants train the same NF4 + LoRA student (`llmkd.train.build_student`, AdamW, clipping) on the
same batches, drawn from the transfer set, each in its own subprocess (so each has its own peak RSS):

  offline  the trainer's own step (`llmkd.train.accumulate_gradients`): student logits at the response
           positions only, `sparse_kd_loss` against the cached top-K + tail target.
  online   the teacher (fp32 on CPU, `models.load_teacher`) runs a forward every step on the same
           batch; dense full-vocabulary KL(teacher || student) at those positions
           (F.kl_div of two log_softmax, summed over the vocabulary, mean over tokens).

Reported per variant: input tokens/s (prompt + response tokens the student ran, no padding), response
tokens/s, seconds per step, peak resident memory, and model FLOP utilisation

    MFU = 6 * N * input_tokens / seconds / peak,   N = the base model's parameter count,

the standard forward + backward estimate (LoRA skips the frozen weights' gradients, so the real count
is nearer 4N; online spends another 2N per token on the teacher, not counted), over the matmul peak
of the student's compute dtype measured by this script (best of square matmuls, all threads).
The first step is a warm-up and is not timed.

The transfer set is the benchmark's own: `--limit` questions built once into $LLMKD_CACHE/bench/ (the
teacher runs once) and reused, so the figures do not depend on what else the tree holds (3 steps on
the main job's set once gave 1.19x where this set gives 1.65x); `--transfer-set` picks another.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmkd import models  # noqa: E402
from llmkd import train  # noqa: E402
from llmkd.config import load_recipe  # noqa: E402
from llmkd.plan import plan_model  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="recipes/smollm2-cpu.yaml")
    parser.add_argument("--transfer-set", help="transfer set folder (default: the benchmark's own, see --limit)")
    parser.add_argument("--limit", type=int, default=32, help="questions in the benchmark's own transfer set (32)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    parser.add_argument("--compute-dtype", choices=["bfloat16", "float16", "float32"],
                        help="override model.compute_dtype of the student")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=["offline", "online"], help=argparse.SUPPRESS)
    return parser


def recipe_of(args):
    overrides = [f"transfer_set.out={args.transfer_set}", f"train.batch_size={args.batch_size}"]
    if args.compute_dtype:
        overrides.append(f"model.compute_dtype={args.compute_dtype}")
    return load_recipe(args.recipe, overrides)


# --- Matmul peak ----------------------------------------------------------------------------------


def matmul_peak(dtype: torch.dtype, sizes=(512, 1024, 2048), seconds: float = 1.0) -> float:
    """Best FLOP/s of an n x n x n matmul in `dtype` over `sizes`, each repeated for ~`seconds`."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        a @ b  # warm-up
        reps, start = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            elapsed = time.perf_counter() - start
            if elapsed >= seconds or (reps >= 2 and elapsed * (reps + 1) / reps > 4 * seconds):
                break
        best = max(best, 2 * n**3 * reps / elapsed)
    return best


# --- Worker: one variant, one process -------------------------------------------------------------


def worker(args) -> dict:
    import torch.nn.functional as F

    recipe = recipe_of(args)
    tok = models.load_tokenizer(recipe.model)
    data = train.TrainingData.open(recipe, tok)
    n_batches = args.steps + 1
    need = n_batches * args.batch_size
    if len(data.examples) < need:
        raise SystemExit(f"{data.path}: {len(data.examples)} examples, {need} needed (--steps, --batch-size)")
    order = np.random.default_rng(args.seed).permutation(len(data.examples))[:need]
    batches = [train.collate(data.examples.rows(order[i : i + args.batch_size]), tok.pad_token_id)
               for i in range(0, need, args.batch_size)]

    torch.manual_seed(args.seed)
    student = train.build_student(recipe, torch.device("cpu"))
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = train.make_optimizer(params, recipe.train)
    teacher = models.load_teacher(recipe.model) if args.worker == "online" else None

    times = []
    for i, batch in enumerate(batches):
        t0 = time.perf_counter()
        if teacher is None:
            train.accumulate_gradients(student, [batch], recipe.train.loss, batch.response_tokens)
        else:
            inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                          logits_to_keep=batch.predict, use_cache=False)
            with torch.no_grad():
                t_logits = teacher(**inputs).logits  # (N, V)
            s_logits = student(**inputs).logits  # (N, V)
            kl = F.kl_div(torch.log_softmax(s_logits.float(), -1), torch.log_softmax(t_logits.float(), -1),
                          log_target=True, reduction="sum") / batch.response_tokens
            kl.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.train.max_grad_norm or float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i > 0:  # step 0 is the warm-up
            times.append(time.perf_counter() - t0)
    timed = batches[1:]
    seconds = sum(times)
    return {
        "variant": args.worker,
        "input_tokens": sum(b.input_tokens for b in timed),
        "response_tokens": sum(b.response_tokens for b in timed),
        "seconds": seconds,
        "step_seconds": seconds / len(times),
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "transfer_set": str(data.path),
        "examples": len(data.examples),
    }


# --- Driver ---------------------------------------------------------------------------------------


def ensure_transfer_set(args) -> str:
    from llmkd.builder import build
    from llmkd.transfer_set import MANIFEST

    if args.transfer_set:
        return args.transfer_set
    recipe = load_recipe(args.recipe)
    out = models.cache_root() / "bench" / f"{recipe.name}-limit{args.limit}"
    if not (out / MANIFEST).is_file():
        print(f"building the benchmark's transfer set: {args.limit} questions into {out} (once)", flush=True)
    build(recipe, out=out, limit=args.limit, progress=False)  # a complete set with these settings: verified, kept
    return str(out)


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    args.transfer_set = ensure_transfer_set(args)
    recipe = recipe_of(args)
    dtype = recipe.model.compute_dtype
    peaks = {name: matmul_peak(getattr(torch, name)) for name in ("float32", "bfloat16")}
    peak = peaks.get(dtype) or peaks["float32"]
    params = plan_model(recipe).total_params

    results = []
    for variant in ("offline", "online"):
        cmd = [sys.executable, __file__, "--worker", variant, "--recipe", args.recipe, "--transfer-set",
               args.transfer_set, "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--seed", str(args.seed)] + (["--compute-dtype", args.compute_dtype] if args.compute_dtype else [])
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TRANSFORMERS_VERBOSITY": "error"})
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            return proc.returncode
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))

    r0 = results[0]
    print(f"\nstudent: {recipe.model.name} NF4 + LoRA r{recipe.lora.r} ({len(recipe.lora.target_modules)} module types), "
          f"N = {params / 1e6:.1f}M params, compute {dtype}; {torch.get_num_threads()} threads")
    print(f"matmul peak: fp32 {peaks['float32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bfloat16'] / 1e9:.1f} GFLOP/s "
          f"(MFU below is over the {dtype} peak)")
    print(f"data: {r0['transfer_set']} ({r0['examples']} examples); batch {args.batch_size}, {args.steps} timed steps "
          f"after 1 warm-up, {r0['input_tokens']:,} input / {r0['response_tokens']:,} response tokens, same batches\n")
    print("| variant | input tok/s | response tok/s | s/step | MFU (6N) | peak RSS GiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        flops = 6 * params * r["input_tokens"] / r["seconds"]
        name = "offline: cached top-K + sparse KD" if r["variant"] == "offline" else "online: teacher fwd + dense KL"
        print(f"| {name} | {r['input_tokens'] / r['seconds']:.1f} | {r['response_tokens'] / r['seconds']:.1f} | "
              f"{r['step_seconds']:.2f} | {100 * flops / peak:.1f}% | {r['peak_rss'] / 2**30:.2f} |")
    speedup = results[1]["seconds"] / results[0]["seconds"]
    print(f"\noffline / online speed: {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
