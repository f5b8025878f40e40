"""Any timm ViT as a backbone: patch 14/16/8, class and register tokens, dynamic size (random init, tiny inputs)."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer

from cribo import backbones
from cribo.backbones import ARCHS, Backbone, BackboneLoadError, arch_spec, export_backbone, load_backbone
from helpers_data import make_folder_dataset
from index.datasets import open_dataset
from index.features import extract_features, image_features
from index.labels import protocol_size

# (arch, patch size, width, prefix tokens = class token + registers)
CONTRACT = [
    ("vit_small_patch14_dinov2", 14, 384, 1),
    ("vit_small_patch14_reg4_dinov2", 14, 384, 5),
    ("vit_tiny_patch16_224", 16, 192, 1),
    ("deit_tiny_patch16_224", 16, 192, 1),
    ("vit_tiny_patch8_224", 8, 192, 1),
]


@pytest.mark.parametrize("arch,p,dim,prefix", CONTRACT)
def test_random_init_contract(arch, p, dim, prefix):
    spec = arch_spec(arch)
    assert (spec.patch_size, spec.embed_dim) == (p, dim)
    bb = load_backbone(arch, random_init=True, seed=0)
    assert (bb.patch_size, bb.embed_dim, bb.num_prefix_tokens) == (p, dim, prefix)
    assert bb.identity == f"random:{arch}:seed0"
    x = torch.randn(2, 3, 3 * p, 2 * p, generator=torch.Generator().manual_seed(0))
    out = bb.forward_features(x)
    tokens = bb.vit.forward_features(x)  # (2, prefix + 6, D)
    assert tokens.shape == (2, prefix + 6, dim)
    assert out["grid"] == (3, 2)
    assert torch.equal(out["x_norm_patchtokens"], tokens[:, prefix:])  # class token and registers dropped
    assert torch.equal(out["x_norm_clstoken"], tokens[:, 0])
    # dynamic size: another grid through the same weights
    assert bb.forward_features(torch.zeros(1, 3, p, 4 * p))["x_norm_patchtokens"].shape == (1, 4, dim)
    with pytest.raises(ValueError, match=f"not a multiple of the patch size {p}"):
        bb.forward_features(torch.zeros(1, 3, p + 1, p))


def test_random_init_is_seeded_for_any_vit():
    a = load_backbone("vit_small_patch14_reg4_dinov2", random_init=True, seed=3)
    b = load_backbone("vit_small_patch14_reg4_dinov2", random_init=True, seed=3)
    c = load_backbone("vit_small_patch14_reg4_dinov2", random_init=True, seed=4)
    assert torch.equal(a.vit.reg_token, b.vit.reg_token)
    assert not torch.equal(a.vit.reg_token, c.vit.reg_token)


def test_vit_without_class_token_gives_the_mean_patch_token():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=16, embed_dim=192, depth=1, num_heads=3, num_classes=0,
                            class_token=False, global_pool="avg", dynamic_img_size=True)
    bb = Backbone(vit, "vit_tiny_patch16_224", "test", "test")
    assert (bb.num_prefix_tokens, bb.has_class_token) == (0, False)
    out = bb.forward_features(torch.randn(1, 3, 32, 48))
    assert out["x_norm_patchtokens"].shape == (1, 6, 192)
    torch.testing.assert_close(out["x_norm_clstoken"], out["x_norm_patchtokens"].mean(dim=1))


def test_unsupported_names_are_explained():
    with pytest.raises(ValueError, match="'resnet18' is a timm ResNet, not a VisionTransformer"):
        load_backbone("resnet18", random_init=True)
    with pytest.raises(ValueError, match="unknown backbone 'vit_nope_patch14'"):
        load_backbone("vit_nope_patch14", random_init=True)
    with pytest.raises(ValueError, match="unknown backbone arch 'vit_nope'.*not a timm model name"):
        arch_spec("vit_nope")
    assert set(ARCHS) >= {"vit_tiny_patch16_224", "vit_small_patch16_224", "vit_tiny_patch8_224"}


def test_resolution_rule_uses_the_model_patch_size():
    assert protocol_size(500, 375, 14) == (490, 364)
    assert protocol_size(500, 375, 16) == (496, 368)
    bb = load_backbone("vit_small_patch14_reg4_dinov2", random_init=True, seed=0)
    image = np.random.default_rng(0).integers(0, 256, (45, 31, 3), dtype=np.uint8)
    tokens, grid = image_features(bb, image)
    assert grid == (3, 2) and tokens.shape == (6, 384)
    np.testing.assert_allclose(np.linalg.norm(tokens, axis=1), 1.0, atol=2e-3)


def test_extraction_of_a_split_at_patch_14(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", {"train": 2}, sizes=((30, 44),))
    ds = open_dataset("folder", root, "train")
    bb = load_backbone("vit_small_patch14_reg4_dinov2", random_init=True, seed=0)
    fs = extract_features(bb, ds, tmp_path / "cache", num_workers=0, progress=False, precision="fp32")
    assert fs.meta["patch_size"] == 14
    assert fs.grids.tolist() == [[2, 3], [2, 3]] and fs.num_patches == 12
    tokens, grid = image_features(bb, ds.load_image(1), precision="fp32")
    np.testing.assert_allclose(fs.features[6:12].astype(np.float32), tokens, atol=1e-3)


def test_export_round_trip_with_registers(tmp_path):
    bb = load_backbone("vit_small_patch14_reg4_dinov2", random_init=True, seed=1)
    info = export_backbone(bb, "vit_small_patch14_reg4_dinov2", tmp_path / "reg4.safetensors")
    assert (info["patch_size"], info["embed_dim"]) == (14, 384)
    loaded = load_backbone(weights=tmp_path / "reg4.safetensors")
    assert loaded.arch == "vit_small_patch14_reg4_dinov2" and loaded.num_prefix_tokens == 5
    x = torch.randn(1, 3, 28, 42)
    assert torch.equal(loaded.forward_features(x)["x_norm_patchtokens"], bb.forward_features(x)["x_norm_patchtokens"])


def test_pos_embed_without_prefix_positions_is_resampled(tmp_path):
    # DINOv2-reg keeps no position for its prefix tokens (no_embed_class): the whole grid is resampled.
    torch.manual_seed(0)
    small = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=70, num_classes=0)  # 5x5 grid
    state = small.state_dict()
    assert state["pos_embed"].shape == (1, 25, 384)
    torch.save(state, tmp_path / "small.pth")
    loaded = load_backbone("vit_small_patch14_reg4_dinov2", tmp_path / "small.pth")
    torch.testing.assert_close(loaded.vit.pos_embed, resample_abs_pos_embed(state["pos_embed"], [37, 37], [5, 5], 0))
    state.pop("reg_token")
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(BackboneLoadError, match=r"missing \(1\): reg_token"):
        load_backbone("vit_small_patch14_reg4_dinov2", tmp_path / "broken.pth")


def test_pretrained_tags_of_any_vit_reach_the_hub(monkeypatch):
    def no_hub(*args, **kwargs):
        raise OSError("offline")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_hub)
    with pytest.raises(BackboneLoadError, match=r"could not fetch timm pretrained weights "
                                                r"'vit_small_patch14_reg4_dinov2\.lvd142m'.*Offline\?"):
        load_backbone("vit_small_patch14_reg4_dinov2.lvd142m")
    with pytest.raises(ValueError, match="'resnet18' is a timm ResNet"):
        load_backbone("resnet18.a1_in1k")
