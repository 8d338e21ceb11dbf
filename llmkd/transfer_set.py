"""Transfer set: the 16-bit teacher's next-token distributions on GSM8K prompts, cached for stage 2.

Stage 1 (`build`) runs the teacher once; stage 2 trains LoRA on the NF4 student against the cache
and never loads the teacher. Per question:

    prompt    prompts.render_prompt(tok, question, exemplars)          (the one prompt format)
    response  teacher: the teacher's own generation (greedy, or seeded sampling)
              gold:    prompts.render_response(tok, question, prompts.assistant_turn(answer), exemplars)
    target    one teacher forward over prompt + response; at every position that predicts a
              response token: losses.topk_with_tail(logits, k) (the one definition of the target),
              stored as int32 ids and fp16 log-probabilities

Folder layout

    <out>/manifest.json                 written last: a folder without it is an unfinished build
    <out>/shards/shard-00000.parquet    examples [0, shard_size), then [shard_size, 2 * shard_size), ...
    <out>/build.json                    while building: the settings of the build under way
    <out>/progress/shard-00000.json     while building: one record per finished shard (size, sha256)

`build.json` and `progress/` are removed once `manifest.json` is written.

Row (one example) of a shard; shards load with `datasets.load_dataset("parquet", ...)`

    id              string                          "gsm8k-train-00042"
    question_hash   string                          `gsm8k.question_hash(question)`
    input_ids       list<int32>               (L,)  prompt + response tokens, no padding
    response_start  int32                           index of the first response token; R = L - response_start
    finish          string                          how the response ends (below)
    topk_ids        list<fixed_size_list<int32, K>>    (R, K)  the teacher's K most likely next tokens, most likely first
    topk_logprobs   list<fixed_size_list<float16, K>>  (R, K)  their log-probabilities at temperature 1
    tail_logmass    list<float16>                      (R,)    log of the mass of every other token, floored at log(1e-30)

Row i of the three target columns is the teacher's distribution for token input_ids[response_start + i],
computed from the logits at position response_start + i - 1. K = manifest settings.top_k.

Responses and `finish`

    teacher  The exact token ids the teacher generated, up to and including the one that ended the
             generation (not decoded and re-tokenized: decode -> encode is not an identity, and the
             cache must hold the distributions along the path the teacher actually took). The prompt
             ids are `tokenizer(prompt, add_special_tokens=False)`, as generation saw them.
             Batches are those of `generation.generate` (a shard's prompts, longest first); with
             do_sample, a batch is seeded with seed + the set-wide index of its first position.
               "eos"          ends with the eos / end-of-turn token (chat models: their `<|im_end|>`)
               "stop_string"  ends with the token that completed one of `prompts.STOP_STRINGS`
               "length"       cut at max_new_tokens (no end marker: stage 2 may drop these)
    gold     `prompts.tokenize_example(tok, prompt, render_response(...))`: the solution, ending with
             the chat template's end-of-turn marker (and whatever the template puts after it).
               "gold"

Size: zstd (level 19) over parquet's BYTE_STREAM_SPLIT encoding. SmolLM2 at K = 64 (64 gold
solutions, or 32 of its own answers): ~175 bytes per response token, prompts included (raw fp16
targets alone: 6K + 2 = 386; of the 175, ids ~107 and log-probs ~63), against 2V bytes for
full-vocabulary fp16 logits: 98,304 at V = 49,152, 256,512 at Llama 3.1's V = 128,256.

manifest.json (`Manifest`; readers check it before touching a shard)

    format_version        FORMAT_VERSION; a reader refuses any other
    llmkd_version         llmkd.__version__ of the build
    settings_hash         sha256 of `settings` (canonical JSON): equal hashes mean equal content,
                          so `build` returns an existing set instead of rebuilding it
    settings              `Settings`: everything that determines the content
      teacher_sha256        over the teacher's weight files and config.json (`teacher.files`)
      teacher_dtype         dtype the teacher ran in
      tokenizer_sha256      over the tokenizer as serialized (vocab, merges, added tokens, normalizers)
      chat_template_sha256  over the chat template ("" when there is none)
      vocab_size            width V of the teacher's logits
      top_k                 K
      response              "teacher" or "gold"
      max_new_tokens, do_sample, sampling_temperature, seed, stop_strings
                            the teacher's generation (null in gold mode; temperature and seed
                            null when greedy)
      batch_size            generation and forward batch (it sets the padding, so the rounding)
      shots, exemplar_seed, exemplar_ids, instruction_sha256, prompt_style
                            the prompt (exemplar_seed null at 0 shots; exemplars are train
                            questions, excluded from the set)
      source, split, start, count
                            the GSM8K range asked for (count after --limit)
      questions_sha256      over the ids and question hashes of the examples, in order (and
                            their solutions, in gold mode)
      shard_size            examples per shard
    teacher               {reference, revision, resolved, files: {name: sha256}, sha256}
    question_ids          ids of the examples, in order (one per row)
    question_hashes       their question hashes: the evaluator's contamination guard
    excluded_exemplar_ids questions of the range left out because they are this set's exemplars
    shards                [{file, examples, response_tokens, bytes, sha256, mean_topk_mass, seconds}]
    totals                {examples, response_tokens, bytes, bytes_per_token,
                           full_vocab_fp16_bytes_per_token (2V), mean_topk_mass}
                          mean_topk_mass = mean over response tokens of exp(logsumexp(topk_logprobs))
    build                 {seconds (summed over shards, resumed runs and processes), tokens_per_s
                           (response tokens per second of one process), processes}
    provenance            package versions and git commit

Resume and multiple processes: questions are cut into shards at fixed boundaries. Each shard is
written under a temporary name, fsynced and renamed, then recorded in `progress/` (also atomically)
with its sha256. Re-running the same build skips the shards whose file matches its record and does
the rest; the shards are written deterministically, so a killed-and-resumed build equals an
uninterrupted one byte for byte. Under `accelerate launch --multi_gpu --num_processes N`, shard i is
built by rank i % N, and rank 0 writes the manifest after a barrier: the same bytes as one process.
A folder built with other settings, or that is not a transfer set, is refused, never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, fields
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from llmkd import __version__, atomic, models, shared_prefix
from llmkd.config import Recipe
from llmkd.data import prompts
from llmkd.data.gsm8k import load_gsm8k, select_range
from llmkd.errors import LlmkdError
from llmkd.generation import generate, truncate_at_stop
from llmkd.losses import topk_with_tail
from llmkd.provenance import provenance

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
BUILD_FILE = "build.json"
SHARD_DIR = "shards"
PROGRESS_DIR = "progress"
LLAMA31_VOCAB = 128_256  # the reference study's teacher, for the size comparison

# Parquet writer options: fixed, so the same rows give the same bytes (resume = uninterrupted).
# BYTE_STREAM_SPLIT groups the k-th byte of every value together (the high bytes of int32 ids and
# the exponents of fp16 log-probs are near-constant), which zstd then compresses; dictionary
# encoding would take precedence over it, so it is off. Level 19 over 9: ~5% smaller files, shard
# writes still a small fraction of the teacher's time.
_PARQUET_OPTIONS = dict(
    compression="zstd",
    compression_level=19,
    use_dictionary=False,
    use_byte_stream_split=[  # parquet's leaf paths of the numeric columns
        "input_ids.list.element",
        "response_start",
        "topk_ids.list.element.list.element",
        "topk_logprobs.list.element.list.element",
        "tail_logmass.list.element",
    ],
)

# Largest logits tensor of one teacher forward (response positions x V): micro-batches are cut to fit.
_LOGITS_BUDGET_BYTES = 1 << 30


# --- Manifest -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything that determines a transfer set's content (keys documented in the module docstring)."""

    teacher_sha256: str
    teacher_dtype: str
    tokenizer_sha256: str
    chat_template_sha256: str
    vocab_size: int
    top_k: int
    response: str
    max_new_tokens: int | None
    do_sample: bool | None
    sampling_temperature: float | None
    seed: int | None
    stop_strings: list[str] | None
    batch_size: int
    shots: int
    exemplar_seed: int | None
    exemplar_ids: list[str]
    instruction_sha256: str
    prompt_style: str
    source: str
    split: str
    start: int
    count: int | None
    questions_sha256: str
    shard_size: int

    def hash(self) -> str:
        return _sha256_text(json.dumps(asdict(self), sort_keys=True, separators=(",", ":")))


