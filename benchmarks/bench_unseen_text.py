"""Fidelity on text unlike GSM8K: does an adapter's gain hold on text no stage trains on?

    python benchmarks/bench_unseen_text.py --adapter default=runs/bench-default-nf4/train/adapter \\
        --adapter kd=runs/bench-kd-nf4/train/adapter        # after bench_methods.py ran those methods

Every llmkd stage sees GSM8K only; its evaluation scores other renderings of GSM8K (plain_chat,
plain_text). This scores two texts that ship with every Python and have nothing of GSM8K: English
prose (the topics of Python's own help, `pydoc_data.topics`) and Python source code (SOURCE_MODULES of
the standard library; `--calibration-text FILE` writes CALIBRATION_MODULES' source, other modules, for
`lora.init_text`). Each text is cut into `--chunks` windows of `--tokens` tokens spread evenly over it
and fed as plain text (no chat template; BOS by `prompts.encode`'s rule). At every position but the
last: KL(teacher || model) over the full vocabulary and top-1 agreement, for the quantised base
(adapter off) and each adapter on it; gap closed = 1 - KL / base KL. A negative gap closed means the
adapter moved the student away from its teacher on that text. The figures depend on the Python
version (its help and sources are the text); the table names it. The table goes into
benchmarks/results.md (its own section, which `run_all.py` keeps).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import platform
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(ROOT), str(HERE)]

from bench_methods import write_section  # noqa: E402
from llmkd import fastpath, models  # noqa: E402
from llmkd.cli import quiet_libraries  # noqa: E402
from llmkd.config import load_recipe  # noqa: E402
from llmkd.data import prompts  # noqa: E402
from llmkd.losses import dense_kd_metrics  # noqa: E402

SOURCE_MODULES = ["argparse", "json.decoder", "json.encoder", "textwrap", "shutil", "tarfile", "statistics",
                  "fractions", "email.message", "http.client"]
# Other standard-library modules, none of the above: calibration text for lora.init_text (--calibration-text).
CALIBRATION_MODULES = ["collections", "typing", "inspect", "pathlib", "logging", "subprocess", "dataclasses",
                       "functools", "asyncio.base_events", "unittest.case", "zipfile", "calendar", "decimal",
                       "ipaddress"]
TITLE = "# methods on unseen text: fidelity on prose and code that no stage trains on"  # kept by run_all.py


def prose() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def code(modules=SOURCE_MODULES) -> str:
    return "\n\n".join(Path(importlib.util.find_spec(m).origin).read_text() for m in modules)


TEXTS = {"prose": (prose, "Python's help topics (English prose)"),
         "code": (code, "Python source: " + ", ".join(SOURCE_MODULES))}


def windows(tokenizer, text: str, chunks: int, tokens: int) -> torch.Tensor:
    """(chunks, tokens) token ids: windows spread evenly over the text, each led by BOS where the
    tokenizer adds one."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    lead = prompts.encode(tokenizer, "")  # [BOS] or []
    width = tokens - len(lead)
    if len(ids) < width * chunks:
        raise SystemExit(f"the text has {len(ids)} tokens, fewer than {chunks} windows of {width}")
    step = (len(ids) - width) // max(chunks - 1, 1)
    return torch.tensor([lead + ids[i * step : i * step + width] for i in range(chunks)])


@torch.no_grad()
def logits_of(model, batches: list[torch.Tensor]) -> list[torch.Tensor]:
    return [model(input_ids=b).logits[:, :-1].float().cpu() for b in batches]


@torch.no_grad()
def score(student, teacher_logits: list[torch.Tensor], batches: list[torch.Tensor]) -> tuple[float, float]:
    kl, agree, n = 0.0, 0, 0
    for t, b in zip(teacher_logits, batches):
        s = student(input_ids=b).logits[:, :-1]
        k, a, m = dense_kd_metrics(t, s, torch.ones(t.shape[:-1], dtype=torch.bool))
        kl, agree, n = kl + float(k), agree + int(a), n + int(m)
    return kl / n, agree / n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes/smollm2-cpu.yaml"))
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=FOLDER",
                   help="an adapter to score (a PEFT folder, e.g. runs/<name>/train/adapter); repeatable")
    p.add_argument("--chunks", type=int, default=32)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="recipe overrides (model.quant=hqq3, ...)")
    p.add_argument("--no-results", action="store_true", help="do not write benchmarks/results.md")
    p.add_argument("--calibration-text", metavar="FILE",
                   help="only write CALIBRATION_MODULES' source to FILE (for lora.init_text) and stop")
    args = p.parse_args(argv)
    if args.calibration_text:
        Path(args.calibration_text).write_text(code(CALIBRATION_MODULES))
        return 0
    quiet_libraries(verbose=False)
    adapters = dict(a.split("=", 1) for a in args.adapter)
    for name, folder in adapters.items():
        if not (Path(folder) / "adapter_config.json").is_file():
            raise SystemExit(f"--adapter {name}: {folder} is not a PEFT adapter folder (no adapter_config.json)")
    recipe = load_recipe(args.recipe, args.set)
    tokenizer = models.load_tokenizer(recipe.model)
    batches = {t: list(windows(tokenizer, make(), args.chunks, args.tokens).split(args.batch))
               for t, (make, _) in TEXTS.items()}
    teacher = models.load_teacher(recipe.model)
    teacher_logits = {t: logits_of(teacher, bs) for t, bs in batches.items()}
    del teacher
    gc.collect()
    rows = {}  # model -> text -> (kl, top1)
    for name, folder in [("base", None), *adapters.items()]:
        student = models.load_student(recipe.model, adapter=folder)
        with fastpath.dequantized_once(student, enabled=recipe.fast_paths):
            rows[name] = {t: score(student, teacher_logits[t], bs) for t, bs in batches.items()}
        print(f"{name}: " + ", ".join(f"{t} KL {kl:.4f} top-1 {100 * a:.1f}%" for t, (kl, a) in rows[name].items()), flush=True)
        del student
        gc.collect()
    text = table(rows, recipe, args)
    print(text)
    if not args.no_results:
        write_section(HERE / "results.md", TITLE, text)
    return 0


def table(rows: dict, recipe, args) -> str:
    texts = list(TEXTS)
    lines = [TITLE, "", f"`python benchmarks/bench_unseen_text.py {' '.join(sys.argv[1:])}`: student "
             f"{recipe.model.quant}, {args.chunks} windows of {args.tokens} tokens per text, Python "
             f"{platform.python_version()}. Texts: " + "; ".join(f"{t}: {what}" for t, (_, what) in TEXTS.items())
             + ". KL(teacher || model) in nats/token (gap closed), top-1 agreement.", "",
             "| model | " + " | ".join(f"{t} KL (closed) | {t} top-1" for t in texts) + " |",
             "|---|" + "---:|---:|" * len(texts)]
    base = rows["base"]
    for name, r in rows.items():
        cells = []
        for t in texts:
            kl, top1 = r[t]
            closed = "" if name == "base" else f" ({100 * (1 - kl / base[t][0]):.1f}%)"
            cells += [f"{kl:.4f}{closed}", f"{100 * top1:.1f}%"]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
