"""Pretraining datasets (cribo.pretrain.data): folders, layouts, Hugging Face, corrupt images."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cribo.pretrain.data import (
    CorruptImageError,
    DataSourceError,
    HFImageDataset,
    ImageFolderDataset,
    build_pretraining_dataset,
    list_images,
)
from cribo.pretrain.transforms import TwoViewTransform

REPO = Path(__file__).resolve().parents[1]


def _save(path: Path, value: int, size=(20, 16), fmt: str | None = None) -> Path:
    """A solid image whose red channel is ``value`` (so an item tells which file it came from)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), dtype=np.uint8)
    arr[..., 0] = value
    Image.fromarray(arr).save(path, format=fmt)
    return path


def _red(img: Image.Image) -> int:
    return int(np.asarray(img)[0, 0, 0])


def test_folder_is_searched_recursively_in_sorted_order(tmp_path):
    _save(tmp_path / "b" / "z.png", 1)
    _save(tmp_path / "a.JPG", 2, fmt="JPEG")
    _save(tmp_path / "b" / "c" / "y.webp", 3, fmt="WEBP")
    _save(tmp_path / "b" / "x.bmp", 4)
    _save(tmp_path / "d.jpeg", 5, fmt="JPEG")
    _save(tmp_path / ".hidden" / "h.png", 6)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = build_pretraining_dataset(tmp_path, None)
    assert isinstance(ds, ImageFolderDataset) and ds.layout == "folder"
    rel = [p.relative_to(tmp_path).as_posix() for p in ds.files]
    assert rel == ["a.JPG", "b/c/y.webp", "b/x.bmp", "b/z.png", "d.jpeg"]
    assert len(ds) == 5
    assert _red(ds[2]) == 4 and _red(ds[3]) == 1  # bmp and png: lossless, exact values
    assert ds[0].mode == "RGB" and ds[0].size == (20, 16)


def test_items_are_the_two_view_tuple(tmp_path):
    _save(tmp_path / "img.png", 10, size=(40, 30))
    ds = build_pretraining_dataset(tmp_path, TwoViewTransform(img_size=32, patch_size=16))
    v1, v2, c1, c2 = ds[0]
    assert v1.shape == v2.shape == (3, 32, 32) and c1.shape == c2.shape == (4, 2)
    with_index = build_pretraining_dataset(tmp_path, TwoViewTransform(img_size=32, patch_size=16),
                                           return_index=True)
    item = with_index[0]
    assert len(item) == 5 and item[4] == 0
    batch = torch.utils.data.default_collate([ds[0], ds[0]])
    assert batch[0].shape == (2, 3, 32, 32) and batch[2].shape == (2, 4, 2)


def test_empty_or_missing_folder_is_a_clear_error(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataSourceError, match=f"{tmp_path}: no images found"):
        build_pretraining_dataset(tmp_path, None)
    with pytest.raises(DataSourceError, match="no such directory"):
        build_pretraining_dataset(tmp_path / "nope", None)


def test_corrupt_image_raises_naming_the_file_or_is_skipped_with_a_warning(tmp_path, caplog):
    _save(tmp_path / "0.png", 1)
    bad = tmp_path / "1.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    good = _save(tmp_path / "2.png", 3)
    truncated = tmp_path / "3.png"
    truncated.write_bytes(good.read_bytes()[:40])
    ds = build_pretraining_dataset(tmp_path, None)
    with pytest.raises(CorruptImageError, match=r"1\.jpg: cannot decode image .*skip_corrupt=True"):
        ds[1]
    with pytest.raises(CorruptImageError, match=r"3\.png: cannot decode image"):
        ds[3]
    skipping = build_pretraining_dataset(tmp_path, None, skip_corrupt=True, return_index=True)
    with caplog.at_level(logging.WARNING, logger="cribo.pretrain.data"):
        img, index = skipping[1]
    assert index == 2 and _red(img) == 3  # the next readable image
    assert "1.jpg" in caplog.text
    img, index = skipping[3]  # wraps around to the first image
    assert index == 0 and _red(img) == 1