@dataclass(frozen=True)
class ShardEntry:
    file: str  # relative to the transfer-set folder
    examples: int
    response_tokens: int
    bytes: int
    sha256: str
    mean_topk_mass: float
    seconds: float  # teacher time spent on this shard


@dataclass(frozen=True)
class Totals:
    examples: int
    response_tokens: int
    bytes: int
    bytes_per_token: float
    full_vocab_fp16_bytes_per_token: int
    mean_topk_mass: float


@dataclass(frozen=True)
class BuildStats:
    seconds: float
    tokens_per_s: float
    processes: int


@dataclass(frozen=True)
class Manifest:
    format_version: int
    llmkd_version: str
    settings_hash: str
    settings: Settings
    teacher: dict
    question_ids: list[str]
    question_hashes: list[str]
    excluded_exemplar_ids: list[str]
    shards: list[ShardEntry]
    totals: Totals
    build: BuildStats
    provenance: dict

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        """Raises ValueError naming the first problem (missing key, wrong version)."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {version!r}, this llmkd reads version {FORMAT_VERSION} "
                "(rebuild the set with this llmkd)"
            )
        top = _fields_of(cls, data, "")
        top["settings"] = Settings(**_fields_of(Settings, top["settings"], "settings."))
        if not isinstance(top["shards"], list):
            raise ValueError("shards is not a list")
        top["shards"] = [ShardEntry(**_fields_of(ShardEntry, s, f"shards[{i}].")) for i, s in enumerate(top["shards"])]
        for i, shard in enumerate(top["shards"]):
            if shard.file != _shard_name(i):  # also keeps a reader inside the folder
                raise ValueError(f"shards[{i}].file is {shard.file!r}, expected {_shard_name(i)!r}")
        top["totals"] = Totals(**_fields_of(Totals, top["totals"], "totals."))
        top["build"] = BuildStats(**_fields_of(BuildStats, top["build"], "build."))
        return cls(**top)


def _fields_of(cls, data: Any, prefix: str) -> dict:
    """The dataclass fields of `cls` from mapping `data`; ValueError naming the missing keys."""
    if not isinstance(data, dict):
        raise ValueError(f"{prefix.rstrip('.') or 'manifest'} is not a mapping")
    missing = [f.name for f in fields(cls) if f.name not in data]
    if missing:
        raise ValueError("missing key(s) " + ", ".join(prefix + m for m in missing))
    return {f.name: data[f.name] for f in fields(cls)}


def read_manifest(path: str | Path) -> Manifest:
    """The manifest of the transfer set at folder `path`; a one-line LlmkdError naming the file."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        hint = " (an unfinished build: re-run the same build to complete it)" if (Path(path) / BUILD_FILE).is_file() else ""
        raise LlmkdError(f"{path}: not a transfer set, no {MANIFEST}{hint}")
    try:
        return Manifest.from_dict(json.loads(file.read_text()))
    except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
        raise LlmkdError(f"{file}: invalid transfer-set manifest: {str(e).splitlines()[0]}") from None


