"""Dense nearest-neighbour retrieval: features, patch labels, FAISS support indices, label transfer, mIoU.

Built on the :mod:`cribo` library (backbones, precision, io); never on :mod:`cribo.pretrain`. A model
or dataset enters through :class:`cribo.contracts.BackboneProtocol` / ``SegDatasetProtocol``.

Usage (one Table-1 row, as ``evaluate.py`` runs it)::

    from cribo import load_backbone
    from index import open_dataset, run_protocol
    backbone = load_backbone("builtin")
    train_ds = open_dataset("voc", "path/to/VOCdevkit/VOC2012", "train_aug")
    val_ds = open_dataset("voc", "path/to/VOCdevkit/VOC2012", "val")
    results = run_protocol(backbone, train_ds, val_ds, ratios=[1, 8], seeds=2, out="results/voc/results.json")

The names below are re-exported lazily (importing ``index`` loads neither torch nor faiss).
"""
from __future__ import annotations

from cribo.exports import lazy_exports

_EXPORTS = {
    "open_dataset": "index.datasets", "SegDataset": "index.datasets",
    "extract_features": "index.features", "image_features": "index.features", "FeatureSet": "index.features",
    "SupportIndex": "index.store", "check_k": "index.store",
    "transfer_labels": "index.transfer", "knn_vote": "index.transfer",
    "mean_iou": "index.metrics", "confusion_matrix": "index.metrics",
    "run_protocol": "index.protocol", "score_index": "index.protocol", "build_support_index": "index.protocol",
    "RetrievalProbe": "index.probe",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports("index", _EXPORTS)
