"""The learning curve (train.py --eval-every), its probe, the hand-made baselines and the new recipe knobs.

Hand-made inputs with known answers: LBP codes of constant, single-spike and checkerboard images; the
texture descriptor of a constant image; a dataset of one-colour patches that any pixel feature
retrieves perfectly; a toy patch-NN case. The engine tests check that evaluating during training
changes nothing in the run (bitwise), and that the eval rows survive a resume and reach the plot.
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cribo.backbones import create_vit, export_backbone, load_backbone
from cribo.pretrain.config import TrainConfig
from cribo.pretrain.loop import LOG_KEYS, train
from cribo.pretrain.report import plot_training_log
from cribo.pretrain.transforms import AUGMENTATIONS
from index.datasets import open_dataset
from index.descriptors import LBP_BINS, PixelPatches, TextureDescriptor, lbp_riu2_codes
from cribo.constants import IMAGENET_MEAN, IMAGENET_STD
from index.features import image_features
from index.probe import RetrievalProbe, patch_nn_rates
from tests.test_engine import tiny_config


pytestmark = pytest.mark.usefixtures("one_thread")


def normalised(rgb01: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (rgb01 - mean) / std


# ---------------------------------------------------------------------------------- descriptors
def test_lbp_codes_on_hand_made_patterns():
    flat = torch.full((1, 1, 9, 9), 0.5)
    assert (lbp_riu2_codes(flat, 1) == 8).all()  # every neighbour >= the centre: eight ones
    spike = flat.clone()
    spike[0, 0, 4, 4] = 1.0
    assert lbp_riu2_codes(spike, 1)[0, 4, 4] == 0  # brighter than all its neighbours
    assert lbp_riu2_codes(spike, 2)[0, 4, 4] == 0
    yy, xx = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    checker = ((yy + xx) % 2).float()[None, None]
    codes = lbp_riu2_codes(checker, 1)[0]
    assert codes[4, 5] == LBP_BINS - 1  # bright centre: 0,1,0,1,... around it, eight transitions
    assert codes[4, 4] == 8  # dark centre: every neighbour >= it
    edge = (xx >= 5).float()[None, None]  # a vertical step
    codes = lbp_riu2_codes(edge, 1)[0]
    assert codes[4, 4] == 8 and codes[4, 5] == 5  # dark side: all >=; bright side: three darker in a row


def test_texture_descriptor_of_a_constant_image_is_exact():
    d = TextureDescriptor()
    out = d.forward_features(normalised(torch.full((2, 3, 32, 48), 0.5)))
    tokens = out["x_norm_patchtokens"]
    assert tokens.shape == (2, 6, d.embed_dim) and d.embed_dim == 68 and out["grid"] == (2, 3)
    third = 1 / math.sqrt(3)
    expected = torch.zeros(68)
    expected[[4, 12, 20]] = third  # bin int(0.5 * 8) = 4 of each channel
    expected[24 + 14 + 8::LBP_BINS] = third  # LBP code 8 at radii 1, 2, 4; no gradients at all
    torch.testing.assert_close(tokens, expected.expand(2, 6, 68), atol=2e-3, rtol=0)


def test_pixel_patches_are_the_patch_values_in_unfold_order():
    x = normalised(torch.rand(1, 3, 32, 32))  # pixels in [0, 1], as an image gives
    tokens = PixelPatches().forward_features(x)["x_norm_patchtokens"]  # (1, 4, 768)
    torch.testing.assert_close(tokens[0, 1], x[0, :, :16, 16:].reshape(-1), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------- the probe
def write_patch_dataset(root: Path, splits: dict[str, int]) -> Path:
    """32x32 images of four one-coloured 16x16 patches, a class per colour: patch-perfect labels."""
    colours = np.array([[200, 30, 30], [30, 200, 30], [30, 30, 200]], np.uint8)
    (root / "classes.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("red\ngreen\nblue\n")
    rng = np.random.default_rng(0)
    for split, n in splits.items():
        for d in ("images", "masks"):
            (root / d / split).mkdir(parents=True, exist_ok=True)
        for j in range(n):
            classes = rng.integers(0, 3, (2, 2)).astype(np.uint8)
            mask = np.kron(classes, np.ones((16, 16), np.uint8))
            Image.fromarray(colours[mask]).save(root / "images" / split / f"{j:03d}.png")
            Image.fromarray(mask).save(root / "masks" / split / f"{j:03d}.png")
    return root


def test_probe_scores_a_perfect_feature_at_100(tmp_path):
    root = write_patch_dataset(tmp_path / "ds", {"support": 20, "val": 6})
    probe = RetrievalProbe(open_dataset("folder", root, "support"), open_dataset("folder", root, "val"),
                           num_support=20, num_queries=6, k=5)
    result = probe(PixelPatches())
    assert result["eval_miou"] == pytest.approx(100.0) and result["eval_patch_nn"] == pytest.approx(1.0)


def test_probe_refuses_too_few_support_patches(tmp_path):
    root = write_patch_dataset(tmp_path / "ds", {"support": 2, "val": 2})
    probe = RetrievalProbe(open_dataset("folder", root, "support"), open_dataset("folder", root, "val"), k=50)
    with pytest.raises(ValueError, match="k=50 larger than the index"):
        probe(PixelPatches())


def test_patch_nn_rates_on_a_toy_case():
    # image 0: patches A (class 0) and B (class 1); image 1: A' near A (class 0), B' near A (class 1)
    tokens = np.array([[1, 0], [0, 1], [0.99, 0.14], [0.95, 0.31]], np.float32)
    tokens /= np.linalg.norm(tokens, axis=1, keepdims=True)
    rates = patch_nn_rates(tokens, labels=np.array([0, 1, 0, 1]), image_of=np.array([0, 0, 1, 1]),
                           cell=np.array([0, 1, 0, 1]))
    # A -> A' (same class, same cell); B -> B' (same class, same cell); A' -> A (yes); B' -> A (no, other cell)
    assert rates == {"same_class_top1": 0.75, "same_position_top1": 0.75}


def _bench_module(name: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_positive_purity_labels_each_patch_by_the_mask_under_its_centre():
    purity = _bench_module("positive_purity")
    mask = np.array([[0, 1, 2], [3, 255, 5]], np.uint8)  # (H=2, W=3), 255 void
    coords = torch.tensor([[0.5, 0.5], [2.9, 0.2], [1.5, 1.5], [7.0, 9.0], [-3.0, 1.0]])  # (x, y)
    # out-of-image centres clamp to the border (a rotated view's mirrored margin)
    assert purity.view_labels(mask, coords).tolist() == [0, 2, -1, 5, 3]


def test_positive_purity_object_classes_are_majorities_over_labelled_patches():
    purity = _bench_module("positive_purity")
    labels = torch.tensor([[0, 0, 1, -1, 2, 2], [1, 1, 1, 1, -1, -1]])  # (B=2, N=6), -1 void
    assign = torch.tensor([[0, 0, 0, 0, 1, 1], [2, 2, 2, 0, 1, 1]])  # K = 3
    cls, pur = purity.object_classes(labels, assign, K=3, num_classes=3)
    assert cls.tolist() == [[0, 2, -1], [1, -1, 1]]  # cluster 1 of image 1 holds only void patches
    assert pur.flatten().tolist() == pytest.approx([2 / 3, 1.0, 0.0, 1.0, 0.0, 1.0])


def test_chain_log_tags_stages_and_counts_steps_from_the_first(tmp_path):
    import importlib.util
    spec = importlib.util.spec_from_file_location("chain_log", Path(__file__).resolve().parents[1] / "scripts" / "chain_log.py")
    chain_log = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(chain_log)
    first, second = tmp_path / "a.jsonl", tmp_path / "b"
    second.mkdir()
    first.write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 0, "eval_miou": 5.0}, {"step": 10, "loss": 3.0}, {"step": 20, "loss": 2.0}, {"step": 20, "eval_miou": 6.0},
        {"step": 30, "loss": 1.0}, {"summary": True}]))
    (second / "log.jsonl").write_text(json.dumps({"step": 0, "eval_miou": 6.5}) + "\n" + json.dumps({"step": 10, "loss": 4.0}) + "\n")
    rows, spans = chain_log.chain([f"A={first}:20", f"B={second}"])
    assert [(r["stage"], r["step"], r["chain_step"]) for r in rows] == [
        ("A", 0, 0), ("A", 10, 10), ("A", 20, 20), ("A", 20, 20), ("B", 0, 20), ("B", 10, 30)]
    assert spans == [("A", 0, 20), ("B", 20, 30)]
    with pytest.raises(SystemExit, match="NAME=RUN_DIR"):
        chain_log.chain([f"C={tmp_path / 'missing'}"])
    # full-protocol points: a stage name means its last chain step; sorted by step
    assert chain_log.full_points(["B=7.5", "0=4.8", "A=6.25"], spans) == [(0, 4.8), (20, 6.25), (30, 7.5)]
    with pytest.raises(SystemExit, match="stage name \\(A, B\\) or a chain step"):
        chain_log.full_points(["Z=1"], spans)
    with pytest.raises(SystemExit, match="with a number"):
        chain_log.full_points(["A=high"], spans)
    chain_log.plot(rows, spans, str(tmp_path / "c.png"), [(0, 4.8), (30, 7.5)], goal=9.0, images_per_step=32)
    assert (tmp_path / "c.png").stat().st_size > 0


def test_handmade_features_go_through_image_features():
    image = np.full((40, 50, 3), 128, np.uint8)  # protocol size 32 x 48
    tokens, grid = image_features(TextureDescriptor(), image, precision="fp32")
    assert grid == (2, 3) and tokens.shape == (6, 68)
    np.testing.assert_allclose(np.linalg.norm(tokens, axis=1), 1.0, atol=1e-3)


# ---------------------------------------------------------------------------------- conv stem
def test_conv_stem_vit_keeps_the_patch_grid_and_round_trips(tmp_path):
    torch.manual_seed(0)
    vit = create_vit("vit_tiny_convstem_patch16")
    assert len(vit.blocks) == 11
    path = export_backbone(vit, "vit_tiny_convstem_patch16", tmp_path / "b.safetensors")  # noqa: F841
    loaded = load_backbone(weights=tmp_path / "b.safetensors")
    assert loaded.arch == "vit_tiny_convstem_patch16" and loaded.patch_size == 16
    x = torch.randn(1, 3, 64, 96)
    out = loaded.forward_features(x)
    assert out["grid"] == (4, 6) and out["x_norm_patchtokens"].shape == (1, 24, 192)
    vit.eval()
    torch.testing.assert_close(out["x_norm_patchtokens"], vit.forward_features(x)[:, 1:])


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize("kw, match", [
    (dict(eval_every=5), "needs --eval-data"),
    (dict(eval_every=-1, eval_data="x"), "must be >= 0"),
    (dict(augment="strong"), "choose one of dino, texture, mild, colour"),
    (dict(crop_scale=(0.5, 0.2)), "MIN <= MAX"),
    (dict(eval_every=5, eval_data="x", eval_queries=1), "--eval-queries >= 2"),
])
def test_config_refuses_bad_recipe_values(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(max_steps=1, batch_size=1, **kw)


def test_texture_views_blur_less_than_dino():
    dino, texture = AUGMENTATIONS["dino"], AUGMENTATIONS["texture"]
    assert texture[0].blur_sigma[1] < dino[0].blur_sigma[1] and texture[1].blur_p == 0.0
    assert texture[1].solarize_p == dino[1].solarize_p and texture[0].jitter_p == dino[0].jitter_p
    mild = AUGMENTATIONS["mild"]
    assert all(a.hue <= 0.02 and a.solarize_p == 0 and a.grayscale_p <= 0.05 for a in mild)
    assert mild[0].blur_sigma == texture[0].blur_sigma


def test_colour_views_disagree_in_hue_over_the_whole_wheel():
    """"colour": every view is jittered, hue shifts spread over [-0.5, 0.5], blur as "mild"."""
    from cribo.pretrain.transforms import draw_view_params
    colour, mild = AUGMENTATIONS["colour"], AUGMENTATIONS["mild"]
    assert [a.blur_p for a in colour] == [a.blur_p for a in mild] and colour[0].blur_sigma == mild[0].blur_sigma
    g = torch.Generator().manual_seed(0)
    views = [draw_view_params(256, 256, (0.12, 0.3), colour[1], generator=g) for _ in range(400)]
    hues = np.array([v.hue for v in views])
    assert all(v.jitter for v in views) and not any(v.solarize for v in views)
    assert hues.min() >= -0.5 and hues.max() <= 0.5 and (np.abs(hues) > 0.25).mean() > 0.4
    assert 0.1 < np.mean([v.grayscale for v in views]) < 0.3


def test_grey_views_are_mild_views_grey_half_of_the_time():
    from cribo.pretrain.transforms import draw_view_params
    grey, mild = AUGMENTATIONS["grey"], AUGMENTATIONS["mild"]
    for g_aug, m_aug in zip(grey, mild):
        assert dataclasses.replace(g_aug, grayscale_p=m_aug.grayscale_p) == m_aug and g_aug.grayscale_p == 0.5
    g = torch.Generator().manual_seed(0)
    views = [draw_view_params(256, 256, (0.25, 0.6), grey[0], generator=g) for _ in range(400)]
    assert 0.42 < np.mean([v.grayscale for v in views]) < 0.58


def test_grey_all_teacher_views_are_grey_and_the_students_only_half_of_the_time():
    """--augment grey-all --student-augment grey: the teacher's two views R = G = B on the same crops
    as the student's, which are grey about half of the time."""
    from cribo.pretrain.transforms import TwoViewTransform
    grey_all, mild = AUGMENTATIONS["grey-all"], AUGMENTATIONS["mild"]
    for g_aug, m_aug in zip(grey_all, mild):
        assert dataclasses.replace(g_aug, grayscale_p=m_aug.grayscale_p) == m_aug and g_aug.grayscale_p == 1.0
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    t = TwoViewTransform(32, scale=(0.25, 0.6), patch_size=16, view1_aug=grey_all[0], view2_aug=grey_all[1],
                         student_augs=AUGMENTATIONS["grey"])
    g = torch.Generator().manual_seed(0)

    def is_grey(view: torch.Tensor) -> bool:  # normalised (3, S, S) back to [0, 1]
        rgb = view * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        return bool((rgb - rgb.mean(0, keepdim=True)).abs().max() < 1e-5)

    student_grey = []
    for _ in range(60):
        v = t.sample(img, g)
        assert is_grey(v.view1) and is_grey(v.view2)
        assert (v.student_params1.box, v.student_params2.box) == (v.params1.box, v.params2.box)
        student_grey += [is_grey(v.student_view1), is_grey(v.student_view2)]
    assert 0.35 < np.mean(student_grey) < 0.65


