import math

import numpy as np
import pytest

from index.store import check_k
from index.transfer import SOFT_TEMPERATURE, knn_vote, soft_vote, transfer_labels

# support patch j has class LABELS[j]
LABELS = np.array([0, 1, 2, 3, 1, 2, 3, 0], dtype=np.int64)


def _support(rows):
    """(I, labels) for queries whose neighbours have the given classes in rank order (-1 = missing).

    The support set is stored in reverse order, so I is not simply 0, 1, 2, ...
    """
    classes = [c for row in rows for c in row if c != -1]
    labels = np.array(classes[::-1], dtype=np.int64)
    I, n = [], len(classes)
    pos = 0
    for row in rows:
        out = []
        for c in row:
            if c == -1:
                out.append(-1)
            else:
                out.append(n - 1 - pos)
                pos += 1
        I.append(out)
    return np.array(I, dtype=np.int64), labels


def test_majority_vote_and_share():
    I, labels = _support([[1, 2, 2, -1], [3, 3, 0, 1]])
    pred, share = knn_vote(I, labels, 4)
    assert pred.dtype == np.int64 and share.dtype == np.float32
    assert pred.tolist() == [2, 3]
    np.testing.assert_allclose(share, [2 / 3, 2 / 4])


def test_two_way_tie_goes_to_best_ranked():
    I, labels = _support([[1, 2, 2, 1], [2, 1, 1, 2]])
    pred, share = knn_vote(I, labels, 4)
    assert pred.tolist() == [1, 2]  # 2-2 ties: the class of the rank-0 neighbour, not the smallest id
    np.testing.assert_allclose(share, [0.5, 0.5])
    # rank 0 is class 0 (1 vote, not tied): the first *tied* class in rank order wins
    I, labels = _support([[0, 1, 2, 1, 2], [0, 2, 1, 1, 2]])
    pred, _ = knn_vote(I, labels, 4)
    assert pred.tolist() == [1, 2]


def test_three_way_tie():
    I, labels = _support([[3, 1, 2, 2, 1, 3], [0, 2, 3, 1, 3, 2]])
    # row 0: 1, 2, 3 all twice -> 3 (rank 0); row 1: 2 and 3 twice, 0 and 1 once -> 2 (rank 1)
    pred, share = knn_vote(I, labels, 4)
    assert pred.tolist() == [3, 2]
    np.testing.assert_allclose(share, [2 / 6, 2 / 6])


def test_missing_neighbours_ignored():
    I = np.array([[-1, 1, -1, -1], [-1, -1, -1, -1], [0, 2, -1, 5]])
    pred, share = knn_vote(I, LABELS, 4)
    assert pred.tolist() == [1, -1, 2]
    np.testing.assert_allclose(share, [1.0, 0.0, 2 / 3])


def _plain_vote(I, labels):
    out = []
    for row in I:
        classes = [int(labels[j]) for j in row if j >= 0]
        if not classes:
            out.append(-1)
            continue
        counts = {c: classes.count(c) for c in classes}
        best = max(counts.values())
        out.append(next(c for c in classes if counts[c] == best))
    return out


def test_chunked_vote_matches_plain_loop():
    rng = np.random.default_rng(0)
    nb, C = 300, 7
    labels = rng.integers(0, C, size=nb)
    I = rng.integers(0, nb, size=(101, 10))
    I[rng.random(I.shape) < 0.1] = -1
    want = _plain_vote(I, labels)
    for chunk in (None, 1, 7, 1000):
        pred, _ = knn_vote(I, labels, C, chunk_size=chunk)
        assert pred.tolist() == want


def test_D_must_be_sorted_similarities():
    I = np.array([[0, 1, 2]])
    pred, _ = knn_vote(I, LABELS, 4, D=np.array([[0.9, 0.5, 0.5]]))
    assert pred.tolist() == [0]
    with pytest.raises(ValueError, match="not sorted by decreasing similarity"):
        knn_vote(I, LABELS, 4, D=np.array([[0.1, 0.5, 0.7]]))
    with pytest.raises(ValueError, match="same shape"):
        knn_vote(I, LABELS, 4, D=np.zeros((1, 2)))


