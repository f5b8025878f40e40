"""Tiny segmentation datasets built in a test's tmp_path, for retrieval, protocol and CLI tests.

``make_folder_dataset`` writes the generic folder layout of :mod:`index.datasets`
(``ROOT/images/<split>/<id>.png``, ``ROOT/masks/<split>/<id>.png``, ``ROOT/classes.txt``): each image is
a few flat-coloured rectangles, one colour per class, with mild seeded noise, and its mask holds the
rectangles' class ids plus void (255) in a left strip and a top-left corner (so at p = 16 the first
patch has no label and a few are partly void), so patch labels include unlabelled patches and
even a randomly initialised ViT retrieves far better than chance. Images come in two sizes (64x48 and
48x64 by default) so batching by protocol size is exercised.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

CLASS_NAMES = ("background", "red", "green", "blue")
CLASS_COLOURS = np.array([[40, 40, 40], [220, 30, 30], [30, 200, 40], [40, 60, 230]], dtype=np.uint8)


def make_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """One ``(H, W, 3)`` uint8 image and its ``(H, W)`` uint8 mask (classes 0..3, void 255)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    for c in (1, 2, 3):
        h, w = rng.integers(height // 4, height // 2 + 1), rng.integers(width // 4, width // 2 + 1)
        y, x = rng.integers(0, height - h + 1), rng.integers(0, width - w + 1)
        mask[y:y + h, x:x + w] = c
    mask[:, :3] = 255  # a void strip: partly void patches
    mask[:16, : max(16, width // 3)] = 255  # a void corner: the top-left 16x16 patch has no label
    img = CLASS_COLOURS[np.where(mask == 255, 0, mask)].astype(np.int16)
    img += rng.integers(-20, 21, size=img.shape, dtype=np.int16)
    return np.clip(img, 0, 255).astype(np.uint8), mask


def make_folder_dataset(root: Path, splits: dict[str, int] | None = None, *, sizes=((48, 64), (64, 48)),
                        seed: int = 0) -> Path:
    """Write a folder-layout dataset under ``root`` and return ``root``.

    splits: images per split (default ``{"train": 8, "val": 4}``); image ``j`` of a split has size
    ``sizes[j % len(sizes)]`` as ``(H, W)`` and id ``<split>_<j:03d>``.
    """
    splits = splits or {"train": 8, "val": 4}
    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    for split, n in splits.items():
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "masks" / split).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            h, w = sizes[j % len(sizes)]
            img, mask = make_scene(rng, h, w)
            Image.fromarray(img).save(root / "images" / split / f"{split}_{j:03d}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"{split}_{j:03d}.png")
    return root


def clustered_feature_cache(path: Path, n: int, seed: int, *, dim: int = 32, clusters: int = 20) -> np.ndarray:
    """A read-only float16 memmap ``(n, dim)`` of L2-normalised points around ``clusters`` random centres
    (noise 0.5), written to ``path`` like a feature cache: the support features of the re-ranking tests."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    mm = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=x.shape)
    mm[:] = x
    mm.flush()
    return np.load(path, mmap_mode="r")