def test_recolour_views_are_mild_views_repainted_half_of_the_time():
    from cribo.pretrain.transforms import draw_view_params
    recolour, mild = AUGMENTATIONS["recolour"], AUGMENTATIONS["mild"]
    for r_aug, m_aug in zip(recolour, mild):
        assert dataclasses.replace(r_aug, recolour_p=0.0) == m_aug and r_aug.recolour_p == 0.5
    g = torch.Generator().manual_seed(0)
    views = [draw_view_params(256, 256, (0.25, 0.6), recolour[0], generator=g) for _ in range(400)]
    drawn = [v.recolour for v in views if v.recolour is not None]
    assert 0.42 < len(drawn) / len(views) < 0.58
    assert 0.4 < np.mean([r.invert for r in drawn]) < 0.6
    assert all(0.5 <= r.gamma <= 2.0 and max(r.dark) < 128 <= min(r.light) for r in drawn)


def test_views_without_recolouring_draw_exactly_as_before():
    """Augmentations with recolour_p = 0 take no extra draws, so the existing runs' views are unchanged:
    the values below were drawn by the code before "recolour" existed (commit 61150ac)."""
    from cribo.pretrain.transforms import draw_view_params
    g = torch.Generator().manual_seed(3)
    for aug in AUGMENTATIONS["mild"] + AUGMENTATIONS["dino"]:
        view = draw_view_params(256, 256, (0.25, 0.6), aug, generator=g)
        assert view.recolour is None
    assert view.box == (37, 2, 156, 149) and view.hue == pytest.approx(-0.04432373121380806, abs=1e-12)
    assert torch.rand(1, generator=g).item() == pytest.approx(0.7664756178855896, abs=1e-12)