def test_vote_input_errors():
    with pytest.raises(ValueError, match=r"outside -1..7"):
        knn_vote(np.array([[8]]), LABELS, 4)
    with pytest.raises(ValueError, match=r"support labels must lie in 0..3"):
        knn_vote(np.array([[0]]), np.array([0, 4]), 4)
    with pytest.raises(ValueError, match="integer"):
        knn_vote(np.array([[0.0]]), LABELS, 4)


def test_check_k():
    check_k(50, 50)
    with pytest.raises(ValueError, match=r"k=51 larger than the index \(50 vectors\): lower --k"):
        check_k(51, 50)
    with pytest.raises(ValueError, match="at least 1"):
        check_k(0, 50)


def test_soft_vote_hand_computation():
    hist = np.array([[1.0, 0.0, 0.0], [0.0, 0.5, 0.5], [0.0, 0.0, 1.0]], np.float32)
    D = np.array([[0.50, 0.48, 0.0], [0.3, 0.0, 0.0], [0.0, 0.0, 0.0]], np.float32)
    I = np.array([[0, 1, -1], [2, -1, -1], [-1, -1, -1]])
    probs = soft_vote(D, I, hist, temperature=0.02)
    w0 = math.exp(25) / (math.exp(25) + math.exp(24))
    np.testing.assert_allclose(probs[0], [w0, (1 - w0) / 2, (1 - w0) / 2], rtol=1e-5)
    np.testing.assert_allclose(probs[1], [0, 0, 1])
    np.testing.assert_allclose(probs[2], [0, 0, 0])
    assert probs.dtype == np.float32


def test_soft_vote_chunking_and_errors():
    rng = np.random.default_rng(0)
    hist = rng.random((50, 4)).astype(np.float32)
    hist /= hist.sum(1, keepdims=True)
    I = rng.integers(0, 50, size=(33, 5))
    D = -np.sort(-rng.random((33, 5)), axis=1).astype(np.float32)
    full = soft_vote(D, I, hist)
    np.testing.assert_allclose(soft_vote(D, I, hist, chunk_size=4), full, rtol=1e-6)
    np.testing.assert_allclose(full.sum(1), 1.0, rtol=1e-5)
    with pytest.raises(ValueError, match="temperature must be positive"):
        soft_vote(D, I, hist, temperature=0)
    with pytest.raises(ValueError, match="same shape"):
        soft_vote(D[:, :2], I, hist)


def test_transfer_labels_majority_and_soft():
    # 3 support patches with labels 0, 1, 1; two queries, k = 2, and a query with no neighbour
    labels = np.array([0, 1, 1])
    I = np.array([[0, 1], [2, 1], [-1, -1]])
    D = np.array([[0.9, 0.5], [0.8, 0.7], [-np.inf, -np.inf]], dtype=np.float32)
    pred, share = transfer_labels(D, I, labels, 3, "majority")
    np.testing.assert_array_equal(pred, [0, 1, -1])  # tie 0 vs 1 -> nearest neighbour's class
    np.testing.assert_allclose(share, [0.5, 1.0, 0.0])
    # soft without histograms: one-hot of the labels; weights softmax(D / 0.02)
    pred, conf = transfer_labels(D, I, labels, 3, "soft")
    w0 = 1.0 / (1.0 + math.exp((0.5 - 0.9) / SOFT_TEMPERATURE))
    np.testing.assert_array_equal(pred, [0, 1, -1])
    np.testing.assert_allclose(conf, [w0, 1.0, 0.0], rtol=1e-5)
    # the same as soft_vote over the full one-hot table, and a given histogram table is used as is
    full = np.eye(3, dtype=np.float32)[labels]
    np.testing.assert_allclose(conf[:2], soft_vote(D[:2], I[:2], full).max(axis=1), rtol=1e-6)
    hist = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [0.0, 1.0, 0.0]], dtype=np.float32)
    pred, _ = transfer_labels(D, I, labels, 3, "soft", support_hist=hist)
    np.testing.assert_array_equal(pred, [2, 1, -1])
    with pytest.raises(ValueError, match="unknown vote"):
        transfer_labels(D, I, labels, 3, "mean")
