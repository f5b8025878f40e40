"""Checks on what a user uploads: images, ground-truth masks, index directories.

Every problem raises :class:`InputError` with a message that names the input and the fix; the UI turns
it into a ``gr.Error`` (a red toast in the browser, an ``AppError`` for API clients) and keeps serving.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from cribo.constants import VOID
from cribo.errors import DataError

_PIL_ERRORS = (OSError, SyntaxError, ValueError, UnidentifiedImageError, Image.DecompressionBombError)
_MASK_MODES = ("P", "L", "1", "I", "I;16", "I;16L", "I;16B")

__all__ = ["InputError", "LoadedImage", "load_image", "load_mask", "as_path"]


class InputError(DataError, ValueError):
    """Bad user input; the message is shown to the user as it is."""


@dataclass(frozen=True)
class LoadedImage:
    """An uploaded image ready for the pipeline.

    pixels: ``(h, w, 3)`` uint8 RGB at the processing size (the original, or downscaled so that its
        longer side is ``max_side``). original_size: ``(H, W)`` of the file; the predicted mask is
        returned at this size. note: a sentence for the user when the image was downscaled, else "".
    """

    pixels: np.ndarray
    original_size: tuple[int, int]
    name: str
    note: str = ""


def as_path(value, what: str) -> Path:
    """A gradio file value (a path string, a dict with 'path', or an object with ``.name``) -> Path."""
    if value is None or value == "":
        raise InputError(f"{what}: no file given; upload one")
    if isinstance(value, dict):
        value = value.get("path") or value.get("name")
    value = getattr(value, "name", value)
    path = Path(os.fspath(value))
    if not path.is_file():
        raise InputError(f"{what}: file {path} not found")
    return path


def load_image(value, *, max_side: int, max_pixels: int, multiple: int = 1, what: str = "image") -> LoadedImage:
    """Decode an uploaded image file to RGB; refuse non-images and images above ``max_pixels``;
    downscale (antialiased) so the longer side is at most ``max_side``, straight to a multiple of
    ``multiple`` (the patch size: the protocol resize of :func:`index.features.image_features` is then
    a no-op, so a large upload is resampled once on the way in).

    EXIF orientation is not applied (as in :mod:`index.datasets`), so the pixels stay aligned with a
    ground-truth mask of the same file.
    """
    path = as_path(value, what)
    try:
        with Image.open(path) as im:
            W, H = im.size
            if W * H > max_pixels:
                raise InputError(
                    f"{what} {path.name} is {W}x{H} = {W * H / 1e6:.1f} MP, above this app's limit of "
                    f"{max_pixels / 1e6:.0f} MP: downscale it first (or start the app with a larger --max-pixels)")
            im.load()
            rgb = np.asarray(im.convert("RGB"))
    except InputError:
        raise
    except _PIL_ERRORS as e:
        raise InputError(f"{what} {path.name} is not a readable image ({type(e).__name__}: {e}); "
                         "upload a PNG, JPEG or WebP file") from e
    note = ""
    if max(H, W) > max_side:
        s = max_side / max(H, W)
        h, w = max(1, round(H * s)), max(1, round(W * s))
        h, w = (h - h % multiple) or h, (w - w % multiple) or w  # floor to the patch grid (if it fits one)
        rgb = np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BILINEAR))
        note = (f"{path.name} is {W}x{H}: processed at {w}x{h} (longer side {max_side} px); "
                f"the mask is returned at {W}x{H}")
    return LoadedImage(rgb, (H, W), path.name, note)


def load_mask(value, *, size: tuple[int, int], num_classes: int, what: str = "ground-truth mask") -> np.ndarray:
    """A single-channel PNG of class ids (palette or grayscale; void 255) of ``size = (H, W)``.

    Returns ``(H, W)`` uint8. Palette masks are read as their indices (the VOC convention), never as
    colours; an RGB rendering is refused.
    """
    path = as_path(value, what)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode not in _MASK_MODES:
                raise InputError(
                    f"{what} {path.name} has mode {mode} ({len(im.getbands())} channels): expected a "
                    "single-channel PNG whose pixel values are class ids (palette 'P' or grayscale 'L', "
                    "void 255), like VOC's SegmentationClass files; a colour rendering cannot be scored")
            raw = np.asarray(im)
    except InputError:
        raise
    except _PIL_ERRORS as e:
        raise InputError(f"{what} {path.name} is not a readable image ({type(e).__name__}: {e})") from e
    if raw.shape != tuple(size):
        raise InputError(f"{what} {path.name} is {raw.shape[1]}x{raw.shape[0]} (WxH) but the image is "
                         f"{size[1]}x{size[0]}: the mask must have the image's size")
    if raw.dtype != np.uint8:
        if raw.size and (raw.min() < 0 or raw.max() > 255):
            raise InputError(f"{what} {path.name} holds values {raw.min()}..{raw.max()}: class ids must "
                             "lie in 0..255 (void 255)")
        raw = raw.astype(np.uint8)
    bad = np.unique(raw[(raw >= num_classes) & (raw != VOID)])
    if bad.size:
        raise InputError(f"{what} {path.name} holds values {bad[:10].tolist()} that are not class ids of "
                         f"this index (0..{num_classes - 1}, void 255): use a mask labelled with the "
                         "index's classes")
    return raw
