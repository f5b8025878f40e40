"""IVF-PQ with exact re-ranking from memory-mapped features (--index ivfpq) against exact search."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from cribo.backbones import load_backbone
from helpers_data import clustered_feature_cache, make_folder_dataset
from index.datasets import open_dataset
from index.protocol import run_protocol
from index.reranked import RerankedIndex, RerankParams
from index.store import IndexParams


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return clustered_feature_cache(tmp_path_factory.mktemp("rr") / "features.npy", 6000, seed=0)


def _exact(features, rows, xq, k):
    ref = faiss.IndexFlatIP(features.shape[1])
    ref.add(np.asarray(features[rows], np.float32))
    return ref.search(xq, k)


def test_reranking_every_candidate_is_exact(data):
    rows = np.arange(1000, 6000)
    xq = np.asarray(data[:200], np.float32)
    # every list visited and every support patch re-ranked: the exact top-k
    index = RerankedIndex(data, rows, np.zeros(5000), RerankParams(nlist=16, pq_m=8, nprobe=16, rerank=500,
                                                                   query_chunk=64))
    D, I = index.search(xq, 10)
    D_ref, I_ref = _exact(data, rows, xq, 10)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, atol=1e-5)


def test_default_reranking_recall_and_exact_similarities(data):
    rows = np.arange(1000, 6000)
    xq = np.asarray(data[:200], np.float32) + 0.01
    index = RerankedIndex(data, rows, np.zeros(5000), RerankParams(nlist=32, pq_m=8, nprobe=8))
    D, I = index.search(xq, 10)
    _, I_ref = _exact(data, rows, xq, 10)
    recall = np.mean([np.intersect1d(a, b).size / 10 for a, b in zip(I, I_ref)])
    assert recall > 0.9
    exact = np.einsum("qkd,qd->qk", np.asarray(data[rows[I]], np.float32), xq)  # similarities are exact ones
    np.testing.assert_allclose(D, exact, atol=1e-5)
    assert np.all(np.diff(D, axis=1) <= 0) and index.memory_bytes() < rows.size * 32 * 2


def test_errors(data):
    rows = np.arange(6000)
    with pytest.raises(ValueError, match="pq_m=7 must divide the feature dimension 32"):
        RerankedIndex(data, rows, np.zeros(6000), RerankParams(pq_m=7))
    with pytest.raises(ValueError, match="too few for IVF-PQ.*use --index flat"):
        RerankedIndex(data, rows[:200], np.zeros(200), RerankParams(pq_m=8))
    with pytest.raises(ValueError, match=r"labels must have shape \(6000,\)"):
        RerankedIndex(data, rows, np.zeros(5), RerankParams(pq_m=8))


def test_protocol_runs_with_ivfpq(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", {"train": 8, "val": 2}, sizes=((128, 128),))
    bb = load_backbone("vit_tiny_patch16_224", random_init=True, seed=0)
    train, val = open_dataset("folder", root, "train"), open_dataset("folder", root, "val")
    kw = dict(ratios=(1,), seeds=1, k=5, cache_dir=tmp_path / "cache", num_workers=0, progress=False, log=None)
    flat = run_protocol(bb, train, val, index_kind="flat", **kw)
    pq = run_protocol(bb, train, val, index_kind="ivfpq", index_params=IndexParams(nlist=4, nprobe=4), **kw)
    assert pq["index"] == "ivfpq"
    assert pq["ratios"]["1"]["num_support_patches"] == flat["ratios"]["1"]["num_support_patches"] == [496]
    assert abs(pq["ratios"]["1"]["miou"][0] - flat["ratios"]["1"]["miou"][0]) < 10
