from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from index.datasets import (
    ADE20K_CLASSES,
    DEFAULT_SPLITS,
    VOC_CLASSES,
    DatasetError,
    open_dataset,
)

# ----------------------------------------------------------------------------- real data


def _split_ids(voc_root: Path, split: str) -> list[str]:
    return (voc_root / "VOC2012" / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


@pytest.mark.parametrize("split,n", [("train_aug", 311), ("val", 321)])
def test_voc_mini_ids(voc_root, split, n):
    ds = open_dataset("voc", voc_root, split)
    assert len(ds) == n
    assert ds.ids == _split_ids(voc_root, split)
    assert ds.class_names == list(VOC_CLASSES) and ds.num_classes == 21 and ds.void == 255
    # voc-mini has no SegmentationClass: every split reads SegmentationClassAug
    assert all(p.parent.name == "SegmentationClassAug" for p in ds.mask_paths)
    assert ds.image_path(0) == ds.root / "JPEGImages" / f"{ds.ids[0]}.jpg"


def test_voc_root_forms(voc_root):
    a = open_dataset("voc", voc_root, "val")
    b = open_dataset("voc", voc_root / "VOC2012", "val")
    assert a.root == b.root == voc_root / "VOC2012"
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != open_dataset("voc", voc_root, "train_aug").fingerprint()


@pytest.mark.parametrize("split", ["train_aug", "val"])
def test_voc_mini_images_and_masks(voc_root, split):
    ds = open_dataset("voc", voc_root, split)
    seen = set()
    for i in range(0, len(ds), 8):
        img, mask = ds.load_image(i), ds.load_mask(i)
        assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        assert mask.dtype == np.uint8 and mask.shape == img.shape[:2]
        seen |= set(np.unique(mask).tolist())
    assert seen <= set(range(21)) | {255}
    assert 255 in seen and 0 in seen and len(seen) > 5
    # palette indices, not colours: identical to the raw palette-mode array
    raw = np.asarray(Image.open(ds.mask_path(0)))
    assert Image.open(ds.mask_path(0)).mode == "P"
    assert np.array_equal(ds.load_mask(0), raw)


def test_ade_sample(ade_root):
    ds = open_dataset("ade20k", ade_root, "validation")
    assert ds.ids == ["ADE_val_00000001", "ADE_val_00000002", "ADE_val_00000003"]
    assert ds.num_classes == 150
    assert ds.class_names == list(ADE20K_CLASSES)  # parsed from objectInfo150.txt = built-in list
    for i in range(len(ds)):
        img, mask = ds.load_image(i), ds.load_mask(i)
        raw = np.asarray(Image.open(ds.mask_path(i)))
        assert mask.shape == img.shape[:2] == raw.shape
        assert (raw == 0).any()
        assert np.all(mask[raw == 0] == 255)
        assert np.array_equal(mask[raw > 0], raw[raw > 0] - 1)
        assert mask[mask != 255].max() < 150


def test_default_splits():
    assert DEFAULT_SPLITS["voc"] == ("train_aug", "val")
    assert DEFAULT_SPLITS["ade20k"] == ("training", "validation")
    assert DEFAULT_SPLITS["folder"] == ("train", "val")


# ----------------------------------------------------------------------------- synthetic layouts


def _save_rgb(path: Path, h: int, w: int, seed: int = 0, fmt: str | None = None) -> np.ndarray:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)
    return arr


def _save_mask(path: Path, mask: np.ndarray, mode: str = "L") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8))
    if mode == "P":
        im = im.convert("P")
        im.putpalette([v for i in range(256) for v in (i * 7 % 256, i * 13 % 256, i * 29 % 256)])
    im.save(path)


def _mask(h, w, values, seed=0):
    return np.random.default_rng(seed).choice(np.array(values, np.uint8), size=(h, w))


@pytest.fixture
def voc_tmp(tmp_path):
    """A 3-image VOC layout under tmp_path/VOCdevkit/VOC2012 with train_aug and val lists."""
    base = tmp_path / "VOCdevkit" / "VOC2012"
    lists = base / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    for k, i in enumerate(["a", "b", "c"]):
        _save_rgb(base / "JPEGImages" / f"{i}.jpg", 20, 30, seed=k)
        _save_mask(base / "SegmentationClassAug" / f"{i}.png", _mask(20, 30, [0, 5, 255], k), "P")
        _save_mask(base / "SegmentationClass" / f"{i}.png", _mask(20, 30, [0, 20, 255], k), "P")
    (lists / "train_aug.txt").write_text("a\nb\n")
    (lists / "val.txt").write_text("c\n\n")
    return tmp_path


