"""`llmkd export`: what a run measured, as a folder an inference engine serves, checked in that engine.

    llmkd export runs/chat-example --to transformers --out exports/chat-example
    llmkd export recipes/chat-example.yaml --out exports/chat-example --check 32

`--to transformers` (bitsandbytes students: nf4, fp4, int8) writes

    config.json, model.safetensors   the quantised student exactly as trained against, in bitsandbytes'
                                     own serialization (its quantization_config inside config.json)
    adapter/                         the distilled LoRA adapter, unmerged (merging into 4-bit weights
                                     re-rounds them and loses most of the adapter's correction)
    tokenizer files                  with the chat template the run rendered its data with
    generation_config.json           llmkd's decoding: greedy, eval.max_new_tokens, its stop strings
    README.md, export.json           the model card and the figures of the fidelity gate

The fidelity gate: before anything is published, a fresh Python process loads the folder with plain
transformers + peft (`llmkd/export_check.py`, which imports nothing of llmkd), scores held-out KL to the
teacher and top-1 agreement on `--check` held-out rows for the base and the distilled student, and
completes the first GENERATED_ROWS prompts with `generate` and the folder's generation config; llmkd's
own evaluator scores the same rows and generates on the same prompts. The folder is published
(atomically) only if the two agree within TOLERANCE; otherwise a one-line error and nothing is written.
Other formats (gguf, merged) and HQQ students are refused in one line.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llmkd import atomic, models
from llmkd.config import Recipe, load_recipe
from llmkd.data import prompts, sources
from llmkd.errors import LlmkdError
from llmkd.provenance import provenance

FORMATS = ("transformers", "gguf", "merged")
EXPORT_FILE = "export.json"  # marks a folder as an export, and names the run and adapter it holds
# The engine's figures against llmkd's own on the same rows. transformers + peft runs the same bitsandbytes
# kernels as llmkd's evaluator, whose fast paths are off here: what differs is summation order.
# Greedy outputs: the share of rows whose output in the engine (generate with the folder's generation config)
# is llmkd's own, up to its stop strings.
TOLERANCE = {"transformers": {"kl_relative": 0.02, "kl_absolute": 1e-4, "top1_points": 1.0, "same_output": 0.9}}
GENERATED_ROWS = 8  # of the --check rows, those whose prompts both sides also complete (one at a time: slow on CPU)


def recipe_of(reference: list[str]) -> Recipe:
    """RUN_OR_RECIPE [key=value ...]: a run folder (runs/<name>, whose adapter records its recipe) or a recipe."""
    first = Path(reference[0]) if reference else None
    record = first / "train" / "adapter" / "llmkd.json" if first is not None else None
    if record is not None and first.is_dir() and record.is_file():
        from pydantic import ValidationError

        from llmkd.config import apply_override, describe

        raw = json.loads(record.read_text())["recipe"]
        for item in reference[1:]:
            apply_override(raw, item, Recipe)
        try:
            return Recipe.model_validate(raw)
        except ValidationError as e:
            raise LlmkdError(f"{record}: {describe(e)}") from None
    if first is not None and first.is_dir():
        raise LlmkdError(f"{first}: not a finished run (no train/adapter/llmkd.json); train it first, or give its recipe")
    return load_recipe(reference[0] if reference else None, reference[1:])


def check_exportable(recipe: Recipe, to: str) -> Path:
    """The run's adapter folder, if `recipe`'s run can go to `to`; a one-line error saying why not otherwise."""
    if to not in FORMATS:
        raise LlmkdError(f"--to {to}: choose one of {', '.join(FORMATS)}")
    if to == "gguf":
        raise LlmkdError("--to gguf needs a student trained against GGUF's own weights (a gguf-q4_0 quantizer), "
                         "which this llmkd does not have yet; export --to transformers")
    if to == "merged":
        raise LlmkdError("--to merged (the adapter merged, re-quantized and recovered) is not in this llmkd yet; "
                         "export --to transformers, which keeps the adapter unmerged")
    if recipe.model.quant.startswith("hqq"):
        raise LlmkdError(f"model.quant {recipe.model.quant}: HQQ students do not export to transformers' "
                         "bitsandbytes format; train model.quant=nf4 (or fp4, int8) to export --to transformers")
    adapter = recipe.layout.adapter
    if not (adapter / "adapter_config.json").is_file():
        state = "an unfinished run (checkpoints, no final adapter)" if recipe.layout.checkpoints.is_dir() else "no run"
        raise LlmkdError(f"{adapter}: {state}; finish `llmkd train` (or `llmkd run`) with this recipe first")
    return adapter


def _identity(recipe: Recipe, adapter: Path) -> dict:
    return {"run": recipe.name, "adapter_sha256": models.sha256_file(adapter / "adapter_model.safetensors"),
            "quant": recipe.model.quant}


def _claim(out: Path, identity: dict) -> None:
    """`out` must be new or an earlier export of this very run and adapter (then it is replaced)."""
    if not out.exists():
        return
    try:
        earlier = json.loads((out / EXPORT_FILE).read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        raise LlmkdError(f"{out}: exists and is not an llmkd export; choose another --out or remove it") from None
    if earlier != identity:
        raise LlmkdError(f"{out}: an export of another run or adapter ({earlier.get('run')}); choose another --out")


def held_out_rows(recipe: Recipe, tokenizer, n: int) -> list[dict]:
    """The first `n` held-out fidelity rows: each the row as evaluation reads it, and its token ids and
    response start as fidelity scoring feeds them (`fidelity_example`)."""
    from llmkd.fidelity import fidelity_example, fidelity_questions, with_responses

    rows = with_responses(list(fidelity_questions(recipe))[:n], None)
    if not rows:
        raise LlmkdError("the fidelity gate has no held-out row with a response to score (prompt-only data)")
    out = []
    for row in rows:
        ids, start = fidelity_example(tokenizer, row, max_length=recipe.data.max_length)
        out.append({"row": row, "input_ids": ids, "start": start})
    return out


def ours(recipe: Recipe, adapter: Path, rows: list[dict]) -> dict:
    """llmkd's evaluator on `rows`: KL(teacher || model) and top-1 of base and distilled (`score_fidelity`,
    one row at a time as the engine side runs them, fast paths off: the library's kernels), and their
    greedy outputs on the first GENERATED_ROWS prompts."""
    from llmkd.fidelity import adapter_off, score_fidelity
    from llmkd.generation import generate_ids

    teacher = models.load_teacher(recipe.model)
    student = models.load_student(recipe.model, adapter=adapter)
    tokenizer = models.load_tokenizer(recipe.model)
    figures = {f.tag: {"kl": f.kl, "top1_agreement": f.top1_agreement, "tokens": f.tokens}
               for f in score_fidelity(teacher, student, tokenizer, [r["row"] for r in rows], tags=["student", "distilled"],
                                       batch_size=1, share_prefix=False, progress=False,
                                       rendering="llmkd" if recipe.data.is_gsm8k else prompts.DATA_RENDERING,
                                       max_length=recipe.data.max_length)}
    for tag, shown in figures.items():
        with adapter_off(student, tag):
            done, _ = generate_ids(student, tokenizer, [r["input_ids"][: r["start"]] for r in rows[:GENERATED_ROWS]],
                                   batch_size=1, max_new_tokens=recipe.eval.max_new_tokens,
                                   stop_strings=sources.stop_strings(recipe.data), progress=False, share_prefix=False)
        shown["outputs"] = [c.text for c in done]
    del teacher, student
    models.release_memory()
    return figures


def same_outputs(ours_: list[str], theirs: list[str], stops) -> float:
    """Share of rows whose engine output, cut at the first stop string, is llmkd's output (both stripped)."""
    def cut(text: str) -> str:
        ends = [text.find(s) for s in stops if s in text]
        return (text[: min(ends)] if ends else text).strip()

    return sum(cut(a) == cut(b) for a, b in zip(ours_, theirs)) / max(len(ours_), 1)


