"""Protocol resolution and patch labels (eval-protocol.md steps 1 and 3).

Shapes: an image is ``(H, W, 3)`` uint8 RGB, a mask ``(H, W)`` uint8 of class ids with void 255;
after resizing to the protocol resolution ``(H', W') = (p*h, p*w)`` there are ``h*w`` patches of
``p x p`` pixels, numbered in row-major order (the order of a ViT's patch tokens).

Resizing uses Pillow: ``Image.resize(..., BILINEAR)`` for images and ``NEAREST`` for masks. Pillow's
bilinear filter widens its support by the down-sampling factor, so it is antialiased when shrinking
(unlike ``cv2.INTER_LINEAR``); the protocol asks for "antialiased bilinear or bicubic".
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from cribo.constants import VOID

__all__ = [
    "protocol_size",
    "resize_image",
    "resize_mask",
    "patch_labels",
    "patch_class_histograms",
    "paint_patches",
]


def protocol_size(h: int, w: int, p: int) -> tuple[int, int]:
    """The protocol resolution: ``(p * floor(h / p), p * floor(w / p))``.

    VOC's 500x375 (W x H) image at p = 16 -> ``(368, 496)``, a 23 x 31 grid of 713 patches.
    """
    if p <= 0:
        raise ValueError(f"patch size must be positive, got p={p}")
    if h < p or w < p:
        raise ValueError(
            f"image of {h}x{w} (HxW) is smaller than one {p}x{p} patch: "
            f"use a larger image or a backbone with a smaller patch size"
        )
    return p * (h // p), p * (w // p)


def _check_size(size: tuple[int, int]) -> tuple[int, int]:
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"size must be (height, width) with positive entries, got {size!r}")
    return int(size[0]), int(size[1])


def resize_image(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Antialiased bilinear resize (Pillow BILINEAR) of ``img (H,W,3) uint8`` to ``size = (H', W')``.

    Returns a new ``(H', W', 3)`` uint8 array (a copy even when the size is unchanged).
    """
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"resize_image expects an (H, W, 3) uint8 image, got {img.shape} {img.dtype}")
    h, w = _check_size(size)
    if img.shape[:2] == (h, w):
        return img.copy()
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))


def resize_mask(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize (Pillow NEAREST) of ``mask (H,W) uint8`` to ``size = (H', W')``.

    Nearest keeps every output value one of the input's class ids (no blending across classes).
    """
    if mask.dtype != np.uint8 or mask.ndim != 2:
        raise ValueError(f"resize_mask expects an (H, W) uint8 mask, got {mask.shape} {mask.dtype}")
    h, w = _check_size(size)
    if mask.shape == (h, w):
        return mask.copy()
    return np.asarray(Image.fromarray(mask).resize((w, h), Image.Resampling.NEAREST))


def _patch_counts(mask: np.ndarray, p: int, num_classes: int, void: int) -> np.ndarray:
    """``(h*w, C)`` int64 pixel counts of each class in each patch, void pixels left out."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H', W'), got shape {mask.shape}")
    H, W = mask.shape
    if H % p or W % p or H == 0 or W == 0:
        raise ValueError(
            f"mask of {H}x{W} is not a multiple of the patch size {p}: "
            f"resize it to protocol_size(H, W, p) first"
        )
    h, w = H // p, W // p
    # (h, p, w, p) -> (h, w, p, p): one row of p*p pixels per patch, patches in row-major order.
    pix = mask.reshape(h, p, w, p).transpose(0, 2, 1, 3).reshape(h * w, p * p).astype(np.int64)
    valid = pix != void
    bad = valid & ((pix < 0) | (pix >= num_classes))
    if bad.any():
        vals = np.unique(pix[bad])[:10].tolist()
        raise ValueError(
            f"mask has class ids {vals} outside 0..{num_classes - 1} that are not void ({void}): "
            f"map the mask to class ids first (index.datasets does this)"
        )
    patch = np.broadcast_to(np.arange(h * w, dtype=np.int64)[:, None], pix.shape)
    flat = patch[valid] * num_classes + pix[valid]
    return np.bincount(flat, minlength=h * w * num_classes).reshape(h * w, num_classes)


def patch_labels(mask: np.ndarray, p: int, num_classes: int, void: int = VOID) -> np.ndarray:
    """Majority label of each ``p x p`` patch of ``mask (H',W')``, ignoring void (protocol step 3).

    Returns ``(h*w,)`` int64: the class with the most valid pixels, ties to the smallest class id,
    and -1 for a patch with no valid pixel (not indexed, not scored). Vectorised: one bincount over
    ``patch * C + label``.
    """
    counts = _patch_counts(mask, p, num_classes, void)
    labels = counts.argmax(axis=1)  # argmax returns the first maximum: ties -> smallest id
    labels[counts.sum(axis=1) == 0] = -1
    return labels


def patch_class_histograms(mask: np.ndarray, p: int, num_classes: int, void: int = VOID) -> np.ndarray:
    """Soft patch labels for the Hummingbird option: ``(h*w, C)`` float32 class fractions.

    Row ``i`` holds the fraction of patch ``i``'s valid (non-void) pixels in each class; it sums
    to 1, or is all zeros for a patch with no valid pixel.
    """
    counts = _patch_counts(mask, p, num_classes, void).astype(np.float32)
    total = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def paint_patches(
    pred: np.ndarray, grid: tuple[int, int], p: int, out_size: tuple[int, int], void: int = VOID
) -> np.ndarray:
    """Paint each patch's prediction over its ``p x p`` pixels, then resize (nearest) to ``out_size``.

    ``pred (h*w,)`` class ids (-1 = no prediction, painted as ``void``), ``grid = (h, w)``,
    ``out_size = (H, W)`` the original mask size. Returns ``(H, W)`` uint8: the pixel-level
    prediction of the protocol's pixel-level option (step 6) and of the app's overlay.
    """
    h, w = grid
    pred = np.asarray(pred)
    if pred.shape != (h * w,):
        raise ValueError(f"pred has shape {pred.shape}, expected ({h * w},) for a {h}x{w} grid")
    if pred.size and (pred.min() < -1 or pred.max() >= 255):
        raise ValueError(f"pred values must be class ids in 0..254 or -1, got {pred.min()}..{pred.max()}")
    ids = np.where(pred < 0, void, pred).astype(np.uint8).reshape(h, w)
    painted = np.repeat(np.repeat(ids, p, axis=0), p, axis=1)
    return resize_mask(painted, out_size)