# --- Reader ---------------------------------------------------------------------------------------


class TransferSet:
    """A finished transfer set: `open` checks the manifest, `verify` the shards, `dataset` loads them."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path) -> "TransferSet":
        return cls(Path(path), read_manifest(path))

    @property
    def question_hashes(self) -> frozenset[str]:
        """Hashes of the questions in the set: an evaluation set must not share any."""
        return frozenset(self.manifest.question_hashes)

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / s.file for s in self.manifest.shards]

    def verify(self) -> None:
        """Every shard present, of the recorded size and sha256, with finite teacher log-probs."""
        import pyarrow.parquet as pq

        for entry, path in zip(self.manifest.shards, self.shard_paths):
            _check_file(path, entry.bytes, entry.sha256)
            table = pq.read_table(path, columns=["topk_logprobs", "tail_logmass"])
            for column in ("topk_logprobs", "tail_logmass"):
                values = _leaf_values(table.column(column))
                if not np.isfinite(values).all():
                    raise LlmkdError(f"{path}: non-finite teacher log-probabilities in column {column}")
            if table.num_rows != entry.examples:
                raise LlmkdError(f"{path}: {table.num_rows} rows, the manifest says {entry.examples}")

    def check_tokenizer(self, tokenizer) -> None:
        """Refuse a tokenizer other than the one the set was built with (its ids would mean other tokens)."""
        s = self.manifest.settings
        if tokenizer_sha256(tokenizer) != s.tokenizer_sha256:
            raise LlmkdError(
                f"{self.path}: built with another tokenizer (its vocabulary, merges or special tokens differ); "
                "rebuild the transfer set for this model"
            )
        if chat_template_sha256(tokenizer) != s.chat_template_sha256:
            raise LlmkdError(f"{self.path}: built with another chat template; rebuild the transfer set for this model")

    def dataset(self):
        """All examples, in manifest order, as one `datasets.Dataset` (memory-mapped)."""
        import datasets

        for entry, path in zip(self.manifest.shards, self.shard_paths):
            if not path.is_file() or path.stat().st_size != entry.bytes:
                raise LlmkdError(f"{path}: missing or of the wrong size; run verify()")
        ds = datasets.load_dataset("parquet", data_files=[str(p) for p in self.shard_paths], split="train")
        if len(ds) != self.manifest.totals.examples:
            raise LlmkdError(f"{self.path}: {len(ds)} rows in the shards, the manifest says {self.manifest.totals.examples}")
        return ds


def _leaf_values(column) -> np.ndarray:
    """The innermost values of a (chunked) nested list column, as one numpy array."""
    import pyarrow as pa

    parts = []
    for chunk in column.chunks:
        while pa.types.is_list(chunk.type) or pa.types.is_fixed_size_list(chunk.type):
            chunk = chunk.flatten()
        parts.append(chunk.to_numpy(zero_copy_only=False))
    return np.concatenate(parts) if parts else np.zeros(0)


def _check_file(path: Path, size: int, sha256: str) -> None:
    if not path.is_file():
        raise LlmkdError(f"{path}: shard missing")
    actual = path.stat().st_size
    if actual != size:
        raise LlmkdError(f"{path}: {actual} bytes, the manifest says {size} (truncated or replaced)")
    if models.sha256_file(path) != sha256:
        raise LlmkdError(f"{path}: sha256 differs from the manifest (corrupted)")


def summary_lines(manifest: Manifest) -> list[str]:
    """What `llmkd build-transfer-set` prints: size, compactness, top-k mass, speed."""
    t, s, b = manifest.totals, manifest.settings, manifest.build
    full, llama = 2 * s.vocab_size, 2 * LLAMA31_VOCAB
    bpt = t.bytes_per_token
    return [
        f"examples          {t.examples:,} in {len(manifest.shards)} shard(s) ({s.response} responses, {s.shots}-shot)",
        f"response tokens   {t.response_tokens:,}",
        f"size              {t.bytes:,} B = {bpt:,.1f} B/token at top-{s.top_k}",
        f"full-vocab fp16   {full:,} B/token at V={s.vocab_size:,} ({full / bpt:,.0f}x larger); "
        f"{llama:,} B/token at V={LLAMA31_VOCAB:,} ({llama / bpt:,.0f}x)",
        f"top-{s.top_k} mass       {t.mean_topk_mass:.4f} mean (the tail bucket holds the rest)",
        f"build             {b.seconds:,.1f} s of teacher time, {b.tokens_per_s:,.1f} response tokens/s per process",
    ]


# --- Hashes ---------------------------------------------------------------------------------------


def _sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    """sha256 of the tokenizer as serialized: vocabulary, merges, added tokens, normalizer, pre-tokenizer.

    Fast tokenizers: their `tokenizer.json` without the padding/truncation state, which a batched
    call changes. Others: the vocabulary sorted by id.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        data = json.loads(backend.to_str())
        data.pop("padding", None)
        data.pop("truncation", None)
    else:
        data = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return _sha256_text(json.dumps(data, sort_keys=True, separators=(",", ":")))


