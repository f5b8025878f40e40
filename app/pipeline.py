"""Segmentation by retrieval of one image against a support index (the app's Segment and Label tabs).

The steps are the protocol's (eval-protocol.md, CrIBo section 4.1), through the library's functions:

    image (H, W, 3) -> protocol size (H', W') = p * floor(. / p)     index.labels.protocol_size / resize_image
                    -> patch tokens (h*w, D), L2-normalised           cribo.backbones.Backbone.forward_features
                    -> k nearest support patches (D, I) (h*w, k)      index.store.SupportIndex.search
                    -> label transfer pred, share (h*w,)              index.transfer.knn_vote / soft_vote
                    -> pixel mask (H, W) uint8                        index.labels.paint_patches

:func:`image_tokens` is the one-image counterpart of :func:`index.features.extract_features` (which
works on whole dataset splits): same resize, normalisation, precision policy and L2 normalisation, and
the tokens are rounded through float16 like the feature cache, so the prediction for an image equals
the protocol's for the same image.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from cribo.precision import autocast, resolve_precision
from index.features import IMAGENET_MEAN, IMAGENET_STD
from index.labels import paint_patches, patch_labels, protocol_size, resize_image, resize_mask
from index.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from index.protocol import SOFT_TEMPERATURE, VOTES
from index.store import SupportIndex
from index.transfer import check_k, knn_vote, soft_vote

__all__ = ["Segmentation", "Scores", "image_tokens", "segment", "score", "transfer_labels", "VOTES"]


@torch.inference_mode()
def image_tokens(backbone, image: np.ndarray, *, device: str | torch.device = "cpu",
                 precision: str = "auto") -> tuple[np.ndarray, tuple[int, int]]:
    """L2-normalised patch tokens of one ``image (H, W, 3) uint8`` at the protocol resolution.

    Returns ``tokens (h*w, D) float32`` (values rounded through float16, as cached by
    :func:`index.features.extract_features`) and ``grid = (h, w)``.
    """
    p = int(backbone.patch_size)
    size = protocol_size(image.shape[0], image.shape[1], p)
    pixels = np.require(resize_image(image, size), requirements="W")  # Pillow's arrays are read-only
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    x = (x.float().div_(255) - mean) / std
    with autocast(resolve_precision(precision, device), device):
        out = backbone.forward_features(x)
    tokens = F.normalize(out["x_norm_patchtokens"][0].float(), dim=-1)  # (h*w, D)
    return tokens.to(torch.float16).float().cpu().numpy(), tuple(out["grid"])


def transfer_labels(index: SupportIndex, D: np.ndarray, I: np.ndarray, num_classes: int,
                    vote: str) -> tuple[np.ndarray, np.ndarray]:
    """``pred (nq,)`` and confidence ``share (nq,)`` from the neighbours ``D, I (nq, k)``.

    majority: :func:`index.transfer.knn_vote` (the share of the k votes the winner got).
    soft: :func:`index.transfer.soft_vote` at Hummingbird's temperature over the neighbours' patch
    labels as one-hot histograms (a saved index keeps each patch's majority label, not its class
    histogram); confidence = the winning class probability.
    """
    if vote == "majority":
        return knn_vote(I, index.labels, num_classes, D)
    if vote != "soft":
        raise ValueError(f"unknown vote {vote!r}: choose one of {VOTES}")
    # one-hot histograms of only the neighbours that occur, so memory is (distinct neighbours, C)
    found = I >= 0
    uniq, local = np.unique(I[found], return_inverse=True)
    hist = np.zeros((uniq.size, num_classes), np.float32)
    hist[np.arange(uniq.size), index.labels[uniq]] = 1.0
    I_local = np.full(I.shape, -1, np.int64)
    I_local[found] = local
    probs = soft_vote(D, I_local, hist, SOFT_TEMPERATURE)
    pred = probs.argmax(axis=1)
    pred[~found.any(axis=1)] = -1
    return pred, probs.max(axis=1)


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
            num_classes: int, out_size: tuple[int, int] | None = None,
            device: str | torch.device = "cpu", precision: str = "auto") -> Segmentation:
    """Segment ``image (H, W, 3) uint8`` by k-NN label transfer from ``index``.

    ``out_size``: size ``(H, W)`` of the returned mask (default: the image's; the app passes the
    original file size when it downscaled a large upload).
    """
    if index.ntotal == 0:
        raise ValueError("the support index is empty: add labelled images to it first")
    check_k(int(k), index.ntotal)
    t0 = time.perf_counter()
    xq, grid = image_tokens(backbone, image, device=device, precision=precision)
    t1 = time.perf_counter()
    D, I = index.search(xq, int(k))
    t2 = time.perf_counter()
    pred, share = transfer_labels(index, D, I, num_classes, vote)
    t3 = time.perf_counter()
    p = int(backbone.patch_size)
    mask = paint_patches(pred, grid, p, out_size or image.shape[:2])
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


def score(seg: Segmentation, gt: np.ndarray, *, patch_size: int, num_classes: int, void: int = 255) -> Scores:
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
