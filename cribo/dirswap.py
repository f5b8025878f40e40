"""Publish a directory at a path with no window: versioned siblings and an atomically swapped symlink.

On disk, for ``PARENT/NAME``::

    PARENT/NAME -> .NAME.<time_ns>-<pid>.ver     relative symlink: the only name users see
    PARENT/.NAME.<time_ns>-<pid>.ver/            one complete version, never modified once published

:func:`publish` writes a new version and swaps the link with one ``rename(2)``, so at every instant
``NAME`` resolves to a complete old or a complete new version. Its steps, each followed by a named
write boundary (:data:`BOUNDARIES`, where the fault-injection tests kill the process):

1. ``.NAME.<v>.tmp/`` is filled by the caller, every file and the directory are fsynced   ``filled``
2. renamed to ``.NAME.<v>.ver`` (complete from now on), parent fsynced                      ``versioned``
3. a symlink ``.NAME.<v>.lnk -> .NAME.<v>.ver`` is made                                      ``linked``
4. it replaces ``NAME`` (``os.replace``), parent fsynced                                     ``swapped``
5. the previous version and stale siblings of killed runs are removed                       ``cleaned``

A ``NAME`` that is a real directory (the layout of earlier versions of this code) is renamed to a
version sibling between steps 2 and 3 (boundary ``moved-legacy``): until the link exists ``NAME`` is
absent and :func:`resolve` returns the newest complete version instead (recovery on the next open).

Never destroys what it did not write: :func:`check_target` refuses an existing file, a symlink to
anything but a version sibling, and a directory the caller's ``owned`` predicate does not recognise
(the index's ``meta.json``) or that holds files besides ``expected``. An empty directory is replaced.

Stale siblings (``.tmp``, ``.lnk``, unreferenced ``.ver``, and the ``.NAME.*.tmp`` / ``.NAME.*.old``
directories of the earlier layout) whose writer process is gone are removed by the next
:func:`publish`: incomplete ones before it writes, superseded versions only after its swap.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

from cribo.errors import UsageError
from cribo.io import fsync_path, pid_alive

BOUNDARIES = ("filled", "versioned", "moved-legacy", "linked", "swapped", "cleaned")
Hook = Callable[[str], None]


class TargetError(UsageError):
    """An output path that holds something this tool did not write (or cannot be written)."""


def _no_hook(name: str) -> None:
    return None


def _pattern(name: str) -> re.Pattern[str]:
    """Siblings of this layout (groups: time, pid, kind) and of the earlier one (group ``legacy``)."""
    n = re.escape(name)
    return re.compile(rf"^\.{n}\.(?:(?P<time>\d+)-(?P<pid>\d+)\.(?P<kind>tmp|ver|lnk)"
                      rf"|(?P<legacy>[A-Za-z0-9_]+)\.(?:tmp|old))$")


def _link_target(path: Path) -> str | None:
    """The version sibling name ``path`` links to, or None when it is not such a link."""
    if not path.is_symlink():
        return None
    target = os.readlink(path)
    m = _pattern(path.name).match(target)
    return target if m and m.group("kind") == "ver" else None


def versions(path: str | os.PathLike) -> list[Path]:
    """The complete version siblings of ``path``, oldest first."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = _pattern(path.name)
    found = []
    for sibling in path.parent.iterdir():
        m = pattern.match(sibling.name)
        if m and m.group("kind") == "ver" and sibling.is_dir() and not sibling.is_symlink():
            found.append((int(m.group("time")), sibling))
    return [p for _, p in sorted(found)]


def resolve(path: str | os.PathLike) -> Path:
    """``path`` when it exists; else the newest complete version of an interrupted publish; else
    ``path`` (so the caller's "not found" message names what the user passed)."""
    path = Path(path)
    if path.exists():
        return path
    found = versions(path)
    return found[-1] if found and not os.path.lexists(path) else path


def check_target(path: str | os.PathLike, *, owned: Callable[[Path], bool], expected: Iterable[str],
                 label: str = "--out", what: str = "index") -> None:
    """Raise :class:`TargetError` unless publishing at ``path`` destroys nothing the tool did not write
    and its folder is writable. Call it before any compute.

    Args:
        owned: ``owned(directory)`` is True for a directory this tool wrote (e.g. its meta.json says so).
        expected: the file names such a directory may hold.
        label: the argument named in messages.
    """
    path = Path(path)
    where = f"{label} {path}"
    ours = _link_target(path) is not None
    if path.is_symlink() and not ours:
        raise TargetError(f"{where} is a symlink to {os.readlink(path)} that this tool did not make: "
                          f"remove it or choose another {label}")
    if path.exists() and not path.is_dir():
        raise TargetError(f"{where} is an existing file, not an {what} directory; choose another {label} "
                          "(nothing was changed)")
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        if entries and not ours and not owned(path):
            raise TargetError(f"{where} is an existing directory that is not an {what} written by this "
                              f"tool (it holds {', '.join(entries[:3])}{', ...' if len(entries) > 3 else ''}); "
                              f"choose a new {label} or an existing {what} directory (nothing was changed)")
        extra = sorted(set(entries) - set(expected))
        if entries and extra:
            raise TargetError(f"{where} is an {what} directory that also holds files this tool did not "
                              f"write ({', '.join(extra)}); move them out or choose another {label}")
    check_writable(path.parent, label=label)


