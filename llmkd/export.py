"""`llmkd export`: what a run measured, as a folder an inference engine serves, checked in that engine.

    llmkd export runs/chat-example --to transformers --out exports/chat-example
    llmkd export recipes/chat-example.yaml --out exports/chat-example --check 32

`--to transformers` (bitsandbytes students: nf4, fp4, int8; HQQ students) writes

    config.json, model.safetensors   the quantised student exactly as trained against, in bitsandbytes'
                                     own serialization (its quantization_config inside config.json), or
                                     HQQ's (`llmkd.export_hqq`: hqq's layer state dicts, which vLLM reads)
    adapter/                         the distilled LoRA adapter, unmerged (merging into 4-bit weights
                                     re-rounds them and loses most of the adapter's correction)
    tokenizer files                  with the chat template the run rendered its data with
    generation_config.json           llmkd's decoding: greedy, eval.max_new_tokens, its stop strings
    README.md, export.json           the model card and the figures of the fidelity gate

`--to gguf` (GGUF students: gguf-q4_0, q4_1, q5_0, q5_1, q8_0) writes

    model.gguf                       the base as llama.cpp runs it: the very blocks the student trained against
    adapter.gguf                     the adapter as llama.cpp's LoRA file (`--lora`), applied at run time
    README.md, export.json           the model card and the figures of the fidelity gate

`--to merged` writes one model with no adapter, at the base's size: the adapter merged, the weights
quantised again (the codes chosen on `--merge-tokens` transfer-set tokens), the format's scales recovered
against the teacher (`llmkd.merge`), with README.md and export.json holding base, adapter, merged and
recovered figures. GGUF students: one model.gguf, gated in llama.cpp; nf4, fp4 and HQQ students: one
checkpoint in their library's serialization (config.json, model.safetensors, tokenizer,
generation_config.json), gated in transformers beside the base.

The fidelity gate: before anything is published, a fresh Python process loads the folder with plain
transformers + peft (`llmkd/export_check.py`, which imports nothing of llmkd; HQQ's layers through hqq's
own `load_state_dict`, as transformers 5.2x loads no HQQ config), scores held-out KL to the
teacher and top-1 agreement on `--check` held-out rows for the base and the distilled student, and
completes the first GENERATED_ROWS prompts with `generate` and the folder's generation config; llmkd's
own evaluator scores the same rows and generates on the same prompts. The folder is published
(atomically) only if the two agree within TOLERANCE; otherwise a one-line error and nothing is written.
For gguf the engine is llama.cpp, whose CPU kernels round activations to 8 bits against a quantised
weight: its figures cannot equal llmkd's token for token. So the gate is two checks. Exact: an all-F32
copy of the same weights and adapter (F32 KV cache) gives llmkd's fp32 log-probabilities of every
response token. Statistical: on the quantised files, the adapter closes within a few points the share
of the base's KL gap that it closes in llmkd, and lowers the KL.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from llmkd import atomic, fastpath, models
from llmkd.config import (ABSMAX_QUANTS, MERGE_CALIBRATION_TOKENS, RECOVERY_STEPS, Recipe, load_recipe,
                          recovered_parameters)
from llmkd.config import recovery_lr as default_recovery_lr
from llmkd.data import prompts, sources
from llmkd.errors import LlmkdError
from llmkd.model_cards import engine_name, gguf_model_card, hqq_student, merged_model_card, model_card
from llmkd.provenance import provenance

FORMATS = ("transformers", "gguf", "merged")
EXPORT_FILE = "export.json"  # marks a folder as an export, and names the run and adapter it holds
# The engine's figures against llmkd's own on the same rows. transformers + peft runs the same bitsandbytes
# kernels as llmkd's evaluator, whose fast paths are off here: what differs is summation order.
# Greedy outputs: the share of rows whose output in the engine (generate with the folder's generation config)
# is llmkd's own, up to its stop strings.
TOLERANCE = {"transformers": {"kl_relative": 0.02, "kl_absolute": 1e-4, "top1_points": 1.0, "same_output": 0.9},
             # exact: max |log p(response token)| difference, F32 llama.cpp against llmkd's fp32 forward;
             # gap_closed_points: the adapter's share of the base's KL closed, llama.cpp against llmkd
             "gguf": {"exact_logprob": 1e-3, "gap_closed_points": 5.0}}
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


def engine_of(recipe: Recipe) -> str:
    """The engine that serves the student's format, and whose TOLERANCE gates it: transformers or gguf
    (llama.cpp). Its own format is the student's default `--to`."""
    return "gguf" if recipe.model.quant.startswith("gguf-") else "transformers"


