"""Peak resident memory of a training start against the transfer set's size.

    python benchmarks/bench_transfer_set_memory.py                 # sets of 1x, 4x, 16x the main job's
    python benchmarks/bench_transfer_set_memory.py --sizes 1 64 --dir /tmp/sets   # keep the sets

The main job's set (`recipes/smollm2-cpu.yaml`: 480 examples, top-64, shards of 256) is stood in for by
synthetic shards written with `transfer_set.write_shard`: random top-k, prompts of 60-179 tokens and
responses of 40-239 (about the gold GSM8K solutions' lengths), so no model is needed. Each set is then
opened in a fresh process the way `llmkd train` opens it: `TransferSet.open` + `verify` (what
`for_recipe` does, less the tokenizer and teacher checks), the examples as `TrainingData` holds them,
and the first `--batches` micro-batches of the epoch collated. Reported: that process's peak RSS from
there on (VmHWM, reset after the imports; file-backed pages of a memory map count) and its growth over
the RSS after the imports; "anonymous": the growth of RssAnon at the end, the process's own memory
(the rest is page cache mapped from the shards: shared by the processes of a launch, and dropped
under memory pressure). Linux only (/proc/self).
The goal is a flat line: a start costs a shard or two, not the set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from llmkd import models, transfer_set  # noqa: E402

MAIN_JOB_EXAMPLES = 480  # recipes/smollm2-cpu.yaml transfer_set.count
TOP_K = 64
SHARD_SIZE = 256  # the recipe's (default) transfer_set.shard_size


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 4, 16], help="multiples of the main job's set")
    parser.add_argument("--batches", type=int, default=8, help="micro-batches of 4 collated after opening (default 8)")
    parser.add_argument("--dir", help="folder for the sets, reused when present (default: a temporary folder, removed)")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # the set to open, in the measuring process
    return parser


def write_set(out: Path, examples: int, seed: int = 0) -> transfer_set.Manifest:
    """A format-4 set of `examples` synthetic examples in shards of SHARD_SIZE, with its manifest."""
    rng = np.random.default_rng(seed)
    entries = []
    for index, first in enumerate(range(0, examples, SHARD_SIZE)):
        n = min(SHARD_SIZE, examples - first)
        prompt, response = rng.integers(60, 180, n), rng.integers(40, 240, n)
        columns = {
            "id": [f"synthetic-{first + i:06d}" for i in range(n)],
            "question_hash": [f"{first + i:064x}" for i in range(n)], "finish": ["gold"] * n,
            "input_ids": [rng.integers(0, 49_152, p + r, dtype=np.int32) for p, r in zip(prompt, response)],
            "response_start": prompt.tolist(),
            "topk_ids": [rng.integers(0, 49_152, (r, TOP_K), dtype=np.int32) for r in response],
            "topk_logprobs": [rng.uniform(-20, 0, (r, TOP_K)).astype(np.float16) for r in response],
            "tail_logmass": [rng.uniform(-20, 0, r).astype(np.float16) for r in response],
        }
        path = out / transfer_set.shard_name(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        transfer_set.write_shard(path, columns, TOP_K)
        entries.append(transfer_set.ShardEntry(
            file=transfer_set.shard_name(index), examples=n, response_tokens=int(response.sum()),
            bytes=path.stat().st_size, sha256=models.sha256_file(path), mean_topk_mass=0.9, seconds=0.0))
    tokens, size = sum(e.response_tokens for e in entries), sum(e.bytes for e in entries)
    settings = transfer_set.Settings(
        teacher_sha256="0" * 64, teacher_dtype="bfloat16", tokenizer_sha256="0" * 64, chat_template_sha256="0" * 64,
        vocab_size=49_152, top_k=TOP_K, encoding="fp16", response="gold", max_new_tokens=None, do_sample=None,
        sampling_temperature=None, seed=None, stop_strings=None, decoding=None, batch_size=16, shots=0,
        renderings=["llmkd"], exemplar_seed=None, exemplar_ids=[], instruction_sha256="0" * 64, prompt_style="chat",
        source="synthetic", split="train", start=0, count=examples, questions_sha256="0" * 64, shard_size=SHARD_SIZE)
    manifest = transfer_set.Manifest(
        format_version=transfer_set.FORMAT_VERSION, llmkd_version="bench", settings_hash=settings.hash(),
        settings=settings, teacher={}, question_ids=[], question_hashes=[], excluded_exemplar_ids=[], shards=entries,
        totals=transfer_set.Totals(examples=examples, response_tokens=tokens, bytes=size,
                                   bytes_per_token=round(size / tokens, 2), full_vocab_fp16_bytes_per_token=2 * 49_152,
                                   mean_topk_mass=0.9),
        build=transfer_set.BuildStats(seconds=0.0, tokens_per_s=0.0, processes=1), provenance={})
    (out / transfer_set.MANIFEST).write_text(json.dumps(asdict(manifest)))
    return manifest


def status_mib(key: str) -> float:
    """VmRSS (resident now), VmHWM (its peak) or RssAnon (resident, less the page cache mapped) of this process, in MiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def measure(path: Path, batches: int) -> dict:
    """In this (fresh) process: open the set as a training start does and collate a few batches."""
    from llmkd import train

    Path("/proc/self/clear_refs").write_text("5")  # the peak restarts from here: the imports' own peak is not the set's
    imports, anonymous = status_mib("VmRSS"), status_mib("RssAnon")
    start = time.perf_counter()
    ts = transfer_set.TransferSet.open(path)
    ts.verify()
    data = train.TrainingData(examples=ts.examples(), transfer_set=ts)
    plan = train.DataPlan(len(data.examples), 4, 1, 1, 0, tuple(int(n) for n in data.examples.input_lengths))
    order = plan.order(0)
    for b in range(batches):
        train.collate(data.examples.rows(order[4 * b : 4 * b + 4]), pad_id=0)
    return {"imports_mib": imports, "peak_mib": status_mib("VmHWM"), "seconds": time.perf_counter() - start,
            "anonymous_mib": status_mib("RssAnon") - anonymous}


def main(argv=None) -> int:
    args = make_parser().parse_args(argv)
    if args.child:
        print(json.dumps(measure(Path(args.child), args.batches)))
        return 0
    tmp = tempfile.TemporaryDirectory() if args.dir is None else None
    root = Path(args.dir or tmp.name)
    print("| set | examples | shards | response tokens | on disk MiB | peak RSS MiB | over the imports' RSS MiB | anonymous MiB | seconds |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        path = root / f"set-{size}x"
        manifest = transfer_set.read_manifest(path) if (path / transfer_set.MANIFEST).is_file() \
            else write_set(path, size * MAIN_JOB_EXAMPLES)
        out = subprocess.run([sys.executable, __file__, "--child", str(path), "--batches", str(args.batches)],
                             check=True, capture_output=True, text=True)
        r = json.loads(out.stdout.splitlines()[-1])
        t = manifest.totals
        print(f"| {size}x | {t.examples:,} | {len(manifest.shards)} | {t.response_tokens:,} | {t.bytes / 2**20:,.1f} | "
              f"{r['peak_mib']:,.0f} | {r['peak_mib'] - r['imports_mib']:,.0f} | "
              f"{r['anonymous_mib']:,.0f} | {r['seconds']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
