"""Procedural scenes with pixel masks: pretraining data, the app's built-in support set, held-out evaluation.

A scene is 1-3 "stuff" regions (sky, water, grass, ...) split by curved boundaries, then 1-6 "things"
(ball, star, heart, ...) painted over them in order, so later objects occlude earlier ones. Every class
has its own texture (and every thing its own shape family), while colour families deliberately
overlap between classes: mean colour, which even a randomly initialised ViT captures, narrows a patch
down to a third of the classes at best; texture and shape, which a backbone has to learn, identify it.

Everything is a pure function of the seed: ``generate_scene(seed)`` draws from
``np.random.default_rng(seed)``, and image ``i`` of a split with seed ``s`` uses ``image_seed(s, i)``, so
it is the same whatever the number of images. Textures are vectorised numpy/OpenCV over the region's
pixels, in "reference pixels" (pixels of a 256x256 image), so a scene looks the same at any ``size``.

Masks: class id (uint8, line index in classes.txt) where a layer's coverage alpha >= 0.5; 255 (void) on
the thin anti-aliased fringe where 0 < alpha < 0.5 (mostly what lies underneath, partly the new layer).

Layout (the generic one)::

    ROOT/classes.txt                       one class name per line, line index = class id
    ROOT/images/<split>/<split>_<seed>_<i:06d>.png    RGB
    ROOT/masks/<split>/<split>_<seed>_<i:06d>.png     mode L, class ids, void 255

CLI: ``python -m cribo.synthetic --out DIR --num-images N --seed S [--split NAME] [--size 256] [--workers W]``.
Pretrain on ``DIR/images/<split>`` (not on ``DIR``, which also holds the masks).
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import re
import sys
from pathlib import Path
from typing import Callable, NamedTuple

import cv2
import numpy as np
from tqdm import tqdm

from cribo.constants import VOID
from cribo.errors import CliParser, run_cli
from cribo.io import atomic_path, write_text

REF_SIZE = 256  # textures and sizes are specified in pixels of a REF_SIZE x REF_SIZE image

# Colour families (RGB). Each class draws from four of them; every family is shared by 6-10 of the 22.
FAMILIES = {
    "red": (196, 52, 44), "orange": (222, 128, 40), "yellow": (218, 196, 64), "green": (72, 148, 58),
    "teal": (40, 146, 146), "blue": (52, 92, 188), "purple": (118, 70, 158), "pink": (222, 130, 168),
    "brown": (122, 84, 50), "grey": (132, 132, 132), "beige": (204, 184, 148),
}


# ----------------------------------------------------------------------------------------------- noise
def _noise(rng: np.random.Generator, u: np.ndarray, v: np.ndarray, cell, octaves: int = 1) -> np.ndarray:
    """Smooth value noise at coordinates (u, v) (h, w), standardised to mean 0, std 1.

    A random grid with spacing ``cell`` (scalar or (cell_u, cell_v)) is sampled bicubically by cv2.remap,
    so the noise follows rotated coordinates; each octave halves the spacing and the amplitude.
    """
    cu, cv_ = (cell, cell) if np.isscalar(cell) else cell
    out, amp = np.zeros(u.shape, np.float32), 1.0
    for _ in range(octaves):
        x = ((u - u.min()) / cu + 1).astype(np.float32)
        y = ((v - v.min()) / cv_ + 1).astype(np.float32)
        grid = rng.random((int(y.max()) + 4, int(x.max()) + 4), dtype=np.float32)
        out += amp * cv2.remap(grid, x, y, cv2.INTER_CUBIC)
        amp, cu, cv_ = amp / 2, cu / 2, cv_ / 2
    return (out - out.mean()) / (out.std() + 1e-6)


def _cells(rng: np.random.Generator, shape: tuple[int, int], cell_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Cellular (Voronoi) noise on the pixel grid: distance (px) to the nearest random seed point and a
    random tone in [0, 1) per cell, both (h, w). One seed point per ``cell_px**2`` pixels."""
    h, w = shape
    n = max(int(h * w / cell_px**2), 1)
    seeds = np.ones(shape, np.uint8)
    seeds[rng.integers(0, h, n), rng.integers(0, w, n)] = 0
    dist, labels = cv2.distanceTransformWithLabels(seeds, cv2.DIST_L2, 5, labelType=cv2.DIST_LABEL_PIXEL)
    return dist, rng.random(n + 1, dtype=np.float32)[labels]