def check_exportable(recipe: Recipe, to: str) -> Path:
    """The run's adapter folder, if `recipe`'s run can go to `to`; a one-line error saying why not otherwise."""
    if to not in FORMATS:
        raise LlmkdError(f"--to {to}: choose one of {', '.join(FORMATS)}")
    gguf_student = recipe.model.quant.startswith("gguf-")
    if to == "gguf" and not gguf_student:
        raise LlmkdError(f"model.quant {recipe.model.quant} cannot go to gguf: llama.cpp would re-quantize the weights and "
                         "lose the adapter's correction; train model.quant=gguf-q4_0 (or gguf-q4_1, q5_0, q5_1, q8_0)")
    if to == "transformers" and gguf_student:
        raise LlmkdError(f"model.quant {recipe.model.quant}: a GGUF student goes to llama.cpp; export --to gguf")
    if to == "merged" and not (gguf_student or hqq_student(recipe) or recipe.model.quant in ABSMAX_QUANTS):
        raise LlmkdError(f"--to merged: llmkd ships merged GGUF, HQQ and {' and '.join(ABSMAX_QUANTS)} students, not "
                         f"{recipe.model.quant}; export --to transformers, which keeps the adapter unmerged")
    adapter = recipe.layout.adapter
    if not (adapter / "adapter_config.json").is_file():
        state = "an unfinished run (checkpoints, no final adapter)" if recipe.layout.checkpoints.is_dir() else "no run"
        raise LlmkdError(f"{adapter}: {state}; finish `llmkd train` (or `llmkd run`) with this recipe first")
    return adapter


def _identity(recipe: Recipe, adapter: Path, to: str) -> dict:
    return {"run": recipe.name, "adapter_sha256": models.sha256_file(adapter / "adapter_model.safetensors"),
            "quant": recipe.model.quant, "format": to}


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


def ours(recipe: Recipe, adapter: Path, rows: list[dict], teacher=None) -> dict:
    """llmkd's evaluator on `rows`: KL(teacher || model) and top-1 of base and distilled (`score_fidelity`,
    one row at a time as the engine side runs them), and their greedy outputs on the first GENERATED_ROWS
    prompts. `teacher`: one already loaded, else loaded here."""
    from llmkd.fidelity import adapter_off

    teacher = teacher if teacher is not None else models.load_teacher(recipe.model)
    student = models.load_student(recipe.model, adapter=adapter)
    tokenizer = models.load_tokenizer(recipe.model)
    with _dequantized_once(recipe, student):
        figures = score_rows(recipe, teacher, student, tokenizer, rows, ["student", "distilled"])
        for tag, shown in figures.items():
            with adapter_off(student, tag):
                shown["outputs"] = greedy_outputs(recipe, student, tokenizer, rows)
    del teacher, student
    models.release_memory()
    return figures


def _dequantized_once(recipe: Recipe, model):
    """GGUF's and HQQ's layers dequantized once for the block: bitwise the numbers of their per-call forward
    (tests/test_gguf.py, tests/test_quantize.py). bitsandbytes' layers keep their own kernels, which the
    transformers engine runs too."""
    return fastpath.dequantized_once(model, enabled=recipe.model.quant.startswith(("gguf-", "hqq")))


