"""Exact search in plain torch (--index torch) against faiss exact search, on the CPU."""
from __future__ import annotations

import faiss
import numpy as np
import pytest

from cribo.backbones import load_backbone
from helpers_data import make_folder_dataset
from index.datasets import open_dataset
from index.protocol import run_protocol
from index.search import SEARCH_KINDS, build_search_index
from index.torch_search import TorchExactIndex
from index.store import IndexParams, SupportIndex


def _unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("query_chunk,base_chunk", [(64, 700), (1000, 5000), (7, 3)])
def test_equals_faiss_flat_inner_product(query_chunk, base_chunk):
    rng = np.random.default_rng(0)
    xb, xq = _unit(rng, 3000, 32), _unit(rng, 200, 32)
    ref = faiss.IndexFlatIP(32)
    ref.add(xb)
    D_ref, I_ref = ref.search(xq, 10)
    index = TorchExactIndex(xb, np.zeros(3000, np.int64), query_chunk=query_chunk, base_chunk=base_chunk)
    D, I = index.search(xq, 10)
    assert D.dtype == np.float32 and I.dtype == np.int64 and D.shape == I.shape == (200, 10)
    np.testing.assert_array_equal(I, I_ref)
    np.testing.assert_allclose(D, D_ref, atol=1e-5)


def test_float16_features_and_k_equal_to_n():
    rng = np.random.default_rng(1)
    xb = _unit(rng, 50, 8).astype(np.float16)  # the feature cache's dtype
    index = TorchExactIndex(xb, np.arange(50), base_chunk=16)
    D, I = index.search(xb[:5], 50)
    assert I[:, 0].tolist() == [0, 1, 2, 3, 4]
    assert sorted(I[0].tolist()) == list(range(50)) and np.all(np.diff(D, axis=1) <= 0)


def test_errors_name_the_problem():
    xb = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"must be a 2-D array \(n, D\)"):
        TorchExactIndex(xb[0], np.zeros(4))
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\)"):
        TorchExactIndex(xb, np.zeros(3))
    with pytest.raises(ValueError, match="dtype must be one of"):
        TorchExactIndex(xb, np.zeros(4), dtype="int8")
    index = TorchExactIndex(xb, np.zeros(4))
    with pytest.raises(ValueError, match=r"queries must be \(nq, 3\)"):
        index.search(np.zeros((2, 5), np.float32), 1)
    with pytest.raises(ValueError, match="larger than the index"):
        index.search(np.zeros((2, 3), np.float32), 5)


def test_kinds_and_dispatch():
    assert SEARCH_KINDS == ("flat", "hnsw", "ivf", "ivfpq", "torch")
    xb, labels = np.eye(4, dtype=np.float32), np.arange(3)
    index = build_search_index(xb, np.array([3, 1, 2]), labels, "torch", params=IndexParams())
    assert isinstance(index, TorchExactIndex) and index.search(xb[[1]], 1)[1].tolist() == [[1]]
    assert isinstance(build_search_index(xb, np.arange(3), labels, "flat", params=IndexParams()), SupportIndex)
    with pytest.raises(ValueError, match="unknown index kind 'lsh'"):
        build_search_index(xb, np.arange(3), labels, "lsh", params=IndexParams())


def test_protocol_with_torch_search_equals_faiss_flat(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", {"train": 6, "val": 3})
    bb = load_backbone("vit_tiny_patch16_224", random_init=True, seed=0)
    train, val = open_dataset("folder", root, "train"), open_dataset("folder", root, "val")
    kw = dict(ratios=(1, 2), seeds=2, k=5, cache_dir=tmp_path / "cache", num_workers=0, progress=False, log=None)
    flat = run_protocol(bb, train, val, index_kind="flat", **kw)
    torch_ = run_protocol(bb, train, val, index_kind="torch", **kw)
    for r in ("1", "2"):
        assert torch_["ratios"][r]["miou"] == flat["ratios"][r]["miou"]
    assert torch_["index"] == "torch"
