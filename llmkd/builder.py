"""Stage 1: build a transfer set. The 16-bit teacher answers GSM8K prompts (or is teacher-forced
on the gold solutions) and its top-k + tail distributions along each response are written as shards.

Questions are cut into shards at fixed boundaries; each shard is written atomically and recorded
in `progress/` with its sha256, so re-running a killed build does only the missing shards and gives
the same bytes as an uninterrupted one. Under `accelerate launch --multi_gpu --num_processes N`,
shard i is built by rank i % N and rank 0 writes the manifest after a barrier. A folder of another
build, or of anything else, is refused, never overwritten. The format: `transfer_sets/README.md`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from llmkd import __version__, atomic, models
from llmkd.config import Recipe
from llmkd.data import prompts, sources
from llmkd.data.gsm8k import load_gsm8k, select_range
from llmkd.errors import LlmkdError
from llmkd.generation import decoding_settings, generate_ids
from llmkd.progress import bar as progress_bar
from llmkd.provenance import provenance
from llmkd.teacher_scoring import shard_columns, teacher_targets
from llmkd.transfer_set import (BUILD_FILE, FORMAT_VERSION, MANIFEST, SHARD_DIR, BuildStats, Manifest, Settings, ShardEntry,
                                Totals, TransferSet, chat_template_sha256, check_file, folder_state, read_manifest, sha256_text,
                                shard_name, teacher_identity, tokenizer_sha256, write_shard)

log = logging.getLogger(__name__)

PROGRESS_DIR = "progress"  # while building: one record per finished shard (size, sha256)

# --- Questions and settings -----------------------------------------------------------------------


def requested_count(recipe: Recipe, limit: int | None) -> int | None:
    """transfer_set.count capped by --limit (None: to the end of the split)."""
    if limit is not None and limit <= 0:
        raise LlmkdError(f"--limit must be > 0, got {limit}")
    count = recipe.transfer_set.count
    return count if limit is None else (limit if count is None else min(count, limit))


def select_questions(recipe: Recipe, *, limit: int | None = None, allow_eval_split: bool = False, tokenizer=None):
    """(rows, exemplars, excluded_ids, data): the examples of the set, the prompt's exemplars, the
    questions of the range left out because they are exemplars (they would appear, answered, in their
    own prompts), and what the data section read (`sources.Rows.describe`, for the manifest).

    Other data than GSM8K is read and checked row by row here, before any teacher runs; with
    data.max_length its gold responses are measured with `tokenizer`."""
    ts = recipe.transfer_set
    if ts.split == "test" and not allow_eval_split:
        raise LlmkdError(
            "transfer_set.split is 'test', the evaluation split: training on it contaminates every "
            "test score; use split 'train' (or --allow-eval-split if you really mean it)"
        )
    count = requested_count(recipe, limit)
    if not recipe.data.is_gsm8k:
        data = sources.load_rows(recipe.data, ts.split, gold=ts.response == "gold")
        tok = tokenizer if tokenizer is not None else models.load_tokenizer(recipe.model)
        prompts.render_row(tok, data.examples[0])  # a tokenizer without a chat template: refused before any write
        if recipe.data.max_length is not None and ts.response == "gold":
            lengths = [len(tok(prompts.render_row(tok, r)[1], add_special_tokens=False)["input_ids"]) for r in data.examples]
            sources.skip_long(data, lengths, recipe.data.max_length, recipe.data.on_bad_row)
        if recipe.data.max_length is not None and ts.response == "teacher" and recipe.data.max_length <= ts.max_new_tokens:
            raise LlmkdError(f"data.max_length {recipe.data.max_length} leaves no room for a prompt before "
                             f"transfer_set.max_new_tokens {ts.max_new_tokens} of teacher response")
        return list(select_range(data.examples, ts.start, count)), [], [], data.describe()
    exemplars = []
    source = sources.gsm8k_copy(recipe.data.source)
    if ts.shots > 0:
        exemplars = prompts.select_exemplars(load_gsm8k("train", source), ts.shots, recipe.data.exemplar_seed)
    taken = {e["question_hash"] for e in exemplars}
    selected, excluded = [], []
    for r in select_range(load_gsm8k(ts.split, source), ts.start, count):
        (excluded if r["question_hash"] in taken else selected).append(r)
    if not selected:
        raise LlmkdError("transfer set: no questions left after excluding the exemplars")
    return selected, exemplars, [r["id"] for r in excluded], {"source": recipe.data.source, "format": "gsm8k",
                                                               "examples": len(selected)}


def make_settings(recipe: Recipe, tokenizer, teacher: dict, rows: Sequence[dict], exemplars: Sequence[dict],
                  count: int | None, vocab_size: int) -> Settings:
    ts = recipe.transfer_set
    teacher_mode = ts.response == "teacher"
    sampled = teacher_mode and ts.do_sample
    stops = sources.stop_strings(recipe.data)
    gsm8k = recipe.data.is_gsm8k
    if ts.top_k >= vocab_size:
        raise LlmkdError(f"transfer_set.top_k={ts.top_k} is not below the teacher's vocabulary ({vocab_size:,} tokens): "
                         "the tail bucket would be empty; keep top_k well below it (32 is plenty)")
    return Settings(
        teacher_sha256=teacher["sha256"],
        teacher_dtype=str(models.teacher_dtype(recipe.model)).removeprefix("torch."),
        tokenizer_sha256=tokenizer_sha256(tokenizer),
        chat_template_sha256=chat_template_sha256(tokenizer),
        vocab_size=vocab_size,
        top_k=ts.top_k,
        encoding=ts.encoding,
        response=ts.response,
        max_new_tokens=ts.max_new_tokens if teacher_mode else None,
        do_sample=ts.do_sample if teacher_mode else None,
        sampling_temperature=ts.sampling_temperature if sampled else None,
        seed=ts.seed if sampled else None,
        stop_strings=list(stops) if teacher_mode else None,
        decoding=decoding_settings(max_new_tokens=ts.max_new_tokens, stop_strings=stops,
                                   do_sample=ts.do_sample, temperature=ts.sampling_temperature,
                                   seed=ts.seed) if teacher_mode else None,
        batch_size=ts.batch_size,
        shots=ts.shots,
        renderings=list(ts.renderings),
        exemplar_seed=recipe.data.exemplar_seed if ts.shots else None,
        exemplar_ids=[e["id"] for e in exemplars],
        instruction_sha256=sha256_text(prompts.INSTRUCTION if gsm8k else ""),
        prompt_style="chat" if prompts.has_chat_template(tokenizer) else "plain",
        # GSM8K's copies keep the names they had before any data ("local", "hub"): the same settings hash.
        source=sources.gsm8k_copy(recipe.data.source) or recipe.data.source,
        split=ts.split,
        start=ts.start,
        count=count,
        questions_sha256=_questions_sha256(rows, with_answers=not teacher_mode),
        shard_size=ts.shard_size,
    )


def _questions_sha256(rows: Sequence[dict], *, with_answers: bool) -> str:
    """Over the ids and question hashes of `rows`, in order (and the solutions, for gold responses; with
    other data, every example's prompt turns and response, so max_length, columns and format are covered)."""
    def content(r: dict) -> str:
        if "messages" in r:
            return sha256_text(json.dumps([list(r["messages"]), r["response"]], ensure_ascii=False))
        return sha256_text(r["answer"]) if with_answers else ""

    lines = [f"{r['id']} {r['question_hash']}" + (f" {content(r)}" if with_answers or "messages" in r else "")
             for r in rows]
    return sha256_text("\n".join(lines))


def _vocab_size(resolved: str, trust_remote_code: bool) -> int:
    """V, the width of the teacher's logits, from its config (without loading the weights)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    config = getattr(config, "get_text_config", lambda: config)()
    return int(config.vocab_size)


# --- Folder claim, shards, progress ----------------------------------------------------------------


def _progress_path(out: Path, index: int) -> Path:
    return out / PROGRESS_DIR / f"shard-{index:05d}.json"


def _settings_diff(old: dict, new: Settings) -> str:
    new = asdict(new)
    keys = [k for k in new if old.get(k) != new[k]]
    shown = ", ".join(f"{k}: {_short(old.get(k))} there, {_short(new[k])} now" for k in keys[:3])
    return shown + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 24 else text[:12] + "..."


def _claim_folder(out: Path, settings: Settings) -> Manifest | None:
    """Check that `out` is new or holds this very build. Returns its manifest if already complete.

    Refuses (LlmkdError naming the folder) a folder of another build or of anything else.
    """
    refuse = f"; choose another transfer_set.out / --out, or delete {out} to rebuild"
    state = folder_state(out, refuse)
    if state == "complete":
        manifest = read_manifest(out)
        if manifest.settings_hash != settings.hash():
            raise LlmkdError(f"{out}: a transfer set built with other settings ({_settings_diff(asdict(manifest.settings), settings)}){refuse}")
        return manifest
    if state == "unfinished":
        try:
            old = json.loads((out / BUILD_FILE).read_text())["settings"]
        except (ValueError, KeyError, TypeError):
            raise LlmkdError(f"{out / BUILD_FILE}: unreadable build record{refuse}") from None
        if old != asdict(settings):
            raise LlmkdError(f"{out}: an unfinished build with other settings ({_settings_diff(old, settings)}){refuse}")
    return None


def _finished_shard(out: Path, index: int) -> dict | None:
    """The progress record of shard `index` if its file is there and matches it, else None."""
    record_path = _progress_path(out, index)
    try:
        record = json.loads(record_path.read_text())
        check_file(out / record["file"], record["bytes"], record["sha256"])
    except (OSError, ValueError, KeyError, TypeError, LlmkdError):
        return None
    return record


def _remove_temporaries(out: Path) -> None:
    """Leftovers of a killed build: `.<name>.tmp-<pid>` files (atomic writes that never finished)."""
    for folder in (out, out / SHARD_DIR, out / PROGRESS_DIR):
        atomic.remove_temporaries(folder)



# --- The teacher's side: responses and targets (scored by llmkd.teacher_scoring) -------------------


@dataclass
class _Job:
    """What every shard of one build needs."""

    recipe: Recipe
    out: Path
    tokenizer: Any
    exemplars: list[dict]
    settings: Settings
    load_teacher: Callable[[], Any]
    bar: Any
    tokens: int = 0  # response tokens so far, for the bar's tokens/s
    started: float = field(default_factory=time.perf_counter)


def _build_shard(job: _Job, index: int, rows: Sequence[dict]) -> dict:
    """Responses, teacher targets and the file of one shard; returns its progress record."""
    ts, tok, k = job.recipe.transfer_set, job.tokenizer, job.settings.top_k
    teacher = job.load_teacher()
    t0 = time.perf_counter()
    # Example j of the set (j = index * shard_size + i) is written in renderings[j % n].
    renderings = [ts.renderings[(index * ts.shard_size + i) % len(ts.renderings)] for i in range(len(rows))]
    rendered = [prompts.render_row(tok, r, how, job.exemplars) for r, how in zip(rows, renderings)]
    texts = [prompt for prompt, _ in rendered]
    max_length = job.recipe.data.max_length
    sequences, starts, finishes = [None] * len(rows), [0] * len(rows), [""] * len(rows)
    targets: list = [None] * len(rows)
    progress = partial(_advance, job)  # per teacher-forward batch
    if ts.response == "teacher":
        # generate's own batches (prompts longest first), one call per batch so the bar moves; the
        # seed of a batch is the recipe seed + the set-wide position of its first example.
        order = sorted(range(len(rows)), key=lambda i: -len(texts[i]))
        for b in range(0, len(order), ts.batch_size):
            idx = order[b : b + ts.batch_size]
            prompt_ids = {i: prompts.encode(tok, texts[i]) for i in idx}
            if max_length is not None:  # room for the longest response the teacher may write
                prompt_ids = {i: sources.fit(ids, max_length - ts.max_new_tokens) for i, ids in prompt_ids.items()}
            completions, _ = generate_ids(
                teacher, tok, [prompt_ids[i] for i in idx], batch_size=len(idx), max_new_tokens=ts.max_new_tokens,
                stop_strings=job.settings.stop_strings, do_sample=ts.do_sample, temperature=ts.sampling_temperature,
                seed=ts.seed + index * ts.shard_size + b, progress=False, share_prefix=job.recipe.fast_paths,
            )
            for i, c in zip(idx, completions):
                sequences[i], starts[i], finishes[i] = prompt_ids[i] + c.token_ids, len(prompt_ids[i]), c.finish
            batch_targets = teacher_targets(
                teacher, [sequences[i] for i in idx], [starts[i] for i in idx], k,
                pad_id=tok.pad_token_id, batch_size=ts.batch_size, share_prefix=job.recipe.fast_paths,
                on_batch=progress,
            )
            for i, t in zip(idx, batch_targets):
                targets[i] = t
    else:
        for i, (prompt, response) in enumerate(rendered):
            ids, mask = prompts.tokenize_example(tok, prompt, response)
            sequences[i], starts[i] = sources.fit_example(ids, mask.index(1), max_length)
            finishes[i] = "gold"
        targets = teacher_targets(teacher, sequences, starts, k, pad_id=tok.pad_token_id, batch_size=ts.batch_size,
                                  share_prefix=job.recipe.fast_paths, on_batch=progress)

    s = job.settings
    columns, masses = shard_columns(rows, sequences, starts, finishes, targets, where=f"shard {index}",
                                    encoding=s.encoding, vocab_size=s.vocab_size)
    path = job.out / shard_name(index)
    write_shard(path, columns, k, s.encoding, s.vocab_size)
    record = asdict(ShardEntry(
        file=shard_name(index), examples=len(rows), response_tokens=int(masses.size),
        bytes=path.stat().st_size, sha256=models.sha256_file(path),
        mean_topk_mass=float(masses.mean()), seconds=round(time.perf_counter() - t0, 3),
    ))
    atomic.write_json(_progress_path(job.out, index), record)
    return record


def _advance(job: _Job, examples: int, tokens: int) -> None:
    """Move the bar by `examples`; show response tokens/s next to its examples/s."""
    if job.bar.disable:
        return
    job.bar.update(examples)
    job.tokens += tokens
    elapsed = time.perf_counter() - job.started
    if elapsed > 0:
        job.bar.set_postfix(tok_s=f"{job.tokens / elapsed:.0f}")


# --- Build ----------------------------------------------------------------------------------------


def _processes() -> tuple[int, int, Callable[[], None]]:
    """(rank, world size, barrier). Several processes only under a distributed launcher (accelerate
    launch --multi_gpu / torchrun set WORLD_SIZE); accelerate's PartialState joins them (gloo on CPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, lambda: None
    from accelerate import PartialState

    # cpu=True without CUDA: otherwise accelerate sees no GPU and falls back to one process per rank
    # (distributed type NO), and every rank would build every shard. A rank waits at the barrier
    # while the others finish their last shard: allow hours, not the default 30 minutes.
    state = PartialState(cpu=not torch.cuda.is_available(), timeout=timedelta(hours=12))
    if state.num_processes != int(os.environ["WORLD_SIZE"]):
        raise LlmkdError(
            f"launched as {os.environ['WORLD_SIZE']} processes but accelerate joined {state.num_processes} "
            f"({state.distributed_type}); was accelerate's state created earlier without cpu=True?"
        )
    return state.process_index, state.num_processes, state.wait_for_everyone


def build(recipe: Recipe, *, out: str | Path | None = None, limit: int | None = None, allow_eval_split: bool = False,
          progress: bool = True, teacher=None, tokenizer=None) -> Manifest:
    """Build (or complete, or just return) the transfer set of `recipe` in `out` (default transfer_set.out).

    limit: at most this many questions (caps transfer_set.count). allow_eval_split: permit split
    "test". teacher, tokenizer: already loaded ones to use (default: load from recipe.model; the
    teacher only if a shard is left to build). A complete set with the same settings is verified
    and returned as is. Returns the manifest, on every rank.
    """
    ts = recipe.transfer_set
    out = Path(out or recipe.layout.transfer_set)
    rank, world, barrier = _processes()
    tok = tokenizer if tokenizer is not None else models.load_tokenizer(recipe.model)
    rows, exemplars, excluded, data = select_questions(recipe, limit=limit, allow_eval_split=allow_eval_split,
                                                       tokenizer=tok)
    count = requested_count(recipe, limit)
    identity = teacher_identity(recipe.model)
    settings = make_settings(recipe, tok, identity, rows, exemplars, count, _vocab_size(identity["resolved"], recipe.model.trust_remote_code))

    # Rank 0 claims the folder (refusing a foreign one) before any other rank looks at it.
    if rank == 0:
        complete = _claim_folder(out, settings)
        if complete is None:
            out.mkdir(parents=True, exist_ok=True)
            _remove_temporaries(out)
            if not (out / BUILD_FILE).exists():
                atomic.write_json(out / BUILD_FILE, {"settings_hash": settings.hash(), "settings": asdict(settings)})
    barrier()
    if rank != 0:
        complete = _claim_folder(out, settings)
    if complete is not None:
        TransferSet(out, complete).verify()
        log.info("%s: already built with these settings", out)
        return complete

    shards = [rows[s : s + ts.shard_size] for s in range(0, len(rows), ts.shard_size)]
    mine = range(rank, len(shards), world)
    todo = [i for i in mine if _finished_shard(out, i) is None]
    if len(todo) < len(mine):
        log.info("%s: resuming, %d of %d shard(s) already built", out, len(mine) - len(todo), len(mine))
    loaded = [teacher]

    def load_teacher():
        if loaded[0] is None:
            loaded[0] = models.load_teacher(recipe.model)
        dtype = str(next(loaded[0].parameters()).dtype).removeprefix("torch.")
        if dtype != settings.teacher_dtype:
            raise LlmkdError(f"the teacher given runs in {dtype}, the recipe says {settings.teacher_dtype} (model.teacher_dtype)")
        return loaded[0]

    bar = progress_bar(total=sum(len(shards[i]) for i in todo), desc=f"transfer set {out.name}", unit="ex",
                       disable=not progress or rank != 0)
    job = _Job(recipe, out, tok, exemplars, settings, load_teacher, bar)
    try:
        for i in todo:
            _build_shard(job, i, shards[i])
    finally:
        bar.close()
    barrier()
    if rank == 0:
        _write_manifest(out, settings, identity, rows, excluded, len(shards), world, data)
    barrier()
    return read_manifest(out)


def _write_manifest(out: Path, settings: Settings, identity: dict, rows: Sequence[dict], excluded: list[str],
                    num_shards: int, processes: int, data: dict) -> Manifest:
    records = []
    for i in range(num_shards):
        record = _finished_shard(out, i)
        if record is None:
            raise LlmkdError(f"{out / shard_name(i)}: missing or not matching its progress record after the build")
        records.append(ShardEntry(**record))
    examples = sum(r.examples for r in records)
    tokens = sum(r.response_tokens for r in records)
    size = sum(r.bytes for r in records)
    seconds = sum(r.seconds for r in records)
    mass = sum(r.mean_topk_mass * r.response_tokens for r in records) / max(tokens, 1)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        llmkd_version=__version__,
        settings_hash=settings.hash(),
        settings=settings,
        teacher=identity,
        question_ids=[r["id"] for r in rows],
        question_hashes=[r["question_hash"] for r in rows],
        excluded_exemplar_ids=excluded,
        shards=records,
        totals=Totals(
            examples=examples, response_tokens=tokens, bytes=size,
            bytes_per_token=round(size / max(tokens, 1), 2),
            full_vocab_fp16_bytes_per_token=2 * settings.vocab_size,
            mean_topk_mass=round(mass, 6),
        ),
        build=BuildStats(seconds=round(seconds, 2), tokens_per_s=round(tokens / seconds, 1) if seconds else 0.0,
                         processes=processes),
        provenance=provenance(),
        data=data,
    )
    atomic.write_json(out / MANIFEST, manifest.to_dict())
    # The manifest now holds every record: drop the build's working files.
    for i in range(num_shards):
        _progress_path(out, i).unlink(missing_ok=True)
    if (out / PROGRESS_DIR).is_dir():
        (out / PROGRESS_DIR).rmdir()
    (out / BUILD_FILE).unlink(missing_ok=True)
    return manifest
