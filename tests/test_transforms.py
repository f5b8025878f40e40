"""Two views with analytic patch coordinates (cribo.pretrain.transforms)."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF

from cribo.pixels import denormalise as denormalize
from cribo.pretrain.transforms import (
    VIEW1_AUG,
    VIEW2_AUG,
    TwoViewTransform,
    ViewAugmentation,
    ViewParams,
    apply_geometry,
    apply_photometric,
    draw_view_params,
    patch_centres,
    random_resized_crop_params,
    to_normalized_tensor,
)


def _coordinate_image(width: int, height: int) -> Image.Image:
    """RGB image whose pixel (row r, col c) holds R = c, G = r (so width, height <= 256)."""
    cols = np.broadcast_to(np.arange(width, dtype=np.uint8)[None, :], (height, width))
    rows = np.broadcast_to(np.arange(height, dtype=np.uint8)[:, None], (height, width))
    return Image.fromarray(np.stack([cols, rows, np.zeros_like(cols)], axis=-1), mode="RGB")


def test_patch_centres_hand_computed_without_and_with_flip():
    # Crop rows 10..110, columns 20..220 (h=100, w=200), resized to 32x32, patches of 16: 2x2 patches.
    # Patch centres at 8 and 24 view pixels: x = 20 + 8*200/32 = 70 and 20 + 24*6.25 = 170;
    # y = 10 + 8*100/32 = 35 and 10 + 24*3.125 = 85. Row-major token order.
    c = patch_centres((10, 20, 100, 200), flip=False, img_size=32, patch_size=16)
    assert c.dtype == torch.float32
    assert torch.equal(c, torch.tensor([[70.0, 35.0], [170.0, 35.0], [70.0, 85.0], [170.0, 85.0]]))
    # Flipped: the first column of the view shows the right end of the crop: x = 20 + 200 - 50 = 170.
    f = patch_centres((10, 20, 100, 200), flip=True, img_size=32, patch_size=16)
    assert torch.equal(f, torch.tensor([[170.0, 35.0], [70.0, 35.0], [170.0, 85.0], [70.0, 85.0]]))


def test_patch_centres_rejects_non_multiple():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        patch_centres((0, 0, 10, 10), False, img_size=30, patch_size=16)


@pytest.mark.parametrize("size", [(500, 375), (100, 900), (900, 60), (64, 64)])
def test_crop_params_equal_torchvision_get_params(size):
    """Same draws as torchvision's RandomResizedCrop.get_params from the same global RNG state
    (extreme aspect ratios exercise the central-crop fallback)."""
    width, height = size
    img = Image.new("RGB", (width, height))
    for seed in range(20):
        torch.manual_seed(seed)
        expected = T.RandomResizedCrop.get_params(img, [0.25, 1.0], [3 / 4, 4 / 3])
        torch.manual_seed(seed)
        got = random_resized_crop_params(height, width, (0.25, 1.0))
        assert got == tuple(expected)
        i, j, h, w = got
        assert 0 <= i and 0 <= j and i + h <= height and j + w <= width


def test_coordinates_match_the_pixels_the_view_actually_shows():
    """End to end: on an image whose pixels encode their own (x, y), the mean of each patch of the
    produced view is the patch's analytic centre (within half a source pixel: resampling error)."""
    width, height = 240, 180
    img = _coordinate_image(width, height)
    tf = TwoViewTransform(img_size=64, scale=(0.25, 1.0), patch_size=16, photometric=False)
    flips = set()
    for seed in range(12):
        out = tf.sample(img, generator=torch.Generator().manual_seed(seed))
        views = ((out.view1, out.coords1, out.params1), (out.view2, out.coords2, out.params2))
        for view, coords, params in views:
            flips.add(params.flip)
            rgb = denormalize(view) * 255.0  # (3, 64, 64), R = source column, G = source row
            patches = rgb[:2].reshape(2, 4, 16, 4, 16).mean(dim=(2, 4))  # (2, 4, 4) patch means
            measured = patches.permute(1, 2, 0).reshape(16, 2) + 0.5  # pixel index -> pixel centre
            i, j, h, w = params.box
            tol = 0.5 * max(w / 64, h / 64, 1.0) + 0.3  # nearest-source-pixel + uint8 rounding error
            assert (measured - coords).abs().max() <= tol, (seed, params)
    assert flips == {True, False}


def test_patch_centres_of_a_window_turned_a_quarter():
    # The 32x32 crop at the origin, turned 90 degrees about its centre (16, 16): the view's top-left
    # patch, offset (-8, -8) from the centre, shows the point at offset (8, -8): (24, 8).
    c = patch_centres((0, 0, 32, 32), flip=False, img_size=32, patch_size=16, angle=90.0)
    assert torch.allclose(c, torch.tensor([[24.0, 8.0], [24.0, 24.0], [8.0, 8.0], [8.0, 24.0]]), atol=1e-5)
    # angle 0 through the turned-window formula gives the axis-aligned crop's centres.
    ref = patch_centres((10, 20, 100, 200), flip=True, img_size=32, patch_size=16)
    assert torch.allclose(patch_centres((10, 20, 100, 200), True, 32, 16, angle=1e-9), ref, atol=1e-4)


