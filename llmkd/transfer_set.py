"""The transfer-set format: the 16-bit teacher's top-k next-token distributions, cached for stage 2.

The format (folder layout, row schema, manifest keys) is written out in `transfer_sets/README.md`;
a shard's one definition in code is `write_shard` / `read_shard`. This module reads and writes the format
and checks a set against the recipe that wants to use it; `llmkd.builder` runs the teacher to make one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmkd import atomic, models, topk_encoding
from llmkd.config import Recipe
from llmkd.errors import LlmkdError

FORMAT_VERSION = 5  # 2: settings.decoding; 3: settings.renderings; 4: safetensors shards; 5: settings.encoding
READABLE_VERSIONS = (4, 5)  # a version 4 set is read as the fp16 encoding it holds
MANIFEST = "manifest.json"  # written last: a folder without it is not a transfer set
BUILD_FILE = "build.json"  # a folder with it and no manifest is an unfinished build
SHARD_DIR = "shards"
LLAMA31_VOCAB = 128_256  # the reference study's teacher, for the size comparison


# A shard's tensors: the examples' tokens, then the teacher's targets in the set's encoding
# (`topk_encoding.STORED`); and the header metadata key of its string columns (one key, so the
# header's bytes are deterministic). The layout is transfer_sets/README.md's.
TOKEN_TENSORS = {"input_ids": "int32", "input_offsets": "int64", "response_start": "int32"}
STRINGS = ("id", "question_hash", "finish")
ROW_ARRAYS = ("input_ids", "response_start", "topk_ids", "topk_logprobs", "tail_logmass")  # a row's, decoded
SHARD_METADATA_KEY = "llmkd.transfer_set.strings"


def tensor_names(encoding: str) -> tuple[str, ...]:
    return (*TOKEN_TENSORS, *topk_encoding.STORED[encoding])


def write_shard(path: Path, columns: dict, k: int, encoding: str = "fp16", vocab_size: int | None = None) -> None:
    """Write one shard atomically with deterministic bytes (the same rows give the same file).

    `columns`: a list per row field (`Examples` gives rows with these keys): id, question_hash,
    finish (str), input_ids (L,), response_start (int), topk_ids / topk_logprobs (R, K) and
    tail_logmass (R,), R = L - response_start; the targets are stored in `encoding`, which for
    `compact` needs the teacher's `vocab_size`.
    """
    from safetensors.numpy import save

    lengths = np.array([len(x) for x in columns["input_ids"]], dtype=np.int64)

    def joined(key: str, dtype, shape: tuple) -> np.ndarray:
        parts = [np.asarray(x, dtype=dtype).reshape(shape) for x in columns[key]]
        return np.concatenate(parts) if parts else np.zeros((0, *shape[1:]), dtype=dtype)

    tensors = {
        "input_ids": joined("input_ids", np.int32, (-1,)),
        "input_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "response_start": np.asarray(columns["response_start"], dtype=np.int32).reshape(-1),
        **topk_encoding.encode(encoding, joined("topk_ids", np.int64, (-1, k)),
                               joined("topk_logprobs", np.float32, (-1, k)),
                               joined("tail_logmass", np.float32, (-1,)), vocab_size),
    }
    strings = {key: [str(v) for v in columns[key]] for key in STRINGS}
    data = save(tensors, metadata={SHARD_METADATA_KEY: json.dumps(strings, separators=(",", ":"))})
    with atomic.open_for_write(path) as f:
        f.write(data)


# safetensors' names of the numpy dtypes (those of the format, and any a foreign file may hold).
SAFETENSORS_DTYPES = {"BOOL": "bool", "U8": "uint8", "I8": "int8", "U16": "uint16", "I16": "int16", "F16": "float16",
                      "U32": "uint32", "I32": "int32", "F32": "float32", "U64": "uint64", "I64": "int64", "F64": "float64"}
PER_EXAMPLE = ("input_offsets", "response_start")  # `read_shard` reads these and maps the rest (per token)
TARGET_LOGPROBS = ("topk_logprobs", "tail_logmass")  # the float16 columns `verify` checks for finiteness


def _header(f, size: int) -> tuple[dict, int]:
    """(header, offset of the data) of the safetensors file open as `f`, `size` bytes long: every
    tensor's dtype known and its bytes inside the file and of its shape's size; ValueError otherwise."""
    n = int.from_bytes(f.read(8), "little")
    if not 2 <= n <= size - 8:
        raise ValueError(f"a header of {n} bytes in a file of {size}")
    header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    for name, info in header.items():
        if name == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        itemsize = np.dtype(SAFETENSORS_DTYPES[info["dtype"]]).itemsize
        if any(not isinstance(d, int) or d < 0 for d in info["shape"]) or \
                not 0 <= begin <= end <= size - 8 - n or end - begin != math.prod(info["shape"]) * itemsize:
            raise ValueError(f"{name}'s data_offsets {begin}..{end} do not hold its {info['dtype']} {info['shape']}")
    return header, 8 + n


def read_shard(path: Path, k: int | None = None, encoding: str = "fp16", names: Sequence[str] | None = None) -> dict:
    """The arrays `names` (default: all of `encoding`'s) of one shard, and its string columns, checked
    to fit together; a one-line LlmkdError naming the file otherwise. `k`: the top_k the manifest expects.

    The per-token arrays are views of the file mapped into memory (copy-on-write: nothing is written
    back), the per-example ones (PER_EXAMPLE) are read: reading a shard reads its header and offsets
    only, a row's tokens come from the page cache when it is used, and the processes of a launch share
    them. Reading the offsets rather than mapping them keeps the open set's resident pages at none (the
    page cache maps a shard's first 2 MiB at once). Mapped through torch, which keeps no file descriptor
    open per shard (Python's mmap would: one per shard, of thousands).
    """
    stored = topk_encoding.STORED[encoding]
    names = tensor_names(encoding) if names is None else tuple(names)
    out, mapped = {}, None
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            header, start = _header(f, size)
            meta, missing = header.get("__metadata__") or {}, [n for n in names if n not in header]
            held = [e for e, t in topk_encoding.STORED.items() if e != encoding and all(n in header for n in t)]
            if missing and held:
                raise LlmkdError(f"{path}: holds the {held[0]} encoding of the teacher's targets, the manifest says {encoding}")
            if missing or SHARD_METADATA_KEY not in meta:
                raise LlmkdError(f"{path}: not a transfer-set shard (no {', '.join(missing) or SHARD_METADATA_KEY})")
            strings = json.loads(meta[SHARD_METADATA_KEY])
            for name in names:
                info = header[name]
                begin, end = (start + o for o in info["data_offsets"])
                if name not in PER_EXAMPLE:
                    if mapped is None:
                        mapped = torch.from_file(str(path), shared=False, size=size, dtype=torch.uint8).numpy()  # (size,)
                    data = mapped[begin:end]
                else:
                    f.seek(begin)
                    data = np.frombuffer(f.read(end - begin), np.uint8)
                out[name] = data.view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        raise LlmkdError(f"{path}: unreadable shard ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    for name, a in out.items():
        dtype, per_token = stored[name] if name in stored else (TOKEN_TENSORS[name], ())
        if a.dtype != np.dtype(dtype) or a.ndim != 1 + len(per_token):
            raise LlmkdError(f"{path}: {name} is {a.dtype} {a.shape}, the {encoding} format says {dtype} "
                             f"({', '.join(('R', *per_token)) if name in stored else 'one axis'})")
        if name in stored and k is not None:
            expected = topk_encoding.row_shape(encoding, name, k, planes=a.shape[1] if "P" in per_token else 0)
            if a.shape[1:] != expected:
                raise LlmkdError(f"{path}: {name} is {a.shape[1:]} per row, the manifest's top_k is {k}")
    n = None
    if "input_offsets" in out:
        offsets = out["input_offsets"]
        n = len(offsets) - 1
        if n < 0 or offsets[0] != 0 or (np.diff(offsets) < 0).any():
            raise LlmkdError(f"{path}: input_offsets do not run from 0 upwards")
        if "input_ids" in out and offsets[-1] != len(out["input_ids"]):
            raise LlmkdError(f"{path}: input_offsets end at {offsets[-1]}, input_ids holds {len(out['input_ids'])}")
    if n is not None and "response_start" in out:
        starts, lengths = out["response_start"].astype(np.int64), np.diff(out["input_offsets"])
        if len(starts) != n or ((starts < 1) | (starts >= lengths)).any():
            raise LlmkdError(f"{path}: a response_start outside its example's tokens")
        rows = int((lengths - starts).sum())
        for t in stored:
            if t in out and len(out[t]) != rows:
                raise LlmkdError(f"{path}: {t} has {len(out[t])} rows, the examples' responses {rows}")
    if not isinstance(strings, dict) or any(not isinstance(strings.get(key), list) for key in STRINGS) or \
            (n is not None and any(len(strings[key]) != n for key in STRINGS)):
        raise LlmkdError(f"{path}: its {', '.join(STRINGS)} do not match its {n} examples")
    return out | {key: strings[key] for key in STRINGS}


def shard_name(index: int) -> str:
    return f"{SHARD_DIR}/shard-{index:05d}.safetensors"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()

# --- Manifest -------------------------------------------------------------------------------------


def folder_state(out: Path, refuse: str) -> str:
    """What folder `out` holds: "new" (absent or empty), "complete" (a manifest), "unfinished" (a
    build record and no manifest). A file, or a folder of anything else, is refused in one line that
    names it and ends with `refuse` (what to do instead)."""
    if not out.exists():
        return "new"
    if not out.is_dir():
        raise LlmkdError(f"{out}: exists and is not a folder{refuse}")
    if (out / MANIFEST).exists():
        return "complete"
    if (out / BUILD_FILE).exists():
        return "unfinished"
    if any(out.iterdir()):
        raise LlmkdError(f"{out}: exists and is not a transfer set (no {MANIFEST} or {BUILD_FILE}){refuse}")
    return "new"


def training_folder_state(path: Path) -> str:
    """`folder_state` of the transfer_set.out that training reads, refused as training refuses it (the dry
    run says what the run will say)."""
    return folder_state(path, "; set transfer_set.out to a folder that `llmkd build-transfer-set` builds")


@dataclass(frozen=True)
class Settings:
    """Everything that determines a transfer set's content (keys documented in the module docstring)."""

    teacher_sha256: str
    teacher_dtype: str
    tokenizer_sha256: str
    chat_template_sha256: str
    vocab_size: int
    top_k: int
    encoding: str  # how the targets are stored: `topk_encoding.ENCODINGS`
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
    # What the data section read: source, format, examples, bad rows skipped per reason, content hash
    # (`sources.Rows.describe`); {} in sets built before it.
    data: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Manifest":
        """Raises ValueError naming the first problem (missing key, wrong version)."""
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, got {type(data).__name__}")
        version = data.get("format_version")
        if version not in READABLE_VERSIONS:
            raise ValueError(
                f"format_version {version!r}, this llmkd reads versions {', '.join(map(str, READABLE_VERSIONS))} "
                "(rebuild the set with this llmkd)"
            )
        top = _fields_of(cls, {"data": {}, **data}, "")
        if version == 4 and isinstance(top["settings"], dict):
            top["settings"] = {**top["settings"], "encoding": "fp16"}
        top["settings"] = Settings(**_fields_of(Settings, top["settings"], "settings."))
        topk_encoding.check(top["settings"].encoding)
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


class Examples(Sequence):
    """Transfer-set examples, shard after shard, as a sequence of rows: dicts with the keys of
    `write_shard`'s columns, numpy arrays for the token columns. A row's arrays are views into its
    shard's memory-mapped arrays (`read_shard`): nothing is concatenated or copied, so the examples
    hold their lengths and strings in memory and their tokens stay in the files until used. A row's
    targets are decoded from the shards' `encoding` when it is read (the fp16 encoding's are views)."""

    def __init__(self, shards: Sequence[dict], encoding: str = "fp16"):
        self._shards, self.encoding = list(shards), encoding
        self._first = np.cumsum([0, *(len(s["response_start"]) for s in self._shards)])  # (S + 1,) first example
        lengths = [np.diff(s["input_offsets"]) for s in self._shards]
        responses = [n - s["response_start"] for n, s in zip(lengths, self._shards)]
        self.input_lengths = np.concatenate([np.zeros(0, np.int64), *lengths])  # (n,) tokens per example
        self.response_lengths = np.concatenate([np.zeros(0, np.int64), *responses])  # (n,) teacher rows per example
        self._row_offsets = [np.concatenate([[0], np.cumsum(r)]) for r in responses]  # per shard (n_s + 1,)

    @classmethod
    def read(cls, paths: Sequence[Path], k: int | None = None, encoding: str = "fp16") -> "Examples":
        return cls([read_shard(p, k, encoding) for p in paths], encoding)

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getitem__(self, i):
        if not isinstance(i, (int, np.integer)):
            raise TypeError(f"Examples index must be an int, got {type(i).__name__}")
        i = int(i) + len(self) if i < 0 else int(i)
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self._first, i, side="right")) - 1  # past any empty shard starting at i
        shard, j = self._shards[s], i - int(self._first[s])
        offsets, (a, b) = shard["input_offsets"], self._row_offsets[s][j : j + 2]
        ids, logprobs, tail = topk_encoding.decode(
            self.encoding, {name: shard[name][a:b] for name in topk_encoding.STORED[self.encoding]})
        return {
            "id": shard["id"][j],
            "question_hash": shard["question_hash"][j],
            "input_ids": shard["input_ids"][offsets[j] : offsets[j + 1]],
            "response_start": int(shard["response_start"][j]),
            "finish": shard["finish"][j],
            "topk_ids": ids,
            "topk_logprobs": logprobs,
            "tail_logmass": tail,
        }

    def rows(self, indices) -> list[dict]:
        return [self[int(i)] for i in indices]

    def columns(self) -> dict:
        """The examples as `write_shard`'s columns (copies: changing them changes no shard)."""
        rows = list(self)
        return {key: [np.array(r[key]) if isinstance(r[key], np.ndarray) else r[key] for r in rows]
                for key in (*STRINGS, *ROW_ARRAYS)}


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
        state = training_folder_state(path)
        if state != "complete":
            raise LlmkdError(
                f"no transfer set at {path} ({'an unfinished build' if state == 'unfinished' else 'missing'}, "
                f"no {MANIFEST}): run `llmkd build-transfer-set` with this recipe first, or set transfer_set.out "
                "to an existing one"
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
                "the student must be the teacher's own quantised copy: rebuild the transfer set or fix model.name"
            )

    def identity(self) -> dict:
        """{path, settings_hash, content_sha256}: which set a checkpoint or an adapter was trained on."""
        content = hashlib.sha256("\n".join(s.sha256 for s in self.manifest.shards).encode()).hexdigest()
        return {"path": str(self.path), "settings_hash": self.manifest.settings_hash, "content_sha256": content}

    def lengths(self) -> tuple[np.ndarray, np.ndarray]:
        """(tokens, response tokens) per example, in manifest order, read from the offsets alone."""
        shards = [read_shard(p, names=("input_offsets", "response_start")) for p in self.shard_paths]
        tokens = np.concatenate([np.diff(s["input_offsets"]) for s in shards]) if shards else np.zeros(0, np.int64)
        starts = np.concatenate([s["response_start"] for s in shards]) if shards else np.zeros(0, np.int64)
        return tokens, tokens - starts

    @property
    def question_hashes(self) -> frozenset[str]:
        """Hashes of the questions in the set: an evaluation set must not share any."""
        return frozenset(self.manifest.question_hashes)

    @property
    def shard_paths(self) -> list[Path]:
        return [self.path / s.file for s in self.manifest.shards]

    def verify(self) -> None:
        """Every shard present, of the recorded size and sha256, well formed, with finite teacher
        log-probs. One read of each file, block by block (`_scan`): no shard is held in memory."""
        for entry, path in zip(self.manifest.shards, self.shard_paths):
            check_size(path, entry.bytes)
            digest, non_finite = _scan(path)
            if digest != entry.sha256:
                raise LlmkdError(f"{path}: sha256 differs from the manifest (corrupted)")
            if non_finite is not None:
                raise LlmkdError(f"{path}: non-finite teacher log-probabilities in column {non_finite}")
            shard = read_shard(path, self.manifest.settings.top_k, self.manifest.settings.encoding)  # header, offsets
            if len(shard["response_start"]) != entry.examples:
                raise LlmkdError(f"{path}: {len(shard['response_start'])} rows, the manifest says {entry.examples}")

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

    def examples(self) -> Examples:
        """All examples, in manifest order, memory-mapped (run `verify` first for the sha256 checks)."""
        for entry, path in zip(self.manifest.shards, self.shard_paths):
            if not path.is_file() or path.stat().st_size != entry.bytes:
                raise LlmkdError(f"{path}: missing or of the wrong size; run verify()")
        examples = Examples.read(self.shard_paths, self.manifest.settings.top_k, self.manifest.settings.encoding)
        if len(examples) != self.manifest.totals.examples:
            raise LlmkdError(f"{self.path}: {len(examples)} rows in the shards, the manifest says {self.manifest.totals.examples}")
        return examples