def test_recolour_pair_repaints_both_views_of_an_image_alike():
    from PIL import Image
    from cribo.pretrain.transforms import TwoViewTransform
    first, second = AUGMENTATIONS["recolour-pair"]
    assert first.recolour_p == second.recolour_p == 0.8 and second.recolour_shared and not first.recolour_shared
    t = TwoViewTransform(64, (0.25, 0.6), 16, view1_aug=first, view2_aug=second)
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8))
    g = torch.Generator().manual_seed(0)
    pairs = [t.sample(img, generator=g) for _ in range(100)]
    assert all(v.params1.recolour == v.params2.recolour for v in pairs)
    assert 0.7 < np.mean([v.params1.recolour is not None for v in pairs]) < 0.9
    assert len({v.params1.recolour for v in pairs}) > 70  # a new repainting per image


def test_recolour_keeps_the_pattern_and_replaces_colours_and_polarity():
    """A two-tone pattern (dark stripes on a light ground) comes out as the pair's two colours, in the
    pattern's places, inverted where drawn; gamma bends mid-greys only."""
    from PIL import Image
    from cribo.pretrain.transforms import Recolour
    pattern = np.zeros((8, 8, 3), np.uint8)
    pattern[:, ::2] = 255  # luma 1 on even columns, 0 on odd ones
    img = Image.fromarray(pattern)
    dark, light = (10.0, 20.0, 30.0), (200.0, 150.0, 250.0)
    out = np.asarray(Recolour(False, 1.7, dark, light).apply(img))
    assert (out[:, ::2] == light).all() and (out[:, 1::2] == dark).all()
    inv = np.asarray(Recolour(True, 0.6, dark, light).apply(img))
    assert (inv[:, ::2] == dark).all() and (inv[:, 1::2] == light).all()
    grey = Image.fromarray(np.full((2, 2, 3), 128, np.uint8))  # luma 128/255
    mid = np.asarray(Recolour(False, 2.0, (0.0, 0.0, 0.0), (255.0, 255.0, 255.0)).apply(grey))
    assert (mid == round(255 * (128 / 255) ** 2)).all()