@pytest.mark.parametrize("box, flip, angle", [((60, 90, 60, 60), False, 90.0),    # upscaled
                                              ((50, 70, 80, 100), True, 37.0),    # downscaled, flipped
                                              ((40, 60, 100, 120), False, -150.0)])
def test_turned_views_show_the_pixels_their_coordinates_name(box, flip, angle):
    """--rotate: on an image whose pixels encode their own (x, y), each patch of a turned view (inside
    the image) averages to its analytic centre, whether the window is enlarged or shrunk (prefiltered)."""
    img = _coordinate_image(240, 180)
    view = apply_geometry(img, box, flip, 64, angle)
    coords = patch_centres(box, flip, 64, 16, angle)
    rgb = torch.from_numpy(np.asarray(view, dtype=np.float32)).permute(2, 0, 1)  # R = column, G = row
    patches = rgb[:2].reshape(2, 4, 16, 4, 16).mean(dim=(2, 4))
    measured = patches.permute(1, 2, 0).reshape(16, 2) + 0.5  # pixel index -> pixel centre
    assert (measured - coords).abs().max() <= 0.6, (measured - coords).abs().max()


def test_rotate_draws_a_turn_per_view_and_nothing_else_changes():
    img = Image.fromarray(np.random.default_rng(3).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    plain = TwoViewTransform(img_size=32, patch_size=16).sample(img, generator=torch.Generator().manual_seed(5))
    turned = TwoViewTransform(img_size=32, patch_size=16, rotate=180).sample(img, generator=torch.Generator().manual_seed(5))
    assert plain.params1.angle == plain.params2.angle == 0.0
    assert turned.params1 == dataclasses.replace(plain.params1, angle=turned.params1.angle)  # drawn after the rest
    assert 0 < abs(turned.params1.angle) <= 180 and turned.params2.angle != turned.params1.angle
    assert not torch.equal(turned.coords1, plain.coords1)
    with pytest.raises(ValueError, match=r"rotate=200.0 must be an angle in degrees in \[0, 180\]"):
        TwoViewTransform(img_size=32, patch_size=16, rotate=200.0)


def test_output_shapes_dtypes_and_normalisation():
    img = Image.fromarray(np.full((50, 70, 3), 128, dtype=np.uint8))
    tf = TwoViewTransform(img_size=32, patch_size=8)
    v1, v2, c1, c2 = tf(img)
    assert v1.shape == v2.shape == (3, 32, 32) and v1.dtype == torch.float32
    assert c1.shape == c2.shape == (16, 2) and c1.dtype == torch.float32
    assert tf.num_patches == 16
    # Coordinates lie inside the image.
    for c in (c1, c2):
        assert (c[:, 0] > 0).all() and (c[:, 0] < 70).all() and (c[:, 1] > 0).all() and (c[:, 1] < 50).all()


def test_seeded_sampling_is_deterministic_and_leaves_global_rng_alone():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    tf = TwoViewTransform(img_size=32, patch_size=16)
    before = torch.random.get_rng_state()
    a = tf.sample(img, generator=torch.Generator().manual_seed(7))
    b = tf.sample(img, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), before)
    assert a.params1 == b.params1 and a.params2 == b.params2
    for x, y in zip(a.as_tuple(), b.as_tuple()):
        assert torch.equal(x, y)
    c = tf.sample(img, generator=torch.Generator().manual_seed(8))
    assert c.params1 != a.params1
    # The plain call draws from the global RNG: reproducible with torch.manual_seed (loader workers).
    torch.manual_seed(3)
    first = tf(img)
    torch.manual_seed(3)
    second = tf(img)
    assert all(torch.equal(x, y) for x, y in zip(first, second))


def test_augmentation_frequencies_follow_dino():
    """Over 2000 seeded draws: flip 0.5, jitter 0.8, grayscale 0.2, blur 1.0 / 0.1, solarize 0 / 0.2."""
    g = torch.Generator().manual_seed(0)
    n = 2000
    p1 = [draw_view_params(300, 400, (0.25, 1.0), VIEW1_AUG, g) for _ in range(n)]
    p2 = [draw_view_params(300, 400, (0.25, 1.0), VIEW2_AUG, g) for _ in range(n)]

    def freq(params, key):
        return sum(bool(key(p)) for p in params) / n

    assert freq(p1, lambda p: p.blur_sigma is not None) == 1.0
    assert freq(p1, lambda p: p.solarize) == 0.0
    for p in (p1, p2):
        assert abs(freq(p, lambda q: q.flip) - 0.5) < 0.04
        assert abs(freq(p, lambda q: q.jitter) - 0.8) < 0.04
        assert abs(freq(p, lambda q: q.grayscale) - 0.2) < 0.04
    assert abs(freq(p2, lambda p: p.blur_sigma is not None) - 0.1) < 0.03
    assert abs(freq(p2, lambda p: p.solarize) - 0.2) < 0.04
    sigmas = [p.blur_sigma for p in p1]
    assert 0.1 <= min(sigmas) and max(sigmas) <= 2.0
    for p in p1:
        assert 0.6 <= p.brightness <= 1.4 and 0.6 <= p.contrast <= 1.4
        assert 0.8 <= p.saturation <= 1.2 and -0.1 <= p.hue <= 0.1
        assert sorted(p.jitter_order) == [0, 1, 2, 3]
        i, j, h, w = p.box
        assert 0.25 * 300 * 400 * 0.95 <= h * w <= 300 * 400