def test_voc_mask_folders(voc_tmp):
    train = open_dataset("voc", voc_tmp, "train_aug")
    val = open_dataset("voc", voc_tmp, "val")
    assert train.ids == ["a", "b"] and val.ids == ["c"]
    assert train.mask_paths[0].parent.name == "SegmentationClassAug"
    assert val.mask_paths[0].parent.name == "SegmentationClass"
    assert np.array_equal(val.load_mask(0), _mask(20, 30, [0, 20, 255], 2))


def _make_folder(root: Path) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("sky\ngrass\ncow\n\n")
    _save_rgb(root / "images" / "train" / "x1.png", 12, 16, 1)
    _save_rgb(root / "images" / "train" / "x0.jpg", 10, 8, 0)
    _save_rgb(root / "images" / "val" / "v.jpeg", 9, 9, 2)
    _save_mask(root / "masks" / "train" / "x0.png", _mask(10, 8, [0, 1, 2, 255], 0))
    _save_mask(root / "masks" / "train" / "x1.png", _mask(12, 16, [0, 2], 1))
    _save_mask(root / "masks" / "val" / "v.png", _mask(9, 9, [1, 255], 2))
    (root / "images" / "train" / "notes.txt").write_text("ignored: not an image")


def test_folder_layout(tmp_path):
    _make_folder(tmp_path)
    ds = open_dataset("folder", tmp_path, "train")
    assert ds.ids == ["x0", "x1"]  # sorted file stems, any of .jpg/.jpeg/.png
    assert ds.class_names == ["sky", "grass", "cow"] and ds.num_classes == 3
    png = ds.load_image(1)
    assert np.array_equal(png, np.random.default_rng(1).integers(0, 256, size=(12, 16, 3), dtype=np.uint8))
    assert ds.load_image(0).shape == (10, 8, 3)
    assert np.array_equal(ds.load_mask(0), _mask(10, 8, [0, 1, 2, 255], 0))
    val = open_dataset("folder", tmp_path, "val")
    assert val.ids == ["v"] and val.load_mask(0).shape == (9, 9)
    assert val.describe()["split"] == "val" and val.describe()["class_names"] == ["sky", "grass", "cow"]


def test_fingerprint_changes_with_content(tmp_path):
    _make_folder(tmp_path)
    before = open_dataset("folder", tmp_path, "train").fingerprint()
    assert open_dataset("folder", tmp_path, "train").fingerprint() == before
    _save_mask(tmp_path / "masks" / "train" / "x1.png", _mask(12, 16, [0, 1, 2], 5))
    assert open_dataset("folder", tmp_path, "train").fingerprint() != before