def greedy_outputs(recipe: Recipe, model, tokenizer, rows: list[dict]) -> list[str]:
    """`model`'s greedy completions of the first GENERATED_ROWS prompts, one at a time as the engines run them."""
    from llmkd.generation import generate_ids

    done, _ = generate_ids(model, tokenizer, [r["input_ids"][: r["start"]] for r in rows[:GENERATED_ROWS]],
                           batch_size=1, max_new_tokens=recipe.eval.max_new_tokens,
                           stop_strings=sources.stop_strings(recipe.data), progress=False, share_prefix=False)
    return [c.text for c in done]


def score_rows(recipe: Recipe, teacher, model, tokenizer, rows: list[dict], tags: list[str]) -> dict:
    """{tag: KL, top-1, tokens} of `model` on `rows` (`score_fidelity`, one row at a time as the engines run
    them, fast paths off: the library's kernels)."""
    from llmkd.fidelity import score_fidelity

    return {f.tag: {"kl": f.kl, "top1_agreement": f.top1_agreement, "tokens": f.tokens}
            for f in score_fidelity(teacher, model, tokenizer, [r["row"] for r in rows], tags=tags, batch_size=1,
                                    share_prefix=False, progress=False,
                                    rendering="llmkd" if recipe.data.is_gsm8k else prompts.DATA_RENDERING,
                                    max_length=recipe.data.max_length)}


def same_outputs(ours_: list[str], theirs: list[str], stops) -> float:
    """Share of rows whose engine output, cut at the first stop string, is llmkd's output (both stripped)."""
    def cut(text: str) -> str:
        ends = [text.find(s) for s in stops if s in text]
        return (text[: min(ends)] if ends else text).strip()

    return sum(cut(a) == cut(b) for a, b in zip(ours_, theirs)) / max(len(ours_), 1)


