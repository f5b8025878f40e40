"""Pictures of the app: class palette, overlays, legend, confidence map, clusters and object matches.

Everything here is pure numpy / Pillow on ``uint8`` arrays (no matplotlib figure, no state), so one
drawing costs a few milliseconds on a VOC-sized image. Shapes: an image is ``(H, W, 3)`` uint8 RGB,
a label mask ``(H, W)`` uint8 of class ids with void 255, a patch grid ``(h, w)``.
"""
from __future__ import annotations

import html

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cribo.constants import VOID

VOID_RGB = (128, 128, 128)

__all__ = [
    "class_palette", "colour_hex", "hex_to_rgb", "colorize", "overlay", "legend_html", "confidence_map",
    "cluster_palette", "draw_clusters", "draw_boxes", "highlight_region", "side_by_side", "match_sheet",
    "label_mask_png",
]


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=max(10, int(size)))


def class_palette(num_classes: int = 256) -> np.ndarray:
    """``(num_classes, 3)`` uint8: the Pascal VOC colour map (bit-interleaved ids), distinct for 0..255.

    Class 0 (VOC background) is black. Every id gets a different colour, so a painted colour maps back
    to exactly one class (:mod:`app.label`).
    """
    ids = np.arange(num_classes)
    rgb = np.zeros((num_classes, 3), np.int64)
    c = ids.copy()
    for shift in range(7, -1, -1):  # the 8 bits of the id, 3 at a time, spread over R, G, B
        for ch in range(3):
            rgb[:, ch] |= ((c >> ch) & 1) << shift
        c >>= 3
    return rgb.astype(np.uint8)


def colour_hex(rgb) -> str:
    r, g, b = (int(v) for v in rgb)
    return f"#{r:02x}{g:02x}{b:02x}"


def hex_to_rgb(colour: str) -> tuple[int, int, int]:
    s = colour.lstrip("#")
    if len(s) != 6:
        raise ValueError(f"expected a colour #rrggbb, got {colour!r}")
    return int(s[0:2], 16), int(s[2:4], 16), int(s[4:6], 16)


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``mask (H, W)`` class ids -> ``(H, W, 3)`` uint8 colours; void is grey."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette[:256]
    lut[VOID] = VOID_RGB
    return lut[mask]