def test_ade_layout_without_object_info(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    _save_rgb(base / "images" / "training" / "t1.jpg", 8, 8)
    raw = np.array([[0, 1], [150, 7]], np.uint8).repeat(4, 0).repeat(4, 1)
    _save_mask(base / "annotations" / "training" / "t1.png", raw)
    ds = open_dataset("ade20k", tmp_path, "training")
    assert ds.class_names == list(ADE20K_CLASSES)
    expected = np.array([[255, 0], [149, 6]], np.uint8).repeat(4, 0).repeat(4, 1)
    assert np.array_equal(ds.load_mask(0), expected)
    with pytest.raises(DatasetError, match=r"image folder .*validation not found: choose one of the splits \['training'\]"):
        open_dataset("ade20k", tmp_path, "validation")


# ----------------------------------------------------------------------------- errors


def test_error_missing_root(tmp_path):
    with pytest.raises(DatasetError, match="does not exist: check --root"):
        open_dataset("voc", tmp_path / "nope", "val")
    with pytest.raises(DatasetError, match="no JPEGImages/ in"):
        open_dataset("voc", tmp_path, "val")
    with pytest.raises(DatasetError, match="unknown dataset kind 'coco'"):
        open_dataset("coco", tmp_path, "val")
    assert issubclass(DatasetError, ValueError)


def test_error_missing_split_file(voc_tmp):
    with pytest.raises(DatasetError, match=r"split list .*trainval.txt not found: choose one of the splits \['train_aug', 'val'\]"):
        open_dataset("voc", voc_tmp, "trainval")


def test_error_empty_split(voc_tmp, tmp_path):
    lists = voc_tmp / "VOCdevkit" / "VOC2012" / "ImageSets" / "Segmentation"
    (lists / "empty.txt").write_text("\n\n")
    with pytest.raises(DatasetError, match=r"split list .*empty.txt is empty"):
        open_dataset("voc", voc_tmp, "empty")
    (lists / "dup.txt").write_text("a\nb\na\n")
    with pytest.raises(DatasetError, match=r"lists ids more than once: \['a'\]"):
        open_dataset("voc", voc_tmp, "dup")
    folder = tmp_path / "f"
    _make_folder(folder)
    (folder / "images" / "test").mkdir()
    with pytest.raises(DatasetError, match="split 'test' is empty: no .jpg/.jpeg/.png images"):
        open_dataset("folder", folder, "test")


def test_error_missing_image_or_mask(voc_tmp):
    base = voc_tmp / "VOCdevkit" / "VOC2012"
    (base / "ImageSets" / "Segmentation" / "val.txt").write_text("c\nghost\n")
    with pytest.raises(DatasetError, match=r"1 ids of split 'val' have no image file: ghost \(.*ghost.jpg\)"):
        open_dataset("voc", voc_tmp, "val")
    _save_rgb(base / "JPEGImages" / "ghost.jpg", 20, 30)
    with pytest.raises(DatasetError, match=r"have no mask file: ghost \(.*SegmentationClass/ghost.png\)"):
        open_dataset("voc", voc_tmp, "val")


def test_error_corrupt_image(tmp_path):
    _make_folder(tmp_path)
    bad = tmp_path / "images" / "train" / "x0.jpg"
    good = bad.read_bytes()
    bad.write_bytes(b"this is not a jpeg")
    ds = open_dataset("folder", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"cannot read image .*x0.jpg.*re-download it or remove its id"):
        ds.load_image(0)
    with pytest.raises(DatasetError, match=r"cannot read image .*x0.jpg"):
        ds.load_mask(0)  # the mask check reads the image header
    bad.write_bytes(good[: len(good) // 2])  # truncated
    with pytest.raises(DatasetError, match=r"cannot read image .*x0.jpg"):
        ds.load_image(0)


def test_error_mask_size_mismatch(tmp_path):
    _make_folder(tmp_path)
    _save_mask(tmp_path / "masks" / "train" / "x1.png", _mask(16, 12, [0, 1], 0))
    ds = open_dataset("folder", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"mask .*x1.png is 16x12 but image .*x1.png is 12x16"):
        ds.load_mask(1)


def test_error_rgb_mask(tmp_path):
    _make_folder(tmp_path)
    _save_rgb(tmp_path / "masks" / "train" / "x1.png", 12, 16, fmt="PNG")
    ds = open_dataset("folder", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"has 3 channels \(mode RGB\): expected a single-channel PNG of class ids"):
        ds.load_mask(1)


def test_error_unknown_class_ids(tmp_path, voc_tmp):
    _make_folder(tmp_path)
    _save_mask(tmp_path / "masks" / "train" / "x1.png", _mask(12, 16, [0, 3, 200], 0))
    ds = open_dataset("folder", tmp_path, "train")
    with pytest.raises(DatasetError, match=r"values \[3, 200\] that are not class ids .*expected a single-channel PNG of class ids"):
        ds.load_mask(1)
    # VOC: a palette index beyond the 21 classes
    base = voc_tmp / "VOCdevkit" / "VOC2012"
    _save_mask(base / "SegmentationClass" / "c.png", _mask(20, 30, [0, 21], 0), "P")
    with pytest.raises(DatasetError, match=r"values \[21\]"):
        open_dataset("voc", voc_tmp, "val").load_mask(0)


def test_error_folder_classes(tmp_path):
    _make_folder(tmp_path)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(DatasetError, match="classes.txt not found"):
        open_dataset("folder", tmp_path, "train")
    (tmp_path / "classes.txt").write_text("a\n\nb\n")
    with pytest.raises(DatasetError, match="empty line among the class names"):
        open_dataset("folder", tmp_path, "train")


# ----------------------------------------------------------------------------- Hugging Face


def _hf_dict(n: int, seed: int, h: int = 6, w: int = 5):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)) for _ in range(n)]
    masks = [rng.integers(0, 4, size=(h, w), dtype=np.uint8) for _ in range(n)]
    return images, masks