def engine(folder: Path, recipe: Recipe, rows: list[dict], *, extra: tuple[str, ...] = (),
           name: str = "plain transformers + peft") -> dict:
    """The same figures from the folder as `name` loads it, in a fresh process: export_check.py with
    `--export folder` (transformers + peft), or `extra` (the engine and its files)."""
    rows_file, out_file = folder.parent / f".{folder.name}.rows.json", folder.parent / f".{folder.name}.check.json"
    rows_file.write_text(json.dumps([{"input_ids": r["input_ids"], "start": r["start"], "generate": i < GENERATED_ROWS}
                                     for i, r in enumerate(rows)]))
    dtype = str(models.teacher_dtype(recipe.model)).removeprefix("torch.")
    engine_files = list(extra) or ["--export", str(folder)]  # llama.cpp: the files are named in `extra`
    command = [sys.executable, str(Path(__file__).with_name("export_check.py")), *engine_files,
               "--teacher", str(models.resolve(recipe.model.name)), "--teacher-dtype", dtype,
               "--rows", str(rows_file), "--out", str(out_file)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of llmkd on its path
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise LlmkdError(f"the exported folder does not load in {name}: {last}")
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


def export(recipe: Recipe, *, to: str | None = None, out: str | Path, check: int = 32,
           gguf_metadata: str | Path | None = None, recovery_steps: int | None = None,
           recovery_lr: float | None = None, merge_tokens: int | None = None, say=print) -> Path:
    """Write, check and publish the export of `recipe`'s run (module docstring); returns the folder.
    `recovery_steps`, `recovery_lr`, `merge_tokens`: `--to merged`'s recovery and calibration (default
    config.RECOVERY_STEPS, recovery_lr, MERGE_CALIBRATION_TOKENS)."""
    if check <= 0:
        raise LlmkdError(f"--check must be > 0, got {check}")
    to = to or engine_of(recipe)
    for flag, value, zero_too in (("--recovery-steps", recovery_steps, False), ("--recovery-lr", recovery_lr, False),
                                  ("--merge-tokens", merge_tokens, True)):  # 0 tokens: rounded to nearest
        if value is not None and to != "merged":
            raise LlmkdError(f"{flag}: only with --to merged (the merge and its recovery), not --to {to}")
        if value is not None and not (value > 0 or (zero_too and value == 0)):
            raise LlmkdError(f"{flag} must be > 0{' (or 0)' if zero_too else ''}, got {value}")
    merging = {"steps": recovery_steps or RECOVERY_STEPS, "lr": recovery_lr or default_recovery_lr(recipe.model.quant),
               "calibration_tokens": MERGE_CALIBRATION_TOKENS if merge_tokens is None else merge_tokens}
    adapter = check_exportable(recipe, to)
    metadata = metadata_source(recipe, gguf_metadata) if engine_of(recipe) == "gguf" else None
    out = Path(out)
    identity = _identity(recipe, adapter, to)
    _claim(out, identity)
    tokenizer = models.load_tokenizer(recipe.model)
    rows = held_out_rows(recipe, tokenizer, check)
    if to == "gguf":
        return _export_gguf(recipe, adapter, out, rows, metadata, identity, say)
    if to == "merged" and engine_of(recipe) == "transformers":
        return _export_merged_transformers(recipe, adapter, out, rows, identity, merging, say)
    if to == "merged":
        return _export_merged(recipe, adapter, out, rows, metadata, identity, merging, say)
    tmp = atomic.temporary_dir(out)
    try:
        t0 = time.perf_counter()
        say(f"[1/3] writing the {recipe.model.quant} student, its adapter and tokenizer -> {out}")
        _write_folder(tmp, recipe, adapter, tokenizer)
        name = engine_name(recipe, "peft")
        say(f"[2/3] scoring {len(rows)} held-out rows in llmkd and, in a fresh process, in {name}")
        llmkd_figures = ours(recipe, adapter, rows)
        engine_figures = engine(tmp, recipe, rows, name=name)
        _passed(gate(to, llmkd_figures, engine_figures, sources.stop_strings(recipe.data)), TOLERANCE[to])
        _publish(tmp, out, recipe, identity, rows, t0, model_card, llmkd=llmkd_figures, engine=engine_figures)
        say("[3/3] the gate passed: " + "; ".join(
            f"{tag} KL {engine_figures[tag]['kl']:.4f} (llmkd {llmkd_figures[tag]['kl']:.4f}), greedy output as "
            f"llmkd's on {100 * engine_figures[tag]['same_output_as_llmkd']:.0f}% of {len(engine_figures[tag]['outputs'])} "
            "prompts" for tag in ("student", "distilled")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _passed(problems: list[str], tolerance: dict) -> None:
    if problems:
        raise LlmkdError(f"the fidelity gate failed, nothing published: {'; '.join(problems)} (tolerance {tolerance})")


def _publish(tmp: Path, out: Path, recipe: Recipe, identity: dict, rows: list[dict], t0: float, card,
             files: bool = False, **figures) -> dict:
    """`tmp` becomes `out` in one rename, with its record (`export.json`: the identity, the gate's tolerance
    and `figures`, and the files' sizes if `files`) and its model card `card(recipe, record)`; returns the record."""
    to = identity["format"]
    tolerance = TOLERANCE[engine_of(recipe)]
    record = {"identity": identity, "format": to, "rows": len(rows), "tolerance": tolerance, **figures,
              "seconds": round(time.perf_counter() - t0, 1)}
    if files:
        record["files"] = {f.name: f.stat().st_size for f in sorted(tmp.iterdir())}
    record |= {"recipe": recipe.model_dump(), **provenance()}
    atomic.write_json(tmp / EXPORT_FILE, record)
    atomic.write_text(tmp / "README.md", card(recipe, record))
    atomic.publish_dir(tmp, out)
    return record


def metadata_source(recipe: Recipe, given: str | Path | None) -> Path:
    """The GGUF whose tokenizer the exported base copies (its hyperparameters come from the model's config)."""
    if given is not None:
        path = Path(given)
        if not path.is_file():
            raise LlmkdError(f"--gguf-metadata {path}: no such file")
        return path
    if recipe.model.name == models.EMBEDDED_ALIAS:
        return models.embedded_gguf()
    raise LlmkdError(f"--to gguf: give --gguf-metadata FILE, a GGUF of {recipe.model.name} to copy its tokenizer "
                     "from (llama.cpp's convert_hf_to_gguf.py writes one from the model folder)")


def _export_gguf(recipe: Recipe, adapter: Path, out: Path, rows: list[dict], metadata: Path, identity: dict,
                 say) -> Path:
    """`--to gguf`: model.gguf + adapter.gguf, checked in llama.cpp (module docstring), then published."""
    from llmkd import export_gguf, quantize

    qtype = quantize.quantizer(recipe.model).ggml_type
    tmp, exact_dir = atomic.temporary_dir(out), atomic.temporary_dir(out.parent / f".{out.name}.f32")
    try:
        t0 = time.perf_counter()
        say(f"[1/3] writing the {recipe.model.quant} base as llama.cpp runs it and the adapter as its LoRA file -> {out}")
        student = models.load_student(recipe.model, adapter=adapter)  # the base exactly as trained against
        base = student.get_base_model()
        template = models.load_tokenizer(recipe.model).chat_template
        export_gguf.write_base(base, tmp / "model.gguf", metadata, qtype, chat_template=template)
        export_gguf.write_lora(adapter, tmp / "adapter.gguf", base.config)
        # The exact check's pair: the same bytes and adapter in fp32, in llmkd and (all-F32 files) in llama.cpp.
        exact = response_logprobs(_in_fp32(student), rows)
        export_gguf.write_base(base, exact_dir / "model.gguf", metadata, qtype, chat_template=template, f32=True)
        export_gguf.write_lora(adapter, exact_dir / "adapter.gguf", base.config)
        del student, base
        models.release_memory()
        say(f"[2/3] scoring {len(rows)} held-out rows in llmkd and, in a fresh process, in llama.cpp")
        llmkd_figures = ours(recipe, adapter, rows)
        engine_figures = engine(tmp, recipe, rows, name="llama.cpp (llama-cpp-python)",
                                extra=("--engine", "llama.cpp", "--base", str(tmp / "model.gguf"),
                                       "--distilled", str(tmp / "model.gguf"), "--distilled-lora", str(tmp / "adapter.gguf"),
                                       "--exact", str(exact_dir / "model.gguf"), "--exact-lora", str(exact_dir / "adapter.gguf"),
                                       "--max-new-tokens", str(recipe.eval.max_new_tokens)))
        _passed(gate_gguf(llmkd_figures, exact, engine_figures, sources.stop_strings(recipe.data)), TOLERANCE["gguf"])
        _publish(tmp, out, recipe, identity, rows, t0, gguf_model_card, files=True, llmkd=llmkd_figures,
                 engine=engine_figures)
        e = engine_figures
        say(f"[3/3] the gate passed: F32 log-probabilities within {e['distilled_f32']['max_logprob_difference']:.1e} "
            f"of llmkd's; in llama.cpp the adapter takes KL {e['student']['kl']:.4f} -> {e['distilled']['kl']:.4f} "
            f"({100 * e['gap_closed']:.1f}% of the gap; llmkd {100 * llmkd_figures['gap_closed']:.1f}%)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(exact_dir, ignore_errors=True)
    return out


def _in_fp32(model):
    """A GGUF student computing in fp32: the same blocks, the rest cast (exact: fp32 holds every value)."""
    from llmkd.gguf_quant import GGUFLinear

    model.float()
    for m in model.modules():
        if isinstance(m, GGUFLinear):
            m.compute_dtype = torch.float32
    return model


def _merging_line(merging: dict) -> str:
    codes = (f"codes chosen on {merging['calibration_tokens']:,} transfer-set tokens" if merging["calibration_tokens"]
             else "codes rounded to nearest")
    return f"{codes}; {merging['steps']} steps at lr {merging['lr']:g}"


def _export_merged(recipe: Recipe, adapter: Path, out: Path, rows: list[dict], metadata: Path, identity: dict,
                   merging: dict, say) -> Path:
    """`--to merged` (GGUF students): one model.gguf, the adapter merged and the scales recovered (llmkd/merge.py),
    checked in llama.cpp against the base as `--to gguf` checks the adapter, then published."""
    from llmkd import export_gguf, merge, quantize

    qtype = quantize.quantizer(recipe.model).ggml_type
    tmp, check_dir = atomic.temporary_dir(out), atomic.temporary_dir(out.parent / f".{out.name}.check")
    try:
        t0 = time.perf_counter()
        tokenizer = models.load_tokenizer(recipe.model)
        template = tokenizer.chat_template
        say(f"[1/3] merging the adapter into the {recipe.model.quant} blocks, quantizing again, recovering the "
            f"{recovered_parameters(recipe.model.quant)} ({_merging_line(merging)}) -> {out}")
        base = models.load_student(recipe.model)  # the engine's reference: the base as trained against
        export_gguf.write_base(base, check_dir / "base.gguf", metadata, qtype, chat_template=template)
        del base
        requantized, recovered, recovery = merge.merged_students(recipe, adapter, tokenizer, **merging)
        say(recovery.line())
        export_gguf.write_base(recovered, tmp / "model.gguf", metadata, qtype, chat_template=template)
        say(f"[2/3] scoring {len(rows)} held-out rows: base, adapter, merged, merged + recovered in llmkd; "
            "base and merged in llama.cpp")
        figures = _merged_figures(recipe, adapter, rows, tokenizer, requantized, recovered)
        del requantized
        exact = response_logprobs(_in_fp32(recovered), rows)
        export_gguf.write_base(recovered, check_dir / "exact.gguf", metadata, qtype, chat_template=template, f32=True)
        del recovered
        models.release_memory()
        engine_figures = engine(tmp, recipe, rows, name="llama.cpp (llama-cpp-python)",
                                extra=("--engine", "llama.cpp", "--base", str(check_dir / "base.gguf"),
                                       "--distilled", str(tmp / "model.gguf"), "--exact", str(check_dir / "exact.gguf"),
                                       "--max-new-tokens", str(recipe.eval.max_new_tokens)))
        gated = {"student": figures["student"], "distilled": dict(figures["merged"])}
        _passed(gate_gguf(gated, exact, engine_figures, sources.stop_strings(recipe.data)), TOLERANCE["gguf"])
        _publish_merged(tmp, out, recipe, identity, rows, t0, figures, recovery, engine_figures, "llama.cpp", say)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(check_dir, ignore_errors=True)
    return out


def _export_merged_transformers(recipe: Recipe, adapter: Path, out: Path, rows: list[dict], identity: dict,
                                merging: dict, say) -> Path:
    """`--to merged` (bitsandbytes nf4 and fp4 students, HQQ students): one quantised checkpoint with no adapter,
    the adapter merged and the quantizer's scales recovered (llmkd/merge.py), gated in transformers against the
    base as `--to transformers` gates the adapter, then published."""
    from llmkd import merge

    tmp, base_dir = atomic.temporary_dir(out), atomic.temporary_dir(out.parent / f".{out.name}.base")
    try:
        t0 = time.perf_counter()
        tokenizer = models.load_tokenizer(recipe.model)
        say(f"[1/3] merging the adapter into the {recipe.model.quant} weights, quantizing again, recovering the "
            f"{recovered_parameters(recipe.model.quant)} ({_merging_line(merging)}) -> {out}")
        _write_folder(base_dir, recipe, None, tokenizer)  # the engine's reference: the base as trained against
        requantized, recovered, recovery = merge.merged_students(recipe, adapter, tokenizer, **merging)
        say(recovery.line())
        # Written before anything runs it: bitsandbytes' CPU inference repacks the weights at the first forward.
        _save_student(recovered, tmp)
        _write_tokenizer_and_decoding(tmp, recipe, tokenizer)
        say(f"[2/3] scoring {len(rows)} held-out rows: base, adapter, merged, merged + recovered in llmkd; "
            f"base and merged in a fresh process in {engine_name(recipe)}")
        figures = _merged_figures(recipe, adapter, rows, tokenizer, requantized, recovered)
        with _dequantized_once(recipe, recovered):
            figures["merged"]["outputs"] = greedy_outputs(recipe, recovered, tokenizer, rows)
        del requantized, recovered
        models.release_memory()
        engine_figures = engine(tmp, recipe, rows, extra=("--export", str(tmp), "--base", str(base_dir)),
                                name=engine_name(recipe))
        gated = {"student": figures["student"], "distilled": figures["merged"]}
        _passed(gate("transformers", gated, engine_figures, sources.stop_strings(recipe.data)), TOLERANCE["transformers"])
        _publish_merged(tmp, out, recipe, identity, rows, t0, figures, recovery, engine_figures, engine_name(recipe), say,
                        weight_bytes={"base": _weight_bytes(base_dir), "merged": _weight_bytes(tmp)})
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(base_dir, ignore_errors=True)
    return out


def _merged_figures(recipe: Recipe, adapter: Path, rows: list[dict], tokenizer, requantized, recovered) -> dict:
    """llmkd's figures of the four models: base and distilled (`ours`), merged and quantized again, recovered."""
    teacher = models.load_teacher(recipe.model)
    figures = ours(recipe, adapter, rows, teacher)
    for tag, model in (("requantized", requantized), ("merged", recovered)):
        with _dequantized_once(recipe, model):
            figures[tag] = score_rows(recipe, teacher, model, tokenizer, rows, ["merged"])["merged"]
    return figures


def _publish_merged(tmp: Path, out: Path, recipe: Recipe, identity: dict, rows: list[dict], t0: float, figures: dict,
                    recovery, engine_figures: dict, engine_label: str, say, **more) -> None:
    closed = {tag: gap_closed({"student": figures["student"], "distilled": figures[tag]})
              for tag in ("distilled", "requantized", "merged")}
    record = _publish(tmp, out, recipe, identity, rows, t0, merged_model_card, files=True, llmkd=figures,
                      gap_closed=closed, adapter_gain_kept=closed["merged"] / closed["distilled"],
                      recovery={"steps": recovery.steps, "lr": recovery.lr, "seconds": round(recovery.seconds, 1),
                                "losses": recovery.losses, "merge_calibration_tokens": recovery.calibration_tokens},
                      engine=engine_figures, **more)
    say(f"[3/3] the gate passed: merged + recovered keeps {100 * record['adapter_gain_kept']:.0f}% of the adapter's "
        f"gain in llmkd (re-quantized only: {100 * closed['requantized'] / closed['distilled']:.0f}%); in {engine_label} "
        f"KL {engine_figures['student']['kl']:.4f} -> {engine_figures['distilled']['kl']:.4f}")


def _weight_bytes(folder: Path) -> int:
    """Bytes of the tensors in `folder`'s safetensors files, less bitsandbytes' quant-state records: those
    are JSON text in a uint8 tensor, whose length follows the digits of the nested absmax's mean."""
    total = 0
    for path in sorted(folder.glob("*.safetensors")):
        with path.open("rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(end - start for key, entry in header.items() if key != "__metadata__"
                     and ".quant_state.bitsandbytes__" not in key for start, end in [entry["data_offsets"]])
    return total


@torch.no_grad()
def response_logprobs(model, rows: list[dict]) -> list[list[float]]:
    """Per row, `model`'s log-probability of each response token, one row at a time."""
    out = []
    for r in rows:
        ids = torch.tensor([r["input_ids"]])
        logits = model(input_ids=ids).logits[0, r["start"] - 1 : len(r["input_ids"]) - 1].float()
        out.append(torch.log_softmax(logits, -1).gather(1, ids[0, r["start"]:, None])[:, 0].tolist())
    return out


def gap_closed(figures: dict) -> float:
    """The share of the base's KL to the teacher that the adapter removes."""
    base = figures["student"]["kl"]
    return 1 - figures["distilled"]["kl"] / base if base > 0 else float("nan")


def gate_gguf(llmkd_figures: dict, exact: list[list[float]], engine_figures: dict, stops=()) -> list[str]:
    """The two checks of the gguf gate (module docstring); records their figures in the dicts given."""
    tol, problems = TOLERANCE["gguf"], []
    f32 = engine_figures["distilled_f32"]
    theirs = f32.pop("target_logprobs")
    worst = max((abs(a - b) for ours_, their in zip(exact, theirs) for a, b in zip(ours_, their)), default=0.0)
    f32["max_logprob_difference"] = worst
    if worst > tol["exact_logprob"] or len(exact) != len(theirs):
        problems.append(f"the all-F32 files in llama.cpp differ from llmkd's fp32 forward by up to {worst:.2e} in a "
                        "response token's log-probability")
    llmkd_figures["gap_closed"], engine_figures["gap_closed"] = gap_closed(llmkd_figures), gap_closed(engine_figures)
    if abs(engine_figures["gap_closed"] - llmkd_figures["gap_closed"]) * 100 > tol["gap_closed_points"]:
        problems.append(f"the adapter closes {100 * engine_figures['gap_closed']:.1f}% of the KL gap in llama.cpp, "
                        f"{100 * llmkd_figures['gap_closed']:.1f}% in llmkd")
    if engine_figures["distilled"]["kl"] >= engine_figures["student"]["kl"]:
        problems.append(f"in llama.cpp the adapter does not lower the KL ({engine_figures['student']['kl']:.4f} -> "
                        f"{engine_figures['distilled']['kl']:.4f})")
    for tag in ("student", "distilled"):  # informational: llama.cpp's 8-bit activations change some greedy paths
        if "outputs" in llmkd_figures[tag] and "outputs" in engine_figures[tag]:
            engine_figures[tag]["same_output_as_llmkd"] = same_outputs(llmkd_figures[tag]["outputs"],
                                                                       engine_figures[tag]["outputs"], stops)
    return problems


def _write_folder(folder: Path, recipe: Recipe, adapter: Path | None, tokenizer) -> None:
    """The base exactly as llmkd quantises it for training, the adapter (unless None) in adapter/, the
    tokenizer and llmkd's decoding."""
    student = models.load_student(recipe.model)
    _save_student(student, folder)
    del student
    models.release_memory()
    if adapter is not None:
        (folder / "adapter").mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy2(adapter / name, folder / "adapter" / name)
    _write_tokenizer_and_decoding(folder, recipe, tokenizer)


def _save_student(model, folder: Path) -> None:
    """config.json and the weights in the quantizer's own serialization: bitsandbytes' through transformers,
    HQQ's through hqq's state dicts (`llmkd.export_hqq`)."""
    from llmkd import export_hqq, quantize

    if quantize.hqq_layers(model):
        export_hqq.write(model, folder)
    else:
        model.save_pretrained(folder)


def _write_tokenizer_and_decoding(folder: Path, recipe: Recipe, tokenizer) -> None:
    from transformers import GenerationConfig

    tokenizer.save_pretrained(folder)
    eos = tokenizer.eos_token_id
    GenerationConfig(do_sample=False, max_new_tokens=recipe.eval.max_new_tokens, eos_token_id=eos,
                     pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos,
                     stop_strings=list(sources.stop_strings(recipe.data)),
                     temperature=None, top_p=None, top_k=None).save_pretrained(folder)
