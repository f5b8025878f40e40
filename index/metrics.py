"""Segmentation scores from a confusion matrix (eval-protocol.md step 6).

``conf[g, c]`` counts the scored patches (or pixels) of ground-truth class ``g`` predicted as ``c``;
it is an int64 ``(C, C)`` array that can be summed over images, seeds or shards. IoU and mIoU are
returned as fractions in [0, 1]; reports multiply by 100 (the paper's Table 1 is in percent).
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = [
    "confusion_matrix",
    "iou_per_class",
    "mean_iou",
    "pixel_accuracy",
    "iou_from_confusion",
    "miou",
]


def confusion_matrix(
    pred: np.ndarray, gt: np.ndarray, num_classes: int, ignore: Iterable[int] = (-1, 255)
) -> np.ndarray:
    """``(C, C)`` int64 confusion of ``pred`` against ``gt`` (any equal shapes), rows = ground truth.

    Positions where ``gt`` is one of ``ignore`` (no label: -1 for patches, void 255 for pixels) are
    not scored. Every scored position must have a ground truth in ``0..C-1`` and a prediction in
    ``0..C-1``; anything else is an error (a missing prediction is never silently dropped).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} must have the same shape")
    C = int(num_classes)
    if C <= 0:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    pred = pred.reshape(-1).astype(np.int64)
    gt = gt.reshape(-1).astype(np.int64)
    scored = ~np.isin(gt, np.asarray(list(ignore), dtype=np.int64))
    pred, gt = pred[scored], gt[scored]
    if gt.size and (gt.min() < 0 or gt.max() >= C):
        bad = np.unique(gt[(gt < 0) | (gt >= C)])[:10].tolist()
        raise ValueError(f"ground truth has ids {bad} outside 0..{C - 1} that are not in ignore={tuple(ignore)}")
    if pred.size and (pred.min() < 0 or pred.max() >= C):
        bad = np.unique(pred[(pred < 0) | (pred >= C)])[:10].tolist()
        raise ValueError(
            f"predictions {bad} outside 0..{C - 1} at scored positions "
            f"(-1 means a query found no neighbour: check the support index)"
        )
    return np.bincount(gt * C + pred, minlength=C * C).reshape(C, C)


def iou_per_class(conf: np.ndarray) -> np.ndarray:
    """``IoU_c = TP / (TP + FP + FN)`` per class, ``(C,)`` float64, NaN where the union is empty."""
    conf = _check_conf(conf)
    tp = np.diag(conf).astype(np.float64)
    union = conf.sum(axis=0) + conf.sum(axis=1) - np.diag(conf)
    iou = np.full(conf.shape[0], np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    return iou


SCORED_CLASSES = ("present", "all")


def mean_iou(conf: np.ndarray, classes: str = "present") -> float:
    """Mean IoU (a fraction) over the classes whose union is non-zero (present in gt or predictions),
    or, with ``classes="all"`` (open-hummingbird-eval), over all ``C`` classes, an empty union counting 0."""
    if classes not in SCORED_CLASSES:
        raise ValueError(f"unknown classes={classes!r}: choose one of {SCORED_CLASSES}")
    iou = iou_per_class(conf)
    present = ~np.isnan(iou)
    if not present.any():
        raise ValueError("the confusion matrix is empty: nothing was scored")
    return float(iou[present].mean() if classes == "present" else np.where(present, iou, 0.0).mean())


def pixel_accuracy(conf: np.ndarray) -> float:
    """Fraction of scored positions (patches or pixels) predicted correctly: ``trace / sum``."""
    conf = _check_conf(conf)
    total = conf.sum()
    if total == 0:
        raise ValueError("the confusion matrix is empty: nothing was scored")
    return float(np.trace(conf) / total)


def _check_conf(conf: np.ndarray) -> np.ndarray:
    conf = np.asarray(conf)
    if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
        raise ValueError(f"confusion matrix must be square (C, C), got {conf.shape}")
    return conf


# Names used in docs/ARCHITECTURE.md.
iou_from_confusion = iou_per_class
miou = mean_iou
