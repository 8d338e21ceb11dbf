"""Sparse top-k + tail KD loss vs a dense full-vocabulary KL: memory, time, value, cache size.

    python benchmarks/bench_loss.py                 # 4,096 tokens at Llama 3.1's vocab (128,256), K = 64
    python benchmarks/bench_loss.py --tokens 1024   # smaller and faster

Each variant runs forward + backward once in its own subprocess, on the same synthetic inputs
(same seed): bf16 student logits (N, V) requiring grad, and either the teacher's full bf16 logits
(dense) or the top-K cache built from them by `topk_with_tail` (sparse; the full teacher logits are
freed before the measurement).

  dense   F.kl_div(log_softmax(student), log_softmax(teacher), log_target=True), both log_softmax
          taken straight to fp32 (`dtype=torch.float32`, no separate upcast copy), summed over the
          vocabulary, mean over tokens; backward.
  sparse  llmkd.losses.sparse_kd_loss(alpha=0, temperature=1, forward_kl); backward.

Memory: the process's resident-set peak during the loss forward + backward, minus its resident set
just before (Linux: reset the peak through /proc/self/clear_refs, read VmHWM and VmRSS from
/proc/self/status). It is what the OS had to provide on top of the inputs: every fp32 temporary,
autograd's saved tensors and the bf16 gradient of the student logits. Inputs are listed separately.

Synthetic distributions: teacher logits ~ 6 * N(0, 1) i.i.d. along the vocabulary, which puts about
the teacher top-64 mass measured on GSM8K (~0.96) inside the top 64; student = teacher + 0.5 * N(0, 1)
(full KL ~0.09 nats/token, near what NF4 + LoRA training reaches). See `_inputs` for how rows are drawn.
"""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmkd.losses import sparse_kd_loss, topk_with_tail  # noqa: E402

TEACHER_SCALE = 6.0
STUDENT_NOISE = 0.5
ROWS_PER_DRAW = 256  # build inputs in row blocks, so generation leaves no large fp32 temporaries
POOL_EXTRA = 1 << 20  # distinct row offsets into the random pools; windows of V = 128k overlap little


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="N, tokens in the batch (default 4096)")
    parser.add_argument("--vocab", type=int, default=128256, help="V (default 128256, Llama 3.1)")
    parser.add_argument("--k", type=int, default=64, help="K, teacher top-k (default 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", choices=("sparse", "dense"), help=argparse.SUPPRESS)
    return parser


# --- Worker: one variant, one process ------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size (VmHWM)


