import numpy as np
import pytest

from index.labels import (
    paint_patches,
    patch_class_histograms,
    patch_labels,
    protocol_size,
    resize_image,
    resize_mask,
)


def test_protocol_size_voc_example():
    assert protocol_size(375, 500, 16) == (368, 496)  # 23 x 31 = 713 patches
    assert protocol_size(16, 16, 16) == (16, 16)
    assert protocol_size(17, 31, 8) == (16, 24)


def test_protocol_size_too_small():
    with pytest.raises(ValueError, match="smaller than one 16x16 patch"):
        protocol_size(15, 500, 16)
    with pytest.raises(ValueError, match="patch size must be positive"):
        protocol_size(10, 10, 0)


# A 4 x 6 mask with p = 2: a 2 x 3 grid of patches, row-major.
HAND_MASK = np.array(
    [
        [0, 0, 255, 255, 1, 1],
        [0, 1, 255, 255, 2, 2],
        [255, 3, 2, 255, 4, 4],
        [3, 255, 255, 255, 4, 0],
    ],
    dtype=np.uint8,
)


def test_patch_labels_hand_made():
    labels = patch_labels(HAND_MASK, 2, num_classes=5)
    # patch 0: 0,0,0,1 -> 0; patch 1: all void -> -1; patch 2: 1,1,2,2 tie -> 1 (smallest id);
    # patch 3: 255,3,3,255 -> 3; patch 4: 2 and 3 void -> 2; patch 5: 4,4,4,0 -> 4.
    assert labels.dtype == np.int64
    assert labels.tolist() == [0, -1, 1, 3, 2, 4]


def test_patch_class_histograms_exact_counts():
    hist = patch_class_histograms(HAND_MASK, 2, num_classes=5)
    expected = np.array(
        [
            [3, 1, 0, 0, 0],
            [0, 0, 0, 0, 0],
            [0, 2, 2, 0, 0],
            [0, 0, 0, 2, 0],
            [0, 0, 1, 0, 0],
            [1, 0, 0, 0, 3],
        ],
        dtype=np.float32,
    )
    expected /= np.maximum(expected.sum(1, keepdims=True), 1)
    assert hist.dtype == np.float32 and hist.shape == (6, 5)
    np.testing.assert_allclose(hist, expected, rtol=0, atol=1e-7)


def test_patch_labels_match_plain_loop_on_random_masks():
    rng = np.random.default_rng(0)
    C, p = 6, 4
    values = np.array([*range(C), 255], dtype=np.uint8)
    for _ in range(5):
        mask = values[rng.integers(0, len(values), size=(3 * p, 5 * p))]
        got = patch_labels(mask, p, C)
        want = []
        for r in range(3):
            for c in range(5):
                block = mask[r * p : (r + 1) * p, c * p : (c + 1) * p].ravel()
                block = block[block != 255]
                want.append(-1 if block.size == 0 else int(np.bincount(block, minlength=C).argmax()))
        assert got.tolist() == want


def test_patch_labels_errors():
    with pytest.raises(ValueError, match="not a multiple of the patch size 2"):
        patch_labels(np.zeros((5, 4), np.uint8), 2, 3)
    bad = np.zeros((4, 4), np.uint8)
    bad[0, 0] = 7
    with pytest.raises(ValueError, match=r"class ids \[7\] outside 0..2"):
        patch_labels(bad, 2, 3)


def test_resize_image_is_antialiased():
    # A 1-pixel checkerboard shrunk 4x: antialiased bilinear averages it to mid-grey everywhere,
    # a non-antialiased (point-sampling) resize would keep 0s and 255s.
    board = ((np.indices((64, 64)).sum(0) % 2) * 255).astype(np.uint8)
    img = np.stack([board] * 3, axis=-1)
    small = resize_image(img, (16, 16))
    assert small.shape == (16, 16, 3) and small.dtype == np.uint8
    assert np.abs(small.astype(int) - 127.5).max() <= 2


def test_resize_image_same_size_is_a_copy():
    img = np.full((8, 8, 3), 9, np.uint8)
    out = resize_image(img, (8, 8))
    assert np.array_equal(out, img) and out is not img
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8"):
        resize_image(img[..., 0], (4, 4))


def test_resize_mask_nearest():
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    up = resize_mask(mask, (4, 4))
    assert np.array_equal(up, np.repeat(np.repeat(mask, 2, 0), 2, 1))
    rng = np.random.default_rng(1)
    m = rng.choice(np.array([3, 7, 255], np.uint8), size=(37, 53))
    down = resize_mask(m, (16, 24))
    assert down.shape == (16, 24) and set(np.unique(down)) <= {3, 7, 255}


def test_paint_patches_exact_and_round_trip():
    pred = np.array([0, -1, 1, 3, 2, 4])
    painted = paint_patches(pred, (2, 3), 2, (4, 6))
    expected = np.repeat(np.repeat(np.array([[0, 255, 1], [3, 2, 4]], np.uint8), 2, 0), 2, 1)
    assert np.array_equal(painted, expected)
    assert patch_labels(painted, 2, 5).tolist() == pred.tolist()
    # resized to an original size that is not a multiple of p
    big = paint_patches(pred, (2, 3), 2, (5, 7))
    assert big.shape == (5, 7) and big[0, 0] == 0 and big[-1, -1] == 4


def test_paint_patches_errors():
    with pytest.raises(ValueError, match=r"expected \(6,\) for a 2x3 grid"):
        paint_patches(np.zeros(5, np.int64), (2, 3), 2, (4, 6))