def check_size(path: Path, size: int) -> None:
    if not path.is_file():
        raise LlmkdError(f"{path}: shard missing")
    actual = path.stat().st_size
    if actual != size:
        raise LlmkdError(f"{path}: {actual} bytes, the manifest says {size} (truncated or replaced)")


def check_file(path: Path, size: int, sha256: str) -> None:
    check_size(path, size)
    if models.sha256_file(path) != sha256:
        raise LlmkdError(f"{path}: sha256 differs from the manifest (corrupted)")


def _blocks(f, n: int, buffer: memoryview):
    """The next `n` bytes of file `f` (fewer at its end), read into `buffer` block by block: each view
    is valid until the next one is read."""
    while n > 0 and (got := f.readinto(buffer[: min(len(buffer), n)])):
        n -= got
        yield buffer[:got]


def _scan(path: Path) -> tuple[str, str | None]:
    """(sha256 of the shard file, the first of TARGET_LOGPROBS holding a non-finite value or None), in
    one sequential read that holds a block at a time and maps nothing (a shard's pages do not stay
    resident). A malformed header is left to `read_shard`, which names the problem."""
    digest, buffer = hashlib.sha256(), memoryview(bytearray(1 << 20))  # an even size: whole float16 values
    non_finite = None
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        try:
            header, start = _header(f, size)
            spans = sorted((start + header[n]["data_offsets"][0], start + header[n]["data_offsets"][1], n)
                           for n in TARGET_LOGPROBS if n in header and header[n]["dtype"] == "F16")
        except (ValueError, KeyError, TypeError):
            spans = []
        f.seek(0)
        position = 0
        for begin, end, name in [*spans, (size, size, None)]:  # the bytes before each span, then the span
            if begin < position:  # overlapping spans: read_shard refuses the file
                continue
            for data in _blocks(f, begin - position, buffer):
                digest.update(data)
            for data in _blocks(f, end - begin, buffer):
                digest.update(data)
                if non_finite is None and not np.isfinite(np.frombuffer(data, np.float16)).all():
                    non_finite = name
            position = end
    return digest.hexdigest(), non_finite