def _inputs(n: int, v: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher (N, V) and student (N, V) bf16 logits. Drawing 2 * N * V normals takes ~25 s here, so
    each row is instead a window, at a random offset, of a long i.i.d. N(0, 1) vector (one for the
    teacher, one for the student's noise): still i.i.d. normal along the vocabulary within a row."""
    gen = torch.Generator().manual_seed(seed)
    pool_t = torch.randn(v + POOL_EXTRA, generator=gen).unfold(0, v, 1)  # (POOL_EXTRA + 1, V) view
    pool_s = torch.randn(v + POOL_EXTRA, generator=gen).unfold(0, v, 1)
    offsets_t = torch.randint(0, POOL_EXTRA + 1, (n,), generator=gen)
    offsets_s = torch.randint(0, POOL_EXTRA + 1, (n,), generator=gen)
    teacher = torch.empty(n, v, dtype=torch.bfloat16)
    student = torch.empty(n, v, dtype=torch.bfloat16)
    for start in range(0, n, ROWS_PER_DRAW):
        rows = slice(start, start + ROWS_PER_DRAW)
        t = pool_t[offsets_t[rows]] * TEACHER_SCALE  # (rows, V) fp32
        teacher[rows] = t
        student[rows] = t.add_(pool_s[offsets_s[rows]], alpha=STUDENT_NOISE)
    return teacher, student


def _worker(args: argparse.Namespace) -> dict:
    n, v, k = args.tokens, args.vocab, args.k
    teacher, student = _inputs(n, v, args.seed)
    student.requires_grad_()
    mask = torch.ones(n, dtype=torch.bool)
    out: dict = {}

    if args.worker == "sparse":
        t0 = time.perf_counter()
        ids, logprobs, tail = topk_with_tail(teacher, k)
        out["build_s"] = time.perf_counter() - t0
        out["topk_mass"] = float((1 - tail.double().exp()).mean())
        # What the trainer reads from the cache: int32 ids, fp16 logprobs and tail.
        target = (ids.to(torch.int32), logprobs.half(), tail.half())
        del teacher, ids, logprobs, tail
        labels = target[0][:, 0].long()
        out["input_bytes"] = student.nbytes + sum(t.nbytes for t in target)

        def run():
            options = dict(alpha=0.0, temperature=1.0, divergence="forward_kl")
            return sparse_kd_loss(student, labels, *target, mask, **options).kl

    else:
        out["input_bytes"] = student.nbytes + teacher.nbytes

        def run():
            log_q = F.log_softmax(student, dim=-1, dtype=torch.float32)
            log_p = F.log_softmax(teacher, dim=-1, dtype=torch.float32)
            return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).mean()

    gc.collect()
    rss_before = _status_kib("VmRSS")
    _reset_peak_rss()
    t0 = time.perf_counter()
    kl = run()
    kl.backward()
    out["loss_s"] = time.perf_counter() - t0
    out["peak_extra_bytes"] = (_status_kib("VmHWM") - rss_before) * 1024
    out["kl"] = kl.item()
    out["grad_finite"] = bool(torch.isfinite(student.grad).all())
    return out


# --- Parent: run both, print the table -----------------------------------------------------------


def _run_worker(variant: str, args: argparse.Namespace) -> dict:
    sizes = ["--tokens", str(args.tokens), "--vocab", str(args.vocab), "--k", str(args.k)]
    cmd = [sys.executable, __file__, "--worker", variant, "--seed", str(args.seed), *sizes]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{variant} worker failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    gib = 1024**3
    result["input_gib"] = result["input_bytes"] / gib
    result["peak_gib"] = result["peak_extra_bytes"] / gib
    result["total_gib"] = result["input_gib"] + result["peak_gib"]
    return result


def main(argv: list[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    n, v, k = args.tokens, args.vocab, args.k
    sparse = _run_worker("sparse", args)
    dense = _run_worker("dense", args)

    print(f"## Sparse top-{k} + tail KD loss vs dense full-vocab KL\n")
    print(
        f"N = {n} tokens, V = {v}, K = {k}, bf16 student logits, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, one forward + backward per variant; "
        f"teacher top-{k} mass (mean) {sparse['topk_mass']:.4f}\n"
    )
    print("| | dense KL | sparse KD | dense / sparse |")
    print("|---|---:|---:|---:|")
    rows = [
        ("inputs (student logits + teacher target), GiB", "input_gib"),
        ("peak RSS above inputs during fwd+bwd, GiB", "peak_gib"),
        ("inputs + that peak, GiB", "total_gib"),
        ("time fwd+bwd, s", "loss_s"),
    ]
    for name, key in rows:
        print(f"| {name} | {dense[key]:.2f} | {sparse[key]:.2f} | {dense[key] / sparse[key]:.2f}x |")
    gap = dense["kl"] - sparse["kl"]
    print(
        f"| KL(teacher ‖ student), nats/token | {dense['kl']:.5f} | {sparse['kl']:.5f} "
        f"| diff {gap:+.5f} ({gap / dense['kl']:+.2%}) |"
    )
    print(f"| gradient finite | {dense['grad_finite']} | {sparse['grad_finite']} | |\n")

    dense_bytes, sparse_bytes = 2 * v, 4 * k + 2 * k + 2
    print(
        "| teacher target | dense fp16 logits | top-K cache (int32 ids, fp16 logprobs, fp16 tail) | ratio |"
    )
    print("|---|---:|---:|---:|")
    print(f"| bytes per token | {dense_bytes:,} | {sparse_bytes:,} | {dense_bytes / sparse_bytes:.0f}x |\n")
    print(
        f"Building the cache with topk_with_tail took {sparse['build_s']:.2f} s for {n} tokens. The sparse "
        "KL is the KL between the K+1-bucket foldings: at T = 1 a lower bound of the full KL (folding "
        "loses information), the gap shrinking as the top-K mass grows."
    )


if __name__ == "__main__":
    main()