def _params(**kw) -> ViewParams:
    base = dict(box=(0, 0, 4, 4), flip=False, jitter=False, jitter_order=(0, 1, 2, 3), brightness=1.0,
                contrast=1.0, saturation=1.0, hue=0.0, grayscale=False, blur_sigma=None, solarize=False)
    base.update(kw)
    return ViewParams(**base)


def test_photometric_operations():
    arr = np.array([[[10, 200, 30], [250, 100, 0]]], dtype=np.uint8)  # (1, 2, 3)
    img = Image.fromarray(arr)
    assert np.array_equal(np.asarray(apply_photometric(img, _params())), arr)  # nothing drawn: identity
    gray = np.asarray(apply_photometric(img, _params(grayscale=True)))
    assert (gray[..., 0] == gray[..., 1]).all() and (gray[..., 1] == gray[..., 2]).all()
    sol = np.asarray(apply_photometric(img, _params(solarize=True)))
    assert np.array_equal(sol, np.where(arr >= 128, 255 - arr, arr))
    # Jitter applies brightness, contrast, saturation, hue in the drawn order.
    factors = dict(brightness=0.5, contrast=1.3, saturation=0.9, hue=0.05)
    fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for order in ((0, 1, 2, 3), (3, 2, 1, 0)):
        expected = img
        for k in order:
            expected = fns[k](expected, list(factors.values())[k])
        got = apply_photometric(img, _params(jitter=True, jitter_order=order, **factors))
        assert np.array_equal(np.asarray(got), np.asarray(expected))
    forward = apply_photometric(img, _params(jitter=True, jitter_order=(0, 1, 2, 3), **factors))
    backward = apply_photometric(img, _params(jitter=True, jitter_order=(3, 2, 1, 0), **factors))
    assert not np.array_equal(np.asarray(forward), np.asarray(backward))


def test_bad_arguments():
    with pytest.raises(ValueError, match="multiple of patch_size"):
        TwoViewTransform(img_size=100, patch_size=16)
    with pytest.raises(ValueError, match="scale"):
        TwoViewTransform(scale=(0.5, 0.2))
    with pytest.raises(TypeError, match="PIL image"):
        TwoViewTransform(img_size=32)(np.zeros((32, 32, 3), dtype=np.uint8))


# ------------------------------------------------------------------------- asymmetric (student) views
_PLAIN = ViewAugmentation(jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0)
_GREY = ViewAugmentation(jitter_p=0.0, grayscale_p=1.0, blur_p=0.0, solarize_p=0.0)


def test_student_views_share_the_crop_and_differ_only_in_their_photometric_changes():
    """--student-augment: the student's view k is the teacher's crop and flip of view k with the
    student's own photometric draw; here the teacher's views are plain crops and the student's are
    their grey versions, pixel for pixel."""
    img = Image.fromarray(np.random.default_rng(1).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    tf = TwoViewTransform(img_size=32, patch_size=16, view1_aug=_PLAIN, view2_aug=_PLAIN, student_augs=(_GREY, _GREY))
    out = tf.sample(img, generator=torch.Generator().manual_seed(4))
    assert len(out.as_tuple()) == 6
    for view, student, params, s_params in ((out.view1, out.student_view1, out.params1, out.student_params1),
                                            (out.view2, out.student_view2, out.params2, out.student_params2)):
        assert (s_params.box, s_params.flip) == (params.box, params.flip) and s_params.grayscale and not params.grayscale
        geo = apply_geometry(img, params.box, params.flip, 32)
        assert torch.equal(view, to_normalized_tensor(geo))
        assert torch.equal(student, to_normalized_tensor(TF.rgb_to_grayscale(geo, num_output_channels=3)))
    assert out.params1.box != out.params2.box  # two crops, each shared by its teacher and student version


def test_without_student_augs_the_views_and_draws_are_unchanged():
    """Asymmetric views draw their photometric changes AFTER each teacher view's draws, so the teacher's
    views of a seed are those of the symmetric transform, and the symmetric one returns 4 tensors."""
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (60, 80, 3), dtype=np.uint8))
    plain = TwoViewTransform(img_size=32, patch_size=16).sample(img, generator=torch.Generator().manual_seed(9))
    assert plain.student_view1 is None and len(plain.as_tuple()) == 4
    asym = TwoViewTransform(img_size=32, patch_size=16, student_augs=(_GREY, _GREY))
    first = asym.sample(img, generator=torch.Generator().manual_seed(9))
    assert first.params1 == plain.params1 and torch.equal(first.view1, plain.view1)
