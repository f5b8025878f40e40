"""Hand-made patch features behind the backbone contract: the floors any learned feature must beat.

Both classes take what a :class:`cribo.backbones.Backbone` takes (ImageNet-normalised ``x (B, 3, H, W)``,
sides multiples of ``patch_size``) and return what it returns (``x_norm_patchtokens (B, h*w, D)``,
``x_norm_clstoken (B, D)`` = the mean token, ``grid``), so they run through the very same protocol
(:func:`index.protocol.run_protocol`, :class:`index.probe.RetrievalProbe`) as a trained network.

- :class:`PixelPatches`: the patch's ImageNet-normalised pixels, ``3 p^2`` numbers (768 at p = 16).
- :class:`TextureDescriptor`: per patch, a colour histogram (8 bins per channel, 24), a histogram of
  gradient orientations weighted by magnitude (12 bins) plus the mean gradient magnitude and the
  grey-level standard deviation (2), and rotation-invariant uniform local-binary-pattern histograms
  (Ojala et al. 2002, "riu2": 10 bins) at radii 1, 2 and 4 pixels (30): 68 numbers. Each of the
  three groups is L2-normalised, so colour, gradients and micro-texture weigh the same.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cribo.pixels import denormalise, normalise

__all__ = ["PixelPatches", "TextureDescriptor", "lbp_riu2_codes"]

COLOUR_BINS = 8
ORIENTATION_BINS = 12
LBP_RADII = (1, 2, 4)
LBP_BINS = 10  # riu2 with 8 neighbours: 0..8 ones in a uniform pattern, 9 = non-uniform
VERSION = 1  # part of the identity (the feature-cache key): bump when a descriptor changes


class _HandMade(torch.nn.Module):
    """Shared contract: ``arch``, ``patch_size``, ``embed_dim``, ``identity``, ``source``."""

    arch = "handmade"
    embed_dim = 0

    def __init__(self, patch_size: int = 16):
        super().__init__()
        self.patch_size = int(patch_size)
        self.identity = f"{self.arch}:v{VERSION}:p{self.patch_size}"
        self.source = self.arch

    def patch_vectors(self, rgb: torch.Tensor) -> torch.Tensor:
        """``rgb (B, 3, H, W)`` in [0, 1] -> ``(B, D, h, w)``."""
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor) -> dict:
        (H, W), p = x.shape[-2:], self.patch_size
        if x.ndim != 4 or x.shape[1] != 3 or H % p or W % p:
            raise ValueError(f"expected (B, 3, H, W) with H, W multiples of {p}, got {tuple(x.shape)}")
        rgb = denormalise(x.float())
        v = self.patch_vectors(rgb)  # (B, D, h, w)
        tokens = v.flatten(2).transpose(1, 2)  # (B, h*w, D), row-major
        return {"x_norm_clstoken": tokens.mean(1), "x_norm_patchtokens": tokens, "grid": (H // p, W // p)}

    def forward(self, x: torch.Tensor) -> dict:
        return self.forward_features(x)


class PixelPatches(_HandMade):
    """Raw pixels: the ImageNet-normalised ``p x p x 3`` values of each patch."""

    arch = "pixels"

    def __init__(self, patch_size: int = 16):
        super().__init__(patch_size)
        self.embed_dim = 3 * self.patch_size**2

    def patch_vectors(self, rgb: torch.Tensor) -> torch.Tensor:
        p = self.patch_size
        B, _, H, W = rgb.shape
        unfolded = F.unfold(normalise(rgb), kernel_size=p, stride=p)  # (B, 3 p^2, h*w)
        return unfolded.view(B, 3 * p * p, H // p, W // p)


def lbp_riu2_codes(grey: torch.Tensor, radius: int) -> torch.Tensor:
    """Rotation-invariant uniform LBP code (0..9) of every pixel of ``grey (B, 1, H, W)``: ``(B, H, W)``.

    The 8 neighbours sit at ``radius`` pixels along the axes and ``round(radius / sqrt 2)`` along both
    axes on the diagonals (replicate padding at the border); a neighbour counts as 1 when it is >= the
    centre. A pattern with at most 2 transitions around the circle is "uniform" and coded by its number
    of ones (0..8); every other pattern is 9.
    """
    d = max(1, round(radius / math.sqrt(2)))
    offsets = [(0, radius), (d, d), (radius, 0), (d, -d), (0, -radius), (-d, -d), (-radius, 0), (-d, d)]
    pad = F.pad(grey, (radius,) * 4, mode="replicate")
    H, W = grey.shape[-2:]
    bits = torch.stack([pad[:, 0, radius + dy:radius + dy + H, radius + dx:radius + dx + W] >= grey[:, 0]
                        for dy, dx in offsets], dim=1).to(torch.int64)  # (B, 8, H, W)
    ones = bits.sum(1)
    transitions = (bits != bits.roll(1, dims=1)).sum(1)
    return torch.where(transitions <= 2, ones, torch.full_like(ones, LBP_BINS - 1))


class TextureDescriptor(_HandMade):
    """Colour histogram + gradient-orientation histogram + multi-radius LBP histograms (68 numbers)."""

    arch = "texture-descriptor"

    def __init__(self, patch_size: int = 16):
        super().__init__(patch_size)
        self.embed_dim = 3 * COLOUR_BINS + ORIENTATION_BINS + 2 + LBP_BINS * len(LBP_RADII)

    def _pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(x, self.patch_size)

    def patch_vectors(self, rgb: torch.Tensor) -> torch.Tensor:
        B = rgb.shape[0]
        # colour: (B, 3, H, W) -> bins 0..7 -> one-hot (B, 24, H, W) -> patch means
        bins = (rgb * COLOUR_BINS).long().clamp_(max=COLOUR_BINS - 1)
        colour = F.one_hot(bins, COLOUR_BINS).permute(0, 1, 4, 2, 3).reshape(B, 3 * COLOUR_BINS, *rgb.shape[-2:])
        colour = self._pool(colour.float())
        # gradients of the grey image (Sobel)
        grey = (0.299 * rgb[:, 0] + 0.587 * rgb[:, 1] + 0.114 * rgb[:, 2])[:, None]  # (B, 1, H, W)
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=rgb.device) / 8
        gx = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), sobel.view(1, 1, 3, 3))
        gy = F.conv2d(F.pad(grey, (1, 1, 1, 1), mode="replicate"), sobel.t().reshape(1, 1, 3, 3))
        magnitude = torch.hypot(gx, gy)[:, 0]  # (B, H, W)
        angle = torch.atan2(gy, gx)[:, 0] % (2 * math.pi)
        obin = (angle / (2 * math.pi) * ORIENTATION_BINS).long().clamp_(max=ORIENTATION_BINS - 1)
        orient = F.one_hot(obin, ORIENTATION_BINS).permute(0, 3, 1, 2).float() * magnitude[:, None]
        orient = self._pool(orient)
        orient = orient / (orient.sum(1, keepdim=True) + 1e-6)
        grey_std = (self._pool(grey**2) - self._pool(grey) ** 2).clamp_(min=0).sqrt()
        gradients = torch.cat([orient, self._pool(magnitude[:, None]), grey_std], dim=1)  # (B, 14, h, w)
        # micro-texture
        lbp = torch.cat([self._pool(F.one_hot(lbp_riu2_codes(grey, r), LBP_BINS).permute(0, 3, 1, 2).float())
                         for r in LBP_RADII], dim=1)  # (B, 30, h, w)
        return torch.cat([F.normalize(g, dim=1) for g in (colour, gradients, lbp)], dim=1)
