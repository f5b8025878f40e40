"""CrIBo: Cross-Image Object-Level Bootstrapping (ICLR 2024): the library root.

The shared pieces live here: backbones and their loading (``backbones``), released checkpoints
(``releases``), the precision policy (``precision``), pixel normalisation (``pixels``), constants,
the model / dataset contracts (``contracts``), atomic IO (``io``, ``dirswap``, ``jsonl``), errors and
argument types, one-process-safe distributed helpers (``dist``), the crop rule (``crops``) and the
scene generator (``synthetic``, ``python -m cribo.synthetic``). The method is :mod:`cribo.pretrain`;
retrieval is the sibling package :mod:`index`. Nothing here imports either.

Usage::

    import cribo
    backbone = cribo.load_backbone("builtin")                 # or a timm arch, a release, weights=...
    out = backbone.forward_features(images)                    # images (B, 3, H, W), ImageNet-normalised
    out["x_norm_patchtokens"]                                  # (B, h*w, D)

The names below are re-exported lazily (importing ``cribo`` loads neither torch nor timm).
"""
from __future__ import annotations

from cribo.exports import lazy_exports

_EXPORTS = {
    "Backbone": "cribo.backbones", "load_backbone": "cribo.backbones", "export_backbone": "cribo.backbones",
    "named_outputs": "cribo.backbones", "ARCHS": "cribo.backbones",
    "RELEASES": "cribo.releases",
    "BackboneProtocol": "cribo.contracts", "SegDatasetProtocol": "cribo.contracts",
    "VOID": "cribo.constants", "IMAGENET_MEAN": "cribo.constants", "IMAGENET_STD": "cribo.constants",
    "normalise": "cribo.pixels", "denormalise": "cribo.pixels",
    "PRECISIONS": "cribo.precision", "resolve_precision": "cribo.precision",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports("cribo", _EXPORTS)
