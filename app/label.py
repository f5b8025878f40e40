"""In-context labelling: a mask painted in the class colours -> labelled support patches.

The brush colours are the index's class colours (:func:`app.draw.class_palette`, all distinct), so a
painted pixel maps back to a class by exact colour equality. Only fully opaque pixels of exactly one
class colour count; anti-aliased brush edges (partial alpha or blended colours) become void, and so do
unpainted pixels. The labelled patches then come from the protocol's own rules
(:func:`index.labels.patch_labels` at the protocol resolution) and the image's tokens from
:func:`index.features.image_features`, ready for :meth:`index.store.SupportIndex.add`.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from app.inputs import InputError
from cribo.constants import VOID
from index.features import image_features
from index.labels import patch_labels, resize_mask


__all__ = ["colours_to_mask", "editor_mask", "labelled_patches"]


def colours_to_mask(rgba: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``rgba (H, W, 4)`` uint8 paint -> ``(H, W)`` uint8 class ids (row of ``palette``), void elsewhere.

    A pixel gets class c iff its alpha is 255 and its RGB equals ``palette[c]`` exactly.
    """
    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"expected an (H, W, 4) RGBA paint layer, got {rgba.shape}")
    if len(palette) > VOID:
        raise ValueError(f"{len(palette)} classes do not fit a uint8 mask with void {VOID}")
    code = (rgba[..., 0].astype(np.int64) << 16) | (rgba[..., 1].astype(np.int64) << 8) | rgba[..., 2]
    pal = palette.astype(np.int64)
    keys = (pal[:, 0] << 16) | (pal[:, 1] << 8) | pal[:, 2]  # (C,) distinct
    order = np.argsort(keys)
    pos = np.searchsorted(keys[order], code).clip(0, len(keys) - 1)
    hit = (keys[order][pos] == code) & (rgba[..., 3] == 255)
    return np.where(hit, order[pos], VOID).astype(np.uint8)


def editor_mask(value: dict | None, palette: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A ``gr.ImageEditor`` value (numpy, RGBA) -> ``(image (H, W, 3) uint8, mask (H, W) uint8)``.

    Layers are stacked in order (a later layer's opaque pixels win); a layer of another size than the
    background is resized with nearest (so no colour is blended).
    """
    if not value or value.get("background") is None:
        raise InputError("label image: upload a support image into the editor first")
    bg = np.asarray(value["background"])
    if bg.ndim != 3:
        raise InputError(f"label image: expected a colour image, got shape {bg.shape}")
    image = np.ascontiguousarray(bg[..., :3]).astype(np.uint8)
    H, W = image.shape[:2]
    mask = np.full((H, W), VOID, np.uint8)
    for layer in value.get("layers") or []:
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[2] != 4:
            raise InputError(f"label image: paint layer has shape {layer.shape}, expected RGBA")
        if layer.shape[:2] != (H, W):
            layer = np.asarray(Image.fromarray(layer).resize((W, H), Image.Resampling.NEAREST))
        painted = colours_to_mask(layer, palette)
        mask = np.where(painted != VOID, painted, mask)
    if (mask == VOID).all():
        raise InputError("label image: nothing painted in a class colour; pick a class colour in the brush "
                         "menu and paint over the regions of that class")
    return image, mask


def labelled_patches(backbone, image: np.ndarray, mask: np.ndarray, num_classes: int, *,
                     device="cpu", precision="auto") -> tuple[np.ndarray, np.ndarray]:
    """Tokens ``xb (m, D)`` and labels ``(m,)`` of the patches of ``image`` that ``mask`` labels.

    A patch's label is the majority of its painted pixels (void = unpainted, ignored), as the
    protocol labels support patches; patches without painted pixels are left out.
    """
    tokens, grid = image_features(backbone, image, device=device, precision=precision)
    p = int(backbone.patch_size)
    labels = patch_labels(resize_mask(mask, (grid[0] * p, grid[1] * p)), p, num_classes, VOID)
    keep = labels >= 0
    if not keep.any():
        raise InputError("label image: the painted strokes cover no patch of the image at the protocol "
                         f"resolution ({p}x{p}-pixel patches); paint larger regions")
    return tokens[keep], labels[keep]
