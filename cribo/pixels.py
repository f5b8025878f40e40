"""The one pixel normaliser: [0, 1] RGB <-> model input, shared by the training views, feature
extraction, the Hummingbird protocol, the hand-made descriptors and the app."""
from __future__ import annotations

import torch

from cribo.constants import IMAGENET_MEAN, IMAGENET_STD

__all__ = ["normalise", "denormalise"]


def normalise(x: torch.Tensor, std: tuple[float, float, float] = IMAGENET_STD) -> torch.Tensor:
    """``x (..., 3, H, W)`` float RGB in [0, 1] -> ``(x - mean) / std`` (ImageNet mean; ``std`` is a
    parameter for the Hummingbird protocol's variant)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x - mean) / torch.tensor(std, dtype=x.dtype, device=x.device).view(3, 1, 1)


def denormalise(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalise`: ``(..., 3, H, W)`` -> RGB in [0, 1] (clamped)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=x.dtype, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=x.dtype, device=x.device).view(3, 1, 1)
    return (x * std + mean).clamp(0.0, 1.0)