def chat_template_sha256(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):  # a dict of named templates
        template = json.dumps(template, sort_keys=True)
    return _sha256_text(template)


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _file_digest(path: Path) -> str:
    """sha256 of a file. A hub cache file is a symlink to a blob named by its sha256 (LFS files):
    that name is the digest already, so a 16 GB checkpoint is not read twice."""
    real = path.resolve()
    if path.is_symlink() and _HEX64.fullmatch(real.name):
        return real.name
    return models.sha256_file(real)


def teacher_identity(cfg) -> dict:
    """{reference, revision, resolved, files: {name: sha256}, sha256}: what the teacher's content is.

    The files are the weights (`*.safetensors`, else `*.bin`) and config.json; for a hub id, those of
    the resolved snapshot in the local hub cache (downloaded if missing and the hub is reachable).
    """
    resolved = models.resolve(cfg.name)
    folder = Path(resolved)
    if not folder.is_dir():  # a hub id
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(
                resolved, revision=cfg.revision, allow_patterns=["*.safetensors", "*.bin", "*.json"]
            ))
        except Exception as e:  # offline without a cached copy, auth, unknown id
            raise LlmkdError(
                f"cannot locate the files of {cfg.name!r} to hash them ({type(e).__name__}); "
                "download it where the hub is reachable and set model.name to that folder"
            ) from None
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not weights:
        raise LlmkdError(f"{folder}: no *.safetensors or *.bin weight files")
    files = {p.name: _file_digest(p) for p in [*weights, folder / "config.json"] if p.is_file()}
    return {
        "reference": cfg.name,
        "revision": cfg.revision,
        "resolved": str(folder),
        "files": files,
        "sha256": _sha256_text(json.dumps(files, sort_keys=True)),
    }