def _sq(x: np.ndarray, duty: float = 0.5) -> np.ndarray:
    """Square wave of period 1: 1 on the first ``duty`` of each period, else 0."""
    return (np.mod(x, 1.0) < duty).astype(np.float32)


# -------------------------------------------------------------------------------------------- textures
# Each texture maps coordinates (u, v) (h, w) in reference pixels to t (h, w) in [0, 1]; the colour is
# c2 + (c1 - c2) * t. ``px`` = image pixels per reference pixel (for pixel-grid textures).
def _clouds(rng, u, v, px):
    return 0.5 + 0.22 * _noise(rng, u, v, (70, 40), octaves=4)


def _waves(rng, u, v, px):
    lam = rng.uniform(8, 12)
    phase = v / lam + 0.6 * _noise(rng, u, v, (40, 20), 2) + 0.25 * np.sin(u / rng.uniform(6, 10))
    return (0.5 + 0.5 * np.sin(2 * np.pi * phase)) ** 2


def _grass(rng, u, v, px):
    return 0.5 + 0.25 * _noise(rng, u, v, (1.6, 14)) + 0.1 * _noise(rng, u, v, 30)


def _sand(rng, u, v, px):
    lam = rng.uniform(15, 22)
    ripple = np.sin(2 * np.pi * (v + 4 * _noise(rng, u, v, 40)) / lam)
    return 0.5 + 0.18 * ripple + 0.16 * _noise(rng, u, v, 1.1)


def _bricks(rng, u, v, px):
    bh = rng.uniform(10, 15)
    bw, mortar = bh * rng.uniform(2.0, 2.6), rng.uniform(1.6, 2.4)
    row = np.floor(v / bh)
    uu = u + (row % 2) * bw / 2
    tone = rng.uniform(0.65, 1.0, (64, 64)).astype(np.float32)
    t = tone[row.astype(np.int64) % 64, np.floor(uu / bw).astype(np.int64) % 64]
    return np.where((np.mod(v, bh) < mortar) | (np.mod(uu, bw) < mortar), 0.0, t)


def _wood(rng, u, v, px):
    lam = rng.uniform(7, 11)
    return 0.25 + 0.75 * np.mod((v + 5 * _noise(rng, u, v, (90, 14), 2)) / lam, 1.0) ** 1.5


def _carpet(rng, u, v, px):  # tartan: two square waves plus a fine diagonal twill
    p = rng.uniform(14, 22)
    return 0.3 * _sq(u / p, 0.35) + 0.3 * _sq(v / p, 0.35) + 0.25 * _sq((u + v) / 3.0) + 0.15


def _gravel(rng, u, v, px):  # pebbles: bright centres, dark gaps, a tone per pebble
    cell = rng.uniform(7, 10) * px
    dist, tone = _cells(rng, u.shape, cell)
    return (0.35 + 0.65 * tone) * np.clip(1 - (dist / (0.75 * cell)) ** 2, 0, 1)


def _rings(rng, u, v, px):
    return 0.5 + 0.5 * np.cos(2 * np.pi * np.hypot(u, v) / rng.uniform(7, 10))


def _speckles(rng, u, v, px):
    return np.where(_noise(rng, u, v, 2.5) > 1.0, 0.1, 0.9)


def _rays(rng, u, v, px):
    return _sq(int(rng.integers(7, 12)) / (2 * np.pi) * np.arctan2(v, u))


def _stripes(rng, u, v, px):
    return _sq(v / rng.uniform(8, 12))


def _checker(rng, u, v, px):
    s = rng.uniform(7, 10)
    return np.mod(np.floor(u / s) + np.floor(v / s), 2)


def _marble(rng, u, v, px):
    return np.abs(np.sin(2 * np.pi * (u + v) / rng.uniform(22, 32) + 1.6 * _noise(rng, u, v, 16, 3))) ** 0.5


