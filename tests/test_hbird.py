"""The Hummingbird protocol's pieces on hand-made inputs, the Hungarian metric, and runs end to end."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from PIL import Image

import evaluate
from cribo.backbones import load_backbone
from helpers_data import make_folder_dataset
from index.datasets import open_dataset
from index.hbird import (HbirdOptions, QuerySet, _patch_distributions, memory_view, random_resized_crop_box,
                         run_hbird, sample_patches, score_queries)
from index.matching import hungarian_mapping, linear_assignment, match_confusion, remap_confusion
from index.labels import patch_labels
from index.metrics import confusion_matrix, mean_iou
from index.protocol import score_confusion
from index.store import SupportIndex


# ---------------------------------------------------------------- metric
def test_linear_assignment_is_optimal_against_brute_force():
    rng = np.random.default_rng(0)
    for t in range(60):
        n = int(rng.integers(1, 6))
        cost = rng.integers(0, 4, (n, n)).astype(float) if t % 2 else rng.random((n, n))
        col = linear_assignment(cost)
        assert sorted(col.tolist()) == list(range(n))
        best = min(cost[np.arange(n), list(p)].sum() for p in itertools.permutations(range(n)))
        assert cost[np.arange(n), col].sum() == pytest.approx(best)


def test_hungarian_remaps_swapped_classes():
    conf = np.array([[5, 1, 0], [0, 0, 7], [2, 6, 0]])  # predictions of classes 1 and 2 swapped
    mapping = hungarian_mapping(conf)
    assert mapping.tolist() == [0, 2, 1]
    assert remap_confusion(conf, mapping).tolist() == [[5, 0, 1], [0, 7, 0], [2, 0, 6]]
    assert match_confusion(conf, "identity")[1] is None
    miou_id, _, _ = score_confusion(conf, "identity")
    miou_h, acc_h, _ = score_confusion(conf, "hungarian")
    assert miou_h > miou_id and acc_h == pytest.approx(100 * 18 / 21)
    with pytest.raises(ValueError, match="unknown metric 'best'"):
        match_confusion(conf, "best")


def test_mean_over_all_classes_counts_absent_ones_as_zero():
    conf = np.array([[3, 1, 0], [1, 3, 0], [0, 0, 0]])  # class 2 never seen nor predicted
    assert mean_iou(conf) == pytest.approx(0.6)
    assert mean_iou(conf, "all") == pytest.approx(0.4)
    with pytest.raises(ValueError, match="unknown classes='some'"):
        mean_iou(conf, "some")


# ---------------------------------------------------------------- memory
def test_crop_box_rule():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = random_resized_crop_box(rng, 50, 80)
        assert 0 <= top and top + h <= 50 and 0 <= left and left + w <= 80 and h > 0 and w > 0
    # areas above the image never fit: the centre crop of the whole image, clamped to the aspect range
    assert random_resized_crop_box(rng, 100, 200, scale=(1.5, 2.0)) == (0, 33, 100, 133)
    assert random_resized_crop_box(rng, 100, 120, scale=(1.5, 2.0)) == (0, 0, 100, 120)


def test_memory_view_without_augmentation_is_a_square_resize():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)
    mask = np.array([[0, 1]] * 3 + [[2, 255]] * 3, dtype=np.uint8).repeat(2, axis=1)  # (6, 4)
    x, lab = memory_view(image, mask, 8, "none", rng)
    assert x.shape == (3, 8, 8) and 0 <= x.min() and x.max() <= 1
    assert lab.tolist()[0] == [0, 0, 0, 0, 1, 1, 1, 1] and lab.tolist()[7] == [2, 2, 2, 2, 255, 255, 255, 255]


def test_patch_distributions_void_as_background_or_ignored():
    mask = np.array([[1, 1, 2, 255],
                     [1, 255, 255, 255]], dtype=np.uint8)  # two 2x2 patches
    bg = _patch_distributions(mask, 2, 3, 255, "background")
    assert bg.tolist() == [[0.25, 0.75, 0.0], [0.75, 0.0, 0.25]]
    ign = _patch_distributions(mask, 2, 3, 255, "ignore")
    assert ign.tolist() == [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]


def test_sampling_keeps_rare_class_patches_and_never_empty_ones():
    # one image, 5 patches: four of class 0, one holding classes 0 and 1, one empty (all zeros)
    d = np.zeros((1, 6, 2), np.float32)
    d[0, :5, 0] = 1.0
    d[0, 4] = [0.5, 0.5]
    for seed in range(20):
        keep = sample_patches(d, 5, np.random.default_rng(seed))
        assert keep.shape == (1, 5) and 5 not in keep  # the empty patch (score 1e6) is never kept
    assert sample_patches(d, 2, np.random.default_rng(0)).tolist() == \
        sample_patches(d, 2, np.random.default_rng(0)).tolist()


# ---------------------------------------------------------------- queries
def test_score_queries_golden_nearest():
    # memory: 2 unit vectors with distributions; one query image of 2x2 patches at S = 4
    memory = np.array([[1, 0], [0, 1]], np.float32)
    dists = np.array([[1.0, 0.0, 0.0], [0.0, 0.2, 0.8]], np.float32)
    index = SupportIndex.build(memory, np.array([0, 2]), "flat")
    feats = np.array([[[1, 0], [0, 1], [0.8, 0.6], [0, 1]]], np.float16)  # patches -> memory 0, 1, 0, 1
    masks = np.array([[[0, 0, 2, 2], [0, 0, 2, 1], [0, 255, 2, 2], [0, 0, 2, 2]]], np.uint8)
    q = QuerySet(feats, masks, grid=2, forward_seconds=0.0)
    conf, tm = score_queries(index, dists, q, 1, HbirdOptions(upsample="nearest"), 3, 255)
    # predictions per pixel: [[0,0,2,2],[0,0,2,2],[0,0,2,2],[0,0,2,2]]; one void pixel not scored
    assert conf.tolist() == [[7, 0, 0], [0, 0, 1], [0, 0, 7]]
    assert set(tm) == {"search", "vote", "metric"}


# ---------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    base = tmp_path_factory.mktemp("hbird")
    root = make_folder_dataset(base / "ds", {"train": 6, "val": 3})
    backbone = load_backbone("vit_tiny_patch16_224", random_init=True, seed=0)
    return root, backbone, open_dataset("folder", root, "train"), open_dataset("folder", root, "val")


def test_runs_are_seeded_and_follow_the_results_layout(setup, tmp_path):
    _, backbone, train, val = setup
    kw = dict(options=HbirdOptions(input_size=64, memory_size=40), ratios=(1, 2), seeds=2, k=3, progress=False,
              log=None)
    a = run_hbird(backbone, train, val, out=tmp_path / "r" / "results.json", **kw)
    b = run_hbird(backbone, train, val, **kw)
    assert a["ratios"]["2"]["miou"] == b["ratios"]["2"]["miou"] and a["ratios"]["1"]["miou"] == b["ratios"]["1"]["miou"]
    assert a["protocol"] == "hbird" and a["hbird"]["memory_size"] == 40 and a["score_classes"] == "all"
    assert a["ratios"]["2"]["num_support_patches"] == [39, 39]  # 40 // 3 images = 13 patches each
    assert a["ratios"]["1"]["num_support_patches"] == [36]  # 40 // 6 = 6 each
    assert json.loads((tmp_path / "r" / "results.json").read_text())["protocol"] == "hbird"
    assert a["timing"]["forward"] > 0 and "memory" in a["timing"]


def test_no_augmentation_with_every_patch_and_a_memory_of_the_queries_themselves(setup):
    # memory = the query split itself, unaugmented, void ignored, k = 1, nearest upsampling: every
    # query patch finds itself, so each pixel gets its patch's majority class (ties: smallest id)
    _, backbone, _, val = setup
    opts = HbirdOptions(input_size=64, augment="none", void_label="ignore", upsample="nearest", pixel_std="imagenet")
    res = run_hbird(backbone, val, val, options=opts, ratios=(1,), seeds=1, k=1, progress=False, log=None,
                    score_classes="present")
    C = len(val.class_names)
    conf = np.zeros((C, C), np.int64)
    for i in range(len(val.ids)):
        mask = np.asarray(Image.fromarray(val.load_mask(i)).resize((64, 64), Image.Resampling.NEAREST))
        majority = patch_labels(mask, 16, C).reshape(4, 4)
        pred = np.kron(majority, np.ones((16, 16), np.int64))
        conf += confusion_matrix(pred, mask, C)
    miou, acc, _ = score_confusion(conf)
    assert res["ratios"]["1"]["miou"][0] == pytest.approx(miou)
    assert res["ratios"]["1"]["pixel_accuracy"][0] == pytest.approx(acc)


def test_cli_hbird_flags_and_errors(setup, tmp_path, capsys):
    root, *_ = setup
    base = ["--dataset", "folder", "--root", str(root), "--backbone", "vit_tiny_patch16_224", "--random-init",
            "--ratios", "2", "--seeds", "1", "--workers", "0", "--out", str(tmp_path / "results.json")]
    assert evaluate.main(base + ["--input-size", "64"]) == 2
    assert "--input-size only apply to --protocol hbird" in capsys.readouterr().err
    assert evaluate.main(base + ["--protocol", "hbird", "--input-size", "60"]) == 2
    assert "--input-size 60 must be a positive multiple of the backbone's patch size 16" in capsys.readouterr().err
    assert evaluate.main(base + ["--protocol", "hbird", "--vote", "soft"]) == 2
    assert "--vote/--level belong to the cribo protocol" in capsys.readouterr().err
    assert evaluate.main(base + ["--protocol", "hbird", "--input-size", "64", "--metric", "hungarian"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert (res["k"], res["metric"], res["hbird"]["input_size"]) == (30, "hungarian", 64)
    assert "time split: forward" in capsys.readouterr().out
    assert res["ratios"]["2"]["miou_identity"][0] <= res["ratios"]["2"]["miou"][0]


def test_patch_14_registers_model_runs_the_hbird_protocol(setup):
    _, _, train, val = setup
    bb = load_backbone("vit_small_patch14_reg4_dinov2", random_init=True, seed=0)
    res = run_hbird(bb, train, val, options=HbirdOptions(input_size=56), ratios=(2,), seeds=1, k=3,
                    progress=False, log=None)
    assert res["patch_size"] == 14 and res["num_query_patches"] == 3 * 16
    assert res["ratios"]["2"]["num_support_patches"] == [3 * 16]
    with pytest.raises(ValueError, match="--input-size 64 must be a positive multiple of the backbone's patch size 14"):
        run_hbird(bb, train, val, options=HbirdOptions(input_size=64), ratios=(2,), seeds=1, progress=False, log=None)
