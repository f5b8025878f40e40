"""Label transfer from retrieved support patches (eval-protocol.md step 5; paper section 4.1).

Inputs follow faiss: ``I (nq, k)`` int64 indices into the support set, each row sorted by
decreasing similarity (rank 0 = nearest), ``-1`` for a missing neighbour (an approximate index may
return fewer than ``k``); ``D (nq, k)`` the matching cosine similarities. Both votes work in chunks of
query rows, so ~1M queries x k=50 x C=150 run in bounded memory (tens of MB per chunk).
"""
from __future__ import annotations

import numpy as np

__all__ = ["knn_vote", "soft_vote", "transfer_labels", "VOTES", "SOFT_TEMPERATURE"]

VOTES = ("majority", "soft")
SOFT_TEMPERATURE = 0.02  # Hummingbird's softmax temperature over cosine similarities
_CHUNK_BYTES = 64 * 2**20  # working-set budget per chunk of query rows


def _check_I(I: np.ndarray, n_support: int) -> np.ndarray:
    I = np.asarray(I)
    if I.ndim != 2 or not np.issubdtype(I.dtype, np.integer):
        raise ValueError(f"I must be an integer (nq, k) array of support indices, got {I.shape} {I.dtype}")
    if I.size and (I.min() < -1 or I.max() >= n_support):
        raise ValueError(
            f"I holds indices {I.min()}..{I.max()} outside -1..{n_support - 1}: "
            f"the index and the support labels ({n_support}) do not belong together"
        )
    return I


