"""--index ivfpq at scale: fast-scan PQ codes, the smaller default nlist and the exact re-ranking step."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from helpers_data import clustered_feature_cache
from index.reranked import RerankedIndex, RerankParams, default_ivfpq_nlist, exact_rerank


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return clustered_feature_cache(tmp_path_factory.mktemp("fs") / "features.npy", 4000, seed=1)


def test_default_nlist_values():
    assert default_ivfpq_nlist(7_500_000) == 1369  # VOC train_aug 1/1
    assert default_ivfpq_nlist(27_000_000) == 2598  # ADE20K training 1/1
    assert default_ivfpq_nlist(100_000_000) == 4096  # capped: the build's coarse assignment is n x nlist x D
    assert default_ivfpq_nlist(1000) == 16
    assert default_ivfpq_nlist(400) == 10  # n // 39 (each list gets FAISS's 39 training points)
    assert default_ivfpq_nlist(10) == 1


def test_exact_rerank_hand_made():
    features = np.array([[1, 0], [0, 1], [0.6, 0.8], [0.8, 0.6], [-1, 0]], dtype=np.float16)
    rows = np.array([4, 3, 2, 1, 0])  # support position -> feature row
    q = np.array([[1, 0], [0, 1]], dtype=np.float32)
    cand = np.array([[3, 1, 4, 2], [0, -1, 2, 2]])  # positions; -1 = no candidate, 2 twice
    D, I = exact_rerank(features, rows, cand, q, 3)
    # query 0: positions 3 (row 1, 0.0), 1 (row 3, 0.8), 4 (row 0, 1.0), 2 (row 2, 0.6)
    np.testing.assert_array_equal(I[0], [4, 1, 2])
    np.testing.assert_allclose(D[0], [1.0, 0.8, 0.6], atol=1e-3)
    # query 1: positions 0 (row 4, 0.0), 2 (row 2, 0.8) twice -> the duplicate keeps candidate order
    np.testing.assert_array_equal(I[1], [2, 2, 0])
    np.testing.assert_allclose(D[1], [0.8, 0.8, 0.0], atol=1e-3)


def test_exact_rerank_fewer_candidates_than_k():
    features = np.eye(3, dtype=np.float16)
    q = np.array([[0, 1, 0]], dtype=np.float32)
    D, I = exact_rerank(features, np.arange(3), np.array([[2, 1, -1]]), q, 4)
    np.testing.assert_array_equal(I, [[1, 2, -1, -1]])
    np.testing.assert_array_equal(D, np.array([[1, 0, -np.inf, -np.inf]], np.float32))


@pytest.mark.parametrize("block,dense", [(64, 32), (64, 1), (7, 32), (100000, 32)])
def test_exact_rerank_blocks_dense_and_sparse(data, monkeypatch, block, dense):
    """Same answer whatever the block size and the sequential / gathered choice (brute force reference)."""
    import index.reranked as rr
    monkeypatch.setattr(rr, "RERANK_BLOCK", block)
    monkeypatch.setattr(rr, "DENSE_SPAN", dense)
    monkeypatch.setattr(rr, "PAIR_CHUNK", 5)
    rng = np.random.default_rng(2)
    rows = rng.permutation(4000)[:3000]
    cand = rng.integers(-1, 3000, (20, 30))
    q = np.asarray(data[rng.integers(0, 4000, 20)], np.float32)
    D, I = exact_rerank(data, rows, cand, q, 10)
    full = np.einsum("qcd,qd->qc", np.asarray(data, np.float32)[rows[np.maximum(cand, 0)]], q)
    full[cand < 0] = -np.inf
    top = np.argsort(-full, axis=1, kind="stable")[:, :10]
    np.testing.assert_allclose(D, np.take_along_axis(full, top, 1), atol=1e-5)
    np.testing.assert_array_equal(np.sort(I, 1), np.sort(np.take_along_axis(cand, top, 1), 1))


def _exact(features, rows, xq, k):
    ref = faiss.IndexFlatIP(features.shape[1])
    ref.add(np.asarray(features[rows], np.float32))
    return ref.search(xq, k)


@pytest.mark.parametrize("bits", [4, 8])
def test_every_candidate_reranked_is_exact(data, bits):
    rows = np.arange(500, 4000)
    xq = np.asarray(data[:100], np.float32)
    index = RerankedIndex(data, rows, np.zeros(rows.size), RerankParams(nlist=8, nprobe=8, rerank=350,
                                                                        pq_bits=bits, query_chunk=32))
    D, I = index.search(xq, 10)
    D_ref, I_ref = _exact(data, rows, xq, 10)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, atol=1e-5)


def test_fast_scan_defaults(data):
    rows = np.arange(4000)
    index = RerankedIndex(data, rows, np.zeros(4000), RerankParams(nlist=16, nprobe=4, pq_bits=4, pq_m=8))
    assert isinstance(index.index, faiss.IndexIVFPQFastScan) and index.index.pq.M == 16  # 8 bytes = 16 x 4 bits
    assert index.index.by_residual
    assert index.memory_bytes() == 4000 * (8 + 8) + 16 * 32 * 4 + 16 * 32 * 4  # codes + ids, centroids, codebooks
    classic = RerankedIndex(data, rows, np.zeros(4000), RerankParams(nlist=16, nprobe=4))  # below 1M rows: 8 bits
    assert classic.pq_m == 4 and classic.pq_bits == 8 and classic.index.pq.M == 4  # default D / 8 bytes
    assert isinstance(classic.index, faiss.IndexIVFPQ) and not isinstance(classic.index, faiss.IndexIVFPQFastScan)
    classic8 = RerankedIndex(data, rows, np.zeros(4000), RerankParams(nlist=16, nprobe=4, pq_m=8))
    xq = np.asarray(data[:200], np.float32) + 0.01
    _, I_ref = _exact(data, rows, xq, 10)
    for idx in (index, classic8):  # 8 bytes per patch, 4-bit fast-scan and 8-bit codes
        D, I = idx.search(xq, 10)
        assert np.mean([np.intersect1d(a, b).size / 10 for a, b in zip(I, I_ref)]) > 0.8
        assert np.all(np.diff(D, axis=1) <= 0)
    again = RerankedIndex(data, rows, np.zeros(4000), RerankParams(nlist=16, nprobe=4, pq_bits=4, pq_m=8))
    np.testing.assert_array_equal(again.search(xq, 10)[1], index.search(xq, 10)[1])  # seeded build


def test_parameter_errors(data):
    rows = np.arange(4000)
    with pytest.raises(ValueError, match="pq_bits must be 4"):
        RerankedIndex(data, rows, np.zeros(4000), RerankParams(pq_bits=6))
    with pytest.raises(ValueError, match="kmeans_iters must be >= 1"):
        RerankedIndex(data, rows, np.zeros(4000), RerankParams(kmeans_iters=0))
    with pytest.raises(ValueError, match="pq_m=12 must divide the feature dimension 32"):
        RerankedIndex(data, rows, np.zeros(4000), RerankParams(pq_m=12))
    with pytest.raises(ValueError, match="64 sub-quantisers, which must divide"):
        RerankedIndex(data, rows, np.zeros(4000), RerankParams(pq_m=32, pq_bits=4))
