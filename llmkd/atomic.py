"""Crash-safe writes, the one way llmkd publishes anything: a file or folder is absent or complete.

A file is written under a temporary name in the same folder, fsynced, then renamed over the target
(atomic on POSIX). A folder (a checkpoint, an adapter, a converted model) is filled under a
temporary name, every file fsynced, renamed into place, and then, if its reader asks for one, given
a marker file: a folder without its marker does not count.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator


def temporary_name(path: Path, owner: str | None = None) -> Path:
    """`.<name>.tmp-<owner>` beside `path`; owner defaults to this process (several writers never clash)."""
    return path.with_name(f".{path.name}.tmp-{owner if owner is not None else os.getpid()}")


def is_temporary(path: Path) -> bool:
    """A write that never finished (its process was killed before the rename)."""
    return path.name.startswith(".") and ".tmp-" in path.name


def remove_temporaries(folder: Path, recursive: bool = False) -> None:
    """Delete leftovers of killed writes under `folder`, files and folders (never a published one)."""
    folder = Path(folder)
    if folder.is_dir():
        for tmp in list((folder.rglob if recursive else folder.glob)(".*.tmp-*")):
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def open_for_write(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` only once the block finished without an error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, data: bytes) -> None:
    with open_for_write(path) as f:
        f.write(data)


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> None:
    write_text(path, "".join(json.dumps(r, default=str) + "\n" for r in rows))


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for p in sorted(Path(folder).rglob("*")):
        fsync_path(p)
    fsync_path(folder)


def temporary_dir(final: Path, owner: str | None = None) -> Path:
    """An empty folder to fill and then `publish_dir` as `final`."""
    tmp = temporary_name(Path(final), owner)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish_dir(tmp: Path, final: Path, *, marker: str | None = None, marker_text: str = "",
                keep_existing: bool = False) -> bool:
    """Make the filled folder `tmp` appear as `final`, then write `marker` in it (if given).

    Whatever stood at `final` is replaced: moved aside, then deleted once the new folder is in
    place. With keep_existing, a complete `final` (with its marker, if one is asked for) is kept
    and `tmp` dropped instead (another process published the same thing first). Returns whether
    `tmp` was published.
    """
    tmp, final = Path(tmp), Path(final)
    if keep_existing and final.is_dir() and (marker is None or (final / marker).is_file()):
        shutil.rmtree(tmp, ignore_errors=True)
        return False
    fsync_tree(tmp)
    old = None
    if final.exists():
        old = temporary_name(final, f"old-{os.getpid()}")
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_path(final.parent)
    if marker is not None:
        write_text(final / marker, marker_text)
        fsync_path(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return True