def engine(folder: Path, recipe: Recipe, rows: list[dict]) -> dict:
    """The same figures from the folder as transformers + peft load it, in a fresh process (export_check.py)."""
    rows_file, out_file = folder.parent / f".{folder.name}.rows.json", folder.parent / f".{folder.name}.check.json"
    rows_file.write_text(json.dumps([{"input_ids": r["input_ids"], "start": r["start"], "generate": i < GENERATED_ROWS}
                                     for i, r in enumerate(rows)]))
    dtype = str(models.teacher_dtype(recipe.model)).removeprefix("torch.")
    command = [sys.executable, str(Path(__file__).with_name("export_check.py")), "--export", str(folder),
               "--teacher", str(models.resolve(recipe.model.name)), "--teacher-dtype", dtype,
               "--rows", str(rows_file), "--out", str(out_file)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of llmkd on its path
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise LlmkdError(f"the exported folder does not load in plain transformers + peft: {last}")
        return json.loads(out_file.read_text())
    finally:
        rows_file.unlink(missing_ok=True)
        out_file.unlink(missing_ok=True)


def gate(to: str, llmkd_figures: dict, engine_figures: dict, stops=()) -> list[str]:
    """What differs beyond TOLERANCE (empty: the folder serves what llmkd measured). Records in
    engine_figures each model's share of outputs the same as llmkd's."""
    tol, problems = TOLERANCE[to], []
    for tag in ("student", "distilled"):
        a, b = llmkd_figures[tag], engine_figures[tag]
        if "outputs" in a and "outputs" in b:
            b["same_output_as_llmkd"] = same_outputs(a["outputs"], b["outputs"], stops)
            if b["same_output_as_llmkd"] < tol["same_output"]:
                problems.append(f"{tag} greedy outputs the same as llmkd's on {100 * b['same_output_as_llmkd']:.0f}% of rows")
        if abs(a["kl"] - b["kl"]) > tol["kl_relative"] * a["kl"] + tol["kl_absolute"]:
            problems.append(f"{tag} KL {b['kl']:.5f} in the engine, {a['kl']:.5f} in llmkd")
        if abs(a["top1_agreement"] - b["top1_agreement"]) * 100 > tol["top1_points"]:
            problems.append(f"{tag} top-1 {100 * b['top1_agreement']:.1f}% in the engine, {100 * a['top1_agreement']:.1f}% in llmkd")
    return problems


def export(recipe: Recipe, *, to: str = "transformers", out: str | Path, check: int = 32,
           say=print) -> Path:
    """Write, check and publish the export of `recipe`'s run (module docstring); returns the folder."""
    if check <= 0:
        raise LlmkdError(f"--check must be > 0, got {check}")
    adapter = check_exportable(recipe, to)
    out = Path(out)
    identity = _identity(recipe, adapter)
    _claim(out, identity)
    tokenizer = models.load_tokenizer(recipe.model)
    rows = held_out_rows(recipe, tokenizer, check)
    tmp = atomic.temporary_dir(out)
    try:
        t0 = time.perf_counter()
        say(f"[1/3] writing the {recipe.model.quant} student, its adapter and tokenizer -> {out}")
        _write_folder(tmp, recipe, adapter, tokenizer)
        say(f"[2/3] scoring {len(rows)} held-out rows in llmkd and, in a fresh process, in transformers + peft")
        llmkd_figures = ours(recipe, adapter, rows)
        engine_figures = engine(tmp, recipe, rows)
        problems = gate(to, llmkd_figures, engine_figures, sources.stop_strings(recipe.data))
        if problems:
            raise LlmkdError(f"the fidelity gate failed, nothing published: {'; '.join(problems)} "
                             f"(tolerance {TOLERANCE[to]})")
        record = {"identity": identity, "format": to, "rows": len(rows), "tolerance": TOLERANCE[to],
                  "llmkd": llmkd_figures, "engine": engine_figures, "seconds": round(time.perf_counter() - t0, 1),
                  "recipe": recipe.model_dump(), **provenance()}
        atomic.write_json(tmp / EXPORT_FILE, record)
        atomic.write_text(tmp / "README.md", model_card(recipe, record))
        say("[3/3] the gate passed: " + "; ".join(
            f"{tag} KL {engine_figures[tag]['kl']:.4f} (llmkd {llmkd_figures[tag]['kl']:.4f}), greedy output as "
            f"llmkd's on {100 * engine_figures[tag]['same_output_as_llmkd']:.0f}% of {len(engine_figures[tag]['outputs'])} "
            "prompts" for tag in ("student", "distilled")))
        atomic.publish_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_folder(folder: Path, recipe: Recipe, adapter: Path, tokenizer) -> None:
    from transformers import GenerationConfig

    student = models.load_student(recipe.model)  # the base exactly as llmkd quantises it for training
    student.save_pretrained(folder)
    del student
    models.release_memory()
    (folder / "adapter").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy2(adapter / name, folder / "adapter" / name)
    tokenizer.save_pretrained(folder)
    eos = tokenizer.eos_token_id
    GenerationConfig(do_sample=False, max_new_tokens=recipe.eval.max_new_tokens, eos_token_id=eos,
                     pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                     stop_strings=list(sources.stop_strings(recipe.data)),
                     temperature=None, top_p=None, top_k=None).save_pretrained(folder)


def model_card(recipe: Recipe, record: dict) -> str:
    e, o = record["engine"], record["llmkd"]
    gap = 1 - e["distilled"]["kl"] / e["student"]["kl"] if e["student"]["kl"] > 0 else float("nan")
    return f"""# {recipe.name}: {recipe.model.name}, distilled into its {recipe.model.quant} copy

The quantised student exactly as llmkd trained against it (bitsandbytes {recipe.model.quant}, serialized with
its quantization config) and the distilled LoRA adapter in `adapter/`, unmerged: merging a LoRA into
4-bit weights re-rounds them and loses most of its correction. Trained on {recipe.data.source}.

## Load it (transformers + peft)

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from peft import PeftModel

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("DIR"), "DIR/adapter")
tokenizer = AutoTokenizer.from_pretrained("DIR")  # generation_config.json holds llmkd's greedy decoding
```

## Serve it (vLLM)

A pre-quantized bitsandbytes checkpoint with the adapter as a LoRA module:

    vllm serve DIR --quantization bitsandbytes --enable-lora --lora-modules distilled=DIR/adapter

## Measured at export

On {record['rows']} held-out rows, teacher-forced, per response token against the 16-bit teacher; this folder
loaded in a fresh process by plain transformers + peft (llmkd's own evaluator in brackets):

| model | KL(teacher‖model) | top-1 agreement | greedy output as llmkd's |
|---|---:|---:|---:|
| base ({recipe.model.quant}, adapter off) | {e['student']['kl']:.4f} ({o['student']['kl']:.4f}) | {100 * e['student']['top1_agreement']:.1f}% ({100 * o['student']['top1_agreement']:.1f}%) | {100 * e['student']['same_output_as_llmkd']:.0f}% |
| distilled | {e['distilled']['kl']:.4f} ({o['distilled']['kl']:.4f}) | {100 * e['distilled']['top1_agreement']:.1f}% ({100 * o['distilled']['top1_agreement']:.1f}%) | {100 * e['distilled']['same_output_as_llmkd']:.0f}% |

Greedy outputs: `generate` with this folder's generation_config.json, against llmkd's own generation.

The adapter closes {100 * gap:.1f}% of the base's KL to the teacher. Tolerance of the gate: {record['tolerance']}.
"""
