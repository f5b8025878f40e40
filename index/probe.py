"""A quick retrieval check of a backbone: the learning curve of a pretraining run, in mIoU.

:class:`RetrievalProbe` decodes a small fixed labelled subset once (the first ``num_support`` images
of a support split and the first ``num_queries`` of a query split), then scores any backbone on it in
seconds with the protocol's own pieces: features at the protocol resolution
(:func:`index.features.image_features`), majority patch labels, exact cosine k-NN over the labelled
support patches, majority vote (:func:`index.transfer.knn_vote`), patch-level mIoU. It is the paper's
protocol on a subset, not a Table-1 figure: ``evaluate.py`` gives those.

It also reports the patch-NN health check (the rate at which a query patch's nearest patch in
*another* query image has its class; :func:`patch_nn_rates`), which needs no support set.
"""
from __future__ import annotations

import time
from typing import Any

import faiss
import numpy as np

from cribo.contracts import BackboneProtocol
from index.features import image_features
from index.labels import patch_labels, protocol_size, resize_mask
from index.metrics import confusion_matrix, mean_iou
from index.store import check_k
from index.transfer import knn_vote

__all__ = ["RetrievalProbe", "patch_nn_rates"]


def patch_nn_rates(tokens: np.ndarray, labels: np.ndarray, image_of: np.ndarray,
                   cell: np.ndarray) -> dict[str, float]:
    """Top-1 cross-image neighbour statistics of L2-normalised patch ``tokens (P, D)``.

    For every labelled patch (``labels >= 0``), its nearest patch (cosine, exact) among the patches of
    the *other* images (``image_of (P,)``): ``same_class_top1`` = how often it has the same label,
    ``same_position_top1`` = how often it sits at the same grid cell (``cell (P,)``), a sign that the
    features encode position rather than content.
    """
    x = np.ascontiguousarray(tokens, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    k = int(np.bincount(image_of).max()) + 1  # enough to always reach a patch of another image
    _, nbr = index.search(x, k)  # (P, k)
    other = image_of[nbr] != image_of[:, None]
    first = nbr[np.arange(len(x)), other.argmax(1)]  # top-1 neighbour outside the patch's own image
    scored = labels >= 0
    return {"same_class_top1": float((labels[first] == labels)[scored].mean()),
            "same_position_top1": float((cell[first] == cell)[scored].mean())}


class RetrievalProbe:
    """Patch mIoU of k-NN label transfer on a fixed small subset, and the patch-NN rate.

    Args:
        support: a labelled split (``SegDataset``: ``load_image``, ``load_mask``, ``num_classes``);
            its first ``num_support`` images are the support set.
        queries: a labelled split; its first ``num_queries`` images are scored.
        k: neighbours per query patch (the protocol's 50).
        device, precision: passed to :func:`index.features.image_features`.
    """

    def __init__(self, support: Any, queries: Any, *, num_support: int = 64, num_queries: int = 60,
                 k: int = 50, device: str = "cpu", precision: str = "fp32"):
        if num_support < 1 or num_queries < 2:
            raise ValueError(f"need at least 1 support and 2 query images (got {num_support}, {num_queries})")
        if support.num_classes != queries.num_classes:
            raise ValueError(f"support ({support.num_classes} classes) and queries ({queries.num_classes}) "
                             "come from different label sets")
        self.num_classes = int(support.num_classes)
        self.k, self.device, self.precision = int(k), device, precision
        self.support = [(support.load_image(i), support.load_mask(i)) for i in range(min(num_support, len(support)))]
        self.queries = [(queries.load_image(i), queries.load_mask(i)) for i in range(min(num_queries, len(queries)))]

    def _encode(self, backbone: BackboneProtocol, pairs: list) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """tokens (P, D), labels (P,), image index (P,), grid cell (P,) of ``pairs``."""
        p = int(backbone.patch_size)
        tokens, labels, image_of, cell = [], [], [], []
        for i, (image, mask) in enumerate(pairs):
            t, grid = image_features(backbone, image, device=self.device, precision=self.precision)
            size = protocol_size(image.shape[0], image.shape[1], p)
            labels.append(patch_labels(resize_mask(mask, size), p, self.num_classes))
            tokens.append(t)
            image_of.append(np.full(len(t), i))
            cell.append(np.arange(len(t)))
        return tuple(np.concatenate(a) for a in (tokens, labels, image_of, cell))

    def __call__(self, backbone: BackboneProtocol) -> dict[str, float]:
        """``{"eval_miou": %, "eval_patch_nn": rate, "eval_seconds": s}`` for ``backbone``."""
        t0 = time.perf_counter()
        s_tok, s_lab, _, _ = self._encode(backbone, self.support)
        q_tok, q_lab, q_img, q_cell = self._encode(backbone, self.queries)
        keep = s_lab >= 0
        check_k(self.k, int(keep.sum()))
        index = faiss.IndexFlatIP(s_tok.shape[1])
        index.add(np.ascontiguousarray(s_tok[keep]))
        scored = q_lab >= 0
        D, I = index.search(np.ascontiguousarray(q_tok[scored]), self.k)
        pred, _ = knn_vote(I, s_lab[keep], self.num_classes, D)
        conf = confusion_matrix(pred, q_lab[scored], self.num_classes)
        nn = patch_nn_rates(q_tok, q_lab, q_img, q_cell)
        return {"eval_miou": 100.0 * mean_iou(conf), "eval_patch_nn": nn["same_class_top1"],
                "eval_seconds": time.perf_counter() - t0}
