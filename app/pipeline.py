"""Segmentation by retrieval of one image against a support index (the app's Segment and Label tabs).

The steps are the protocol's (eval-protocol.md, CrIBo section 4.1), through the library's functions:

    image (H, W, 3) -> protocol size (H', W') = p * floor(. / p)     index.labels.protocol_size / resize_image
                    -> patch tokens (h*w, D), L2-normalised           cribo.backbones.Backbone.forward_features
                    -> k nearest support patches (D, I) (h*w, k)      index.store.SupportIndex.search
                    -> label transfer pred, share (h*w,)              index.transfer.knn_vote / soft_vote
                    -> pixel mask (H, W) uint8                        index.labels.paint_patches

:func:`index.features.image_features` is the one-image counterpart of
:func:`index.features.extract_features`, so the prediction for an image equals the protocol's for the
same image.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from cribo.constants import VOID
from index.features import image_features
from index.labels import paint_patches, patch_labels, resize_mask
from index.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from index.store import SupportIndex, check_k
from index.transfer import VOTES, transfer_labels

__all__ = ["Segmentation", "Scores", "segment", "score", "VOTES"]


@dataclass
class Segmentation:
    """One segmented image.

    mask: ``(H, W)`` uint8 class ids at the size of ``image`` given to :func:`segment` (void 255 where
    no prediction). pred, share: ``(h*w,)`` per-patch class and confidence. grid: ``(h, w)``.
    proc_size: protocol resolution ``(H', W')``. timings: seconds of ``forward``, ``search``, ``vote``,
    ``paint``.
    """

    mask: np.ndarray
    pred: np.ndarray
    share: np.ndarray
    grid: tuple[int, int]
    proc_size: tuple[int, int]
    timings: dict[str, float] = field(default_factory=dict)


def segment(backbone, index: SupportIndex, image: np.ndarray, *, k: int = 50, vote: str = "majority",
            num_classes: int,
            device: str | torch.device = "cpu", precision: str = "auto") -> Segmentation:
    """Segment ``image (H, W, 3) uint8`` by k-NN label transfer from ``index``; the mask is painted at
    the image's size (a caller that wants another size paints ``pred`` on ``grid`` itself, once, with
    :func:`index.labels.paint_patches`)."""
    if index.ntotal == 0:
        raise ValueError("the support index is empty: add labelled images to it first")
    check_k(int(k), index.ntotal)
    t0 = time.perf_counter()
    xq, grid = image_features(backbone, image, device=device, precision=precision)
    t1 = time.perf_counter()
    D, I = index.search(xq, int(k))
    t2 = time.perf_counter()
    pred, share = transfer_labels(D, I, index.labels, num_classes, vote)
    t3 = time.perf_counter()
    p = int(backbone.patch_size)
    mask = paint_patches(pred, grid, p, image.shape[:2])
    t4 = time.perf_counter()
    return Segmentation(mask, pred, share, grid, (grid[0] * p, grid[1] * p),
                        {"forward": t1 - t0, "search": t2 - t1, "vote": t3 - t2, "paint": t4 - t3})


@dataclass
class Scores:
    """Scores of one prediction against a ground-truth mask, as fractions in [0, 1].

    patch_*: the protocol's patch level (prediction vs each patch's majority label, unlabelled patches
    not scored); pixel_*: the pixel-level option (patch predictions painted at the mask's size, void
    ignored). per-class IoU arrays are ``(C,)`` float64 with NaN for classes absent from both.
    """

    patch_miou: float
    patch_iou: np.ndarray
    patch_accuracy: float
    pixel_miou: float
    pixel_iou: np.ndarray
    pixel_accuracy: float
    scored_patches: int


def score(seg: Segmentation, gt: np.ndarray, *, patch_size: int, num_classes: int, void: int = VOID) -> Scores:
    """Score ``seg`` against ``gt (H, W)`` uint8 (same size as ``seg.mask``; class ids, void 255)."""
    if gt.shape != seg.mask.shape:
        raise ValueError(f"ground truth {gt.shape} and prediction {seg.mask.shape} must have the same size")
    gt_patch = patch_labels(resize_mask(gt, seg.proc_size), patch_size, num_classes, void)
    if not (gt_patch >= 0).any():
        raise ValueError("the ground-truth mask has no labelled pixel (all void): nothing to score")
    conf_patch = confusion_matrix(seg.pred, gt_patch, num_classes)
    # Pixel level: a patch without any neighbour (possible only with an approximate index) is painted
    # void and confusion_matrix raises on it rather than silently dropping it.
    conf_pixel = confusion_matrix(seg.mask, gt, num_classes, ignore=(void,))
    return Scores(mean_iou(conf_patch), iou_per_class(conf_patch), pixel_accuracy(conf_patch),
                  mean_iou(conf_pixel), iou_per_class(conf_pixel), pixel_accuracy(conf_pixel),
                  int((gt_patch >= 0).sum()))
