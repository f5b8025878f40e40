"""The random-resized-crop rule (torchvision's ``RandomResizedCrop.get_params``), one implementation for
the pretraining views (:mod:`cribo.pretrain.transforms`, torch generator) and the Hummingbird memory
views (:mod:`index.hbird`, numpy generator).

The rule: 10 tries of a target area ``U(scale) x H x W`` and an aspect ``exp(U(log ratio))``; the first
box that fits wins, placed uniformly; else the centre crop of the whole image clamped to ``ratio``.
Each caller supplies the three draws from its own random stream, so each keeps its exact sequence of
random numbers (and its own float precision for the draws).
"""
from __future__ import annotations

import math
from typing import Callable

__all__ = ["CropBox", "resized_crop_box"]

#: ``(top, left, height, width)`` in pixels.
CropBox = tuple[int, int, int, int]


def resized_crop_box(height: int, width: int, ratio: tuple[float, float], *,
                     area_fraction: Callable[[], float], aspect: Callable[[], float],
                     integer: Callable[[int], int]) -> CropBox:
    """``(top, left, h, w)`` of a random crop of a ``height x width`` image.

    Args:
        ratio: (min, max) aspect ratio w/h of the crop (the fallback clamps to it).
        area_fraction: draws the target area as a fraction of the image, ``U(scale)``.
        aspect: draws the aspect ratio, ``exp(U(log ratio))``.
        integer: ``integer(n)`` draws uniformly from ``0 .. n - 1``.
    """
    area = height * width
    for _ in range(10):
        target_area = area * area_fraction()
        a = aspect()
        w = int(round(math.sqrt(target_area * a)))
        h = int(round(math.sqrt(target_area / a)))
        if 0 < w <= width and 0 < h <= height:
            top = integer(height - h + 1)
            left = integer(width - w + 1)
            return int(top), int(left), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w