def summary_lines(manifest: Manifest) -> list[str]:
    """What `llmkd build-transfer-set` prints: size, compactness, top-k mass, speed."""
    t, s, b = manifest.totals, manifest.settings, manifest.build
    full, llama = 2 * s.vocab_size, 2 * LLAMA31_VOCAB
    bpt = t.bytes_per_token
    return [
        f"examples          {t.examples:,} in {len(manifest.shards)} shard(s) ({s.response} responses, {s.shots}-shot)",
        f"response tokens   {t.response_tokens:,}",
        f"size              {t.bytes:,} B = {bpt:,.1f} B/token at top-{s.top_k}, {s.encoding} encoding",
        f"full-vocab fp16   {full:,} B/token at V={s.vocab_size:,} ({full / bpt:,.0f}x larger); "
        f"{llama:,} B/token at V={LLAMA31_VOCAB:,} ({llama / bpt:,.0f}x)",
        f"top-{s.top_k} mass       {t.mean_topk_mass:.4f} mean (the tail bucket holds the rest)",
        f"build             {b.seconds:,.1f} s of teacher time, {b.tokens_per_s:,.1f} response tokens/s per process",
        *data_lines(manifest.data),
    ]


def data_lines(data: dict) -> list[str]:
    """Which data the set holds, and the bad rows left out (data.on_bad_row: skip), for other data than GSM8K."""
    if not data or data.get("format") == "gsm8k":
        return []
    skipped = data.get("skipped") or {}
    lines = [f"data              {data['source']} ({data['format']}): {data['conversations']:,} conversation(s), "
             f"content {data['content_sha256'][:12]}"]
    if skipped:
        lines.append(f"bad rows skipped  {sum(skipped.values()):,}: " + "; ".join(f"{n} {why}" for why, n in skipped.items()))
    return lines


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


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # from_pretrained's order; each may come as an index
INDEX_SUFFIX = ".index.json"  # "model.safetensors.index.json": its weight_map names the shards