# --- Questions and settings -----------------------------------------------------------------------


def requested_count(recipe: Recipe, limit: int | None) -> int | None:
    """transfer_set.count capped by --limit (None: to the end of the split)."""
    if limit is not None and limit <= 0:
        raise LlmkdError(f"--limit must be > 0, got {limit}")
    count = recipe.transfer_set.count
    return count if limit is None else (limit if count is None else min(count, limit))


def select_questions(recipe: Recipe, *, limit: int | None = None, allow_eval_split: bool = False):
    """(rows, exemplars, excluded_ids): the questions of the set, the prompt's exemplars, and the
    questions of the range left out because they are exemplars (they would appear, answered, in
    their own prompts)."""
    ts = recipe.transfer_set
    if ts.split == "test" and not allow_eval_split:
        raise LlmkdError(
            "transfer_set.split is 'test', the evaluation split: training on it contaminates every "
            "test score; use split 'train' (or --allow-eval-split if you really mean it)"
        )
    count = requested_count(recipe, limit)
    exemplars = []
    if ts.shots > 0:
        exemplars = prompts.select_exemplars(load_gsm8k("train", recipe.data.source), ts.shots, recipe.data.exemplar_seed)
    taken = {e["question_hash"] for e in exemplars}
    rows, excluded = [], []
    for r in select_range(load_gsm8k(ts.split, recipe.data.source), ts.start, count):
        (excluded if r["question_hash"] in taken else rows).append(r)
    if not rows:
        raise LlmkdError("transfer set: no questions left after excluding the exemplars")
    return rows, exemplars, [r["id"] for r in excluded]


def make_settings(recipe: Recipe, tokenizer, teacher: dict, rows: Sequence[dict], exemplars: Sequence[dict],
                  count: int | None, vocab_size: int) -> Settings:
    ts = recipe.transfer_set
    teacher_mode = ts.response == "teacher"
    sampled = teacher_mode and ts.do_sample
    if ts.top_k >= vocab_size:
        raise LlmkdError(f"transfer_set.top_k={ts.top_k} is not below the teacher's vocabulary ({vocab_size:,} tokens): "
                         "the tail bucket would be empty; keep top_k well below it (64 is plenty)")
    return Settings(
        teacher_sha256=teacher["sha256"],
        teacher_dtype=str(models.teacher_dtype(recipe.model)).removeprefix("torch."),
        tokenizer_sha256=tokenizer_sha256(tokenizer),
        chat_template_sha256=chat_template_sha256(tokenizer),
        vocab_size=vocab_size,
        top_k=ts.top_k,
        response=ts.response,
        max_new_tokens=ts.max_new_tokens if teacher_mode else None,
        do_sample=ts.do_sample if teacher_mode else None,
        sampling_temperature=ts.sampling_temperature if sampled else None,
        seed=ts.seed if sampled else None,
        stop_strings=list(prompts.STOP_STRINGS) if teacher_mode else None,
        batch_size=ts.batch_size,
        shots=ts.shots,
        exemplar_seed=recipe.data.exemplar_seed if ts.shots else None,
        exemplar_ids=[e["id"] for e in exemplars],
        instruction_sha256=_sha256_text(prompts.INSTRUCTION),
        prompt_style="chat" if prompts.has_chat_template(tokenizer) else "plain",
        source=recipe.data.source,
        split=ts.split,
        start=ts.start,
        count=count,
        questions_sha256=_questions_sha256(rows, with_answers=not teacher_mode),
        shard_size=ts.shard_size,
    )


