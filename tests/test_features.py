"""Feature extraction at the protocol resolution: values, layout, labels, cache reuse and separation."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cribo.backbones import load_backbone
from helpers_data import make_folder_dataset
from index.datasets import open_dataset
from cribo.constants import IMAGENET_MEAN, IMAGENET_STD
from index.features import (FeatureSet, cache_key, dataset_fingerprint,
                            extract_features, size_batches)
from index.labels import patch_labels, protocol_size, resize_image, resize_mask


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = make_folder_dataset(tmp_path_factory.mktemp("data") / "ds", {"train": 6, "val": 3},
                               sizes=((48, 64), (64, 48), (50, 70)))
    return open_dataset("folder", root, "train")


@pytest.fixture(scope="module")
def vit():
    return load_backbone("vit_tiny_patch16_224", random_init=True, seed=0)


class CountingForward:
    """Wraps ``backbone.forward_features`` to count calls and images."""

    def __init__(self, backbone, monkeypatch):
        self.calls, self.images = 0, 0
        original = backbone.forward_features

        def counted(x):
            self.calls += 1
            self.images += x.shape[0]
            return original(x)

        monkeypatch.setattr(backbone, "forward_features", counted)


def reference_features(backbone, image: np.ndarray) -> np.ndarray:
    """Independent single-image computation of the protocol's features, float32 (h*w, D)."""
    size = protocol_size(*image.shape[:2], backbone.patch_size)
    x = torch.tensor(resize_image(image, size)).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        tokens = backbone.forward_features(x)["x_norm_patchtokens"][0]
    return F.normalize(tokens, dim=-1).numpy()


def test_features_layout_values_and_labels(tiny, vit, tmp_path):
    fs = extract_features(vit, tiny, tmp_path, precision="fp32", batch_size=4, num_workers=0, progress=False)
    p = vit.patch_size
    assert isinstance(fs, FeatureSet) and fs.ids == tiny.ids and fs.meta["cached"] is False
    # sizes 48x64 -> 3x4, 64x48 -> 4x3, 50x70 -> 48x64 -> 3x4 patches
    assert fs.grids.tolist() == [[3, 4], [4, 3], [3, 4], [3, 4], [4, 3], [3, 4]]
    assert fs.sizes.tolist() == [[48, 64], [64, 48], [50, 70]] * 2
    assert fs.offsets.tolist() == [0, 12, 24, 36, 48, 60, 72]
    assert fs.features.shape == (72, 192) and fs.features.dtype == np.float16
    assert isinstance(fs.features, np.memmap) and not fs.features.flags.writeable
    np.testing.assert_allclose(np.linalg.norm(fs.features.astype(np.float32), axis=1), 1.0, atol=2e-3)
    for i in range(len(tiny)):
        ref = reference_features(vit, tiny.load_image(i))
        np.testing.assert_allclose(fs.features[fs.image_rows(i)].astype(np.float32), ref, atol=2e-3)
        mask = tiny.load_mask(i)
        expected = patch_labels(resize_mask(mask, protocol_size(*mask.shape, p)), p, 4)
        np.testing.assert_array_equal(fs.labels[fs.image_rows(i)], expected)
    assert (fs.labels == -1).any() and (fs.labels >= 0).any()  # the void strip leaves unlabelled patches
    meta = json.loads((fs.path / "meta.json").read_text())
    assert meta["precision"] == "fp32" and meta["resolution_rule"] == "floor-to-patch-multiple"
    assert meta["forward_seconds"] > 0 and meta["backbone"] == vit.identity
    assert sorted(q.name for q in fs.path.iterdir()) == ["features.npy", "labels.npy", "meta.json"]


def test_cache_is_reused_without_any_forward(tiny, vit, tmp_path, monkeypatch):
    first = extract_features(vit, tiny, tmp_path, precision="fp32", num_workers=0, progress=False)
    counter = CountingForward(vit, monkeypatch)
    second = extract_features(vit, tiny, tmp_path, precision="fp32", num_workers=0, progress=False)
    assert counter.calls == 0 and second.meta["cached"] is True
    assert second.path == first.path
    np.testing.assert_array_equal(second.features, first.features)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # one entry, no temporary left


def test_cache_is_separated_by_backbone_identity(tiny, vit, tmp_path, monkeypatch):
    a = extract_features(vit, tiny, tmp_path, precision="fp32", num_workers=0, progress=False)
    other = load_backbone("vit_tiny_patch16_224", random_init=True, seed=1)
    counter = CountingForward(other, monkeypatch)
    b = extract_features(other, tiny, tmp_path, precision="fp32", num_workers=0, progress=False)
    assert counter.images == len(tiny) and b.meta["cached"] is False
    assert a.path != b.path and b.meta["backbone"] == "random:vit_tiny_patch16_224:seed1"
    assert not np.allclose(a.features.astype(np.float32), b.features.astype(np.float32), atol=0.05)
    # the resolved precision and the dataset content are part of the key too
    fp = dataset_fingerprint(tiny)
    keys = {cache_key(vit.identity, fp, "fp32"), cache_key(vit.identity, fp, "bf16"),
            cache_key(vit.identity, {**fp, "split": "val"}, "fp32"), cache_key(other.identity, fp, "fp32")}
    assert len(keys) == 4 and cache_key(vit.identity, dict(fp), "fp32") == a.path.name


def test_batches_group_equal_sizes_and_workers_give_the_same_features(tiny, vit, tmp_path, monkeypatch):
    counter = CountingForward(vit, monkeypatch)
    serial = extract_features(vit, tiny, tmp_path / "a", precision="fp32", batch_size=16, num_workers=0,
                              progress=False)
    assert counter.calls == 2  # two protocol sizes (50x70 floors to 48x64), one batch each
    workers = extract_features(vit, tiny, tmp_path / "b", precision="fp32", batch_size=2, num_workers=2,
                               progress=False)
    np.testing.assert_allclose(workers.features.astype(np.float32), serial.features.astype(np.float32), atol=2e-3)
    np.testing.assert_array_equal(workers.labels, serial.labels)


def test_size_batches():
    sizes = np.array([[32, 48], [48, 32], [32, 48], [32, 48], [48, 32], [16, 16]])
    batches = size_batches(sizes, 2)
    assert batches == [[0, 2], [3], [1, 4], [5]]
    assert sorted(i for b in batches for i in b) == list(range(6))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        size_batches(sizes, 0)


def test_rows_of_selects_image_rows_and_labelled_patches():
    fs = FeatureSet(features=np.zeros((9, 2), np.float16), labels=np.array([0, -1, 2, 1, 1, -1, -1, 3, 0]),
                    offsets=np.array([0, 2, 5, 9]), grids=np.zeros((3, 2), np.int64),
                    sizes=np.zeros((3, 2), np.int64), ids=["a", "b", "c"])
    assert fs.rows_of([2, 0]).tolist() == [5, 6, 7, 8, 0, 1]
    assert fs.rows_of([0, 2], labelled_only=True).tolist() == [0, 7, 8]
    assert fs.rows_of([]).tolist() == []


def test_failed_extraction_leaves_no_cache(tiny, vit, tmp_path, monkeypatch):
    def broken(x):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(vit, "forward_features", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        extract_features(vit, tiny, tmp_path, precision="fp32", num_workers=0, progress=False)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    assert extract_features(vit, tiny, tmp_path, precision="fp32", num_workers=0, progress=False).meta["cached"] is False


def test_bad_precision_is_rejected(tiny, vit, tmp_path):
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        extract_features(vit, tiny, tmp_path, precision="fp8", progress=False)