def _weight_files(folder: Path, fetch) -> list[str]:
    """The weight files `from_pretrained` reads from `folder`: model.safetensors, else the files
    model.safetensors.index.json names, else the same for pytorch_model.bin. Any other file (a
    consolidated.safetensors for another runtime, .bin beside .safetensors) is neither fetched nor
    hashed. `fetch(names)` brings those files into `folder` first (a hub snapshot; the indexes are
    there already), if it holds them."""
    for single in WEIGHT_FILES:
        fetch([single])
        if (folder / single).is_file():
            return [single]
        index = folder / (single + INDEX_SUFFIX)
        if index.is_file():
            try:
                names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise LlmkdError(f"{index}: not a weight index ({type(e).__name__}: {e})") from None
            fetch(names)
            missing = [n for n in names if not (folder / n).is_file()]
            if missing:
                raise LlmkdError(f"{index}: names {', '.join(missing)}, not in {folder}")
            return names
    raise LlmkdError(f"{folder}: no {' or '.join(n + f'[{INDEX_SUFFIX}]' for n in WEIGHT_FILES)}")


@contextmanager
def _local_main_first():
    """Under a process group of several processes, the body runs on each machine's main process
    (LOCAL_RANK 0) first and on the others once it is done, so they find the files in the hub cache
    rather than downloading them too. Builder and trainer join their group (accelerate) before they
    hash the teacher; without one (one process) the body just runs."""
    import torch.distributed as dist

    group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    if group and not first:
        dist.barrier()
    try:
        yield
    finally:
        if group and first:  # also when it failed: the others then try and say why themselves
            dist.barrier()


