"""Bounded work: a cap on the image side that evaluate.py and build_index.py process.

The protocol runs every image at its native size (floored to a multiple of the patch size), so the
work per image grows with its pixel count (and the attention with its square): one 8000 x 8000 image
is 250,000 patches at p = 16. :func:`bound_dataset` wraps a :class:`index.datasets.SegDataset`:

- an image smaller than one patch is refused, naming the file;
- by default (``max_side=None``) an image whose longer side exceeds :data:`DEFAULT_MAX_SIDE` is
  refused, naming the file, when its mask is first read (the mask pass, before any forward);
- with an explicit ``--max-side N`` every image whose longer side exceeds ``N`` is downscaled (image
  antialiased bilinear, mask nearest) to a longer side of ``N`` before the protocol's floor to the
  patch multiple; ``N`` enters the dataset fingerprint (the feature cache key) and its description
  (results and index metadata), since the numbers are then no longer the native-size protocol's.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from cribo.contracts import SegDatasetProtocol
from index.datasets import DatasetError
from index.labels import resize_image, resize_mask

DEFAULT_MAX_SIDE = 4096


class BoundedDataset:
    """``dataset`` with images at most ``max_side`` on their longer side (refused or downscaled).

    Every other attribute (``ids``, ``class_names``, ``split``, ``root``, ...) is the wrapped dataset's.
    """

    def __init__(self, dataset: SegDatasetProtocol, max_side: int, *, downscale: bool, patch_size: int = 1):
        if max_side < max(1, patch_size):
            raise ValueError(f"--max-side must be >= the patch size {patch_size}, got {max_side}")
        self.dataset, self.max_side, self.downscale = dataset, int(max_side), downscale
        self.patch_size = int(patch_size)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "max_side", "downscale", "patch_size"):
            raise AttributeError(name)  # unpickling in a worker: not yet initialised
        return getattr(self.dataset, name)

    def __len__(self) -> int:
        return len(self.dataset)

    def _where(self, i: int) -> str:
        try:
            return str(self.dataset.image_path(i))
        except DatasetError:  # a dataset without files (Hugging Face): its id
            return f"image {self.dataset.ids[i]!r} of split {self.dataset.split!r}"

    def _target(self, i: int, shape: tuple[int, ...]) -> tuple[int, int] | None:
        """The downscaled ``(h, w)`` of item ``i``, None when it fits; refuses it when not downscaling."""
        H, W = int(shape[0]), int(shape[1])
        if min(H, W) < self.patch_size:
            raise DatasetError(f"{self._where(i)} is {W}x{H} (WxH), smaller than one {self.patch_size}x"
                               f"{self.patch_size} patch of this backbone: remove it from the split")
        if max(H, W) <= self.max_side:
            return None
        if not self.downscale:
            raise DatasetError(
                f"{self._where(i)} is {W}x{H} (WxH), above the limit of {self.max_side} pixels per side "
                f"(the protocol runs images at native size: this one would be "
                f"{(H // self.patch_size) * (W // self.patch_size):,} patches of {self.patch_size} px); pass "
                "--max-side N to downscale larger images to N pixels, or remove it")
        s = self.max_side / max(H, W)
        low = self.patch_size  # never downscale below one patch
        return max(low, round(H * s)), max(low, round(W * s))

    def load_mask(self, i: int) -> np.ndarray:
        mask = self.dataset.load_mask(i)
        size = self._target(i, mask.shape)
        return mask if size is None else resize_mask(mask, size)

    def load_image(self, i: int) -> np.ndarray:
        image = self.dataset.load_image(i)
        size = self._target(i, image.shape)
        return image if size is None else resize_image(image, size)

    def describe(self) -> dict[str, Any]:
        info = self.dataset.describe()
        return {**info, "max_side": self.max_side} if self.downscale else info

    def fingerprint(self) -> str:
        inner = self.dataset.fingerprint()
        return f"{inner}:max_side={self.max_side}" if self.downscale else inner


def bound_dataset(dataset: SegDatasetProtocol, max_side: int | None, patch_size: int = 1) -> BoundedDataset:
    """``dataset`` refusing images above :data:`DEFAULT_MAX_SIDE` (``max_side=None``), or downscaling
    those above an explicit ``max_side``; images smaller than one ``patch_size`` patch are refused."""
    if max_side is None:
        return BoundedDataset(dataset, DEFAULT_MAX_SIDE, downscale=False, patch_size=patch_size)
    return BoundedDataset(dataset, max_side, downscale=True, patch_size=patch_size)
