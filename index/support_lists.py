"""Explicit support subsets: published lists of support image ids instead of seeded draws.

A support list is a text file with one image id per line (blank lines and ``#`` comments skipped),
e.g. open-hummingbird-eval's ``file_sets/voc/1_div_128/trainaug_128_42.txt``. A folder of lists
(one per seed) is every ``*.txt`` directly inside it, in name order.

Each list becomes one run of the protocol. Its ratio ``1/n`` and seed are read from a name of the
open-hummingbird-eval form ``<split>_<n>_<seed>`` (``trainaug_128_42`` -> ratio 128, seed 42); for
any other name the ratio is ``round(N / len(ids))`` over the ``N`` images of the support split and
the seed is the list's position in its folder. Results name the list (``support_lists``).

Ids absent from the support split are an error naming the list and the first missing ids;
``allow_missing=True`` drops them instead (and records how many were dropped), e.g. to run the
full-VOC lists on a VOC subset.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

__all__ = ["SupportList", "SupportListError", "read_support_lists"]

_HBIRD_NAME = re.compile(r"^.+_(\d+)_(\d+)$")  # <split>_<n>_<seed>, e.g. trainaug_128_42
_SHOW = 5


class SupportListError(ValueError):
    """A support list file or folder that cannot be used; the message names the file and the fix."""


@dataclass(frozen=True)
class SupportList:
    """One explicit support subset.

    name: the file stem. path: the file. ids: support image ids kept, in file order. ratio, seed:
    nominal ratio ``n`` (of 1/n) and seed (see the module docstring). sha256: of the file's bytes.
    missing: ids of the file that the split does not have (only non-empty with ``allow_missing``).
    """

    name: str
    path: str
    ids: list[str]
    ratio: int
    seed: int
    sha256: str
    missing: list[str] = field(default_factory=list)

    def describe(self) -> dict:
        """JSON record of the list for results files."""
        return {"name": self.name, "path": self.path, "sha256": self.sha256, "ratio": self.ratio, "seed": self.seed,
                "num_ids": len(self.ids), "num_missing": len(self.missing), "missing": self.missing}


def _list_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix == ".txt")
        if not files:
            raise SupportListError(f"--support-list {path} is a folder without any *.txt list: put one file per "
                                   "seed in it (one image id per line)")
        return files
    raise SupportListError(f"--support-list {path} does not exist: pass a text file of image ids or a folder of them")


def _read_ids(path: Path) -> tuple[list[str], bytes]:
    try:
        raw = path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SupportListError(f"support list {path} is unreadable ({e}): it must be a UTF-8 text file, one image "
                               "id per line") from e
    ids = [s for s in (line.split("#", 1)[0].strip() for line in text.splitlines()) if s]
    if not ids:
        raise SupportListError(f"support list {path} holds no image id: write one id per line (e.g. 2008_007456)")
    seen: set[str] = set()
    dupes = sorted({i for i in ids if i in seen or seen.add(i)})
    if dupes:
        raise SupportListError(f"support list {path} repeats ids {', '.join(dupes[:_SHOW])}: list each image once")
    return ids, raw


def read_support_lists(path: str | Path, split_ids: Sequence[str], *, split: str = "support",
                       allow_missing: bool = False) -> list[SupportList]:
    """The lists of ``path`` (a file or a folder of ``*.txt``), checked against ``split_ids``.

    Raises :class:`SupportListError` for a missing path, an empty folder, an empty or unreadable
    file, repeated ids, ids absent from the split (unless ``allow_missing``), or a list left empty.
    """
    path = Path(path)
    known = set(split_ids)
    out = []
    for position, file in enumerate(_list_files(path)):
        ids, raw = _read_ids(file)
        missing = [i for i in ids if i not in known]
        if missing and not allow_missing:
            raise SupportListError(
                f"support list {file}: {len(missing)} of its {len(ids)} ids are not in the {split} split "
                f"({', '.join(missing[:_SHOW])}{', ...' if len(missing) > _SHOW else ''}): use the list of this "
                "dataset and split, or --allow-missing-ids to drop them (the run then uses fewer images)")
        kept = [i for i in ids if i in known]
        if not kept:
            raise SupportListError(f"support list {file}: none of its {len(ids)} ids is in the {split} split "
                                   f"({len(known)} images): is it the list of another dataset?")
        match = _HBIRD_NAME.match(file.stem)
        if match:
            ratio, seed = int(match.group(1)), int(match.group(2))
        else:
            ratio, seed = max(1, round(len(known) / len(kept))), position
        if ratio < 1:
            raise SupportListError(f"support list {file}: its name says ratio 1/{ratio}; ratios are >= 1")
        out.append(SupportList(name=file.stem, path=str(file), ids=kept, ratio=ratio, seed=seed,
                               sha256=hashlib.sha256(raw).hexdigest(), missing=missing))
    return out
