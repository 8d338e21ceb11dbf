"""Crash-safe writes: a file is either absent or complete, never half-written.

Write to a temporary name in the same folder, fsync, then rename over the target (atomic on POSIX).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable


def temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def is_temporary(path: Path) -> bool:
    """A write that never finished (its process was killed before the rename)."""
    return path.name.startswith(".") and ".tmp-" in path.name


def remove_temporaries(folder: Path, recursive: bool = False) -> None:
    """Delete leftovers of killed writes under `folder` (never a complete file)."""
    folder = Path(folder)
    if folder.is_dir():
        for tmp in (folder.rglob if recursive else folder.glob)(".*.tmp-*"):
            tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))
