"""FAISS support indices: exactness against brute force, approximate recall, persistence, errors."""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest

from index.store import (INDEX_KINDS, IncompatibleIndexError, IndexLoadError, IndexParams, SupportIndex,
                         default_nlist, select_support)
from index.transfer import knn_vote


def unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def clustered(rng: np.random.Generator, n: int, d: int, centres: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors around ``centres`` random directions; label = centre id mod 5."""
    c = unit_rows(rng, centres, d)
    lab = rng.integers(0, centres, n)
    x = c[lab] + 0.35 * rng.standard_normal((n, d)).astype(np.float32) / np.sqrt(d)
    return x / np.linalg.norm(x, axis=1, keepdims=True), lab % 5


def brute_force(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    sims = xq.astype(np.float64) @ xb.astype(np.float64).T
    I = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, I, axis=1), I


@pytest.mark.parametrize("d,k", [(8, 1), (32, 10), (64, 50)])
def test_flat_matches_brute_force(d, k):
    rng = np.random.default_rng(d)
    xb, xq = unit_rows(rng, 400, d), unit_rows(rng, 60, d)
    xb[7] = xb[3]  # an exact duplicate: a tie that either order may resolve
    index = SupportIndex.build(xb, np.zeros(400, np.int64), "flat")
    D, I = index.search(xq, k)
    D_ref, I_ref = brute_force(xq, xb, k)
    assert D.shape == I.shape == (60, k) and I.dtype == np.int64
    np.testing.assert_allclose(D, D_ref, atol=1e-5)
    # tie-tolerant: every returned id has the brute-force similarity of its rank, and ids are distinct
    true_sims = np.take_along_axis(xq.astype(np.float64) @ xb.astype(np.float64).T, I, axis=1)
    np.testing.assert_allclose(true_sims, D_ref, atol=1e-5)
    assert all(len(set(row)) == k for row in I.tolist())
    gap = D_ref[:, :-1] - D_ref[:, 1:]
    clear = np.concatenate([gap > 1e-4, np.ones((60, 1), bool)], axis=1) & np.concatenate(
        [np.ones((60, 1), bool), gap > 1e-4], axis=1)
    assert (I[clear] == I_ref[clear]).all()  # away from near-ties the ids agree exactly


def test_float16_input_is_indexed_as_float32_values():
    rng = np.random.default_rng(0)
    xb16 = unit_rows(rng, 100, 16).astype(np.float16)
    a = SupportIndex.build(xb16, np.zeros(100, np.int64), "flat")
    b = SupportIndex.build(xb16.astype(np.float32), np.zeros(100, np.int64), "flat")
    xq = unit_rows(rng, 10, 16)
    for x, y in zip(a.search(xq, 5), b.search(xq, 5)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_recall(kind):
    rng = np.random.default_rng(1)
    xb, labels = clustered(rng, 4000, 32)
    xq, _ = clustered(rng, 200, 32)
    exact = SupportIndex.build(xb, labels, "flat")
    # tight clusters make HNSW hop between them: a wide beam is needed (0.82 recall at efSearch 128)
    approx = SupportIndex.build(xb, labels, kind, params=IndexParams(nprobe=16, ef_search=512))
    _, I_ref = exact.search(xq, 10)
    _, I = approx.search(xq, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(I.tolist(), I_ref.tolist())])
    assert recall > 0.9
    assert approx.kind == kind and approx.ntotal == 4000


def test_ivf_uses_default_nlist_and_fp16_storage():
    rng = np.random.default_rng(2)
    xb = unit_rows(rng, 3000, 16)
    index = SupportIndex.build(xb, np.zeros(3000, np.int64), "ivf")
    ivf = faiss.extract_index_ivf(index.index)
    assert ivf.nlist == default_nlist(3000) == min(round(4 * np.sqrt(3000)), 3000 // 39)
    assert isinstance(index.index, faiss.IndexIVFScalarQuantizer)
    assert index.index.sq.qtype == faiss.ScalarQuantizer.QT_fp16
    assert default_nlist(10) == 1 and default_nlist(1_000_000) == 4000


def test_k_larger_than_index_is_a_clear_error():
    index = SupportIndex.build(unit_rows(np.random.default_rng(0), 5, 8), np.arange(5), "flat")
    with pytest.raises(ValueError, match=r"k=6 larger than the index \(5 vectors\)"):
        index.search(unit_rows(np.random.default_rng(1), 2, 8), 6)


def test_build_rejects_bad_inputs():
    x = unit_rows(np.random.default_rng(0), 5, 8)
    with pytest.raises(ValueError, match="unknown index kind 'lsh'"):
        SupportIndex.build(x, np.arange(5), "lsh")
    with pytest.raises(ValueError, match="unlabelled patches"):
        SupportIndex.build(x, np.array([0, 1, -1, 2, 3]), "flat")
    with pytest.raises(ValueError, match=r"labels must have shape \(5,\)"):
        SupportIndex.build(x, np.arange(4), "flat")
    with pytest.raises(ValueError, match="no labelled patch"):
        SupportIndex.build(np.zeros((0, 8), np.float32), np.zeros(0, np.int64), "flat")


def test_add_extends_vectors_and_labels():
    rng = np.random.default_rng(3)
    xb = unit_rows(rng, 50, 8)
    index = SupportIndex.build(xb[:40], np.zeros(40, np.int64), "flat")
    index.add(xb[40:], np.full(10, 3))
    assert index.ntotal == 50 and index.labels.tolist() == [0] * 40 + [3] * 10
    _, I = index.search(xb[40:], 1)
    assert I[:, 0].tolist() == list(range(40, 50))
    with pytest.raises(ValueError, match="dimension 4"):
        index.add(unit_rows(rng, 2, 4), np.zeros(2, np.int64))


META = {"backbone": {"identity": "random:vit_tiny_patch16_224:seed0", "source": "test"}, "ratio": 8, "seed": 1}


@pytest.mark.parametrize("kind", sorted(INDEX_KINDS))
def test_save_load_round_trip_gives_identical_predictions(tmp_path, kind):
    rng = np.random.default_rng(4)
    xb, labels = clustered(rng, 2000, 16)
    xq, _ = clustered(rng, 100, 16)
    index = SupportIndex.build(xb, labels, kind, meta=META, params=IndexParams(nprobe=4, ef_search=32))
    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["index.faiss", "labels.npy", "meta.json"]
    loaded = SupportIndex.load(tmp_path / "idx")
    assert loaded.kind == kind and loaded.params == index.params and loaded.ntotal == 2000
    assert loaded.meta["ratio"] == 8 and loaded.meta["faiss_version"] == faiss.__version__
    np.testing.assert_array_equal(loaded.labels, labels)
    D0, I0 = index.search(xq, 20)
    D1, I1 = loaded.search(xq, 20)
    np.testing.assert_array_equal(I0, I1)
    np.testing.assert_array_equal(D0, D1)
    p0, _ = knn_vote(I0, index.labels, 5, D0)
    p1, _ = knn_vote(I1, loaded.labels, 5, D1)
    np.testing.assert_array_equal(p0, p1)
    assert np.load(tmp_path / "idx" / "labels.npy", allow_pickle=False).dtype == np.int64


def saved(tmp_path: Path) -> Path:
    x = unit_rows(np.random.default_rng(5), 30, 8)
    return SupportIndex.build(x, np.arange(30) % 3, "flat", meta=META).save(tmp_path / "idx")


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(IndexLoadError, match="not found"):
        SupportIndex.load(tmp_path / "nowhere")
    d = saved(tmp_path)
    (d / "labels.npy").unlink()
    with pytest.raises(IndexLoadError, match="missing labels.npy"):
        SupportIndex.load(d)

    d = saved(tmp_path)
    np.save(d / "labels.npy", np.zeros(29, np.int64))
    with pytest.raises(IndexLoadError, match="30 vectors, labels.npy 29"):
        SupportIndex.load(d)

    d = saved(tmp_path)
    np.save(d / "labels.npy", np.array([{"a": 1}] * 30, dtype=object), allow_pickle=True)
    with pytest.raises(IndexLoadError, match="not a plain numpy array"):
        SupportIndex.load(d)

    d = saved(tmp_path)
    meta = json.loads((d / "meta.json").read_text())
    del meta["dim"]
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexLoadError, match=r"lacks keys \['dim'\]"):
        SupportIndex.load(d)

    d = saved(tmp_path)
    (d / "index.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(IndexLoadError, match="not a readable FAISS index"):
        SupportIndex.load(d)


def test_check_compatible_refuses_another_backbone(tmp_path):
    loaded = SupportIndex.load(saved(tmp_path))
    loaded.check_compatible(SimpleNamespace(identity="random:vit_tiny_patch16_224:seed0", source="x"))
    with pytest.raises(IncompatibleIndexError, match="built with backbone 'random:vit_tiny_patch16_224:seed0'"):
        loaded.check_compatible(SimpleNamespace(identity="random:vit_tiny_patch16_224:seed1", source="x"))
    bare = SupportIndex.build(unit_rows(np.random.default_rng(0), 3, 8), np.arange(3), "flat")
    with pytest.raises(IncompatibleIndexError, match="records no backbone identity"):
        bare.check_compatible(SimpleNamespace(identity="a", source="x"))


def test_failed_save_keeps_the_existing_index(tmp_path, monkeypatch):
    d = saved(tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    other = SupportIndex.build(unit_rows(np.random.default_rng(9), 12, 8), np.zeros(12, np.int64), "flat")

    def broken_write(index, path):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("disk full")

    monkeypatch.setattr(faiss, "write_index", broken_write)
    with pytest.raises(RuntimeError, match="disk full"):
        other.save(d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    # no temporary directory left behind: only the link and the one version it points to
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["idx", os.readlink(d)])
    monkeypatch.undo()
    other.save(d)  # a good save replaces it
    assert SupportIndex.load(d).ntotal == 12


def test_search_params_can_change_after_loading(tmp_path):
    rng = np.random.default_rng(6)
    xb, labels = clustered(rng, 2000, 16)
    SupportIndex.build(xb, labels, "ivf", params=IndexParams(nprobe=2)).save(tmp_path / "ivf")
    loaded = SupportIndex.load(tmp_path / "ivf")
    assert faiss.extract_index_ivf(loaded.index).nprobe == 2
    loaded.set_search_params(nprobe=64)
    assert faiss.extract_index_ivf(loaded.index).nprobe == 64 and loaded.params.nprobe == 64
    with pytest.raises(ValueError, match="ef_search applies to hnsw"):
        loaded.set_search_params(ef_search=10)


def test_gpu_request_without_faiss_gpu_is_an_error():
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        pytest.skip("faiss-gpu with a GPU: the request is valid here")
    x = unit_rows(np.random.default_rng(0), 10, 8)
    with pytest.raises(RuntimeError, match="install faiss-gpu"):
        SupportIndex.build(x, np.zeros(10, np.int64), "flat", gpu=True)
    assert SupportIndex.build(x, np.zeros(10, np.int64), "flat").search_device == "cpu"


IDS = [f"{i:04d}" for i in range(311)]


@pytest.mark.parametrize("ratio,expected", [(1, 311), (8, 39), (64, 5), (128, 2)])
def test_select_support_counts(ratio, expected):
    chosen = select_support(IDS, ratio, seed=3)
    assert len(chosen) == expected == round(311 / ratio)
    assert len(set(chosen)) == expected and set(chosen) <= set(IDS)
    assert chosen == sorted(chosen, key=IDS.index)  # dataset order


def test_select_support_is_deterministic_and_seeded():
    a, b = select_support(IDS, 8, 0), select_support(IDS, 8, 0)
    assert a == b
    assert select_support(IDS, 8, 1) != a
    expected = sorted(np.random.default_rng(0).choice(311, size=39, replace=False).tolist())
    assert a == [IDS[i] for i in expected]
    assert select_support(IDS, 1, 0) == select_support(IDS, 1, 7) == IDS
    assert len(select_support(IDS[:5], 2, 0)) == 3  # round half up: 2.5 -> 3


def test_select_support_errors():
    with pytest.raises(ValueError, match="ratio must be an integer >= 1"):
        select_support(IDS, 0, 0)
    with pytest.raises(ValueError, match="keeps no image"):
        select_support(IDS[:3], 8, 0)


def test_index_params_for_run_keep_the_knobs_and_take_the_run_seed():
    assert IndexParams.for_run(None, 3) == IndexParams(seed=3)
    assert IndexParams.for_run(IndexParams(nlist=7, nprobe=2, seed=9), 4) == IndexParams(nlist=7, nprobe=2, seed=4)