def _dots(rng, u, v, px):
    s = rng.uniform(9, 12)
    return (np.hypot(np.mod(u, s) - s / 2, np.mod(v, s) - s / 2) > 0.3 * s).astype(np.float32)


def _craters(rng, u, v, px):
    r = rng.uniform(5, 8) * px
    dist, _ = _cells(rng, u.shape, 2.6 * r)
    t = np.where(dist < r, 0.25 + 0.5 * (dist / r) ** 2, 0.75)
    return np.where((dist >= r) & (dist < 1.3 * r), 1.0, t)


def _honeycomb(rng, u, v, px):  # three plane waves at 60 degrees: a hexagonal lattice of cells
    k = 2 * np.pi / rng.uniform(7, 9)
    val = sum(np.cos(k * _rotate(u, v, a)[0]) for a in (0, np.pi / 3, 2 * np.pi / 3))
    return (val > -0.6).astype(np.float32)


def _zigzag(rng, u, v, px):
    p = rng.uniform(10, 14)
    return _sq((v + 0.6 * p * 2 * np.abs(np.mod(u / p, 1) - 0.5)) / rng.uniform(7, 9))


def _chevrons(rng, u, v, px):  # along the arrow's axis (+u)
    return _sq((u + np.abs(v)) / rng.uniform(10, 13))


def _leopard(rng, u, v, px):
    n = _noise(rng, u, v, 7)
    return np.where(n > 1.2, 0.55, np.where(n > 0.6, 0.0, 1.0))


def _veins(rng, u, v, px):  # midrib along +u, thin side veins
    veins = _sq((u - 0.9 * np.abs(v)) / rng.uniform(7, 9), 0.2)
    return np.where(np.abs(v) < 1.3, 0.0, 0.9 - 0.8 * veins)


def _crosshatch(rng, u, v, px):
    lam = rng.uniform(6, 8)
    return 1 - np.maximum(_sq((u + v) / lam, 0.25), _sq((u - v) / lam, 0.25))


# ---------------------------------------------------------------------------------------------- shapes
# Each shape returns contours (n, 2) (x, y) around the origin with radius about 1; the object's u axis
# is +x. cv2.fillPoly fills nested contours as holes (ring, nut).
def _polar(r: np.ndarray) -> np.ndarray:
    th = np.linspace(0, 2 * np.pi, len(r), endpoint=False)
    return np.stack([r * np.cos(th), r * np.sin(th)], 1)


def _circle(rng):
    return [_polar(np.ones(64))]


def _egg(rng):
    th = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    return [np.stack([np.cos(th), 0.75 * np.sin(th) * (1 - 0.18 * np.cos(th))], 1)]


def _star(rng):
    n = int(rng.integers(5, 8))
    return [_polar(np.tile([1.0, rng.uniform(0.4, 0.55)], n))]


def _triangle(rng):
    return [_polar(np.ones(3))]


def _rounded_box(rng):  # superellipse |x|^p + |y|^p = 1
    th = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    c, s, e = np.cos(th), np.sin(th), 2 / rng.uniform(4, 8)
    return [0.85 * np.stack([np.sign(c) * np.abs(c) ** e, np.sign(s) * np.abs(s) ** e], 1)]


def _ring(rng):
    return [_polar(np.ones(64)), _polar(np.full(64, rng.uniform(0.5, 0.65)))[::-1]]


def _cross(rng):
    a = rng.uniform(0.28, 0.4)
    q = np.array([[1, -a], [1, a], [a, a], [a, 1], [-a, 1], [-a, a], [-1, a], [-1, -a], [-a, -a], [-a, -1],
                  [a, -1], [a, -a]])
    return [q.astype(np.float64)]


def _crescent(rng):  # unit circle minus the circle of radius r2 centred at (d, 0)
    d, r2 = rng.uniform(0.35, 0.55), rng.uniform(0.8, 0.95)
    x0 = (1 - r2**2 + d**2) / (2 * d)
    th0, ph1 = np.arccos(x0), np.arctan2(np.sqrt(1 - x0**2), x0 - d)
    th, ph = np.linspace(th0, 2 * np.pi - th0, 48), np.linspace(2 * np.pi - ph1, ph1, 48)
    outer = np.stack([np.cos(th), np.sin(th)], 1)
    return [np.concatenate([outer, np.stack([d + r2 * np.cos(ph), r2 * np.sin(ph)], 1)])]


