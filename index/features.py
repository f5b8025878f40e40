"""Dense patch features at the protocol resolution, cached on disk (eval-protocol.md steps 1-3).

:func:`extract_features` runs a backbone once over a split: every image resized to
``(H', W') = (p * floor(H / p), p * floor(W / p))`` (antialiased bilinear), ImageNet mean/std
normalisation, last-layer patch tokens after the final norm (``x_norm_patchtokens``, CLS dropped),
L2-normalised so that cosine similarity is an inner product. The ``(h*w, D)`` tokens of all images are
stacked into one float16 ``(total_patches, D)`` array, image ``i`` at rows ``offsets[i]:offsets[i+1]``
in row-major patch order, next to their majority patch labels (``-1`` = no valid pixel).

Cache: ``cache_dir/<key>/{features.npy, labels.npy, meta.json}`` with ``key`` the sha256 of
(backbone.identity, dataset fingerprint, resolution rule, resolved precision, format version). The
directory is written under a temporary name and renamed when complete, so a cache directory that
exists is complete; it is reused as is (``features.npy`` memory-mapped read-only). Different weights,
random inits and presets have different ``backbone.identity`` values, so their features never mix.
The fingerprint holds the dataset kind, root realpath, split, a hash of the ids, the class count and
``SegDataset.fingerprint()`` (file sizes and mtimes), so edited files make a new cache entry.

Throughput: a first pass decodes the masks only (cheap PNGs) to get each image's size and patch
labels; the second pass groups images of the same protocol size into batches (VOC has few distinct
sizes), decoded and resized by DataLoader workers while the main process runs the forward.

Precision: ``"auto"`` is bf16 autocast where the device has bf16 arithmetic (CUDA with bf16; CPU with
AVX-512 BF16 or AMX, see :mod:`cribo.precision`), else fp32. ``"bf16"`` / ``"fp32"`` force it. The
resolved precision is part of the cache key and of ``FeatureSet.meta["precision"]``.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from cribo import dist
from cribo.contracts import BackboneProtocol, SegDatasetProtocol
from cribo.errors import DataError
from cribo.pixels import normalise
from cribo.precision import autocast, resolve_precision
from index.labels import patch_labels, protocol_size, resize_image, resize_mask

__all__ = ["FeatureSet", "extract_features", "image_features", "normalise_pixels", "dataset_fingerprint",
           "cache_key", "size_batches", "RESOLUTION_RULE", "FeatureCacheError"]

FORMAT_VERSION = 1
RESOLUTION_RULE = "floor-to-patch-multiple"
FEATURES_FILE, LABELS_FILE, META_FILE = "features.npy", "labels.npy", "meta.json"


def normalise_pixels(x: torch.Tensor) -> torch.Tensor:
    """``x (B, 3, H, W)`` uint8 pixels -> float32 ImageNet-normalised model input, on ``x``'s device."""
    return normalise(x.float().div(255))


@torch.inference_mode()
def image_features(backbone: BackboneProtocol, image: np.ndarray, *, device: str | torch.device = "cpu",
                   precision: str = "auto") -> tuple[np.ndarray, tuple[int, int]]:
    """L2-normalised patch tokens of one ``image (H, W, 3) uint8`` at the protocol resolution.

    The one-image counterpart of :func:`extract_features` (same resize, normalisation, precision
    policy and L2 normalisation; the tokens are rounded through float16 like the cache), so that the
    prediction for an image equals the protocol's for the same image.

    Returns ``tokens (h*w, D) float32`` and ``grid = (h, w)``.
    """
    device = torch.device(device)
    size = protocol_size(image.shape[0], image.shape[1], int(backbone.patch_size))
    pixels = np.require(resize_image(image, size), requirements="W")  # Pillow's arrays are read-only
    x = normalise_pixels(torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device))
    with autocast(resolve_precision(precision, device), device):
        out = backbone.forward_features(x)
    tokens = F.normalize(out["x_norm_patchtokens"][0].float(), dim=-1)  # (h*w, D)
    return tokens.to(torch.float16).float().cpu().numpy(), tuple(out["grid"])


class FeatureCacheError(DataError, RuntimeError):
    """A feature cache directory exists but does not hold what its meta.json says."""


