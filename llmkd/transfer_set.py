"""The transfer-set format: the 16-bit teacher's top-k next-token distributions, cached for stage 2.

The format (folder layout, row schema, manifest keys) is written out in `transfer_sets/README.md`;
the row schema's one definition in code is `row_features`. This module reads and writes the format
and checks a set against the recipe that wants to use it; `llmkd.builder` runs the teacher to make one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from llmkd import atomic, models
from llmkd.config import Recipe
from llmkd.errors import LlmkdError

FORMAT_VERSION = 3  # 2: settings.decoding; 3: settings.renderings
MANIFEST = "manifest.json"  # written last: a folder without it is not a transfer set
BUILD_FILE = "build.json"  # a folder with it and no manifest is an unfinished build
SHARD_DIR = "shards"
LLAMA31_VOCAB = 128_256  # the reference study's teacher, for the size comparison


def row_features(k: int):
    """The row schema of a shard (`datasets.Features`), K = top_k. Row i of the three target columns
    is the teacher's distribution for token input_ids[response_start + i]."""
    import datasets

    return datasets.Features({
        "id": datasets.Value("string"),
        "question_hash": datasets.Value("string"),
        "input_ids": datasets.List(datasets.Value("int32")),
        "response_start": datasets.Value("int32"),
        "finish": datasets.Value("string"),
        "topk_ids": datasets.List(datasets.List(datasets.Value("int32"), length=k)),
        "topk_logprobs": datasets.List(datasets.List(datasets.Value("float16"), length=k)),
        "tail_logmass": datasets.List(datasets.Value("float16")),
    })


def _numeric_leaf_paths(schema) -> list[str]:
    """Parquet's leaf paths of the numeric columns of an arrow schema ("topk_ids.list.element.list.element")."""
    import pyarrow as pa

    paths = []
    for f in schema:
        t, path = f.type, f.name
        while pa.types.is_list(t) or pa.types.is_fixed_size_list(t):
            t, path = t.value_type, path + ".list.element"
        if pa.types.is_integer(t) or pa.types.is_floating(t):
            paths.append(path)
    return paths


def write_shard(path: Path, columns: dict, k: int) -> None:
    """Write one shard atomically with deterministic bytes (the same rows give the same file).

    Typed through `datasets`, so its features travel in the parquet schema and
    `load_dataset("parquet")` gives them back; written by pyarrow because `Dataset.to_parquet`
    (datasets 5.2) sets its own compression and rejects ours. BYTE_STREAM_SPLIT groups the k-th
    byte of every value (the high bytes of int32 ids and the exponents of fp16 log-probs are
    near-constant), which zstd then compresses; dictionary encoding would take precedence over
    it, so it is off. Level 19 over 9: smaller files, writes still a small part of a build.
    """
    import datasets
    import pyarrow.parquet as pq

    features = row_features(k)
    table = datasets.Dataset.from_dict(columns, features=features).data.table
    table = table.cast(features.arrow_schema)  # the schema with the features metadata
    with atomic.open_for_write(path) as f:
        pq.write_table(table, f, compression="zstd", compression_level=19, use_dictionary=False,
                       use_byte_stream_split=_numeric_leaf_paths(table.schema))


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:05d}.parquet"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

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
    decoding: dict | None
    batch_size: int
    shots: int
    renderings: list[str]
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
        return sha256_text(json.dumps(asdict(self), sort_keys=True, separators=(",", ":")))


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
            if shard.file != shard_name(i):  # also keeps a reader inside the folder
                raise ValueError(f"shards[{i}].file is {shard.file!r}, expected {shard_name(i)!r}")
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


@dataclass
class Rows:
    """Numpy-formatted transfer-set rows and their per-example lengths: a whole set as training opens it,
    or one on-policy round's shard."""

    dataset: Any
    input_lengths: np.ndarray  # (n,) tokens per example
    response_lengths: np.ndarray  # (n,) response tokens per example (= teacher rows)

    def rows(self, indices) -> list[dict]:
        return [self.dataset[int(i)] for i in indices]


class TransferSet:
    """A finished transfer set: `open` checks the manifest, `verify` the shards, `dataset` loads them."""

    def __init__(self, path: Path, manifest: Manifest):
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path) -> "TransferSet":
        return cls(Path(path), read_manifest(path))

    @classmethod
    def for_recipe(cls, recipe: Recipe, tokenizer) -> "TransferSet":
        """The recipe's transfer set, verified and checked to fit its model (what training reads)."""
        path = recipe.layout.transfer_set
        if not (path / MANIFEST).is_file():
            state = "an unfinished build" if path.is_dir() else "missing"
            raise LlmkdError(
                f"no transfer set at {path} ({state}, no {MANIFEST}): run `llmkd build-transfer-set` with this "
                "recipe first, or set transfer_set.out to an existing one"
            )
        ts = cls.open(path)
        ts.verify()
        ts.check(recipe, tokenizer)
        return ts

    def check(self, recipe: Recipe, tokenizer) -> None:
        """Refuse a set of another teacher, tokenizer or chat template than the recipe's model."""
        self.check_tokenizer(tokenizer)
        if teacher_identity(recipe.model)["sha256"] != self.manifest.settings.teacher_sha256:
            raise LlmkdError(
                f"{self.path}: built from another teacher than model.name={recipe.model.name!r} (weights differ); "
                "the student must be the teacher's own NF4 copy: rebuild the transfer set or fix model.name"
            )

    def identity(self) -> dict:
        """{path, settings_hash, content_sha256}: which set a checkpoint or an adapter was trained on."""
        content = hashlib.sha256("\n".join(s.sha256 for s in self.manifest.shards).encode()).hexdigest()
        return {"path": str(self.path), "settings_hash": self.manifest.settings_hash, "content_sha256": content}

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, response tokens) per example, in manifest order, read from the length columns only."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        tokens, responses = [], []
        for path in self.shard_paths:
            table = pq.read_table(path, columns=["input_ids", "response_start"])
            n = pc.list_value_length(table.column("input_ids")).to_numpy().astype(np.int64)
            tokens.append(n)
            responses.append(n - table.column("response_start").to_numpy().astype(np.int64))
        return np.concatenate(tokens), np.concatenate(responses)

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
            check_file(path, entry.bytes, entry.sha256)
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


def check_file(path: Path, size: int, sha256: str) -> None:
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
    return sha256_text(json.dumps(data, sort_keys=True, separators=(",", ":")))


def chat_template_sha256(tokenizer) -> str:
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):  # a dict of named templates
        template = json.dumps(template, sort_keys=True)
    return sha256_text(template)


_HEX64 = re.compile(r"[0-9a-f]{64}")


def _file_digest(path: Path) -> str:
    """sha256 of a file. A hub cache file is a symlink to a blob named by its sha256 (LFS files):
    that name is the digest already, so a 16 GB checkpoint is not read twice."""
    real = path.resolve()
    if path.is_symlink() and _HEX64.fullmatch(real.name):
        return real.name
    return models.recorded_sha256(real)


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
        "sha256": sha256_text(json.dumps(files, sort_keys=True)),
    }
