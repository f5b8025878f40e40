"""Released CrIBo checkpoints (paper Table 1) and their download.

A release is a name for one checkpoint published by the authors (``load_backbone(name)``). ``download_release`` fetches it once
into a cache folder (default ``~/.cache/cribo/checkpoints``) with a progress bar, writing atomically
so an interrupted download never leaves a file that looks complete. Nothing is downloaded on import.

The released files are training checkpoints (``teacher`` / ``student`` / pickled ``args``);
``cribo.backbones.load_backbone`` reads them with ``weights_only=True`` and an allow-list.
"""
from __future__ import annotations

import http.client
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from cribo.errors import DataError
from cribo.io import atomic_path

_CHUNK = 1 << 20


class ReleaseDownloadError(DataError, RuntimeError):
    """A preset checkpoint could not be downloaded (offline, HTTP error, truncated transfer)."""


@dataclass(frozen=True)
class Release:
    """One released checkpoint. ``voc_miou`` / ``ade_miou``: paper Table 1, k-NN retrieval at 1/1."""

    name: str
    url: str
    arch: str
    pretrain_data: str
    epochs: int
    voc_miou: float
    ade_miou: float

    @property
    def filename(self) -> str:
        return f"{self.name}.pth"


RELEASES: dict[str, Release] = {
    p.name: p
    for p in (
        Release("cribo-in1k-vits16", "https://rdr.kuleuven.be/api/access/datafile/159665",
               "vit_small_patch16_224", "ImageNet-1k", 800, 73.2, 28.3),
        Release("cribo-in1k-vitb16", "https://rdr.kuleuven.be/api/access/datafile/159666",
               "vit_base_patch16_224", "ImageNet-1k", 400, 74.9, 30.0),
        Release("cribo-coco-vits16", "https://rdr.kuleuven.be/api/access/datafile/159667",
               "vit_small_patch16_224", "COCO", 300, 58.1, 23.4),
    )
}


def default_cache_dir() -> Path:
    """``~/.cache/cribo/checkpoints`` (the ``cache_dir`` argument overrides it)."""
    return Path.home() / ".cache" / "cribo" / "checkpoints"


def get_release(name: str) -> Release:
    if name not in RELEASES:
        raise KeyError(f"unknown preset {name!r}; available: {', '.join(RELEASES)}")
    return RELEASES[name]


def release_path(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the checkpoint of preset ``name`` lives (or will live) on disk."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / get_release(name).filename


def download_release(name: str, cache_dir: str | os.PathLike | None = None, *,
                    timeout: float = 60.0, progress: bool = True) -> Path:
    """Return the local path of preset ``name``, downloading it first if it is not cached.

    Raises ``ReleaseDownloadError`` naming the URL and the exact path where the file can be put by
    hand when the download fails (e.g. on an offline machine).
    """
    preset = get_release(name)
    dest = release_path(name, cache_dir)
    if dest.is_file():
        return dest
    try:
        with urllib.request.urlopen(preset.url, timeout=timeout) as response, atomic_path(dest) as tmp:
            total = response.headers.get("Content-Length") if response.headers is not None else None
            total = int(total) if total is not None else None
            received = 0
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                                            desc=f"download {name}", disable=not progress) as bar:
                while chunk := response.read(_CHUNK):
                    f.write(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
            if total is not None and received != total:
                raise ReleaseDownloadError(
                    f"download of preset {name!r} from {preset.url} was truncated: got {received} of "
                    f"{total} bytes. Run again, or download the file by hand and put it at {dest}")
    except (OSError, http.client.HTTPException) as err:  # URLError, HTTPError, timeouts, resets
        raise ReleaseDownloadError(
            f"could not download preset {name!r} from {preset.url} ({err}). If this machine is "
            f"offline, download that URL elsewhere and put the file at {dest} "
            f"(or pass the file itself as the weights path)") from err
    return dest
