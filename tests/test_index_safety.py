"""Index saves never destroy what the tool did not write, replace atomically, and survive a kill at
every write boundary (cribo.dirswap)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cribo import dirswap
from index.store import SupportIndex, check_index_target

META = {"backbone": {"identity": "random:vit_tiny_patch16_224:seed0", "source": "test"}}
KILLED = 77


def make_index(n: int, seed: int = 0) -> SupportIndex:
    x = np.random.default_rng(seed).standard_normal((n, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return SupportIndex.build(x, np.arange(n) % 3, "flat", meta=META)


def tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (links as their target, files as their bytes)."""
    out: dict[str, bytes | str] = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else (p.read_bytes() if p.is_file() else "dir")
    return out


def legacy_index(path: Path, n: int) -> Path:
    """An index directory in the layout of earlier versions (a real directory, not a link)."""
    tmp = path.parent / "legacy-build"
    make_index(n).save(tmp)
    real = tmp.resolve()
    os.rename(real, path)
    tmp.unlink()
    return path


def dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


# ----------------------------------------------------------------------------------- never destroy
def test_existing_folder_of_notes_is_refused_and_untouched(tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("buy milk")
    before = tree(tmp_path)
    with pytest.raises(dirswap.TargetError, match=r"--out .*notes is an existing directory that is not an index "
                                                  r"written by this tool \(it holds todo.txt\)"):
        make_index(5).save(notes)
    assert tree(tmp_path) == before


def test_existing_file_is_refused_and_untouched(tmp_path):
    f = tmp_path / "out"
    f.write_text("precious")
    with pytest.raises(dirswap.TargetError, match="is an existing file, not an index directory"):
        check_index_target(f)
    with pytest.raises(dirswap.TargetError, match="is an existing file"):
        make_index(5).save(f)
    assert tree(tmp_path) == {"out": b"precious"}


def test_index_with_foreign_files_is_refused(tmp_path):
    d = make_index(5).save(tmp_path / "idx")
    (d / "my-notes.md").write_text("x")
    before = tree(tmp_path)
    with pytest.raises(dirswap.TargetError, match=r"also holds files this tool did not write \(my-notes.md\)"):
        make_index(6).save(d)
    assert tree(tmp_path) == before


def test_foreign_symlink_is_refused(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(dirswap.TargetError, match="is a symlink to .*elsewhere that this tool did not make"):
        make_index(5).save(tmp_path / "out")
    assert (tmp_path / "out").resolve() == tmp_path / "elsewhere"


def test_parent_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(dirswap.TargetError, match=r"--out: .*file cannot be a folder"):
        check_index_target(tmp_path / "file" / "idx")


def test_empty_folder_and_legacy_index_are_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    make_index(5).save(tmp_path / "empty")
    assert SupportIndex.load(tmp_path / "empty").ntotal == 5
    legacy = legacy_index(tmp_path / "old", 7)
    assert legacy.is_dir() and not legacy.is_symlink()
    make_index(9).save(legacy)
    assert legacy.is_symlink() and SupportIndex.load(legacy).ntotal == 9
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["empty", os.readlink(tmp_path / "empty"), "old", os.readlink(legacy)])


def test_replacing_keeps_one_version_and_cleans_stale_siblings(tmp_path):
    d = make_index(5).save(tmp_path / "idx")
    pid = dead_pid()
    stale = [f".idx.1-{pid}.tmp", f".idx.2-{pid}.ver", f".idx.3-{pid}.lnk", ".idx.abc_12.old", ".idx.xyz9.tmp"]
    for name in stale:
        (tmp_path / name).mkdir() if not name.endswith(".lnk") else (tmp_path / name).symlink_to("nowhere")
    alive = tmp_path / f".idx.4-{os.getppid()}.tmp"  # a concurrent writer that is still running
    alive.mkdir()
    (tmp_path / "unrelated.tmp").mkdir()
    make_index(6).save(d)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == sorted(["idx", os.readlink(d), alive.name, "unrelated.tmp"])
    assert SupportIndex.load(d).ntotal == 6


# ----------------------------------------------------------------------------------- fault injection
def boundaries_hit(tmp_path: Path, legacy: bool) -> list[str]:
    target = legacy_index(tmp_path / "idx", 4) if legacy else make_index(4).save(tmp_path / "idx")
    hit: list[str] = []
    make_index(5).save(target, on_boundary=hit.append)
    return hit


def test_every_boundary_is_reached(tmp_path):
    assert boundaries_hit(tmp_path / "a", legacy=False) == [b for b in dirswap.BOUNDARIES if b != "moved-legacy"]
    assert boundaries_hit(tmp_path / "b", legacy=True) == list(dirswap.BOUNDARIES)


def kill_at(boundary: str):
    def hook(name: str) -> None:
        if name == boundary:
            os._exit(KILLED)
    return hook


# "moved-legacy" exists only when replacing a directory of the earlier layout
KILL_CASES = [(b, False) for b in dirswap.BOUNDARIES if b != "moved-legacy"] + [(b, True) for b in dirswap.BOUNDARIES]


@pytest.mark.parametrize("boundary,legacy", KILL_CASES,
                         ids=[f"{b}-{'legacy-dir' if legacy else 'link'}" for b, legacy in KILL_CASES])
def test_kill_at_every_write_boundary_leaves_a_complete_index(tmp_path, boundary, legacy):
    out = legacy_index(tmp_path / "idx", 4) if legacy else make_index(4).save(tmp_path / "idx")
    old_labels = SupportIndex.load(out).labels
    new = make_index(11, seed=1)
    pid = os.fork()
    if pid == 0:  # the child saves and is killed at the boundary
        try:
            new.save(out, on_boundary=kill_at(boundary))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == KILLED

    loaded = SupportIndex.load(out)  # a complete old or a complete new index, never a partial one
    expected = {4: old_labels, 11: new.labels}[loaded.ntotal]
    np.testing.assert_array_equal(loaded.labels, expected)
    if boundary in ("swapped", "cleaned"):
        assert loaded.ntotal == 11
    if boundary in ("filled", "versioned", "linked") and not legacy:
        assert loaded.ntotal == 4

    make_index(13, seed=2).save(out)  # the next run recovers and cleans up after the killed one
    assert SupportIndex.load(out).ntotal == 13
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["idx", os.readlink(out)])


def test_unwritable_folder_is_refused_before_any_compute(tmp_path, monkeypatch):
    """A read-only folder (simulated: this suite may run as root, which ignores permission bits)."""
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(dirswap.tempfile, "mkstemp", refuse)
    with pytest.raises(dirswap.TargetError, match=r"--out: the folder .* is not writable \(Permission denied\)"):
        check_index_target(tmp_path / "ro" / "idx")
    assert list(tmp_path.iterdir()) == []  # the missing folder was not created