def test_imagenet_coco_generic_and_voc_layouts_use_the_training_split(tmp_path, voc_root):
    imagenet = tmp_path / "imagenet"
    _save(imagenet / "train" / "n01" / "a.JPEG", 1, fmt="JPEG")
    _save(imagenet / "train" / "n02" / "b.JPEG", 2, fmt="JPEG")
    _save(imagenet / "val" / "n01" / "c.JPEG", 3, fmt="JPEG")
    ds = build_pretraining_dataset(imagenet, None)
    assert ds.layout == "train/" and [p.name for p in ds.files] == ["a.JPEG", "b.JPEG"]
    assert [p.name for p in build_pretraining_dataset(imagenet, None, split="val").files] == ["c.JPEG"]

    coco = tmp_path / "coco"
    _save(coco / "train2017" / "000001.jpg", 1, fmt="JPEG")
    _save(coco / "val2017" / "000002.jpg", 2, fmt="JPEG")
    assert [p.name for p in build_pretraining_dataset(coco, None).files] == ["000001.jpg"]
    coco_alt = tmp_path / "coco_alt"
    _save(coco_alt / "images" / "train2017" / "000003.jpg", 1, fmt="JPEG")
    _save(coco_alt / "annotations" / "x.png", 1)
    assert [p.name for p in build_pretraining_dataset(coco_alt, None).files] == ["000003.jpg"]

    generic = tmp_path / "synthetic"
    _save(generic / "images" / "train" / "train_0_000000.png", 1)
    _save(generic / "masks" / "train" / "train_0_000000.png", 200)
    ds = build_pretraining_dataset(generic, None)
    assert ds.layout == "images/train" and len(ds) == 1 and _red(ds[0]) == 1
    expected = r"split 'val' not found in .*synthetic/images \(available: \['train'\]\)"
    with pytest.raises(DataSourceError, match=expected):
        build_pretraining_dataset(generic, None, split="val")
    only_val = tmp_path / "only_val"
    _save(only_val / "images" / "validation" / "a.png", 1)
    _save(only_val / "annotations" / "validation" / "a.png", 1)
    with pytest.raises(DataSourceError, match=r"available: \['validation'\]"):
        build_pretraining_dataset(only_val, None)

    voc = build_pretraining_dataset(voc_root, None)
    assert voc.layout == "voc:train_aug" and len(voc) == 311
    assert all(p.parent.name == "JPEGImages" for p in voc.files)
    assert len(build_pretraining_dataset(voc_root, None, split="val")) == 321
    with pytest.raises(DataSourceError, match=r"available: \['train_aug', 'val'\]"):
        build_pretraining_dataset(voc_root, None, split="test")


def test_list_images_rejects_a_file(tmp_path):
    f = _save(tmp_path / "a.png", 1)
    with pytest.raises(DataSourceError, match="not a directory"):
        list_images(f)


def _hf_images(values):
    import datasets

    imgs = []
    for v in values:
        arr = np.zeros((8, 10, 3), dtype=np.uint8)
        arr[..., 0] = v
        imgs.append(Image.fromarray(arr))
    features = datasets.Features({"picture": datasets.Image(), "label": datasets.Value("int64")})
    return datasets.Dataset.from_dict({"picture": imgs, "label": list(values)}, features=features)


def test_hugging_face_saved_dataset_and_dataset_dict(tmp_path):
    import datasets

    single = tmp_path / "single"
    _hf_images([7, 8, 9]).save_to_disk(str(single))
    for source in (single, f"hf:{single}"):
        ds = build_pretraining_dataset(source, None)
        assert isinstance(ds, HFImageDataset) and ds.image_column == "picture"  # auto-detected
        assert len(ds) == 3 and _red(ds[2]) == 9 and ds[0].mode == "RGB"

    dd = tmp_path / "dict"
    datasets.DatasetDict({"train": _hf_images([1, 2]), "validation": _hf_images([5])}).save_to_disk(str(dd))
    assert [_red(x) for x in build_pretraining_dataset(dd, None)] == [1, 2]
    assert _red(build_pretraining_dataset(f"hf:{dd}:validation", None)[0]) == 5
    with pytest.raises(DataSourceError, match=r"no split 'test' \(splits: \['train', 'validation'\]\)"):
        build_pretraining_dataset(f"hf:{dd}:test", None)

    items = build_pretraining_dataset(single, TwoViewTransform(img_size=16, patch_size=8), return_index=True)
    assert len(items[1]) == 5 and items[1][4] == 1


def test_hugging_face_without_an_image_column(tmp_path):
    import datasets

    path = tmp_path / "text"
    datasets.Dataset.from_dict({"text": ["a", "b"]}).save_to_disk(str(path))
    with pytest.raises(DataSourceError, match="no column of type datasets.Image"):
        build_pretraining_dataset(path, None)
    with pytest.raises(DataSourceError, match=r"no column 'img'"):
        build_pretraining_dataset(path, None, image_column="img")


def test_offline_hub_is_a_clear_error():
    """In a fresh process with the hub switched off (the library reads the switch at import)."""
    code = (
        "from cribo.pretrain.data import build_pretraining_dataset, DataSourceError\n"
        "try:\n"
        "    build_pretraining_dataset('hf:some-org/not-cached-here', None)\n"
        "except DataSourceError as e:\n"
        "    print('MESSAGE', e)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    expected = "MESSAGE hf:some-org/not-cached-here:train: could not load the Hugging Face dataset"
    assert expected in out.stdout, out
    assert "save_to_disk directory" in out.stdout
