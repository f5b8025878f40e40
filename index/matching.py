"""Matching predicted classes to ground-truth classes before scoring (``--metric hungarian``).

Label transfer predicts ground-truth class ids already, so the default metric (``identity``) scores
them as they are. open-hummingbird-eval instead scores after a one-to-one Hungarian matching of
predicted to ground-truth classes that maximises the summed IoU (``scipy.optimize.linear_sum_assignment``
on ``1 - IoU``), which can only raise the mIoU; ``--metric hungarian`` reproduces it for comparison
with numbers published with that tool. The assignment here is the classical O(C^3) shortest
augmenting path algorithm with potentials (no scipy dependency); ties are broken towards the
smallest index, which may differ from scipy's choice between equally good matchings (same total).
"""
from __future__ import annotations

import numpy as np

__all__ = ["METRICS", "linear_assignment", "hungarian_mapping", "remap_confusion", "match_confusion"]

METRICS = ("identity", "hungarian")


def linear_assignment(cost: np.ndarray) -> np.ndarray:
    """Minimum-cost perfect matching of a square ``cost (n, n)``: returns ``col (n,)``, row ``i`` -> ``col[i]``."""
    cost = np.asarray(cost, dtype=np.float64)
    if cost.ndim != 2 or cost.shape[0] != cost.shape[1]:
        raise ValueError(f"cost must be a square (n, n) matrix, got {cost.shape}")
    if not np.isfinite(cost).all():
        raise ValueError("cost must be finite")
    n = cost.shape[0]
    u, v = np.zeros(n + 1), np.zeros(n + 1)  # potentials of rows and columns (1-based, 0 = virtual)
    match = np.zeros(n + 1, dtype=np.int64)  # match[j] = row matched to column j (0 = free)
    way = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        match[0], j0 = i, 0
        minv = np.full(n + 1, np.inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:  # Dijkstra-like growth of the alternating tree, vectorised over the columns
            used[j0] = True
            i0 = match[j0]
            free = ~used[1:]
            reduced = cost[i0 - 1] - u[i0] - v[1:]  # (n,)
            better = free & (reduced < minv[1:])
            minv[1:][better] = reduced[better]
            way[1:][better] = j0
            cand = np.where(free, minv[1:], np.inf)
            j1 = int(np.argmin(cand)) + 1
            delta = cand[j1 - 1]
            u[match[used]] += delta
            v[used] -= delta
            minv[1:][free] -= delta
            j0 = j1
            if match[j0] == 0:
                break
        while j0:  # flip the augmenting path
            j1 = way[j0]
            match[j0] = match[j1]
            j0 = j1
    col = np.empty(n, dtype=np.int64)
    col[match[1:] - 1] = np.arange(n)
    return col


def hungarian_mapping(conf: np.ndarray) -> np.ndarray:
    """``mapping (C,)``: predicted class ``p`` -> ground-truth class, one to one, maximising the summed IoU
    of ``conf (C, C)`` (rows = ground truth, columns = predictions)."""
    conf = np.asarray(conf, dtype=np.float64)
    rows, cols = conf.sum(axis=1, keepdims=True), conf.sum(axis=0, keepdims=True)
    iou = conf / np.maximum(rows + cols - conf, 1e-8)  # (G, P) IoU of every (gt, pred) pairing
    gt_to_pred = linear_assignment(1.0 - iou)
    mapping = np.empty(conf.shape[1], dtype=np.int64)
    mapping[gt_to_pred] = np.arange(conf.shape[0])
    return mapping


def remap_confusion(conf: np.ndarray, mapping: np.ndarray) -> np.ndarray:
    """Fold the prediction columns of ``conf (G, P)`` by ``mapping (P,)`` (pred -> gt): ``(G, G)``."""
    conf = np.asarray(conf)
    out = np.zeros((conf.shape[0], conf.shape[0]), dtype=conf.dtype)
    np.add.at(out.T, np.asarray(mapping), conf.T)
    return out


def match_confusion(conf: np.ndarray, metric: str) -> tuple[np.ndarray, np.ndarray | None]:
    """``(conf scored, mapping or None)`` for ``metric`` in :data:`METRICS`."""
    if metric == "identity":
        return np.asarray(conf), None
    if metric == "hungarian":
        mapping = hungarian_mapping(conf)
        return remap_confusion(conf, mapping), mapping
    raise ValueError(f"unknown metric {metric!r}: choose one of {METRICS}")