def _nut(rng):
    return [_polar(np.ones(6)), _polar(np.full(48, rng.uniform(0.3, 0.42)))[::-1]]


def _heart(rng):
    t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
    x, y = 16 * np.sin(t) ** 3, 13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)
    return [np.stack([x, 2.5 - y], 1) / 16]


def _arrow(rng):
    w, head = rng.uniform(0.18, 0.3), rng.uniform(0.05, 0.35)
    return [np.array([[-1, -w], [head, -w], [head, -0.6], [1, 0], [head, 0.6], [head, w], [-1, w]], float)]


def _blob(rng):
    th = np.linspace(0, 2 * np.pi, 96, endpoint=False)
    r = 1 + sum(rng.uniform(0, 0.16) * np.cos(k * th + rng.uniform(0, 2 * np.pi)) for k in range(2, 6))
    return [_polar(r / r.max())]


def _leaf(rng):
    x = np.linspace(1, -1, 32)
    y = rng.uniform(0.32, 0.45) * (1 - x**2) * (1 + 0.3 * x)
    return [np.concatenate([np.stack([x, y], 1), np.stack([x[::-1], -y[::-1]], 1)[1:-1]])]


def _kite(rng):
    return [np.array([[1, 0], [0, 0.62], [-1, 0], [0, -0.62]], float)]


# --------------------------------------------------------------------------------------------- classes
Texture = Callable[..., np.ndarray]


class Stuff(NamedTuple):
    name: str
    texture: Texture
    families: tuple[str, ...]
    angle: float  # texture orientation jitter (radians, +-)


class Thing(NamedTuple):
    name: str
    shape: Callable[[np.random.Generator], list[np.ndarray]]
    texture: Texture
    families: tuple[str, ...]
    aspect: tuple[float, float]  # x stretched by a, y by 1/a


STUFF = [
    Stuff("sky", _clouds, ("blue", "grey", "orange", "pink"), 0.1),
    Stuff("water", _waves, ("blue", "teal", "green", "grey"), 0.2),
    Stuff("grass", _grass, ("green", "yellow", "brown", "teal"), 0.25),
    Stuff("sand", _sand, ("beige", "yellow", "orange", "grey"), 0.3),
    Stuff("bricks", _bricks, ("red", "brown", "grey", "orange"), 0.15),
    Stuff("wood", _wood, ("brown", "orange", "beige", "red"), np.pi),
    Stuff("carpet", _carpet, ("red", "purple", "blue", "green"), np.pi),
    Stuff("gravel", _gravel, ("grey", "brown", "beige", "blue"), 0.0),
]
THINGS = [
    Thing("ball", _circle, _rings, ("red", "yellow", "blue", "orange"), (1.0, 1.0)),
    Thing("egg", _egg, _speckles, ("beige", "pink", "teal", "yellow"), (1.05, 1.25)),
    Thing("star", _star, _rays, ("yellow", "orange", "purple", "red"), (1.0, 1.15)),
    Thing("sign", _triangle, _stripes, ("red", "yellow", "blue", "green"), (0.85, 1.2)),
    Thing("box", _rounded_box, _checker, ("brown", "beige", "green", "purple"), (0.7, 1.5)),
    Thing("ring", _ring, _marble, ("yellow", "grey", "blue", "pink"), (1.0, 1.15)),
    Thing("cross", _cross, _dots, ("red", "green", "teal", "grey"), (0.85, 1.2)),
    Thing("moon", _crescent, _craters, ("grey", "yellow", "beige", "blue"), (1.0, 1.0)),
    Thing("nut", _nut, _honeycomb, ("grey", "brown", "orange", "teal"), (1.0, 1.0)),
    Thing("heart", _heart, _zigzag, ("red", "pink", "purple", "orange"), (0.9, 1.1)),
    Thing("arrow", _arrow, _chevrons, ("green", "blue", "purple", "yellow"), (1.0, 1.2)),
    Thing("blob", _blob, _leopard, ("purple", "green", "teal", "pink"), (0.85, 1.2)),
    Thing("leaf", _leaf, _veins, ("green", "yellow", "brown", "orange"), (1.0, 1.1)),
    Thing("kite", _kite, _crosshatch, ("pink", "blue", "red", "teal"), (0.8, 1.0)),
]
CLASS_NAMES: list[str] = [s.name for s in STUFF] + [t.name for t in THINGS]


