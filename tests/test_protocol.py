"""The retrieval protocol end to end on a tiny folder dataset: JSON contract and independent recomputation."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from cribo.backbones import load_backbone
from helpers_data import make_folder_dataset
from index.datasets import open_dataset
from index.features import extract_features
from index.labels import paint_patches
from index.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from index.protocol import build_support_index, run_protocol
from index.report import format_table, report_paths
from index.store import SupportIndex, select_support
from index.transfer import knn_vote

K = 5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("protocol")
    root = make_folder_dataset(base / "ds", {"train": 9, "val": 4})
    backbone = load_backbone("vit_tiny_patch16_224", random_init=True, seed=0)
    train, val = open_dataset("folder", root, "train"), open_dataset("folder", root, "val")
    return backbone, train, val, base / "cache"


def run(setup, tmp_path, **kw):
    backbone, train, val, cache = setup
    args = dict(ratios=(1, 2, 4), seeds=3, k=K, cache_dir=cache, num_workers=0, progress=False, log=None)
    return run_protocol(backbone, train, val, **{**args, **kw})


def test_results_follow_the_json_contract(setup, tmp_path):
    out = tmp_path / "res" / "results.json"
    res = run(setup, tmp_path, out=out)
    assert set(res["ratios"]) == {"1", "2", "4"}
    for r, n_runs, n_images in (("1", 1, 9), ("2", 3, 5), ("4", 3, 2)):  # round(9/2) = 5 (half up)
        e = res["ratios"][r]
        assert len(e["miou"]) == n_runs and e["seeds"] == list(range(n_runs))
        assert e["mean"] == pytest.approx(np.mean(e["miou"])) and e["std"] == pytest.approx(np.std(e["miou"]))
        assert [len(ids) for ids in e["support_ids"]] == [n_images] * n_runs
        assert e["support_ids"] == [select_support(setup[1].ids, int(r), s) for s in e["seeds"]]
        assert all(0 <= m <= 100 for m in e["miou"]) and len(e["per_class_iou"][0]) == 4
    assert res["ratios"]["1"]["std"] == 0.0
    assert res["class_names"] == ["background", "red", "green", "blue"] and res["k"] == K
    assert set(res["timing"]) >= {"forward", "search", "vote", "metric", "total"}
    on_disk = json.loads(out.read_text())
    assert on_disk["ratios"]["2"]["miou"] == res["ratios"]["2"]["miou"]
    paths = report_paths(out)
    assert all(p.is_file() for p in paths.values())
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = list(csv.DictReader(paths["csv"].open()))
    assert [r["seed"] for r in rows if r["ratio"] == "4"] == ["0", "1", "2", "mean", "std"]
    assert "| 1/4 |" in paths["md"].read_text()
    assert format_table(res).splitlines()[2].startswith("1/4 ")  # least data first


def test_miou_equals_a_direct_recomputation(setup, tmp_path):
    backbone, train, val, cache = setup
    res = run(setup, tmp_path)
    tr = extract_features(backbone, train, cache, num_workers=0, progress=False)
    va = extract_features(backbone, val, cache, num_workers=0, progress=False)
    q = va.labels >= 0
    xq, gt = va.features[q].astype(np.float32), va.labels[q]
    for r, e in res["ratios"].items():
        for j, ids in enumerate(e["support_ids"]):
            images = [train.ids.index(i) for i in ids]
            rows = np.concatenate([np.arange(tr.offsets[i], tr.offsets[i + 1]) for i in images])
            rows = rows[tr.labels[rows] >= 0]
            xb = tr.features[rows].astype(np.float64)
            sims = xq.astype(np.float64) @ xb.T
            I = np.argsort(-sims, axis=1, kind="stable")[:, :K]  # brute force, no FAISS
            pred, _ = knn_vote(I, tr.labels[rows], 4)
            conf = confusion_matrix(pred, gt, 4)
            assert e["miou"][j] == pytest.approx(100 * mean_iou(conf), abs=1e-9), (r, j)
            assert e["pixel_accuracy"][j] == pytest.approx(100 * pixel_accuracy(conf))
            iou = 100 * iou_per_class(conf)
            assert e["per_class_iou"][j] == [None if np.isnan(v) else pytest.approx(v) for v in iou]


def test_pixel_level_equals_painting_each_image(setup, tmp_path):
    backbone, train, val, cache = setup
    res = run(setup, tmp_path, ratios=(1,), level="pixel")
    tr = extract_features(backbone, train, cache, num_workers=0, progress=False)
    va = extract_features(backbone, val, cache, num_workers=0, progress=False)
    rows = np.nonzero(tr.labels >= 0)[0]
    index = SupportIndex.build(tr.features[rows], tr.labels[rows], "flat")
    D, I = index.search(va.features, K)  # every query patch, labelled or not
    pred, _ = knn_vote(I, index.labels, 4, D)
    conf = np.zeros((4, 4), np.int64)
    for i in range(len(val)):
        mask = val.load_mask(i)
        painted = paint_patches(pred[va.image_rows(i)], tuple(va.grids[i]), 16, mask.shape)
        conf += confusion_matrix(painted, mask, 4)
    assert res["ratios"]["1"]["miou"][0] == pytest.approx(100 * mean_iou(conf), abs=1e-9)
    assert res["level"] == "pixel"


def test_soft_vote_with_one_neighbour_equals_majority(setup, tmp_path):
    soft = run(setup, tmp_path, ratios=(1, 4), seeds=2, k=1, vote="soft")
    hard = run(setup, tmp_path, ratios=(1, 4), seeds=2, k=1, vote="majority")
    for r in ("1", "4"):
        assert soft["ratios"][r]["miou"] == pytest.approx(hard["ratios"][r]["miou"])
    assert soft["vote"] == "soft"


def test_approximate_index_kind_runs(setup, tmp_path):
    res = run(setup, tmp_path, ratios=(1,), index_kind="hnsw")
    exact = run(setup, tmp_path, ratios=(1,))
    # 100+ support vectors, a wide beam: HNSW finds the exact neighbours on data this small
    assert res["index"] == "hnsw" and res["ratios"]["1"]["miou"] == pytest.approx(exact["ratios"]["1"]["miou"])


def test_protocol_argument_errors(setup, tmp_path):
    with pytest.raises(ValueError, match="larger than the index"):
        run(setup, tmp_path, ratios=(4,), k=10_000)
    with pytest.raises(ValueError, match="unknown vote 'mode'"):
        run(setup, tmp_path, vote="mode")
    with pytest.raises(ValueError, match="unknown level 'image'"):
        run(setup, tmp_path, level="image")
    with pytest.raises(ValueError, match="ratios must be distinct integers >= 1"):
        run(setup, tmp_path, ratios=(1, 1))
    backbone, train, _, cache = setup
    other = open_dataset("folder", make_folder_dataset(tmp_path / "o", {"val": 2}), "val")
    other.class_names = ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="different class names"):
        run_protocol(backbone, train, other, cache_dir=cache, progress=False, log=None)


def test_build_support_index_meta_and_round_trip(setup, tmp_path):
    backbone, train, _, cache = setup
    index = build_support_index(backbone, train, ratio=4, seed=1, kind="flat", cache_dir=cache,
                                num_workers=0, progress=False, out=tmp_path / "idx")
    fs = extract_features(backbone, train, cache, num_workers=0, progress=False)
    ids = select_support(train.ids, 4, 1)
    labelled = sum(int((fs.labels[fs.image_rows(train.ids.index(i))] >= 0).sum()) for i in ids)
    loaded = SupportIndex.load(tmp_path / "idx")
    loaded.check_compatible(backbone)
    assert loaded.ntotal == index.ntotal == labelled
    m = loaded.meta
    assert m["image_ids"] == ids and m["ratio"] == 4 and m["seed"] == 1 and m["split"] == "train"
    assert m["backbone"]["identity"] == backbone.identity and m["patch_size"] == 16
    assert m["resolution_rule"] == "floor-to-patch-multiple" and m["class_names"][1] == "red"
    assert m["dataset"]["kind"] == "folder" and m["kind"] == "flat" and m["dim"] == 192