def check_output_file(path: str | os.PathLike, *, label: str) -> None:
    """Refuse, before any compute, a file output that is an existing directory or sits in a folder
    that cannot be written (an existing file is this tool's earlier result and is replaced atomically)."""
    path = Path(path)
    if path.is_dir():
        raise TargetError(f"{label} {path} is an existing directory; give a file path (nothing was changed)")
    check_writable(path.parent, label=label)


def check_writable(folder: str | os.PathLike, *, label: str) -> None:
    """Prove that ``folder`` (or, when it does not exist yet, its nearest existing ancestor, where it
    will be created) accepts a new file, leaving nothing behind; else :class:`TargetError`."""
    folder = Path(folder).absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise TargetError(f"{label}: {folder} cannot be a folder ({existing} is a file); choose another {label}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".cribo-write-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except PermissionError as e:
        raise TargetError(f"{label}: the folder {existing} is not writable ({e.strerror}); choose a writable "
                          f"{label} or fix its permissions") from e
    except OSError as e:
        raise TargetError(f"{label}: cannot write in {existing} ({e.strerror}); choose another {label}") from e


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


def remove_stale(path: str | os.PathLike, *, incomplete_only: bool) -> list[Path]:
    """Remove siblings of ``path`` left by killed publishes (their writer pid is gone).

    ``incomplete_only``: only ``.tmp`` / ``.lnk`` (safe at any time); else also every version that
    ``path`` does not link to and the earlier layout's ``.old`` directories.
    """
    path = Path(path)
    if not path.parent.is_dir():
        return []
    pattern = _pattern(path.name)
    current = _link_target(path)
    removed = []
    for sibling in sorted(path.parent.iterdir()):
        m = pattern.match(sibling.name)
        if m is None or sibling.name == current:
            continue
        if m.group("legacy") is not None:
            stale = not incomplete_only or sibling.name.endswith(".tmp")
        else:
            stale = (not incomplete_only or m.group("kind") != "ver") and not pid_alive(int(m.group("pid")))
        if stale:
            _remove(sibling)
            removed.append(sibling)
    return removed


def publish(path: str | os.PathLike, fill: Callable[[Path], None], *, owned: Callable[[Path], bool],
            expected: Iterable[str], label: str = "--out", what: str = "index",
            on_boundary: Hook = _no_hook) -> Path:
    """Write a new version of the directory ``path`` with ``fill(tmp_dir)`` and swap it in atomically.

    ``on_boundary(name)`` is called after each step (:data:`BOUNDARIES`): the fault-injection tests
    kill the process there. Returns ``path``.
    """
    path = Path(path)
    expected = tuple(expected)
    check_target(path, owned=owned, expected=expected, label=label, what=what)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path, incomplete_only=True)
    now = time.time_ns()
    stem = f".{path.name}.{now}-{os.getpid()}"
    tmp, version, link = (path.parent / f"{stem}.{kind}" for kind in ("tmp", "ver", "lnk"))
    tmp.mkdir()
    try:
        fill(tmp)
        for f in tmp.iterdir():
            fsync_path(f)
        fsync_path(tmp)
        on_boundary("filled")
        os.rename(tmp, version)
        fsync_path(path.parent)
        on_boundary("versioned")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    previous = _link_target(path)
    if path.is_dir() and not path.is_symlink():  # earlier layout (owned, checked above) or empty
        if any(path.iterdir()):
            # named older than the new version: an interrupted publish resolves to the new one
            os.rename(path, path.parent / f".{path.name}.{now - 1}-{os.getpid()}.ver")
        else:
            path.rmdir()
        fsync_path(path.parent)
        on_boundary("moved-legacy")
    os.symlink(version.name, link)
    on_boundary("linked")
    os.replace(link, path)
    fsync_path(path.parent)
    on_boundary("swapped")
    if previous is not None and (path.parent / previous).exists():
        shutil.rmtree(path.parent / previous)
    remove_stale(path, incomplete_only=False)
    on_boundary("cleaned")
    return path