def _boundaries(mask: np.ndarray) -> np.ndarray:
    """``(H, W)`` bool: pixels whose right or lower neighbour has another label."""
    edge = np.zeros(mask.shape, bool)
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
    return edge


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Class colours blended over ``image`` with dark region boundaries; void pixels left as they are."""
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {image.shape[:2]} and mask {mask.shape} must have the same size")
    colours = colorize(mask, palette).astype(np.float32)
    out = image.astype(np.float32)
    labelled = (mask != VOID)[..., None]
    out = np.where(labelled, (1 - alpha) * out + alpha * colours, out)
    out[_boundaries(mask)] = (20, 20, 20)
    return np.round(out).astype(np.uint8)


def legend_html(class_names: list[str], palette: np.ndarray, mask: np.ndarray | None = None,
                title: str = "Legend") -> str:
    """HTML swatches ``name (share %)`` of the classes present in ``mask`` (largest first), or of all
    classes when ``mask`` is None."""
    if mask is not None:
        counts = np.bincount(mask.reshape(-1), minlength=256)
        total = max(int(counts[: len(class_names)].sum()), 1)
        order = [int(c) for c in np.argsort(-counts[: len(class_names)], kind="stable") if counts[c] > 0]
        items = [(c, f"{100.0 * counts[c] / total:.1f}%") for c in order]
    else:
        items = [(c, "") for c in range(len(class_names))]
    chips = []
    for c, share in items:
        name = html.escape(class_names[c])
        chips.append(
            f'<span class="cribo-chip" title="class id {c}"><span class="cribo-swatch" '
            f'style="background:{colour_hex(palette[c])}"></span>{name}'
            + (f' <span class="cribo-share">{share}</span>' if share else "") + "</span>")
    body = "".join(chips) or "<em>no class predicted</em>"
    return (f'<div class="cribo-legend"><div class="cribo-legend-title">{html.escape(title)}</div>'
            f"{body}</div>")


# A perceptually ordered dark-blue -> yellow ramp (viridis samples), interpolated to 256 steps.
_VIRIDIS = np.array([(68, 1, 84), (72, 40, 120), (62, 74, 137), (49, 104, 142), (38, 130, 142),
                     (31, 158, 137), (53, 183, 121), (109, 205, 89), (180, 222, 44), (253, 231, 37)], float)


def _ramp() -> np.ndarray:
    x = np.linspace(0, len(_VIRIDIS) - 1, 256)
    lo = np.floor(x).astype(int).clip(0, len(_VIRIDIS) - 2)
    t = (x - lo)[:, None]
    return np.round(_VIRIDIS[lo] * (1 - t) + _VIRIDIS[lo + 1] * t).astype(np.uint8)


def confidence_map(share: np.ndarray, grid: tuple[int, int], out_size: tuple[int, int],
                   image: np.ndarray | None = None) -> np.ndarray:
    """Per-patch vote share ``(h*w,)`` in [0, 1] as a colour map of ``out_size = (H, W)`` plus a scale bar.

    Each patch is one flat cell (nearest upsampling: the confidence is a per-patch quantity). When
    ``image`` is given it shows through faintly. Returns ``(H + bar, W, 3)`` uint8.
    """
    h, w = grid
    share = np.asarray(share, np.float32)
    if share.shape != (h * w,):
        raise ValueError(f"share has shape {share.shape}, expected ({h * w},)")
    H, W = out_size
    lut = _ramp()
    cells = lut[np.round(share.clip(0, 1) * 255).astype(np.uint8)].reshape(h, w, 3)
    rows = (np.arange(H) * h // H).clip(0, h - 1)
    cols = (np.arange(W) * w // W).clip(0, w - 1)
    heat = cells[rows][:, cols].astype(np.float32)
    if image is not None:
        heat = 0.8 * heat + 0.2 * image.astype(np.float32).mean(axis=2, keepdims=True)
    bar_h = max(18, H // 14)
    bar = np.full((bar_h, W, 3), 255, np.uint8)
    margin = min(60, W // 5)
    ramp_w = max(W - 2 * margin, 2)
    strip = lut[np.linspace(0, 255, ramp_w).astype(np.uint8)]
    bar[bar_h // 4: bar_h - 2, margin:margin + ramp_w] = strip[None]
    img = Image.fromarray(np.concatenate([np.round(heat).astype(np.uint8), bar]))
    d = ImageDraw.Draw(img)
    d.text((4, H + bar_h // 4), "0", fill=(0, 0, 0))
    d.text((W - margin + 4, H + bar_h // 4), "1", fill=(0, 0, 0))
    return np.asarray(img)


def cluster_palette(K: int) -> np.ndarray:
    """``(K, 3)`` uint8 well-separated, saturated colours (golden-ratio hue steps)."""
    hues = (np.arange(K) * 0.6180339887) % 1.0
    sat = np.where(np.arange(K) % 2 == 0, 0.85, 0.6)
    val = np.where(np.arange(K) % 3 == 2, 0.75, 0.95)
    i = np.floor(hues * 6).astype(int) % 6
    f = hues * 6 - np.floor(hues * 6)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    table = np.stack([np.stack(v, 1) for v in ((val, t, p), (q, val, p), (p, val, t), (p, q, val),
                                                 (t, p, val), (val, p, q))])  # (6, K, 3)
    return np.round(table[i, np.arange(K)] * 255).astype(np.uint8)


def _hatch(shape: tuple[int, int], period: int = 8) -> np.ndarray:
    y, x = np.mgrid[0:shape[0], 0:shape[1]]
    return ((x + y) % period) < 2


def draw_clusters(view: np.ndarray, assign: np.ndarray, grid: tuple[int, int], colours: np.ndarray,
                  dropped: np.ndarray, alpha: float = 0.5, scale: int = 2) -> np.ndarray:
    """One view ``(S, S, 3)`` with its patch clusters ``assign (h*w,)`` coloured, upscaled by ``scale``.

    Clusters with ``dropped[k]`` (present in this view only) are drawn grey with black hatching;
    cluster boundaries are dark lines.
    """
    h, w = grid
    S = view.shape[0] * scale
    img = np.asarray(Image.fromarray(view).resize((view.shape[1] * scale, S), Image.Resampling.BICUBIC))
    H, W = img.shape[:2]
    cells = assign.reshape(h, w)
    lab = cells[(np.arange(H) * h // H)][:, (np.arange(W) * w // W)]
    col = colours[lab].astype(np.float32)
    is_dropped = dropped[lab]
    col[is_dropped] = (150, 150, 150)
    out = (1 - alpha) * img.astype(np.float32) + alpha * col
    out[is_dropped & _hatch((H, W))] = (30, 30, 30)
    out[_boundaries(lab)] = (15, 15, 15)
    return np.round(out).astype(np.uint8)


def draw_boxes(image: np.ndarray, boxes: list[tuple[int, int, int, int]], colours: list[tuple[int, int, int]],
               labels: list[str]) -> np.ndarray:
    """Crop boxes ``(i, j, h, w)`` (top, left, height, width) outlined on ``image``, each labelled inside
    its box: the first box at its top-left corner, the others at their bottom-left corner (so that
    labels of boxes sharing a corner do not cover each other)."""
    img = Image.fromarray(image.copy())
    d = ImageDraw.Draw(img)
    width = max(2, min(image.shape[:2]) // 150)
    font = _font(min(image.shape[:2]) // 18)
    for n, ((i, j, h, w), c, text) in enumerate(zip(boxes, colours, labels)):
        d.rectangle([j, i, j + w - 1, i + h - 1], outline=tuple(c), width=width)
        _, _, tw, th = d.textbbox((0, 0), text, font=font)
        x, y = j + width, (i + width) if n == 0 else (i + h - width - th - 4)
        d.rectangle([x, y, x + tw + 6, y + th + 4], fill=tuple(c))
        d.text((x + 3, y + 1), text, fill=(255, 255, 255), font=font)
    return np.asarray(img)


def highlight_region(view: np.ndarray, member: np.ndarray, grid: tuple[int, int], colour,
                     scale: int = 1) -> np.ndarray:
    """``view`` with the patches ``member (h*w,) bool`` kept bright and outlined, the rest dimmed."""
    h, w = grid
    img = view if scale == 1 else np.asarray(
        Image.fromarray(view).resize((view.shape[1] * scale, view.shape[0] * scale), Image.Resampling.BICUBIC))
    H, W = img.shape[:2]
    cells = member.reshape(h, w)
    inside = cells[(np.arange(H) * h // H)][:, (np.arange(W) * w // W)]
    out = img.astype(np.float32)
    out[~inside] = 0.45 * out[~inside] + 0.55 * 235.0
    edge = _boundaries(inside.astype(np.uint8))
    grown = edge.copy()
    grown[1:] |= edge[:-1]
    grown[:, 1:] |= edge[:, :-1]
    out[grown] = colour
    return np.round(out).astype(np.uint8)


def side_by_side(left: np.ndarray, right: np.ndarray, gap: int = 8) -> np.ndarray:
    """Two images of the same height next to each other on white, ``gap`` pixels apart."""
    H = max(left.shape[0], right.shape[0])
    out = np.full((H, left.shape[1] + gap + right.shape[1], 3), 255, np.uint8)
    out[: left.shape[0], : left.shape[1]] = left
    out[: right.shape[0], left.shape[1] + gap:] = right
    return out


def match_sheet(pairs: list[tuple[np.ndarray, np.ndarray, str, bool]], per_row: int = 2) -> np.ndarray:
    """All object matches in one picture: ``per_row`` cells a row, each ``left | right`` above a caption
    band, green for a cycle-consistent pair and red otherwise. ``pairs``: (left, right, caption, ok)."""
    if not pairs:
        return np.full((60, 480, 3), 255, np.uint8)
    cells = []
    for left, right, caption, ok in pairs:
        top = side_by_side(left, right)
        band = Image.new("RGB", (top.shape[1], 26), (46, 125, 50) if ok else (183, 28, 28))
        ImageDraw.Draw(band).text((6, 5), caption, fill=(255, 255, 255), font=_font(14))
        cells.append(np.concatenate([top, np.asarray(band)]))
    h = max(c.shape[0] for c in cells)
    w = max(c.shape[1] for c in cells)
    gap = 12
    rows = -(-len(cells) // per_row)
    sheet = np.full((rows * (h + gap) - gap, per_row * (w + gap) - gap, 3), 255, np.uint8)
    for n, c in enumerate(cells):
        r, q = divmod(n, per_row)
        sheet[r * (h + gap): r * (h + gap) + c.shape[0], q * (w + gap): q * (w + gap) + c.shape[1]] = c
    return sheet


def label_mask_png(mask: np.ndarray, palette: np.ndarray, path) -> None:
    """Write ``mask (H, W)`` uint8 class ids as a palette PNG (mode P): pixel values are the class ids,
    the embedded palette shows them in the class colours (void grey). Lossless; written atomically."""
    from cribo.io import atomic_path

    lut = np.zeros((256, 3), np.uint8)
    lut[: len(palette)] = palette[:256]
    lut[VOID] = VOID_RGB
    im = Image.fromarray(np.ascontiguousarray(mask, dtype=np.uint8))  # mode L
    im.putpalette(lut.reshape(-1).tolist())  # L -> P, pixel values (the class ids) unchanged
    with atomic_path(path) as tmp:
        im.save(tmp, format="PNG")