@dataclass
class FeatureSet:
    """Patch features of one dataset split.

    features: ``(P, D)`` float16, L2-normalised rows (read-only memmap of features.npy).
    labels: ``(P,)`` int64 majority patch labels, -1 = no valid pixel.
    offsets: ``(n + 1,)`` int64, image ``i`` owns rows ``offsets[i]:offsets[i+1]``.
    grids: ``(n, 2)`` int64 patch grid ``(h, w)``; sizes: ``(n, 2)`` int64 original ``(H, W)``.
    ids: the dataset's image ids, in dataset order. meta: cache metadata (see meta.json), with
    ``forward_seconds`` (time spent in the backbone forward when the cache was made) and ``cached``
    (True when this call reused an existing cache). path: the cache directory.
    """

    features: np.ndarray
    labels: np.ndarray
    offsets: np.ndarray
    grids: np.ndarray
    sizes: np.ndarray
    ids: list[str]
    meta: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def num_patches(self) -> int:
        return int(self.features.shape[0])

    def image_rows(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def rows_of(self, images: np.ndarray | list[int], *, labelled_only: bool = False) -> np.ndarray:
        """Row ids ``(m,) int64`` of the patches of ``images`` (dataset indices), in image order.

        ``labelled_only`` keeps the patches with a label (the ones the protocol indexes and scores).
        """
        images = np.asarray(images, dtype=np.int64)
        starts, stops = self.offsets[images], self.offsets[images + 1]
        counts = stops - starts
        # rows = start of each image repeated over its patches + position within the image
        rows = np.repeat(starts, counts) + (np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts))
        return rows[self.labels[rows] >= 0] if labelled_only else rows


def dataset_fingerprint(dataset: SegDatasetProtocol) -> dict[str, Any]:
    """What identifies a split's content for the cache.

    kind, root realpath, split, image and class counts, a hash of the ids, and
    ``dataset.fingerprint()`` (which also covers file sizes and mtimes, so edited files miss the cache).
    """
    return {
        "kind": dataset.kind,
        "root": os.path.realpath(dataset.root) if os.path.exists(dataset.root) else str(dataset.root),
        "split": dataset.split,
        "num_images": len(dataset.ids),
        "num_classes": len(dataset.class_names),
        "ids_sha256": hashlib.sha256("\n".join(dataset.ids).encode()).hexdigest(),
        "content_sha256": dataset.fingerprint(),
    }


