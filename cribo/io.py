"""Atomic file writes: write to a temporary file beside the target, fsync, then ``os.replace``.

A reader never sees a half-written file, and a crash never destroys what was already there. A crash
can leave the temporary sibling ``.NAME.<pid>_<random>.tmp`` behind; the next write of the same target
removes it (:func:`remove_stale_temps`: only those whose writer process is gone).
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
    """Names of the temporary siblings of ``path``: ``.NAME.<pid>_<random>.tmp`` (group ``pid``), or
    ``.NAME.<random>.tmp`` as written by earlier versions."""
    return re.compile(rf"^\.{re.escape(Path(path).name)}\.(?:(?P<pid>\d+)_)?[A-Za-z0-9_]+{re.escape(TEMP_SUFFIX)}$")


def pid_alive(pid: int) -> bool:
    """True when another process with this id runs (this process's own id counts as gone: a killed
    writer restarted in a container often gets the same id back)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary siblings left by interrupted writes of ``path`` (not those of a writer
    that is still running); returns what was removed."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = temp_pattern(path)
    removed = []
    for sibling in path.parent.iterdir():
        m = pattern.match(sibling.name)
        running = m is not None and m.group("pid") is not None and pid_alive(int(m.group("pid")))
        if m and sibling.is_file() and not sibling.is_symlink() and not running:
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
    remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}_", suffix=TEMP_SUFFIX, dir=path.parent)
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