def _questions_sha256(rows: Sequence[dict], *, with_answers: bool) -> str:
    """Over the ids and question hashes of `rows`, in order (and the solutions, for gold responses)."""
    lines = [f"{r['id']} {r['question_hash']}" + (f" {_sha256_text(r['answer'])}" if with_answers else "") for r in rows]
    return _sha256_text("\n".join(lines))


def _vocab_size(resolved: str, trust_remote_code: bool) -> int:
    """V, the width of the teacher's logits, from its config (without loading the weights)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    config = getattr(config, "get_text_config", lambda: config)()
    return int(config.vocab_size)


# --- Folder claim, shards, progress ----------------------------------------------------------------


def _shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:05d}.parquet"


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
    if not out.exists():
        return None
    if not out.is_dir():
        raise LlmkdError(f"{out}: exists and is not a folder; choose another transfer_set.out / --out")
    refuse = f"; choose another transfer_set.out / --out, or delete {out} to rebuild"
    if (out / MANIFEST).exists():
        manifest = read_manifest(out)
        if manifest.settings_hash != settings.hash():
            raise LlmkdError(f"{out}: a transfer set built with other settings ({_settings_diff(asdict(manifest.settings), settings)}){refuse}")
        return manifest
    if (out / BUILD_FILE).exists():
        try:
            old = json.loads((out / BUILD_FILE).read_text())["settings"]
        except (ValueError, KeyError, TypeError):
            raise LlmkdError(f"{out / BUILD_FILE}: unreadable build record{refuse}") from None
        if old != asdict(settings):
            raise LlmkdError(f"{out}: an unfinished build with other settings ({_settings_diff(old, settings)}){refuse}")
        return None
    if any(out.iterdir()):
        raise LlmkdError(f"{out}: exists and is not a transfer set (no {MANIFEST} or {BUILD_FILE}){refuse}")
    return None


def _finished_shard(out: Path, index: int) -> dict | None:
    """The progress record of shard `index` if its file is there and matches it, else None."""
    record_path = _progress_path(out, index)
    try:
        record = json.loads(record_path.read_text())
        _check_file(out / record["file"], record["bytes"], record["sha256"])
    except (OSError, ValueError, KeyError, TypeError, LlmkdError):
        return None
    return record


def _remove_temporaries(out: Path) -> None:
    """Leftovers of a killed build: `.<name>.tmp-<pid>` files (atomic writes that never finished)."""
    for folder in (out, out / SHARD_DIR, out / PROGRESS_DIR):
        atomic.remove_temporaries(folder)


def _write_parquet_atomic(path: Path, columns: dict, k: int) -> None:
    """Write one shard: typed through `datasets` (its features travel in the parquet schema, so
    `load_dataset("parquet")` gives them back), zstd, deterministic bytes; tmp name, fsync, rename.

    pyarrow writes the table because `Dataset.to_parquet` (datasets 5.2) sets its own compression
    and rejects ours ("multiple values for keyword argument 'compression'").
    """
    import datasets
    import pyarrow.parquet as pq

    features = datasets.Features({
        "id": datasets.Value("string"),
        "question_hash": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "response_start": datasets.Value("int32"),
        "finish": datasets.Value("string"),
        "topk_ids": datasets.List(datasets.List(datasets.Value("int32"), length=k)),
        "topk_logprobs": datasets.List(datasets.List(datasets.Value("float16"), length=k)),
        "tail_logmass": datasets.List(datasets.Value("float16")),
    })
    table = datasets.Dataset.from_dict(columns, features=features).data.table
    table = table.cast(features.arrow_schema)  # the schema with the features metadata
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            pq.write_table(table, f, **_PARQUET_OPTIONS)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# --- The teacher's side: responses and targets -----------------------------------------------------


def _eos_ids(teacher, tokenizer) -> set[int]:
    ids = teacher.generation_config.eos_token_id
    ids = set(ids) if isinstance(ids, (list, tuple)) else ({ids} if ids is not None else set())
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def _finish(ids: list[int], tokenizer, eos: set[int]) -> str:
    if ids and ids[-1] in eos:
        return "eos"
    if truncate_at_stop(tokenizer.decode(ids, skip_special_tokens=True), prompts.STOP_STRINGS)[1]:
        return "stop_string"
    return "length"


@torch.no_grad()
def teacher_targets(teacher, sequences: Sequence[list[int]], starts: Sequence[int], k: int, *, pad_id: int,
                    batch_size: int, on_batch: Callable[[int, int], None] | None = None,
                    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """`topk_with_tail` of the teacher at the positions predicting each sequence's response tokens.

    Returns, per sequence, (ids int64 (R, K), logprobs fp32 (R, K), tail fp32 (R,)), R = len - start.
    Batches of `batch_size` sequences, longest first, right-padded; logits are computed only at the
    response positions (transformers' boolean `logits_to_keep`), and a batch is cut into
    micro-batches so they stay under `_LOGITS_BUDGET_BYTES`. The prompt prefix all sequences share
    (system turn, instruction, exemplars) is run once for all batches (`shared_prefix.forward`).
    `on_batch(sequences, response tokens)` is called after each micro-batch (progress).
    """
    device = next(teacher.parameters()).device
    elem = torch.finfo(next(teacher.parameters()).dtype).bits // 8
    vocab = teacher.get_output_embeddings().weight.shape[0]
    max_tokens = max(1, _LOGITS_BUDGET_BYTES // (vocab * elem))
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    batches = []
    for b in range(0, len(order), batch_size):
        micro, tokens = [], 0
        for i in order[b : b + batch_size]:
            r = len(sequences[i]) - starts[i]
            if micro and tokens + r > max_tokens:
                batches.append(micro)
                micro, tokens = [], 0
            micro.append(i)
            tokens += r
        batches.append(micro)

    prefix = shared_prefix.usable_prefix_length(sequences, teacher, limit=min(starts) - 1)
    cache = shared_prefix.prefix_cache(teacher, sequences[0][:prefix]) if prefix else None
    out: list = [None] * len(sequences)
    for idx in batches:
        input_ids, attention, keep = prompts.teacher_forced_batch(
            [sequences[i] for i in idx], [starts[i] for i in idx], pad_id)
        input_ids, attention, keep = input_ids.to(device), attention.to(device), keep.to(device)
        logits = shared_prefix.forward(teacher, input_ids, attention, keep, prefix, cache).logits
        # logits: (N, V), the kept positions, row by row
        if logits.shape != (int(keep.sum()), vocab):
            raise RuntimeError(f"teacher ignored the boolean logits_to_keep: logits {tuple(logits.shape)}")
        ids, logprobs, tail = topk_with_tail(logits, k)  # (N, K), (N, K), (N,)
        offset = 0
        for i in idx:
            r = len(sequences[i]) - starts[i]
            out[i] = (ids[offset : offset + r].cpu(), logprobs[offset : offset + r].cpu(), tail[offset : offset + r].cpu())
            offset += r
        if on_batch is not None:
            on_batch(len(idx), offset)
    return out


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


def _build_shard(job: _Job, index: int, rows: Sequence[dict]) -> dict:
    """Responses, teacher targets and the parquet file of one shard; returns its progress record."""
    ts, tok, k = job.recipe.transfer_set, job.tokenizer, job.settings.top_k
    teacher = job.load_teacher()
    t0 = time.perf_counter()
    texts = [prompts.render_prompt(tok, r["question"], job.exemplars) for r in rows]
    sequences, starts, finishes = [None] * len(rows), [0] * len(rows), [""] * len(rows)
    targets: list = [None] * len(rows)
    progress = partial(_advance, job.bar)  # per teacher-forward batch
    if ts.response == "teacher":
        eos = _eos_ids(teacher, tok)
        # generate's own batches (prompts longest first), one call per batch so the bar moves; the
        # seed of a batch is the recipe seed + the set-wide position of its first example.
        order = sorted(range(len(rows)), key=lambda i: -len(texts[i]))
        for b in range(0, len(order), ts.batch_size):
            idx = order[b : b + ts.batch_size]
            completions, _ = generate(
                teacher, tok, [texts[i] for i in idx], batch_size=len(idx), max_new_tokens=ts.max_new_tokens,
                stop_strings=prompts.STOP_STRINGS, do_sample=ts.do_sample, temperature=ts.sampling_temperature,
                seed=ts.seed + index * ts.shard_size + b, progress=False,
            )
            for i, c in zip(idx, completions):
                prompt_ids = tok(texts[i], add_special_tokens=False)["input_ids"]
                sequences[i], starts[i], finishes[i] = prompt_ids + c.token_ids, len(prompt_ids), _finish(c.token_ids, tok, eos)
            batch_targets = teacher_targets(
                teacher, [sequences[i] for i in idx], [starts[i] for i in idx], k,
                pad_id=tok.pad_token_id, batch_size=ts.batch_size, on_batch=progress,
            )
            for i, t in zip(idx, batch_targets):
                targets[i] = t
    else:
        for i, r in enumerate(rows):
            response = prompts.render_response(tok, r["question"], prompts.assistant_turn(r["answer"]), job.exemplars)
            ids, mask = prompts.tokenize_example(tok, texts[i], response)
            sequences[i], starts[i], finishes[i] = ids, mask.index(1), "gold"
        targets = teacher_targets(teacher, sequences, starts, k, pad_id=tok.pad_token_id, batch_size=ts.batch_size,
                                  on_batch=progress)

    targets = [(ids.to(torch.int32), logprobs.to(torch.float16), tail.to(torch.float16)) for ids, logprobs, tail in targets]
    for r, (_, logprobs, tail) in zip(rows, targets):
        if not (torch.isfinite(logprobs).all() and torch.isfinite(tail).all()):
            raise LlmkdError(f"teacher produced non-finite log-probabilities on {r['id']} (shard {index}); "
                             "check the teacher's weights and dtype")
    columns = {
        "id": [r["id"] for r in rows],
        "question_hash": [r["question_hash"] for r in rows],
        "input_ids": sequences,
        "response_start": starts,
        "finish": finishes,
        "topk_ids": [t[0].numpy() for t in targets],
        "topk_logprobs": [t[1].numpy() for t in targets],
        "tail_logmass": [t[2].numpy() for t in targets],
    }
    masses = torch.cat([t[1].float().logsumexp(-1).exp() for t in targets])  # (tokens,) as stored
    path = job.out / _shard_name(index)
    _write_parquet_atomic(path, columns, k)
    record = asdict(ShardEntry(
        file=_shard_name(index), examples=len(rows), response_tokens=int(masses.numel()),
        bytes=path.stat().st_size, sha256=models.sha256_file(path),
        mean_topk_mass=float(masses.double().mean()), seconds=round(time.perf_counter() - t0, 3),
    ))
    atomic.write_json(_progress_path(job.out, index), record)
    return record


def _advance(bar, examples: int, tokens: int) -> None:
    """Move the bar by `examples`; show response tokens/s next to tqdm's examples/s."""
    if bar.disable:
        return
    bar.update(examples)
    bar.tokens = getattr(bar, "tokens", 0) + tokens
    elapsed = bar.format_dict["elapsed"]
    if elapsed > 0:
        bar.set_postfix(tok_s=f"{bar.tokens / elapsed:.0f}")


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
    out = Path(out or ts.out)
    rank, world, barrier = _processes()
    rows, exemplars, excluded = select_questions(recipe, limit=limit, allow_eval_split=allow_eval_split)
    count = requested_count(recipe, limit)
    tok = tokenizer if tokenizer is not None else models.load_tokenizer(recipe.model)
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

    bar = tqdm(total=sum(len(shards[i]) for i in todo), desc=f"transfer set {out.name}", unit="ex",
               disable=not progress or rank != 0)
    job = _Job(recipe, out, tok, exemplars, settings, load_teacher, bar)
    try:
        for i in todo:
            _build_shard(job, i, shards[i])
    finally:
        bar.close()
    barrier()
    if rank == 0:
        _write_manifest(out, settings, identity, rows, excluded, len(shards), world)
    barrier()
    return read_manifest(out)


def _write_manifest(out: Path, settings: Settings, identity: dict, rows: Sequence[dict], excluded: list[str],
                    num_shards: int, processes: int) -> Manifest:
    records = []
    for i in range(num_shards):
        record = _finished_shard(out, i)
        if record is None:
            raise LlmkdError(f"{out / _shard_name(i)}: missing or not matching its progress record after the build")
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
    )
    atomic.write_json(out / MANIFEST, manifest.to_dict())
    # The manifest now holds every record: drop the build's working files.
    for i in range(num_shards):
        _progress_path(out, i).unlink(missing_ok=True)
    if (out / PROGRESS_DIR).is_dir():
        (out / PROGRESS_DIR).rmdir()
    (out / BUILD_FILE).unlink(missing_ok=True)
    return manifest