def cache_key(backbone_identity: str, fingerprint: dict, precision: str) -> str:
    """sha256 over everything that changes the cached numbers."""
    blob = json.dumps({"backbone": backbone_identity, "dataset": fingerprint, "resolution": RESOLUTION_RULE,
                       "precision": precision, "format": FORMAT_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def size_batches(sizes: np.ndarray, batch_size: int) -> list[list[int]]:
    """Group image indices by protocol size ``sizes (n, 2)`` into batches of at most ``batch_size``.

    Sizes are visited largest group first, images within a group in dataset order; every index
    appears exactly once.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys, inverse, counts = np.unique(sizes, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    batches: list[list[int]] = []
    for g in np.argsort(-counts, kind="stable"):
        members = np.nonzero(inverse == g)[0]
        batches.extend(members[s:s + batch_size].tolist() for s in range(0, len(members), batch_size))
    return batches


# ---------------------------------------------------------------------------- loading workers
class _MaskPass(Dataset):
    """Item ``i`` -> (i, (H, W), (H', W'), patch labels (h*w,) int16): masks only, no image decode."""

    def __init__(self, dataset: SegDatasetProtocol, patch_size: int):
        self.dataset, self.p = dataset, patch_size
        self.num_classes = len(dataset.class_names)

    def __len__(self) -> int:
        return len(self.dataset.ids)

    def __getitem__(self, i: int):
        mask = self.dataset.load_mask(i)
        H, W = mask.shape
        size = protocol_size(H, W, self.p)
        lab = patch_labels(resize_mask(mask, size), self.p, self.num_classes, self.dataset.void)
        return i, (H, W), size, lab.astype(np.int16)


class _ImagePass(Dataset):
    """Item ``i`` -> (i, image (3, H', W') uint8 tensor) at the protocol size found by the mask pass."""

    def __init__(self, dataset: SegDatasetProtocol, sizes: np.ndarray, protocol_sizes: np.ndarray):
        self.dataset, self.sizes, self.protocol_sizes = dataset, sizes, protocol_sizes

    def __len__(self) -> int:
        return len(self.dataset.ids)

    def __getitem__(self, i: int):
        img = self.dataset.load_image(i)
        if img.shape[:2] != tuple(self.sizes[i]):
            raise ValueError(f"image {self.dataset.ids[i]!r} is {img.shape[0]}x{img.shape[1]} but its mask is "
                             f"{self.sizes[i][0]}x{self.sizes[i][1]}: fix the dataset (mask and image must match)")
        img = resize_image(img, tuple(int(s) for s in self.protocol_sizes[i]))
        if not img.flags.writeable:  # Pillow-backed arrays are read-only; torch wants writable memory
            img = img.copy()
        return i, torch.from_numpy(img).permute(2, 0, 1)


def _as_list(batch: list) -> list:
    return batch


# ---------------------------------------------------------------------------- cache I/O
def _load_cache(path: Path) -> FeatureSet:
    try:
        meta = json.loads((path / META_FILE).read_text())
        features = np.load(path / FEATURES_FILE, mmap_mode="r", allow_pickle=False)
        labels = np.load(path / LABELS_FILE, allow_pickle=False).astype(np.int64)
    except (OSError, ValueError) as e:
        raise FeatureCacheError(f"feature cache {path} is unreadable ({e}); delete that directory to rebuild it") from e
    offsets = np.asarray(meta["offsets"], dtype=np.int64)
    if features.shape != (meta["num_patches"], meta["dim"]) or labels.shape != (meta["num_patches"],) \
            or offsets[-1] != meta["num_patches"]:
        raise FeatureCacheError(f"feature cache {path} is inconsistent (features {features.shape}, labels "
                                f"{labels.shape}, meta {meta['num_patches']}x{meta['dim']}); delete it to rebuild")
    return FeatureSet(features=features, labels=labels, offsets=offsets,
                      grids=np.asarray(meta["grids"], dtype=np.int64).reshape(-1, 2),
                      sizes=np.asarray(meta["sizes"], dtype=np.int64).reshape(-1, 2),
                      ids=list(meta["ids"]), meta=meta, path=path)


def extract_features(
    backbone: BackboneProtocol,
    dataset: SegDatasetProtocol,
    cache_dir: str | os.PathLike,
    *,
    precision: str = "auto",
    device: str | torch.device = "cpu",
    batch_size: int = 16,
    num_workers: int = 2,
    progress: bool = True,
) -> FeatureSet:
    """Features and patch labels of every image of ``dataset``, from the cache or computed once.

    Args:
        backbone: a :class:`cribo.backbones.Backbone` (``patch_size``, ``embed_dim``, ``identity``,
            ``forward_features``). It is moved to ``device`` and run in eval mode (its mode is
            restored afterwards).
        dataset: a :class:`index.datasets.SegDataset`.
        cache_dir: the cache root; the features go to ``cache_dir/<key>/``.
        precision: "auto" | "bf16" | "fp32" (see the module docstring).
        batch_size: images per forward (all of one protocol size).
        num_workers: DataLoader processes decoding and resizing images (0 = in the main process).

    Returns:
        a :class:`FeatureSet`; ``meta["cached"]`` says whether an existing cache was reused.
    """
    device = torch.device(device)
    resolved = resolve_precision(precision, device)
    if resolved not in ("bf16", "fp32"):
        raise ValueError(f"feature extraction supports precision auto, bf16 or fp32, got {precision!r}")
    n = len(dataset.ids)
    if n == 0:
        raise ValueError(f"dataset split {dataset.split!r} at {dataset.root} has no images")
    if len(dataset.class_names) > np.iinfo(np.int16).max:
        raise ValueError(f"{len(dataset.class_names)} classes do not fit the int16 patch labels")
    fingerprint = dataset_fingerprint(dataset)
    key = cache_key(backbone.identity, fingerprint, resolved)
    cache_dir = Path(cache_dir)
    final = cache_dir / key
    # under torchrun, rank 0 decides for all (the cache dir must be on a filesystem every rank sees)
    if dist.broadcast_object(final.is_dir()):
        fs = _load_cache(final)
        fs.meta["cached"] = True
        return fs

    main = dist.is_main()
    if main:
        cache_dir.mkdir(parents=True, exist_ok=True)
    made = tempfile.mkdtemp(prefix=f".{key}.", suffix=".tmp", dir=cache_dir) if main else None
    tmp = Path(dist.broadcast_object(made))  # rank 0's temporary directory, written by every rank
    try:
        meta = _extract_into(tmp, backbone, dataset, resolved, device, batch_size, num_workers, progress and main)
        meta.update(key=key, backbone=backbone.identity, backbone_source=getattr(backbone, "source", ""),
                    dataset=fingerprint, precision=resolved, precision_requested=precision)
        if main:
            (tmp / META_FILE).write_text(json.dumps(meta) + "\n")  # written last: its presence marks completion
            try:
                os.rename(tmp, final)
            except OSError:
                if not final.is_dir():  # another process finished the same key first: use theirs
                    raise
        dist.barrier()
    finally:
        if main and tmp.exists():
            shutil.rmtree(tmp)
    fs = _load_cache(final)
    fs.meta["cached"] = False
    return fs


def _extract_into(out: Path, backbone: BackboneProtocol, dataset: SegDatasetProtocol, precision: str, device: torch.device,
                  batch_size: int, num_workers: int, progress: bool) -> dict[str, Any]:
    """Write labels.npy and features.npy of ``dataset`` into ``out``; return the cache metadata.

    Under torchrun every rank reads the masks (cheap), rank 0 writes the labels and creates
    features.npy, and rank ``r`` of ``W`` runs the forward of size batches ``r, r + W, ...`` into it;
    ``forward_seconds`` is summed over the ranks.
    """
    t_start = time.perf_counter()
    rank, world = dist.rank(), dist.world_size()
    p, D, n = int(backbone.patch_size), int(backbone.embed_dim), len(dataset.ids)
    loader_kw = dict(num_workers=num_workers, persistent_workers=False)

    # pass 1: masks -> original sizes, protocol sizes, patch labels (no image decoding)
    sizes = np.zeros((n, 2), np.int64)
    psizes = np.zeros((n, 2), np.int64)
    labels: list[np.ndarray | None] = [None] * n
    masks = DataLoader(_MaskPass(dataset, p), batch_size=32, collate_fn=_as_list, **loader_kw)
    for batch in tqdm(masks, total=len(masks), desc=f"masks {dataset.split}", unit="batch", disable=not progress):
        for i, size, psize, lab in batch:
            sizes[i], psizes[i], labels[i] = size, psize, lab
    grids = psizes // p
    counts = grids[:, 0] * grids[:, 1]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    total = int(offsets[-1])
    if rank == 0:
        np.save(out / LABELS_FILE, np.concatenate(labels).astype(np.int16), allow_pickle=False)

    # pass 2: images grouped by protocol size -> normalised, L2-normalised patch tokens
    if rank == 0:
        feats = np.lib.format.open_memmap(out / FEATURES_FILE, mode="w+", dtype=np.float16, shape=(total, D))
    dist.barrier()
    if rank != 0:
        feats = np.load(out / FEATURES_FILE, mmap_mode="r+", allow_pickle=False)
    batches = size_batches(psizes, batch_size)[rank::world]
    images = DataLoader(_ImagePass(dataset, sizes, psizes), batch_sampler=batches,
                        pin_memory=device.type == "cuda", **loader_kw)
    was_training = backbone.training
    backbone.to(device).eval()
    forward_s = 0.0
    bar = tqdm(total=sum(map(len, batches)), desc=f"features {dataset.split}", unit="img", disable=not progress)
    try:
        with torch.inference_mode():
            for idx, x in images:
                x = normalise_pixels(x.to(device, non_blocking=True))
                h, w = int(grids[idx[0], 0]), int(grids[idx[0], 1])
                t0 = time.perf_counter()
                with autocast(precision, device):
                    tokens = backbone.forward_features(x)["x_norm_patchtokens"]  # (B, h*w, D)
                tokens = F.normalize(tokens.float(), dim=-1)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # a CPU-GPU sync point: the forward's real end
                forward_s += time.perf_counter() - t0
                if tokens.shape[1:] != (h * w, D):
                    raise RuntimeError(f"backbone returned patch tokens {tuple(tokens.shape)} for input "
                                       f"{tuple(x.shape)}; expected (B, {h * w}, {D})")
                idx = idx.numpy()
                rows = (offsets[idx][:, None] + np.arange(h * w)).reshape(-1)
                feats[rows] = tokens.reshape(-1, D).to(torch.float16).cpu().numpy()
                bar.update(len(idx))
    finally:
        bar.close()
        backbone.train(was_training)
    feats.flush()
    del feats
    forward_s = float(dist.all_reduce_sum(torch.tensor([forward_s], dtype=torch.float64, device=device))[0])
    dist.barrier()  # every rank's rows are on disk before rank 0 completes the cache
    elapsed = time.perf_counter() - t_start
    return {
        "format": FORMAT_VERSION, "resolution_rule": RESOLUTION_RULE, "patch_size": p, "dim": D,
        "num_images": n, "num_patches": total, "ids": list(dataset.ids), "class_names": list(dataset.class_names),
        "offsets": offsets.tolist(), "grids": grids.tolist(), "sizes": sizes.tolist(),
        "forward_seconds": forward_s, "extract_seconds": elapsed, "batch_size": batch_size,
        "device": str(device), "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