def teacher_identity(cfg) -> dict:
    """{reference, revision, resolved, files: {name: sha256}, sha256}: what the teacher's content is.

    The files are config.json and the weight files `from_pretrained` reads (`_weight_files`; not an
    index, which names the shards but holds no weight); for a hub id, those of the resolved snapshot
    in the local hub cache, downloaded if missing and the hub is reachable: config.json and the
    indexes first, then only the weight files named, on each machine's main process first.
    """
    resolved = models.resolve(cfg.name)
    folder = Path(resolved)
    if folder.is_dir():
        weights = _weight_files(folder, fetch=lambda names: None)
    else:  # a hub id
        try:
            from huggingface_hub import snapshot_download

            def fetch(names: list[str]) -> Path:
                return Path(snapshot_download(resolved, revision=cfg.revision, allow_patterns=names))

            with _local_main_first():
                folder = fetch(["config.json", *(n + INDEX_SUFFIX for n in WEIGHT_FILES)])
                weights = _weight_files(folder, fetch)
        except LlmkdError:
            raise
        except Exception as e:  # offline without a cached copy, auth, unknown id
            raise LlmkdError(
                f"cannot locate the files of {cfg.name!r} to hash them ({type(e).__name__}); "
                "download it where the hub is reachable and set model.name to that folder"
            ) from None
    files = {name: _file_digest(folder / name) for name in [*weights, "config.json"] if (folder / name).is_file()}
    return {
        "reference": cfg.name,
        "revision": cfg.revision,
        "resolved": str(folder),
        "files": files,
        "sha256": sha256_text(json.dumps(files, sort_keys=True)),
    }
