"""Transfer-set builder vs a naive one-question-at-a-time cache: speed, size, top-k mass.

    python benchmarks/bench_transfer_set.py                  # 16 GSM8K train questions, top-64, 128 new tokens
    python benchmarks/bench_transfer_set.py --questions 8    # faster

Both cache the teacher's (the recipe's model, default the embedded SmolLM2-135M-Instruct) next-token
distributions along its own greedy answers to the same questions, in the same prompt format:

  naive   per question, `model.generate(..., output_logits=True)` at batch 1, and the full-vocabulary
          logits of every generated token saved as fp16 (`np.save`, 2V bytes per token).
  llmkd   `llmkd.transfer_set.build` (response: teacher): batched generation (left padding), one
          batched teacher forward, top-k + tail bucket, fp16, safetensors shards.

Reported: response tokens per second (wall time of the caching, the model already loaded), bytes
per response token on disk, and the top-k mass captured (mean over tokens of the top-k
probabilities' sum; the naive cache keeps everything, 1.0). A second table re-encodes the naive
cache's full logits at several k with the builder's writer: size and mass as k grows.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmkd import builder, models, transfer_set  # noqa: E402
from llmkd.config import load_recipe  # noqa: E402
from llmkd.data import prompts  # noqa: E402
from llmkd.losses import topk_with_tail  # noqa: E402


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=16, help="GSM8K train questions (default 16)")
    parser.add_argument("--k", type=int, default=64, help="teacher top-k of the builder (default 64)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer (default 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="builder batch (default 16)")
    parser.add_argument("--recipe", default="recipes/smollm2-cpu.yaml")
    parser.add_argument("--out", help="folder for both caches (default: a temporary folder, removed)")
    return parser


def naive_cache(model, tok, rows, max_new_tokens: int, out: Path) -> dict:
    """One question at a time, full-vocab fp16 logits of each generated token: the baseline."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, temperature=None, top_p=None, top_k=None,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, stop_strings=list(prompts.STOP_STRINGS),
        output_logits=True, return_dict_in_generate=True,
    )
    out.mkdir(parents=True, exist_ok=True)
    responses, tokens, size, logits_all = [], 0, 0, []
    start = time.perf_counter()
    for i, r in enumerate(rows):
        ids = tok(prompts.render_prompt(tok, r["question"]), add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            gen = model.generate(**ids, generation_config=config, tokenizer=tok)
        logits = torch.cat(gen.logits, dim=0).to(torch.float16)  # (R, V): one row per generated token
        path = out / f"{i:05d}.npy"
        np.save(path, logits.numpy())
        size += path.stat().st_size
        tokens += logits.shape[0]
        responses.append(gen.sequences[0, ids["input_ids"].shape[1] :].tolist())
        logits_all.append(logits)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens": tokens, "bytes": size, "responses": responses, "logits": logits_all}


def k_sweep(logits_all, ks, vocab: int, folder: Path) -> list[tuple[int, float, float]]:
    """(k, bytes/token, mean top-k mass) of the builder's shard encoding of the same logits."""
    rows = []
    for k in ks:
        if k >= vocab:
            continue
        targets = [topk_with_tail(lg.float(), k) for lg in logits_all]
        columns = {
            "id": [f"q{i}" for i in range(len(targets))],
            "question_hash": ["0" * 16] * len(targets),
            "input_ids": [[0] * (len(t[0]) + 1) for t in targets],  # a placeholder prompt of one token
            "response_start": [1] * len(targets),
            "finish": ["eos"] * len(targets),
            "topk_ids": [t[0].to(torch.int32).numpy() for t in targets],
            "topk_logprobs": [t[1].to(torch.float16).numpy() for t in targets],
            "tail_logmass": [t[2].to(torch.float16).numpy() for t in targets],
        }
        path = folder / f"k{k}.safetensors"
        transfer_set.write_shard(path, columns, k)
        tokens = sum(len(t[0]) for t in targets)
        mass = torch.cat([t[1].to(torch.float16).float().logsumexp(-1).exp() for t in targets]).mean()
        rows.append((k, path.stat().st_size / tokens, float(mass)))
    return rows


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    recipe = load_recipe(args.recipe, [
        "transfer_set.response=teacher", "transfer_set.split=train", "transfer_set.start=0",
        f"transfer_set.count={args.questions}", f"transfer_set.top_k={args.k}",
        f"transfer_set.max_new_tokens={args.max_new_tokens}", f"transfer_set.batch_size={args.batch_size}",
        "transfer_set.shots=0", f"transfer_set.shard_size={max(args.questions, 1)}",
    ])
    tok = models.load_tokenizer(recipe.model)
    model = models.load_teacher(recipe.model)
    rows, _, _, _ = builder.select_questions(recipe)
    vocab = model.get_output_embeddings().weight.shape[0]
    tmp = tempfile.TemporaryDirectory() if args.out is None else None
    root = Path(args.out or tmp.name)
    print(f"{len(rows)} questions, max {args.max_new_tokens} new tokens, V={vocab:,}, torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} (other processes slow both)\n",
          file=sys.stderr)

    start = time.perf_counter()
    manifest = builder.build(recipe, out=root / "llmkd", teacher=model, tokenizer=tok, progress=False)
    ours_seconds = time.perf_counter() - start
    naive = naive_cache(model, tok, rows, args.max_new_tokens, root / "naive")

    ours_responses = [r["input_ids"][r["response_start"] :].tolist() for r in transfer_set.TransferSet.open(root / "llmkd").examples()]
    same = sum(a == b for a, b in zip(ours_responses, naive["responses"]))
    t = manifest.totals
    ours_tps, naive_tps = t.response_tokens / ours_seconds, naive["tokens"] / naive["seconds"]
    naive_bpt = naive["bytes"] / naive["tokens"]

    print("| cache | response tokens | seconds | tokens/s | bytes/token | top-k mass |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| naive: generate at batch 1, full-vocab fp16 | {naive['tokens']:,} | {naive['seconds']:.1f} | "
          f"{naive_tps:.1f} | {naive_bpt:,.0f} | 1.0000 |")
    print(f"| llmkd: batched build, top-{args.k} + tail, safetensors | {t.response_tokens:,} | {ours_seconds:.1f} | "
          f"{ours_tps:.1f} | {t.bytes_per_token:,.1f} | {t.mean_topk_mass:.4f} |")
    print(f"| ratio (llmkd / naive) | | | {ours_tps / naive_tps:.2f}x | 1/{naive_bpt / t.bytes_per_token:,.0f} | |")
    print(f"\nSame greedy response as the naive run: {same}/{len(rows)} questions. "
          f"Full-vocab fp16 at Llama 3.1's V=128,256: {2 * 128256:,} B/token "
          f"({2 * 128256 / t.bytes_per_token:,.0f}x llmkd's).")

    print("\nThe naive cache's logits re-encoded by the builder's writer (same tokens):\n")
    print("| k | bytes/token | top-k mass |")
    print("|---:|---:|---:|")
    for k, bpt, mass in k_sweep(naive["logits"], [16, 64, 128, 256], vocab, root / "sweep"):
        print(f"| {k} | {bpt:,.1f} | {mass:.4f} |")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