# ---------------------------------------------------------------------------------- the engine
def test_eval_every_logs_a_curve_without_changing_the_run(tmp_path):
    eval_root = write_patch_dataset(tmp_path / "eval", {"support": 16, "val": 3})
    plain = tiny_config(tmp_path / "plain", max_steps=4, log_every=1)
    train(plain)
    curve = tiny_config(tmp_path / "curve", max_steps=4, log_every=1, eval_every=2, eval_data=str(eval_root),
                        eval_support=16, eval_queries=3)
    train(curve)
    rows = [json.loads(line) for line in (Path(curve.output_dir) / "log.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_miou" in r]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in evals] == [0, 2, 4]
    assert all(set(r) == {"step", "eval_miou", "eval_patch_nn", "eval_seconds"} for r in evals)
    assert all(set(r) == set(LOG_KEYS) for r in steps)
    base = [json.loads(line) for line in (Path(plain.output_dir) / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in steps] == [r["loss"] for r in base]  # bitwise: evaluation touches nothing
    png = plot_training_log(Path(curve.output_dir) / "log.jsonl", tmp_path / "c.png", images_per_step=2)
    assert png.stat().st_size > 0


def test_eval_rows_survive_a_resume(tmp_path):
    eval_root = write_patch_dataset(tmp_path / "eval", {"support": 16, "val": 3})
    kw = dict(max_steps=4, log_every=1, eval_every=2, eval_data=str(eval_root), eval_support=16, eval_queries=3)
    train(tiny_config(tmp_path, stop_at=2, ckpt_every=2, **kw))
    train(tiny_config(tmp_path, ckpt_every=2, **kw))
    rows = [json.loads(line) for line in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "eval_miou" in r] == [0, 2, 4]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
