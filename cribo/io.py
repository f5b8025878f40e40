"""Atomic file writes: write to a temporary file beside the target, fsync, then ``os.replace``.

A reader never sees a half-written file, and a crash never destroys what was already there. A crash
can leave the temporary sibling ``.NAME.<random>.tmp`` behind; :func:`remove_stale_temps` removes
those of one target (the writers call it before writing again).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterator

TEMP_SUFFIX = ".tmp"


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file's or a directory's content to disk (a directory: its entries, after renames)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_pattern(path: str | os.PathLike) -> re.Pattern[str]:
    """Names of the temporary siblings :func:`atomic_path` creates for ``path``."""
    return re.compile(rf"^\.{re.escape(Path(path).name)}\.[A-Za-z0-9_]+{re.escape(TEMP_SUFFIX)}$")


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings left by interrupted writes of ``path``; returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = temp_pattern(path)
    removed = []
    for sibling in path.parent.iterdir():
        if pattern.match(sibling.name) and sibling.is_file() and not sibling.is_symlink():
            sibling.unlink()
            removed.append(sibling)
    return removed


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's directory; on success it is fsynced and replaces ``path``.

    >>> with atomic_path("out.bin") as tmp:
    ...     tmp.write_bytes(b"...")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: str | os.PathLike, obj: Any, **kwargs: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, **kwargs) + "\n")


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
