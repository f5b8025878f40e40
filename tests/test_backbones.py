"""Backbone registry, forward contract, every weight format, and the error paths (no network)."""
import argparse
import io
import json
import re
import urllib.error
import urllib.request

import huggingface_hub.errors
import pytest
import safetensors.torch
import timm
import torch
from timm.layers import resample_abs_pos_embed

from cribo import backbones, releases
from cribo.backbones import (ARCHS, BUILTIN_ARCH, Backbone, BackboneLoadError, backbone_state_dict,
                             create_vit, export_backbone, file_sha256, load_backbone)

TINY = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return load_backbone(TINY, random_init=True, seed=0)


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---------------------------------------------------------------- registry and forward contract

def test_registry_holds_the_supported_vits():
    assert set(ARCHS) == {"vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
                          "vit_tiny_patch8_224", "vit_small_patch8_224", "vit_base_patch8_224",
                          "vit_tiny_convstem_patch16", "vit_mini_convstem_patch16"}
    assert BUILTIN_ARCH in ARCHS


def test_arch_spec_overrides_reach_timm():
    # The mini arch is the tiny config with width, heads and depth overridden, and the conv stem.
    vit = backbones._empty_vit("vit_mini_convstem_patch16")
    assert (vit.embed_dim, len(vit.blocks), vit.blocks[0].attn.num_heads) == (128, 6, 2)
    assert isinstance(vit.patch_embed, backbones.HybridEmbed) and backbones.patch_stride(vit) == 16
    tiny = backbones._empty_vit("vit_tiny_convstem_patch16")
    assert (tiny.embed_dim, len(tiny.blocks), tiny.blocks[0].attn.num_heads) == (192, 11, 3)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_arch_builds_with_contract_shapes(arch):
    # On the meta device, uninitialised (the builder create_vit uses): every arch, base too, at no cost.
    vit = backbones._empty_vit(arch)
    spec = ARCHS[arch]
    assert vit.num_classes == 0 and isinstance(vit.head, torch.nn.Identity)
    assert backbones.patch_stride(vit) == spec.patch_size
    assert vit.embed_dim == spec.embed_dim and vit.num_prefix_tokens == 1 and vit.reg_token is None
    backbone = Backbone(vit, arch, "test", "test")
    p = spec.patch_size
    for H, W in [(224, 224), (96, 160)]:
        out = backbone.forward_features(torch.empty(2, 3, H, W, device="meta"))
        assert out["grid"] == (H // p, W // p)
        assert out["x_norm_clstoken"].shape == (2, spec.embed_dim)
        assert out["x_norm_patchtokens"].shape == (2, (H // p) * (W // p), spec.embed_dim)


def test_drop_path_rate_reaches_the_blocks():
    vit = create_vit(TINY, drop_path_rate=0.1)
    rates = [block.drop_path1.drop_prob if hasattr(block.drop_path1, "drop_prob") else 0.0 for block in vit.blocks]
    assert rates == pytest.approx([0.1 * i / 11 for i in range(12)])  # timm's linear stochastic-depth rule


@pytest.mark.parametrize("arch", ["vit_tiny_patch16_224", "vit_tiny_patch8_224"])
def test_tiny_forward_values(arch):
    backbone = load_backbone(arch, random_init=True, seed=0)
    p = backbone.patch_size
    x = torch.randn(3, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = backbone.forward_features(x)
        tokens = backbone.vit.forward_features(x)
        first = backbone.forward_features(x[:1])
    assert out["grid"] == (64 // p, 96 // p)
    assert out["x_norm_patchtokens"].shape == (3, (64 // p) * (96 // p), 192)
    assert torch.equal(out["x_norm_clstoken"], tokens[:, 0])  # CLS first, dropped from the patches
    assert torch.equal(out["x_norm_patchtokens"], tokens[:, 1:])
    # after the final LayerNorm (timm init: weight 1, bias 0): every token has mean 0, variance 1
    patches = out["x_norm_patchtokens"]
    torch.testing.assert_close(patches.mean(-1), torch.zeros(patches.shape[:2]), atol=1e-5, rtol=0)
    torch.testing.assert_close(patches.var(-1, unbiased=False), torch.ones(patches.shape[:2]), atol=1e-3, rtol=0)
    torch.testing.assert_close(first["x_norm_patchtokens"], patches[:1], atol=1e-5, rtol=1e-5)


def test_forward_rejects_sizes_off_the_patch_grid(tiny):
    with pytest.raises(ValueError, match="100x96 is not a multiple of the patch size 16"):
        tiny.forward_features(torch.zeros(1, 3, 100, 96))
    with pytest.raises(ValueError, match=r"\(B,3,H,W\)"):
        tiny.forward_features(torch.zeros(3, 64, 64))


def test_state_dict_sha256_is_order_free_and_content_sensitive():
    a = {"x": torch.arange(6.0).reshape(2, 3), "y": torch.ones(2)}
    digest = backbones.state_dict_sha256(a)
    assert backbones.state_dict_sha256({"y": torch.ones(2), "x": torch.arange(6.0).reshape(2, 3)}) == digest
    assert backbones.state_dict_sha256({**a, "y": torch.tensor([1.0, 1.5])}) != digest
    assert backbones.state_dict_sha256({**a, "x": a["x"].reshape(3, 2)}) != digest  # shape counts
    assert backbones.state_dict_sha256({**a, "y": a["y"].double()}) != digest  # dtype counts


# ---------------------------------------------------------------- random init

def test_random_init_is_deterministic_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    a = load_backbone(TINY, random_init=True, seed=0)
    assert torch.equal(torch.rand(4), expected)  # the global generator did not move
    b = load_backbone(TINY, random_init=True, seed=0)
    c = load_backbone(TINY, random_init=True, seed=1)
    _assert_same_weights(a.state_dict(), b.state_dict())
    assert not torch.equal(a.vit.patch_embed.proj.weight, c.vit.patch_embed.proj.weight)
    assert (a.identity, c.identity) == (f"random:{TINY}:seed0", f"random:{TINY}:seed1")
    assert load_backbone("builtin", random_init=True).identity == f"random:{BUILTIN_ARCH}:seed0"
    assert not a.training and a.vit.pos_embed.requires_grad


# ---------------------------------------------------------------- our export

@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_export_round_trip(tmp_path, tiny, dtype):
    path = tmp_path / "m.safetensors"
    info = export_backbone(tiny, TINY, path, meta={"epochs": 3}, dtype=dtype)
    assert json.loads(path.with_suffix(".json").read_text()) == info
    assert info["sha256"] == file_sha256(path)
    assert (info["arch"], info["patch_size"], info["embed_dim"], info["dtype"], info["epochs"]) == \
        (TINY, 16, 192, dtype, 3)
    loaded = load_backbone(weights=path)  # self-describing: no name
    assert (loaded.arch, loaded.identity) == (TINY, info["sha256"])
    want = {k: v.half().float() if dtype == "fp16" else v for k, v in tiny.state_dict().items()}
    got = loaded.state_dict()
    assert all(v.dtype == torch.float32 for v in got.values())
    _assert_same_weights(got, want)
    if dtype == "fp32":
        x = torch.randn(2, 3, 48, 80, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            assert torch.equal(loaded(x)["x_norm_patchtokens"], tiny(x)["x_norm_patchtokens"])


def test_export_argument_errors(tmp_path, tiny):
    with pytest.raises(ValueError, match="backbone is a vit_tiny_patch16_224, not vit_small"):
        export_backbone(tiny, "vit_small_patch16_224", tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match=r"meta keys \['sha256'\] are reserved"):
        export_backbone(tiny, TINY, tmp_path / "m.safetensors", meta={"sha256": "x"})
    with pytest.raises(ValueError, match="must end in .safetensors"):
        export_backbone(tiny, TINY, tmp_path / "m.pth")
    assert list(tmp_path.iterdir()) == []


def test_export_checksum_and_descriptor_are_verified(tmp_path, tiny):
    path = tmp_path / "m.safetensors"
    export_backbone(tiny, TINY, path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BackboneLoadError, match="does not match the sha256 recorded in m.json"):
        load_backbone(weights=path)
    path.with_suffix(".json").write_text('{"note": "unrelated"}')
    with pytest.raises(BackboneLoadError, match="m.json sits beside m.safetensors but is not a cribo export"):
        load_backbone(weights=path)


def test_builtin_missing_then_present(tmp_path, monkeypatch):
    builtin = tmp_path / "weights" / "builtin.safetensors"
    monkeypatch.setattr(backbones, "BUILTIN_WEIGHTS", builtin)
    with pytest.raises(BackboneLoadError, match=f"builtin backbone weights are missing: {re.escape(str(builtin))}"):
        load_backbone("builtin")
    info = export_backbone(load_backbone(BUILTIN_ARCH, random_init=True, seed=0), BUILTIN_ARCH, builtin)
    loaded = load_backbone("builtin")
    assert (loaded.arch, loaded.identity) == (BUILTIN_ARCH, info["sha256"])
    with pytest.raises(ValueError, match="brings its own weights"):
        load_backbone("builtin", weights=builtin)


# ---------------------------------------------------------------- plain state dicts

def _save(state: dict, path, fmt: str):
    if fmt == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, path)
    else:
        torch.save(state, path)
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_plain_state_dict_loads_with_a_name(tmp_path, tiny, fmt):
    path = _save(tiny.vit.state_dict(), tmp_path / f"w.{fmt}", fmt)
    with pytest.raises(BackboneLoadError, match=r"cannot tell the architecture of .*w\.\w+ .*--backbone"):
        load_backbone(weights=path)
    loaded = load_backbone(TINY, path)
    _assert_same_weights(loaded.state_dict(), tiny.state_dict())
    assert loaded.identity == file_sha256(path)


def test_one_prefix_stripper_for_every_layout():
    t = torch.zeros(1)
    assert backbone_state_dict({"module._orig_mod.cls_token": t, "norm.weight": t}).keys() == \
        {"cls_token", "norm.weight"}
    wrapped = {"module.backbone.cls_token": t, "module.backbone.norm.bias": t, "module.head.mlp.0.weight": t}
    assert backbone_state_dict(wrapped).keys() == {"cls_token", "norm.bias"}  # projection head ignored
    with pytest.raises(BackboneLoadError, match=r"unexpected keys beside backbone\.\* and head\.\*: queue"):
        backbone_state_dict({"backbone.cls_token": t, "queue": t})
    with pytest.raises(BackboneLoadError, match="entry 'args' is a str, not a tensor"):
        backbone_state_dict({"cls_token": t, "args": "x"})


def test_ddp_prefixed_state_dict_loads(tmp_path, tiny):
    path = _save({f"module.{k}": v for k, v in tiny.vit.state_dict().items()}, tmp_path / "ddp.pth", "torch")
    _assert_same_weights(load_backbone(TINY, path).state_dict(), tiny.state_dict())


def test_classifier_head_is_refused_not_dropped(tmp_path, tiny):
    state = {**tiny.vit.state_dict(), "head.weight": torch.zeros(1000, 192), "head.bias": torch.zeros(1000)}
    path = _save(state, tmp_path / "cls.pth", "torch")
    with pytest.raises(BackboneLoadError, match=r"classifier weights \(head\.bias, head\.weight\).*num_classes=0"):
        load_backbone(TINY, path)


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny):
    state = dict(tiny.vit.state_dict())
    del state["norm.weight"]
    state["blocks.99.attn.qkv.weight"] = torch.zeros(1)
    path = _save(state, tmp_path / "keys.pth", "torch")
    with pytest.raises(BackboneLoadError, match=r"keys do not match vit_tiny_patch16_224: missing \(1\): "
                                                r"norm\.weight; unexpected \(1\): blocks\.99\.attn\.qkv\.weight"):
        load_backbone(TINY, path)


def test_wrong_arch_shapes_are_reported(tmp_path, tiny):
    path = _save(tiny.vit.state_dict(), tmp_path / "tiny.pth", "torch")
    with pytest.raises(BackboneLoadError, match=r"shapes do not fit vit_small_patch16_224 .*cls_token "
                                                r"\(1, 1, 192\) vs \(1, 1, 384\).*another arch"):
        load_backbone("vit_small_patch16_224", path)


def test_pos_embed_of_another_grid_is_resampled(tmp_path):
    torch.manual_seed(0)
    small_grid = timm.create_model(TINY, img_size=112, num_classes=0)  # 7x7 position grid
    state = small_grid.state_dict()
    loaded = load_backbone(TINY, _save(state, tmp_path / "112.pth", "torch"))
    pos = loaded.vit.pos_embed
    assert pos.shape == (1, 1 + 14 * 14, 192)
    assert torch.equal(pos[:, :1], state["pos_embed"][:, :1])  # class-token position untouched
    torch.testing.assert_close(pos, resample_abs_pos_embed(state["pos_embed"], [14, 14], [7, 7], 1))
    assert torch.equal(loaded.vit.blocks[0].attn.qkv.weight, state["blocks.0.attn.qkv.weight"])


# ---------------------------------------------------------------- training checkpoints (CrIBo / DINO)

@pytest.fixture(scope="module")
def cribo_checkpoint(tmp_path_factory):
    """A fake released CrIBo checkpoint with the reference layout (ViT-S/16)."""
    torch.manual_seed(0)
    backbone = create_vit("vit_small_patch16_224").state_dict()
    teacher = {f"backbone.{k}": v for k, v in backbone.items()}
    teacher.update({"head.mlp.0.weight": torch.randn(32, 384), "head.last_layer.weight_g": torch.ones(64, 1),
                    "head.last_layer_object.weight_v": torch.randn(64, 16)})
    student = {f"module.{k}": v for k, v in teacher.items()}  # shares storage: written once
    student["module.backbone.cls_token"] = teacher["backbone.cls_token"] + 1.0  # the student differs
    ckpt = {"teacher": teacher, "student": student, "epoch": 800,
            "optimizer": {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                          "param_groups": [{"lr": 5e-4, "weight_decay": 0.04, "params": [0]}]},
            "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, n_tokens=32,
                                       pos_alpha=[1.0], data_path="/datasets/imagenet", use_fp16=True),
            "dino_loss": {"center": torch.zeros(1, 64)}, "fp16_scaler": {"scale": 65536.0, "_growth_tracker": 7}}
    path = tmp_path_factory.mktemp("cribo") / "cribo_vits16.pth"
    torch.save(ckpt, path)
    return path, backbone


def test_cribo_checkpoint_loads_the_teacher_safely(cribo_checkpoint):
    path, backbone = cribo_checkpoint
    loaded = load_backbone(weights=path)  # arch from args: vit_small + patch 16
    assert (loaded.arch, loaded.embed_dim, loaded.identity) == ("vit_small_patch16_224", 384, file_sha256(path))
    assert "teacher" in loaded.source
    _assert_same_weights(loaded.vit.state_dict(), backbone)  # the teacher, not the student
    with pytest.raises(BackboneLoadError, match="holds a vit_small_patch16_224 backbone but "
                                                "vit_base_patch16_224 was requested"):
        load_backbone("vit_base_patch16_224", path)


def test_dino_checkpoint_patch8_arch_from_args(tmp_path):
    torch.manual_seed(0)
    backbone = create_vit("vit_tiny_patch8_224").state_dict()
    teacher = {**{f"backbone.{k}": v for k, v in backbone.items()}, "head.last_layer.weight_g": torch.ones(8, 1)}
    path = tmp_path / "dino.pth"
    torch.save({"teacher": teacher, "args": argparse.Namespace(arch="vit_tiny", patch_size=8)}, path)
    loaded = load_backbone(weights=path)
    assert (loaded.arch, loaded.patch_size) == ("vit_tiny_patch8_224", 8)
    _assert_same_weights(loaded.vit.state_dict(), backbone)
    torch.save({"teacher": teacher, "args": argparse.Namespace(arch="resnet50", patch_size=16)}, path)
    with pytest.raises(BackboneLoadError, match="args say arch='resnet50', patch_size=16, which is not a supported"):
        load_backbone(weights=path)


_EXPLOITED = []


def _exploit():
    _EXPLOITED.append("code from the checkpoint ran")


class _Payload:
    def __reduce__(self):
        return (_exploit, ())


def test_other_pickled_objects_are_refused_never_run(tmp_path, tiny):
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {f"backbone.{k}": v for k, v in tiny.vit.state_dict().items()},
                "args": argparse.Namespace(arch="vit_tiny", patch_size=16), "extra": _Payload()}, path)
    with pytest.raises(BackboneLoadError, match=r"evil\.pth holds a pickled \S*_exploit; only tensors.*"
                                                r"never unpickles"):
        load_backbone(weights=path)
    assert _EXPLOITED == []


def test_broken_files_are_named(tmp_path, tiny):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"<html>not found</html>")
    with pytest.raises(BackboneLoadError, match=r"junk\.bin is not a checkpoint"):
        load_backbone(TINY, junk)
    good = _save(tiny.vit.state_dict(), tmp_path / "good.pth", "torch")
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BackboneLoadError, match=r"cut\.pth is a corrupt or truncated torch checkpoint"):
        load_backbone(TINY, cut)
    good = _save(tiny.vit.state_dict(), tmp_path / "good.safetensors", "safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(BackboneLoadError, match=r"cut\.safetensors is a corrupt or truncated safetensors"):
        load_backbone(TINY, cut)
    legacy = tmp_path / "legacy.pth"
    torch.save({"cls_token": torch.zeros(1, 1, 192)}, legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:40])
    with pytest.raises(BackboneLoadError, match=r"legacy\.pth (cannot be unpickled safely|is a corrupt)"):
        load_backbone(TINY, legacy)
    listing = tmp_path / "list.pth"
    torch.save([1, 2], listing)
    with pytest.raises(BackboneLoadError, match=r"list\.pth: unrecognised checkpoint layout"):
        load_backbone(TINY, listing)
    with pytest.raises(BackboneLoadError, match=r"weights file not found: .*absent\.pth"):
        load_backbone(TINY, tmp_path / "absent.pth")


# ---------------------------------------------------------------- presets and hub (network mocked)

class _FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, length: int):
        super().__init__(data)
        self.headers = {"Content-Length": str(length)}