# ----------------------------------------------------------------------------------------------- scene
@dataclasses.dataclass(frozen=True)
class Layer:
    """One painted region: ``rgb`` (h, w, 3) float32 in [0, 255] with coverage ``alpha`` (h, w) in [0, 1],
    its top-left corner at (y0, x0) in the image."""
    class_id: int
    y0: int
    x0: int
    rgb: np.ndarray
    alpha: np.ndarray


@dataclasses.dataclass(frozen=True)
class Scene:
    """Layers in painting order (stuff first, then things), then a lighting gain (H, W) and noise (H, W, 3)."""
    size: int
    layers: list[Layer]
    light: np.ndarray
    noise: np.ndarray


def _colours(rng: np.random.Generator, families: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Two colours (3,) for t = 1 and t = 0: a jittered family colour, and a darker or lighter shade of it
    or a colour of another of the class's families."""
    c1 = np.asarray(FAMILIES[families[rng.integers(len(families))]], np.float32) * rng.uniform(0.8, 1.12)
    c1 = np.clip(c1 + rng.normal(0, 14, 3), 0, 255)
    mode = rng.random()
    if mode < 0.45:
        c2 = c1 * rng.uniform(0.3, 0.6)
    elif mode < 0.75:
        c2 = c1 + (255 - c1) * rng.uniform(0.35, 0.65)
    else:
        c2 = np.clip(np.asarray(FAMILIES[families[rng.integers(len(families))]]) + rng.normal(0, 14, 3), 0, 255)
    return c1.astype(np.float32), c2.astype(np.float32)


def _paint(rng, texture: Texture, families, u, v, px) -> np.ndarray:
    """Texture at (u, v) coloured with the class's colours: (h, w, 3) float32."""
    c1, c2 = _colours(rng, families)
    t = np.clip(texture(rng, u, v, px), 0, 1).astype(np.float32)
    return cv2.transform(t, np.stack([c1 - c2, c2], 1))  # (h, w, 3) = t * (c1 - c2) + c2


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (x, y) expressed in axes rotated by ``angle`` (float32 in, float32 out)."""
    c, s = float(np.cos(angle)), float(np.sin(angle))
    return x * c + y * s, y * c - x * s


def _stuff_layers(rng: np.random.Generator, size: int) -> list[Layer]:
    """1-3 stuff regions: the first covers the image, each next one the side of a wavy boundary curve
    (the first a tilted horizon y = curve(x), the next either way); alpha is the anti-aliased signed
    distance to the curve."""
    px = size / REF_SIZE
    t = np.arange(size, dtype=np.float32)
    n = int(rng.choice([1, 2, 3], p=[0.2, 0.45, 0.35]))
    layers = []
    for k, cls in enumerate(rng.choice(len(STUFF), n, replace=False)):
        spec, box = STUFF[cls], (slice(0, size), slice(0, size))
        alpha = np.ones((size, size), np.float32)
        if k > 0:
            tilt = rng.uniform(-0.3, 0.3) if k == 1 else rng.uniform(-0.6, 0.6)
            w1, w2 = 2 * np.pi / (rng.uniform(0.5, 1.5) * size), 2 * np.pi / (rng.uniform(0.1, 0.3) * size)
            a1, a2, p1, p2 = rng.uniform(0, 0.08) * size, rng.uniform(0, 0.025) * size, *rng.uniform(0, 7, 2).tolist()
            curve = (rng.uniform(0.2, 0.8) * size + tilt * (t - size / 2) + a1 * np.sin(w1 * t + p1)
                     + a2 * np.sin(w2 * t + p2))
            norm = np.sqrt(1 + (tilt + a1 * w1 * np.cos(w1 * t + p1) + a2 * w2 * np.cos(w2 * t + p2)) ** 2)
            dist = (t[:, None] - curve) / norm  # (y, x): signed distance to the curve y = curve(x)
            if k > 1 and rng.random() < 0.5:
                dist = dist.T  # a boundary x = curve(y)
            alpha = np.clip(0.5 + float(rng.choice([-1, 1])) * dist, 0, 1)
            rows, cols = np.flatnonzero(alpha.any(1)), np.flatnonzero(alpha.any(0))
            if len(rows) == 0:
                continue
            box = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
        x, y = (t[box[1]] - size / 2) / px, (t[box[0], None] - size / 2) / px
        u, v = _rotate(x, y, rng.uniform(-spec.angle, spec.angle))
        rgb = _paint(rng, spec.texture, spec.families, u + rng.uniform(0, 500), v + rng.uniform(0, 500), px)
        layers.append(Layer(int(cls), box[0].start, box[1].start, rgb, alpha[box]))
    return layers


def _thing_layer(rng: np.random.Generator, size: int) -> Layer:
    """One object: a shape of a random thing class, scaled (radius 24-76 reference px), stretched,
    rotated, placed with its centre inside the image, filled anti-aliased, textured in its own frame."""
    px = size / REF_SIZE
    cls = int(rng.integers(len(THINGS)))
    spec = THINGS[cls]
    r, asp, th = rng.uniform(24, 76) * px, rng.uniform(*spec.aspect), rng.uniform(0, 2 * np.pi)
    cx, cy = (rng.uniform(0.06, 0.94, 2) * size).tolist()
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    contours = [(c * [r * asp, r / asp]) @ rot.T + [cx, cy] for c in spec.shape(rng)]
    pts = np.concatenate(contours)
    x0, y0 = (max(int(np.floor(pts[:, i].min())) - 1, 0) for i in (0, 1))
    x1, y1 = (min(int(np.ceil(pts[:, i].max())) + 2, size) for i in (0, 1))
    canvas = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(canvas, [np.round((c - [x0, y0]) * 16).astype(np.int32) for c in contours], 255,
                 lineType=cv2.LINE_AA, shift=4)
    x, y = np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32)[:, None]
    u, v = _rotate((x - cx) / px, (y - cy) / px, th)
    rgb = _paint(rng, spec.texture, spec.families, u, v, px)
    return Layer(len(STUFF) + cls, y0, x0, rgb, canvas.astype(np.float32) / 255)


def sample_scene(seed: int, size: int = REF_SIZE) -> Scene:
    """Draw a scene from ``np.random.default_rng(seed)``: stuff layers, 1-6 thing layers, soft lighting
    (exposure times a linear gradient, gain 0.55-1.5) and uniform noise (std 1.4-4)."""
    if size < 32:
        raise ValueError(f"size={size}: scenes need at least 32x32 pixels")
    rng = np.random.default_rng(seed)
    layers = _stuff_layers(rng, size)
    layers += [_thing_layer(rng, size) for _ in range(int(rng.integers(1, 7)))]
    x = np.arange(size, dtype=np.float32) / size - 0.5
    light = rng.uniform(0.85, 1.1) * (1 + rng.uniform(-0.35, 0.35) * x + rng.uniform(-0.35, 0.35) * x[:, None])
    noise = (rng.random((size, size, 3), dtype=np.float32) - 0.5) * rng.uniform(5, 14)  # uniform, std 1.4-4
    return Scene(size, layers, light.astype(np.float32), noise)


def render(scene: Scene, post: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Paint the layers in order: image (H, W, 3) float32 (in [0, 255] if ``post``) and mask (H, W) uint8.

    Where a layer's alpha is 0 nothing changes (bit-exactly); alpha >= 0.5 sets its class, 0 < alpha < 0.5
    sets void. ``post`` applies the lighting gain and the noise, then clips to [0, 255].
    """
    image = np.zeros((scene.size, scene.size, 3), np.float32)
    mask = np.full((scene.size, scene.size), VOID, np.uint8)
    for layer in scene.layers:
        h, w = layer.alpha.shape
        sl = (slice(layer.y0, layer.y0 + h), slice(layer.x0, layer.x0 + w))
        if layer.alpha.min() == 1:  # opaque: a plain copy
            image[sl], mask[sl] = layer.rgb, layer.class_id
            continue
        image[sl] += (layer.rgb - image[sl]) * layer.alpha[..., None]
        mask[sl][layer.alpha >= 0.5] = layer.class_id
        mask[sl][(layer.alpha > 0) & (layer.alpha < 0.5)] = VOID
    if post:
        image = np.clip(image * scene.light[..., None] + scene.noise, 0, 255)
    return image, mask


def generate_scene(seed: int, size: int = REF_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """The scene of ``seed``: image (size, size, 3) uint8 RGB and mask (size, size) uint8 (class ids, 255)."""
    image, mask = render(sample_scene(seed, size))
    return np.round(image).astype(np.uint8), mask


def image_seed(seed: int, index: int) -> int:
    """Seed of image ``index`` of a split generated with ``seed`` (independent of the number of images)."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, np.uint64)[0])


# -------------------------------------------------------------------------------------------- writing
def _write_png(path: Path, array: np.ndarray) -> None:
    ok, buf = cv2.imencode(".png", array[..., ::-1] if array.ndim == 3 else array)
    if not ok:
        raise OSError(f"could not encode {path} as PNG")
    with atomic_path(path) as tmp:
        tmp.write_bytes(buf.tobytes())


def _write_one(job: tuple[str, str, int, int, int]) -> None:
    root, split, seed, index, size = job
    image, mask = generate_scene(image_seed(seed, index), size)
    name = f"{split}_{seed}_{index:06d}.png"
    _write_png(Path(root) / "images" / split / name, image)
    _write_png(Path(root) / "masks" / split / name, mask)


def write_split(out, split: str, num_images: int, seed: int, size: int = REF_SIZE, workers: int = 1) -> Path:
    """Write ``num_images`` scenes as ``out/{images,masks}/<split>/<split>_<seed>_<i:06d>.png`` and
    ``out/classes.txt``; return ``out``. Other splits in ``out`` are kept; re-running a split with the same
    seed rewrites the same files (and adds more if ``num_images`` grew)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", split):
        raise ValueError(f"--split {split!r}: use letters, digits, '_' and '-' (e.g. train, val)")
    if num_images < 1 or seed < 0 or workers < 1 or size < 32:
        raise ValueError(f"need --num-images >= 1, --seed >= 0, --workers >= 1, --size >= 32 "
                         f"(got {num_images}, {seed}, {workers}, {size})")
    root = Path(out)
    classes, expected = root / "classes.txt", "\n".join(CLASS_NAMES) + "\n"
    if classes.exists() and classes.read_text() != expected:
        raise ValueError(f"{classes} lists other classes than this generator ({len(CLASS_NAMES)} classes): "
                         f"it was written by another version; write to a new --out folder")
    image_dir = root / "images" / split
    others = sorted(p.name for p in image_dir.glob("*.png") if not p.name.startswith(f"{split}_{seed}_"))
    if others:
        raise ValueError(f"{image_dir} already holds images of another seed ({others[0]}); choose another "
                         f"--split name or delete {image_dir} and {root / 'masks' / split}")
    if not classes.exists():
        write_text(classes, expected)
    jobs = [(str(root), split, seed, i, size) for i in range(num_images)]
    bar = tqdm(total=num_images, desc=f"synthetic {split} seed {seed}", unit="img")
    if workers == 1:
        for job in jobs:
            _write_one(job)
            bar.update()
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_write_one, jobs, chunksize=8):
                bar.update()
    bar.close()
    return root


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success; a user error prints one line ``error: ...`` (exit 2 arguments, 1 data)."""
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    p = CliParser(prog="python -m cribo.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="dataset root (created; other splits in it are kept)")
    p.add_argument("--num-images", type=int, required=True)
    p.add_argument("--seed", type=int, required=True, help="split seed: image i uses image_seed(seed, i)")
    p.add_argument("--split", default="train")
    p.add_argument("--size", type=int, default=REF_SIZE, help="image side in pixels")
    p.add_argument("--workers", type=int, default=1, help="processes")
    a = p.parse_args(argv)
    root = write_split(a.out, a.split, a.num_images, a.seed, size=a.size, workers=a.workers)  # ValueError: exit 2
    print(f"wrote {a.num_images} scenes to {root / 'images' / a.split} and {root / 'masks' / a.split}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