def test_hf_local_image_masks(tmp_path):
    datasets = pytest.importorskip("datasets")
    splits = {}
    raw_masks = {}
    for split, n in (("train", 3), ("validation", 2)):
        images, masks = _hf_dict(n, seed=n)
        raw_masks[split] = masks
        feats = datasets.Features({"image": datasets.Image(), "annotation": datasets.Image(),
                                   "file_name": datasets.Value("string")})
        splits[split] = datasets.Dataset.from_dict(
            {"image": images, "annotation": [Image.fromarray(m) for m in masks],
             "file_name": [f"{split}/img{i}.jpg" for i in range(n)]},
            features=feats,
        )
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "hfds"))
    ds = open_dataset("hf", tmp_path / "hfds", "validation", class_names=["a", "b", "c"], reduce_zero_label=True)
    assert ds.ids == ["img0", "img1"] and ds.num_classes == 3
    assert (ds.image_column, ds.mask_column) == ("image", "annotation")
    assert ds.load_image(1).shape == (6, 5, 3)
    raw = raw_masks["validation"][1]
    expected = np.where(raw == 0, 255, raw.astype(int) - 1).astype(np.uint8)
    assert np.array_equal(ds.load_mask(1), expected)
    with pytest.raises(DatasetError, match=r"split 'test' not in .*choose one of \['train', 'validation'\]"):
        open_dataset("hf", tmp_path / "hfds", "test", class_names=["a"])
    with pytest.raises(DatasetError, match="no class names in the features of mask column 'annotation'.*pass class_names"):
        open_dataset("hf", tmp_path / "hfds", "train")
    with pytest.raises(DatasetError, match="mask column 'seg' not in the dataset's columns"):
        open_dataset("hf", tmp_path / "hfds", "train", mask_column="seg", class_names=["a"])
    # 4 raw ids without reduce_zero_label but only 3 classes -> id 3 is unknown
    with pytest.raises(DatasetError, match=r"values \[3\] that are not class ids"):
        open_dataset("hf", tmp_path / "hfds", "train", class_names=["a", "b", "c"]).load_mask(0)


def test_hf_array_masks_with_class_label(tmp_path):
    datasets = pytest.importorskip("datasets")
    images, masks = _hf_dict(2, seed=0)
    label = datasets.ClassLabel(names=["w", "x", "y", "z"])
    feats = datasets.Features({"img": datasets.Image(), "label": datasets.List(datasets.List(label))})
    d = datasets.Dataset.from_dict({"img": images, "label": [m.tolist() for m in masks]}, features=feats)
    bad = datasets.Dataset.from_dict({"img": images[:1], "label": [masks[0][:5].tolist()]}, features=feats)
    datasets.DatasetDict({"train": d, "bad": bad}).save_to_disk(str(tmp_path / "arr"))
    ds = open_dataset("hf", tmp_path / "arr", "train")
    assert ds.class_names == ["w", "x", "y", "z"]
    assert ds.ids == ["000000", "000001"]
    assert np.array_equal(ds.load_mask(1), masks[1])
    assert np.array_equal(ds.load_image(0), np.asarray(images[0]))
    with pytest.raises(DatasetError, match="has no image files: use load_image"):
        ds.image_path(0)
    with pytest.raises(DatasetError, match=r"mask of item 0 .* is 5x5 but its image is 6x5"):
        open_dataset("hf", tmp_path / "arr", "bad").load_mask(0)
    assert open_dataset("hf", tmp_path / "arr", "train", reduce_zero_label=True).class_names == ["x", "y", "z"]


def test_hf_errors(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DatasetError, match=r"cannot load Hugging Face dataset 'scene_parse_150'.*save_to_disk"):
        open_dataset("hf", "scene_parse_150", "validation")
    (tmp_path / "junk").mkdir()
    with pytest.raises(DatasetError, match="is not a Hugging Face dataset saved with save_to_disk"):
        open_dataset("hf", tmp_path / "junk", "train")
    with pytest.raises(DatasetError, match=r"apply to kind 'hf' only"):
        open_dataset("folder", tmp_path, "train", mask_column="x")
