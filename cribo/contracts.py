"""What retrieval (``index/``) and the app need from a model and from a dataset, as ``typing.Protocol``s:
any object with these members can be evaluated, indexed and served, without touching ``index/``.

:class:`cribo.backbones.Backbone` (timm ViTs) and the hand-made descriptors of ``index.descriptors``
satisfy :class:`BackboneProtocol`; ``index.datasets.SegDataset`` (VOC, ADE20K, folders, Hugging Face)
and ``index.bounds.BoundedDataset`` satisfy :class:`SegDatasetProtocol`.

Example, a third-party model::

    class MyModel(torch.nn.Module):            # also gives .to / .train / .training
        arch, patch_size, embed_dim = "my-vit", 14, 384
        identity, source = "my-vit:v1", "my lab"   # identity keys the feature cache: change it with the weights
        def forward_features(self, x):           # x (B, 3, H, W) ImageNet-normalised, H, W multiples of 14
            tokens = ...                          # (B, h*w, D) row-major over the (h, w) grid
            return {"x_norm_clstoken": tokens.mean(1), "x_norm_patchtokens": tokens,
                    "grid": (x.shape[-2] // 14, x.shape[-1] // 14)}

    index.protocol.run_protocol(MyModel(), train_ds, val_ds, ...)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

__all__ = ["BackboneProtocol", "SegDatasetProtocol"]


@runtime_checkable
class BackboneProtocol(Protocol):
    """A patch-token model with the named output contract (see :func:`cribo.backbones.named_outputs`)."""

    arch: str
    patch_size: int
    embed_dim: int
    identity: str  # fingerprint of the weights: the feature-cache key
    training: bool

    def forward_features(self, x: torch.Tensor) -> dict[str, Any]:
        """x (B,3,H,W) -> ``x_norm_clstoken`` (B,D), ``x_norm_patchtokens`` (B,h*w,D), ``grid`` (h, w)."""
        ...

    def to(self, device: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...


@runtime_checkable
class SegDatasetProtocol(Protocol):
    """A split of a semantic-segmentation dataset: images and uint8 masks (void = ``cribo.constants.VOID``)."""

    kind: str
    root: str | Path
    split: str
    ids: list[str]
    class_names: list[str]
    void: int

    def load_image(self, i: int) -> np.ndarray:
        """(H, W, 3) uint8 RGB."""
        ...

    def load_mask(self, i: int) -> np.ndarray:
        """(H, W) uint8 class ids, ``void`` for unlabelled pixels."""
        ...

    def fingerprint(self) -> str:
        """Changes whenever the content changes (the feature-cache key)."""
        ...