def test_preset_downloads_once_then_loads_from_cache(tmp_path, monkeypatch, cribo_checkpoint):
    path, backbone = cribo_checkpoint
    data, urls = path.read_bytes(), []

    def serve(url, timeout):
        urls.append(url)
        return _FakeResponse(data, len(data))

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    loaded = load_backbone("cribo-in1k-vits16", cache_dir=tmp_path)
    assert urls == [releases.RELEASES["cribo-in1k-vits16"].url]
    assert [p.name for p in tmp_path.iterdir()] == ["cribo-in1k-vits16.pth"]
    assert loaded.identity == file_sha256(path) and loaded.arch == "vit_small_patch16_224"
    _assert_same_weights(loaded.vit.state_dict(), backbone)
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    assert load_backbone("cribo-in1k-vits16", cache_dir=tmp_path).identity == loaded.identity


def _offline(url, timeout):
    raise urllib.error.URLError("[Errno -2] Name or service not known")


def test_preset_offline_error_names_url_and_path(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    dest = tmp_path / "cache" / "cribo-coco-vits16.pth"
    url = releases.RELEASES["cribo-coco-vits16"].url
    expected = f"{re.escape(url)}.*put the file at {re.escape(str(dest))}"
    with pytest.raises(BackboneLoadError, match=expected):
        load_backbone("cribo-coco-vits16", cache_dir=tmp_path / "cache")
    with pytest.raises(releases.ReleaseDownloadError, match=expected):
        releases.download_release("cribo-coco-vits16", tmp_path / "cache", progress=False)
    assert not dest.exists()


def test_truncated_download_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: _FakeResponse(b"PK\x03\x04abc", 1000))
    with pytest.raises(releases.ReleaseDownloadError, match="truncated: got 7 of 1000 bytes"):
        releases.download_release("cribo-in1k-vitb16", tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_timm_pretrained_offline_error(monkeypatch):
    def no_hub(*args, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot find the requested files in the local cache")

    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_hub)
    with pytest.raises(BackboneLoadError, match=r"could not fetch timm pretrained weights "
                                                r"'vit_small_patch16_224\.dino'.*Offline\?"):
        load_backbone("vit_small_patch16_224.dino")
    with pytest.raises(ValueError, match="timm has no pretrained weights 'vit_small_patch16_224.nope'"):
        load_backbone("vit_small_patch16_224.nope")


def test_name_and_argument_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown backbone 'vit_huge'.*builtin, cribo-in1k-vits16"):
        load_backbone("vit_huge", random_init=True)
    with pytest.raises(ValueError, match="no weights for 'vit_small_patch16_224'"):
        load_backbone("vit_small_patch16_224")
    with pytest.raises(ValueError, match="random_init=True contradicts weights"):
        load_backbone(TINY, tmp_path / "w.pth", random_init=True)
    with pytest.raises(ValueError, match="random_init=True needs an arch name"):
        load_backbone(random_init=True)
