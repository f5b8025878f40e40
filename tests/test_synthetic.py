"""Procedural scenes: determinism, image/mask agreement, class list, folder layout and CLI."""
import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from cribo.synthetic import (CLASS_NAMES, STUFF, VOID, Layer, generate_scene, image_seed, render, sample_scene,
                             write_split)

REPO = Path(__file__).resolve().parents[1]
NUM_CLASSES = len(CLASS_NAMES)


def _read_split(root: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A plain reader of the generic layout: id -> (image (H, W, 3), mask (H, W))."""
    images = sorted((root / "images" / split).glob("*.png"))
    masks = sorted((root / "masks" / split).glob("*.png"))
    assert [p.name for p in images] == [p.name for p in masks]
    out = {}
    for ip, mp in zip(images, masks):
        image, mask = Image.open(ip), Image.open(mp)
        assert (image.mode, mask.mode) == ("RGB", "L")
        out[ip.stem] = (np.asarray(image), np.asarray(mask))
    return out


def test_generate_scene_is_deterministic_per_seed():
    image, mask = generate_scene(7, size=128)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert mask.shape == (128, 128) and mask.dtype == np.uint8
    again = generate_scene(7, size=128)
    assert image.tobytes() == again[0].tobytes() and mask.tobytes() == again[1].tobytes()
    other = generate_scene(8, size=128)
    assert image.tobytes() != other[0].tobytes() and mask.tobytes() != other[1].tobytes()


def test_image_seed_depends_on_seed_and_index_only():
    assert image_seed(3, 5) == image_seed(3, 5)
    assert len({image_seed(s, i) for s in range(4) for i in range(50)}) == 200


def test_generate_scene_is_the_quantised_render_of_its_scene():
    scene = sample_scene(11, size=96)
    image, mask = render(scene)
    assert 0 <= image.min() and image.max() <= 255
    got = generate_scene(11, size=96)
    np.testing.assert_array_equal(got[0], np.round(image).astype(np.uint8))
    np.testing.assert_array_equal(got[1], mask)


def test_object_alone_on_known_background_mask_is_where_the_image_changes():
    scene = sample_scene(5, size=128)
    background = Layer(0, 0, 0, np.full((128, 128, 3), 100.0, np.float32), np.ones((128, 128), np.float32))
    things = [layer for seed in range(4) for layer in sample_scene(seed, 128).layers if layer.class_id >= len(STUFF)]
    assert len(things) >= 6
    for obj in things:
        image, mask = render(dataclasses.replace(scene, layers=[background, obj]), post=False)
        changed = np.any(image != 100.0, axis=-1)
        obj_pixels = mask == obj.class_id
        assert obj_pixels.sum() > 100
        np.testing.assert_array_equal(changed, obj_pixels | (mask == VOID))
        assert np.all(mask[~changed] == 0)
        # the void band is a thin fringe: every void pixel lies within 2 px of an object pixel (sharp tips)
        near = cv2.dilate(obj_pixels.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool)
        assert np.all(near[mask == VOID])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_each_layer_labels_exactly_the_pixels_it_paints(seed):
    """Painting layer j over layers[:j] (occlusion) changes the image exactly where the mask becomes its
    class or void; everything else keeps its label."""
    scene = sample_scene(seed, size=128)
    before_image, before_mask = render(dataclasses.replace(scene, layers=scene.layers[:1]), post=False)
    assert np.all(before_mask == scene.layers[0].class_id)
    for j in range(1, len(scene.layers)):
        cls = scene.layers[j].class_id
        image, mask = render(dataclasses.replace(scene, layers=scene.layers[: j + 1]), post=False)
        changed = np.any(image != before_image, axis=-1)
        np.testing.assert_array_equal(mask[~changed], before_mask[~changed])
        assert set(np.unique(mask[changed]).tolist()) <= {cls, VOID}
        if cls >= len(STUFF):
            assert np.count_nonzero(mask == cls) > 0
        before_image, before_mask = image, mask
    np.testing.assert_array_equal(before_mask, render(scene)[1])


def test_mask_ids_in_class_range_and_every_class_appears():
    seen = set()
    for seed in range(60):
        mask = generate_scene(seed, size=64)[1]
        ids = set(np.unique(mask).tolist())
        assert ids <= set(range(NUM_CLASSES)) | {VOID}
        assert (mask == VOID).mean() < 0.1
        seen |= ids
    assert seen == set(range(NUM_CLASSES)) | {VOID}


def test_class_names():
    assert len(CLASS_NAMES) >= 20 and len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    assert all(re.fullmatch(r"[a-z]+", n) for n in CLASS_NAMES)


def test_write_split_layout_and_second_split(tmp_path):
    root = write_split(tmp_path / "syn", "train", 3, seed=5, size=64)
    assert root == tmp_path / "syn"
    assert (root / "classes.txt").read_text().splitlines() == CLASS_NAMES
    train = _read_split(root, "train")
    assert sorted(train) == [f"train_5_{i:06d}" for i in range(3)]
    for i, (image, mask) in enumerate(train.values()):
        want_image, want_mask = generate_scene(image_seed(5, i), size=64)
        np.testing.assert_array_equal(image, want_image)  # PNG is lossless
        np.testing.assert_array_equal(mask, want_mask)
        assert int(mask[mask != VOID].max()) < NUM_CLASSES

    classes_before = (root / "classes.txt").read_bytes()
    write_split(root, "val", 2, seed=6, size=64)
    assert (root / "classes.txt").read_bytes() == classes_before
    val = _read_split(root, "val")
    assert sorted(val) == ["val_6_000000", "val_6_000001"]
    assert sorted(_read_split(root, "train")) == sorted(train)
    assert not np.array_equal(val["val_6_000000"][0], train["train_5_000000"][0])


def test_image_i_does_not_depend_on_the_number_of_images_or_workers(tmp_path):
    write_split(tmp_path / "a", "train", 2, seed=9, size=64)
    write_split(tmp_path / "b", "train", 4, seed=9, size=64, workers=2)
    for i in range(2):
        for kind in ("images", "masks"):
            name = f"{kind}/train/train_9_{i:06d}.png"
            assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_write_split_errors(tmp_path):
    root = tmp_path / "syn"
    write_split(root, "train", 1, seed=1, size=64)
    with pytest.raises(ValueError, match="another seed .*train_1_000000"):
        write_split(root, "train", 1, seed=2, size=64)
    write_split(root, "train", 2, seed=1, size=64)  # same seed: rewrites and extends
    assert len(list((root / "images" / "train").iterdir())) == 2
    (root / "classes.txt").write_text("sky\nsea\n")
    with pytest.raises(ValueError, match=r"classes.txt lists other classes.*new --out"):
        write_split(root, "val", 1, seed=3, size=64)
    with pytest.raises(ValueError, match="--split 'a/b'"):
        write_split(tmp_path / "x", "a/b", 1, seed=1)
    with pytest.raises(ValueError, match="--num-images >= 1"):
        write_split(tmp_path / "x", "train", 0, seed=1)
    with pytest.raises(ValueError, match="size=16"):
        generate_scene(0, size=16)


def test_cli_writes_the_layout(tmp_path):
    out = tmp_path / "cli"

    def cli(seed: int) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "cribo.synthetic", "--out", str(out), "--num-images", "2", "--seed", str(seed),
               "--split", "val", "--size", "64"]
        return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)

    run = cli(4)
    assert run.returncode == 0, run.stderr
    assert (out / "classes.txt").read_text().splitlines() == CLASS_NAMES
    assert sorted(_read_split(out, "val")) == ["val_4_000000", "val_4_000001"]
    clash = cli(5)  # the same split with another seed: a usage error naming the folder
    assert clash.returncode == 2 and f"{out / 'images' / 'val'} already holds images of another seed" in clash.stderr
