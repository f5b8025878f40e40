"""Constants shared by every package: the void label of segmentation masks and the ImageNet pixel
statistics every backbone here was trained with."""
from __future__ import annotations

__all__ = ["VOID", "IMAGENET_MEAN", "IMAGENET_STD"]

#: Mask value of unlabelled pixels (uint8 masks: class ids 0..254, 255 = void).
VOID = 255
#: Per-channel RGB mean and std of ImageNet, for pixels scaled to [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