def _rows_per_chunk(k: int, width: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        return chunk_size
    return max(1, _CHUNK_BYTES // (8 * (k + width)))


def knn_vote(
    I: np.ndarray,
    support_labels: np.ndarray,
    num_classes: int,
    D: np.ndarray | None = None,
    *,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Majority vote of the ``k`` nearest support patches (the CrIBo protocol's label transfer).

    Each query takes the class most frequent among its valid neighbours. Ties go to the tied class
    whose best-ranked neighbour is nearest, i.e. the class of the first neighbour in rank order whose
    class is among the tied ones.

    Args:
        I: ``(nq, k)`` int64 support indices, sorted by decreasing similarity, -1 = missing.
        support_labels: ``(nb,)`` int class id of each support patch, in ``0..C-1``.
        num_classes: ``C``.
        D: optional ``(nq, k)`` similarities of ``I``; only checked (shape, and sorted by decreasing
            similarity, which catches L2 distances passed by mistake). Ranks come from the order of ``I``.
        chunk_size: query rows per chunk (default: a ~64 MB working set).

    Returns:
        ``pred (nq,)`` int64 winning class (-1 for a query without any valid neighbour) and
        ``share (nq,)`` float32 the winner's votes over the valid neighbours (0 where none): a
        confidence.

    Vectorised per chunk: counts ``(n, C)`` by one bincount over ``row * (C+1) + label`` (missing
    neighbours vote for a sentinel column C that is dropped), then among the argmax-tied classes
    the first-ranked hit via ``take_along_axis``.
    """
    support_labels = np.asarray(support_labels)
    C = int(num_classes)
    if support_labels.ndim != 1:
        raise ValueError(f"support_labels must be (nb,), got {support_labels.shape}")
    if support_labels.size and (support_labels.min() < 0 or support_labels.max() >= C):
        raise ValueError(
            f"support labels must lie in 0..{C - 1}, got {support_labels.min()}..{support_labels.max()} "
            f"(unlabelled patches must not be in the index)"
        )
    I = _check_I(I, support_labels.shape[0])
    nq, k = I.shape
    if D is not None:
        _check_D(D, I)
    # Labels with a sentinel C appended: I = -1 indexes it. A small dtype keeps the random gather
    # labels[I] (the vote's hot spot) in cache: 2 bytes per support patch instead of 8.
    small = np.int16 if C < np.iinfo(np.int16).max else np.int64
    labels = np.append(support_labels, C).astype(small)
    pred = np.empty(nq, dtype=np.int64)
    share = np.empty(nq, dtype=np.float32)
    step = _rows_per_chunk(k, C + 1, chunk_size)
    for s in range(0, nq, step):
        Ic = I[s : s + step]
        n = Ic.shape[0]
        lab = labels[Ic]  # (n, k); missing neighbours (-1) get the sentinel C
        rows = np.arange(0, n * (C + 1), C + 1, dtype=np.int64)[:, None]
        counts = np.bincount((rows + lab).ravel(), minlength=n * (C + 1)).reshape(n, C + 1)
        nvalid = k - counts[:, C]
        counts[:, C] = 0
        best = counts.max(axis=1)  # (n,)
        tied = counts == best[:, None]  # (n, C+1); the sentinel is tied only when best == 0
        tied[:, C] = False
        hit = np.take_along_axis(tied, lab, axis=1)  # (n, k): neighbour j's class is a tied winner
        first = hit.argmax(axis=1)  # first True in rank order
        p = lab[np.arange(n), first]
        none = nvalid == 0
        p[none] = -1
        pred[s : s + n] = p
        share[s : s + n] = np.where(none, 0.0, best / np.maximum(nvalid, 1))
    return pred, share


def soft_vote(
    D: np.ndarray,
    I: np.ndarray,
    support_hist: np.ndarray,
    temperature: float = 0.02,
    *,
    chunk_size: int | None = None,
) -> np.ndarray:
    """Hummingbird soft label transfer: ``probs = sum_j softmax(D / T)_j * support_hist[I_j]``.

    Args:
        D: ``(nq, k)`` cosine similarities, I: ``(nq, k)`` support indices (-1 = missing, weight 0).
        support_hist: ``(nb, C)`` class histograms of the support patches
            (``labels.patch_class_histograms``).
        temperature: softmax temperature (Hummingbird: 0.02).

    Returns:
        ``probs (nq, C)`` float32; rows sum to 1 where the neighbours' histograms do, all zeros for a
        query without valid neighbours. ``probs.argmax(1)`` is the prediction, ``probs.max(1)`` its
        confidence; the Hummingbird protocol upsamples ``probs`` bilinearly before the argmax.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    support_hist = np.asarray(support_hist, dtype=np.float32)
    if support_hist.ndim != 2:
        raise ValueError(f"support_hist must be (nb, C), got {support_hist.shape}")
    I = _check_I(I, support_hist.shape[0])
    D = np.asarray(D, dtype=np.float32)
    if D.shape != I.shape:
        raise ValueError(f"D {D.shape} and I {I.shape} must have the same shape")
    nq, k = I.shape
    C = support_hist.shape[1]
    probs = np.zeros((nq, C), dtype=np.float32)
    step = _rows_per_chunk(k, k * C // 2, chunk_size)  # (n, k, C) float32 gather dominates
    for s in range(0, nq, step):
        Ic, Dc = I[s : s + step], D[s : s + step]
        valid = Ic >= 0
        logits = np.where(valid, Dc / temperature, -np.inf)
        top = logits.max(axis=1, keepdims=True)
        top[~np.isfinite(top)] = 0.0  # rows with no valid neighbour: all weights become 0
        w = np.exp(logits - top)
        z = w.sum(axis=1, keepdims=True)
        w = np.divide(w, z, out=np.zeros_like(w), where=z > 0)
        probs[s : s + step] = np.einsum("nk,nkc->nc", w, support_hist[np.where(valid, Ic, 0)])
    return probs


def _check_D(D: np.ndarray, I: np.ndarray) -> None:
    D = np.asarray(D)
    if D.shape != I.shape:
        raise ValueError(f"D {D.shape} and I {I.shape} must have the same shape")
    d = np.where(I >= 0, D.astype(np.float64), -np.inf)
    with np.errstate(invalid="ignore"):  # -inf - -inf after the missing tail
        increasing = np.diff(d, axis=1) > 0
    if increasing.any():
        row = int(np.nonzero(increasing.any(axis=1))[0][0])
        raise ValueError(
            f"D is not sorted by decreasing similarity (row {row}): knn_vote expects inner-product "
            f"similarities in faiss order, not L2 distances"
        )


def transfer_labels(
    D: np.ndarray,
    I: np.ndarray,
    support_labels: np.ndarray,
    num_classes: int,
    vote: str = "majority",
    support_hist: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``pred (nq,)`` and confidence ``(nq,)`` from the neighbours ``D, I (nq, k)`` by ``vote``.

    majority: :func:`knn_vote` (confidence = the winner's share of the valid votes).
    soft: :func:`soft_vote` at :data:`SOFT_TEMPERATURE` over ``support_hist (nb, C)``, the support
    patches' class histograms; without it (a saved index keeps each patch's majority label only) over
    one-hot histograms of ``support_labels``, built for the neighbours that occur only, so memory is
    (distinct neighbours, C). Confidence = the winning class probability; ``pred`` is -1 for a query
    without any valid neighbour.
    """
    if vote == "majority":
        return knn_vote(I, support_labels, num_classes, D)
    if vote != "soft":
        raise ValueError(f"unknown vote {vote!r}: choose one of {VOTES}")
    I = _check_I(I, np.asarray(support_labels).shape[0])
    found = I >= 0
    if support_hist is None:
        uniq, local = np.unique(I[found], return_inverse=True)
        support_hist = np.zeros((uniq.size, num_classes), np.float32)
        support_hist[np.arange(uniq.size), np.asarray(support_labels)[uniq]] = 1.0
        I = np.where(found, 0, -1)
        I[found] = local
    probs = soft_vote(D, I, support_hist, SOFT_TEMPERATURE)
    pred = probs.argmax(axis=1)
    pred[~found.any(axis=1)] = -1
    return pred, probs.max(axis=1)
