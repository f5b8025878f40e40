"""Backbone registry and loading, shared by training, retrieval and the app.

Every backbone is a timm ``VisionTransformer`` built with ``num_classes=0`` (no classifier) and
``dynamic_img_size=True`` (any input whose sides are multiples of the patch size; the position
embedding is interpolated). ``Backbone`` wraps it with a named output contract (DINOv2 style):

    forward_features(x (B,3,H,W)) -> {"x_norm_clstoken": (B,D), "x_norm_patchtokens": (B,h*w,D),
                                      "grid": (h, w)}     with h = H/p, w = W/p, row-major patches.

``load_backbone`` reads every supported weight format (our export, plain state dicts, CrIBo / DINO
training checkpoints, released presets, timm pretrained tags). Torch files are only ever read with
``torch.load(weights_only=True)`` and an allow-list holding ``argparse.Namespace``: a checkpoint that
needs any other Python object is refused, never unpickled.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import os
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import safetensors
import safetensors.torch
import timm
import torch
from timm.layers import HybridEmbed, LayerNorm2d, resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_hybrid import ConvStem
from torch import nn

from cribo import releases
from cribo.dirswap import TargetError, check_output_file
from cribo.errors import TORCH_LOAD_ERRORS, TORCH_PROTOCOL_WARNING, DataError
from cribo.io import atomic_path, write_json

BUILTIN_ARCH = "vit_mini_convstem_patch16"
BUILTIN_WEIGHTS = Path(__file__).resolve().parent / "weights" / "builtin.safetensors"
EXPORT_FORMAT = "cribo-backbone"
_EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile
_SHOW = 10  # keys listed per category in error messages


class BackboneLoadError(DataError, RuntimeError):
    """Weights that cannot be loaded into a backbone; the message names the file and the fix."""


@dataclass(frozen=True)
class ArchSpec:
    """A supported ViT: the timm model it is built from, with ``patch_size`` forced."""

    timm_name: str
    patch_size: int
    embed_dim: int
    depth: int | None = None      # transformer blocks (None: the timm model's own)
    num_heads: int | None = None  # attention heads (None: the timm model's own)
    conv_stem: bool = False       # patchify with a convolutional stem instead of one p x p convolution


ARCHS: dict[str, ArchSpec] = {
    "vit_tiny_patch16_224": ArchSpec("vit_tiny_patch16_224", 16, 192),
    "vit_small_patch16_224": ArchSpec("vit_small_patch16_224", 16, 384),
    "vit_base_patch16_224": ArchSpec("vit_base_patch16_224", 16, 768),
    # timm has no tiny patch-8 model: the tiny config with its patch size overridden.
    "vit_tiny_patch8_224": ArchSpec("vit_tiny_patch16_224", 8, 192),
    "vit_small_patch8_224": ArchSpec("vit_small_patch8_224", 8, 384),
    "vit_base_patch8_224": ArchSpec("vit_base_patch8_224", 8, 768),
    # ViT-Ti/16 with the convolutional stem of Xiao et al. 2021 ("Early convolutions help transformers
    # see better"): four 3x3 stride-2 convolutions (24-48-96-192 channels) replace the 16x16 patchify,
    # and one transformer block is removed to keep the compute, as in that paper. Learns faster from
    # scratch on small data (the built-in is trained on CPU).
    "vit_tiny_convstem_patch16": ArchSpec("vit_tiny_patch16_224", 16, 192, depth=11, conv_stem=True),
    # A quarter of that compute for CPU pretraining: width 128 (2 heads of 64), 6 blocks, the same stem
    # (16-32-64-128 channels). About 0.06 GMAC per 112-px view against 0.28 for the tiny one.
    "vit_mini_convstem_patch16": ArchSpec("vit_tiny_patch16_224", 16, 128, depth=6, num_heads=2, conv_stem=True),
}


def known_names() -> list[str]:
    """Every listed ``name``; besides these, any timm ``VisionTransformer`` name (``vit_small_patch14_dinov2``,
    ``vit_small_patch14_reg4_dinov2``, ``deit_small_patch16_224``, ...) and timm pretrained tags
    ``<arch>.<tag>`` (vit_small_patch16_224.dino) are accepted."""
    return ["builtin", *releases.RELEASES, *ARCHS]


def create_vit(arch: str, *, drop_path_rate: float = 0.0) -> VisionTransformer:
    """Randomly initialised ViT of a supported ``arch`` (uses the global torch RNG)."""
    return _timm_vit(arch, drop_path_rate=drop_path_rate)


def arch_spec(arch: str) -> ArchSpec:
    """The :class:`ArchSpec` of ``arch``: a registered one (``ARCHS``), else any timm model that is a
    ``VisionTransformer`` (patch size and width read from the model built on the meta device).

    Raises ``ValueError`` naming the arch when timm does not know it or it is not a plain ViT.
    """
    if arch in ARCHS:
        return ARCHS[arch]
    return _timm_spec(arch)


@functools.lru_cache(maxsize=None)
def _timm_spec(arch: str) -> ArchSpec:
    if not timm.is_model(arch):
        raise ValueError(f"unknown backbone arch {arch!r}: not a timm model name; registered: "
                         f"{', '.join(ARCHS)}, or any timm VisionTransformer such as vit_small_patch14_dinov2 "
                         "(timm.list_models('vit_*') lists them)")
    with torch.device("meta"):  # shapes only: no memory, no init cost
        vit = timm.create_model(arch, pretrained=False, num_classes=0)
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"backbone arch {arch!r} is a timm {type(vit).__name__}, not a VisionTransformer: "
                         "only plain ViTs (patch tokens + prefix tokens) are supported")
    ph, pw = vit.patch_embed.patch_size
    if ph != pw:
        raise ValueError(f"backbone arch {arch!r} has non-square {ph}x{pw} patches: only square patches are supported")
    return ArchSpec(arch, int(ph), int(vit.embed_dim))


def _empty_vit(arch: str) -> VisionTransformer:
    """The ``arch`` on the meta device, uninitialised: a shape reference or a target for assign-loading."""
    with torch.device("meta"):
        return _timm_vit(arch, weight_init="skip")


def _timm_vit(arch: str, **kwargs) -> VisionTransformer:
    spec = arch_spec(arch)
    if spec.depth is not None:
        kwargs["depth"] = spec.depth
    if spec.num_heads is not None:
        kwargs["num_heads"] = spec.num_heads
    kwargs["embed_dim"] = spec.embed_dim
    if spec.conv_stem:
        kwargs["embed_layer"] = _conv_stem_embed
    return timm.create_model(spec.timm_name, pretrained=False, num_classes=0, dynamic_img_size=True,
                             patch_size=spec.patch_size, **kwargs)


def registered_arch(arch: str) -> ArchSpec:
    """The :class:`ArchSpec` of a registered ``arch`` (``ARCHS``: the ones training builds)."""
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is not supported; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch]


def named_outputs(vit: VisionTransformer, x: torch.Tensor) -> dict:
    """The named output contract of a timm ViT: x (B,3,H,W), H and W multiples of the patch size ->
    tokens after the final LayerNorm.

    Returns ``x_norm_clstoken`` (B,D), ``x_norm_patchtokens`` (B,h*w,D) (row-major over the (h,w)
    grid, every prefix token dropped: class token and registers; not L2-normalised) and ``grid`` =
    (h, w). A ViT without a class token gives the mean patch token as ``x_norm_clstoken``. Used by
    :class:`Backbone` (retrieval, the app) and by the training step on its raw student / teacher ViTs.
    """
    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"expected images of shape (B,3,H,W), got {tuple(x.shape)}")
    (H, W), p = x.shape[-2:], patch_stride(vit)
    if H % p or W % p:
        # timm's patch convolution would silently drop the remainder rows/columns.
        raise ValueError(f"input size {H}x{W} is not a multiple of the patch size {p}: "
                         "resize or crop it first (index.labels.protocol_size gives a valid size)")
    tokens = vit.forward_features(x)  # (B, num_prefix + h*w, D), final norm applied
    patches = tokens[:, vit.num_prefix_tokens:]  # (B, h*w, D)
    if patches.shape[1] != (H // p) * (W // p):
        raise RuntimeError(f"{type(vit).__name__} returned {patches.shape[1]} patch tokens for a {H}x{W} input, "
                           f"expected {(H // p) * (W // p)}")
    cls = tokens[:, 0] if vit.cls_token is not None else patches.mean(dim=1)
    return {"x_norm_clstoken": cls, "x_norm_patchtokens": patches, "grid": (H // p, W // p)}


def patch_stride(vit: VisionTransformer) -> int:
    """Pixels per token side: the patchify kernel, or for a convolutional stem (timm ``HybridEmbed``) the
    stem's downsampling ratio times the projection's kernel."""
    embed = vit.patch_embed
    ratio = getattr(embed, "feature_ratio", (1, 1))
    return int(embed.patch_size[0] * ratio[0])


def _conv_stem_embed(*, patch_size: int, embed_dim: int, **kwargs) -> HybridEmbed:
    """timm ``embed_layer`` for the convolutional stem: log2(p) 3x3 stride-2 convolutions (LayerNorm2d +
    ReLU between them, so no batch statistics), channels doubling up to ``embed_dim``, then timm's
    1x1 projection. The grid is the same as a p x p patchify: one token per p x p pixels."""
    depth = int(math.log2(patch_size))
    if 2**depth != patch_size:
        raise ValueError(f"a convolutional stem needs a power-of-two patch size, got {patch_size}")
    channels = tuple(embed_dim // 2 ** (depth - 1 - i) for i in range(depth))
    stem = ConvStem(in_chans=kwargs.get("in_chans", 3), depth=depth, channels=channels, stride=(2,) * depth,
                    norm_layer=LayerNorm2d)
    return HybridEmbed(stem, patch_size=1, embed_dim=embed_dim, **kwargs)


class Backbone(nn.Module):
    """A timm ViT with the named output contract used by retrieval, training and the app.

    Attributes: ``arch``, ``patch_size``, ``embed_dim``, ``identity`` (fingerprint of the weights,
    the feature-cache key: sha256 of the weights file or ``random:<arch>:seed<s>``), ``source``.
    """

    def __init__(self, vit: VisionTransformer, arch: str, identity: str, source: str):
        super().__init__()
        spec = arch_spec(arch)
        if vit.embed_dim != spec.embed_dim or patch_stride(vit) != spec.patch_size:
            raise ValueError(f"{arch}: expected embed_dim {spec.embed_dim} and {spec.patch_size}-pixel patches, "
                             f"got embed_dim {vit.embed_dim} and {patch_stride(vit)}-pixel patches")
        self.vit = vit
        self.arch, self.patch_size, self.embed_dim = arch, spec.patch_size, spec.embed_dim
        # prefix tokens ahead of the patch tokens: the class token (if any) then registers (DINOv2-reg)
        self.num_prefix_tokens = int(vit.num_prefix_tokens)
        self.has_class_token = vit.cls_token is not None
        self.identity, self.source = identity, source

    def forward_features(self, x: torch.Tensor) -> dict:
        """x (B,3,H,W), H and W multiples of ``patch_size`` -> tokens after the final LayerNorm.

        Returns ``x_norm_clstoken`` (B,D), ``x_norm_patchtokens`` (B,h*w,D) (row-major over the
        (h,w) grid, every prefix token dropped: class token and registers; not L2-normalised) and
        ``grid`` = (h, w). A ViT without a class token gives the mean patch token as ``x_norm_clstoken``.
        """
        return named_outputs(self.vit, x)

    def forward(self, x: torch.Tensor) -> dict:
        return self.forward_features(x)

    def extra_repr(self) -> str:
        return f"arch={self.arch}, identity={self.identity}, source={self.source}"


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def state_dict_sha256(state: dict[str, torch.Tensor]) -> str:
    """Hex sha256 over (name, dtype, shape, bytes) of every tensor, in sorted key order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        digest.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


# ------------------------------------------------------------------ loading

def load_backbone(name: str | None = None, weights: str | os.PathLike | None = None, *,
                  random_init: bool = False, seed: int = 0, device: str | torch.device = "cpu",
                  cache_dir: str | os.PathLike | None = None) -> Backbone:
    """Build a ``Backbone`` in eval mode on ``device``.

    name: a registered arch (``ARCHS``), ``"builtin"`` (``BUILTIN_WEIGHTS``), a preset
        (``cribo.releases.RELEASES``; downloaded to ``cache_dir``, default ~/.cache/cribo/checkpoints)
        or a timm pretrained tag ``<arch>.<tag>`` (e.g. ``vit_small_patch16_224.dino``, from the hub).
    weights: a file, format auto-detected: our export (``X.safetensors`` + ``X.json``, arch read
        from the json), a plain safetensors / torch state dict of a timm ViT with ``num_classes=0``
        (``name`` required), or a CrIBo / DINO training checkpoint (``teacher`` backbone; arch from
        its ``args`` when ``name`` is not given).
    random_init: initialise the arch of ``name`` with seed ``seed`` (global RNG left untouched).

    Raises ``BackboneLoadError`` for anything wrong with the weights (missing, corrupt, unsafe
    pickle, keys or shapes that do not match, failed download) and ``ValueError`` for bad arguments.
    """
    if name is not None and "." in name:  # a timm pretrained tag, e.g. vit_small_patch16_224.dino
        if weights is not None or random_init:
            raise ValueError(f"{name!r} is a timm pretrained tag: pass neither weights nor random_init")
        return _timm_pretrained(name).to(device).eval()
    arch = _arch_of_name(name)
    if random_init:
        if weights is not None:
            raise ValueError("random_init=True contradicts weights=...: pass one of them")
        if arch is None:
            raise ValueError(f"random_init=True needs an arch name, one of {', '.join(ARCHS)}")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            vit = create_vit(arch)
        backbone = Backbone(vit, arch, f"random:{arch}:seed{seed}", f"random init ({arch}, seed {seed})")
        return backbone.to(device).eval()
    if name == "builtin" or name in releases.RELEASES:
        if weights is not None:
            raise ValueError(f"name={name!r} brings its own weights; do not also pass weights={weights!r}")
        weights = _builtin_weights() if name == "builtin" else _release_weights(name, cache_dir)
    if weights is None:
        raise ValueError(f"no weights for {name!r}: pass weights=<file>, random_init=True, a preset "
                         f"({', '.join(releases.RELEASES)}), 'builtin' or a timm tag like "
                         "vit_small_patch16_224.dino")
    return _from_file(Path(weights), arch, label=name if arch != name else None).to(device).eval()


def _arch_of_name(name: str | None) -> str | None:
    if name is None or name in ARCHS:
        return name
    if timm.is_model(name):
        arch_spec(name)  # a plain timm ViT, or a clear ValueError
        return name
    if name == "builtin":
        return BUILTIN_ARCH
    if name in releases.RELEASES:
        return releases.RELEASES[name].arch
    raise _unknown(name)


def _unknown(name: str) -> ValueError:
    return ValueError(f"unknown backbone {name!r}; use one of {', '.join(known_names())} or a timm "
                      "pretrained tag such as vit_small_patch16_224.dino (a file goes in weights=)")


def _builtin_weights() -> Path:
    # Read at call time, so that tests (and forks) can point BUILTIN_WEIGHTS elsewhere.
    if not Path(BUILTIN_WEIGHTS).is_file():
        raise BackboneLoadError(
            f"the builtin backbone weights are missing: {BUILTIN_WEIGHTS} (and its .json). They are "
            "produced by the recipe in cribo/weights/MODEL_CARD.md; or use a preset "
            f"({', '.join(releases.RELEASES)}) or pass a weights file")
    return Path(BUILTIN_WEIGHTS)


def _release_weights(name: str, cache_dir: str | os.PathLike | None) -> Path:
    try:
        return releases.download_release(name, cache_dir)
    except releases.ReleaseDownloadError as err:  # one error type for callers of load_backbone
        raise BackboneLoadError(str(err)) from err


def _timm_pretrained(tag: str) -> Backbone:
    arch = tag.split(".", 1)[0]
    if arch not in ARCHS and not timm.is_model(arch):
        raise _unknown(tag)
    arch_spec(arch)  # a plain timm ViT, or a clear ValueError
    available = timm.list_pretrained(f"{arch}.*")
    if tag not in available:
        raise ValueError(f"timm has no pretrained weights {tag!r}; tags for {arch}: {available or 'none'}")
    try:
        vit = timm.create_model(tag, pretrained=True, num_classes=0, dynamic_img_size=True)
    except OSError as err:  # huggingface_hub's LocalEntryNotFoundError and HTTP errors, URLError
        raise BackboneLoadError(
            f"could not fetch timm pretrained weights {tag!r} from the Hugging Face hub ({err}). Offline? "
            "Run once on a connected machine (the hub cache is ~/.cache/huggingface), or export the "
            "backbone there with cribo.backbones.export_backbone and pass the .safetensors file") from err
    identity = f"timm:{tag}:{state_dict_sha256(vit.state_dict())}"
    return Backbone(vit, arch, identity, f"timm pretrained {tag}")


def _from_file(path: Path, arch: str | None, label: str | None = None) -> Backbone:
    if not path.is_file():
        raise BackboneLoadError(f"weights file not found: {path}")
    found_arch = None
    if _sniff(path) == "safetensors":
        sidecar = path.with_suffix(".json")
        if sidecar.exists():
            state, found_arch, identity = _read_export(path, sidecar)
            kind = "cribo export"
        else:
            state, kind, identity = _read_safetensors(path), "safetensors state dict", file_sha256(path)
    else:
        state, args, kind = _unwrap(_torch_load(path), path)
        found_arch, identity = _arch_from_args(args, path), file_sha256(path)
    if arch is not None and found_arch is not None and arch != found_arch:
        raise BackboneLoadError(f"{path} holds a {found_arch} backbone but {arch} was requested: drop "
                                "the name (the file is self-describing) or pass the matching one")
    arch = arch or found_arch
    if arch is not None:
        try:
            arch_spec(arch)
        except ValueError as err:
            raise BackboneLoadError(f"{path} declares arch {arch!r}, not a supported one: {err}") from err
    if arch is None:
        raise BackboneLoadError(f"cannot tell the architecture of {path} ({kind} without arch "
                                f"information): pass its name (--backbone), one of {', '.join(ARCHS)}")
    vit = _empty_vit(arch)  # no init to pay for: every tensor is assigned from the file
    state = _match_state(backbone_state_dict(state, path), vit, arch, path, resample_pos_embed=True)
    vit.load_state_dict({k: v.float() for k, v in state.items()}, strict=True, assign=True)
    return Backbone(vit, arch, identity, f"{label + ': ' if label else ''}{path} ({kind})")


def _sniff(path: Path) -> str:
    """'torch' (zip or legacy pickle written by torch.save) or 'safetensors', from the first bytes."""
    with open(path, "rb") as f:
        head = f.read(9)
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < path.stat().st_size:
        return "safetensors"
    raise BackboneLoadError(f"{path} is not a checkpoint: expected a safetensors file or a torch.save "
                            f"file, but it starts with {head!r}")


def _torch_load(path: Path) -> object:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=TORCH_PROTOCOL_WARNING)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        blocked = re.search(r"GLOBAL (\S+)", str(err))
        if blocked is None:  # e.g. a truncated legacy (non-zip) file
            raise BackboneLoadError(f"{path} cannot be unpickled safely ({_first_line(err)}): it "
                                    "is corrupt or not a torch checkpoint") from err
        raise BackboneLoadError(
            f"{path} holds a pickled {blocked.group(1)}; only tensors, plain containers and "
            "argparse.Namespace are allowed. cribo never unpickles arbitrary objects (weights_only=False "
            "can run code from the file). In a trusted session, re-save just the weights, e.g. "
            "torch.save(ckpt['teacher'], 'x.pth'), or export them with cribo.backbones.export_backbone"
        ) from err
    except TORCH_LOAD_ERRORS as err:  # the rest: random bytes, truncation
        raise BackboneLoadError(f"{path} is a corrupt or truncated torch checkpoint "
                                f"({_first_line(err)}); download or save it again") from err


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except safetensors.SafetensorError as err:
        raise BackboneLoadError(f"{path} is a corrupt or truncated safetensors file ({err})") from err


def _read_export(path: Path, sidecar: Path) -> tuple[dict, str, str]:
    """Our export: returns (state, arch, sha256) after checking the json's checksum."""
    try:
        info = json.loads(sidecar.read_text())
    except json.JSONDecodeError as err:
        raise BackboneLoadError(f"{sidecar} (beside {path.name}) is not valid JSON: {err}") from err
    if not isinstance(info, dict) or info.get("format") != EXPORT_FORMAT or "arch" not in info:
        raise BackboneLoadError(f"{sidecar} sits beside {path.name} but is not a cribo export "
                                f"descriptor (needs format={EXPORT_FORMAT!r}, arch, sha256): move it away")
    sha = file_sha256(path)
    if sha != info.get("sha256"):
        raise BackboneLoadError(f"{path} does not match the sha256 recorded in {sidecar.name} "
                                f"({sha} != {info.get('sha256')}): the file was modified or corrupted "
                                "after export; export it again")
    return _read_safetensors(path), info["arch"], sha


def _unwrap(obj: object, path: Path) -> tuple[dict, object, str]:
    """(state, args, kind) of a torch checkpoint: training checkpoint or plain state dict."""
    if isinstance(obj, dict) and "teacher" in obj:
        if not isinstance(obj["teacher"], dict):
            kind = type(obj["teacher"]).__name__
            raise BackboneLoadError(f"{path}: 'teacher' is a {kind}, not a state dict")
        return obj["teacher"], obj.get("args"), "training checkpoint, teacher"
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj, None, "state dict"
    keys = list(obj)[:_SHOW] if isinstance(obj, dict) else type(obj).__name__
    raise BackboneLoadError(f"{path}: unrecognised checkpoint layout (top level: {keys}); expected a "
                            "state dict of tensors or a CrIBo/DINO training checkpoint with 'teacher'")


def _arch_from_args(args: object, path: Path) -> str | None:
    """Arch of a DINO/CrIBo ``args`` Namespace: arch='vit_small', patch_size=16 -> vit_small_patch16_224."""
    if args is None:
        return None
    fields = vars(args) if isinstance(args, argparse.Namespace) else args
    if not isinstance(fields, dict) or "arch" not in fields:
        return None
    arch, patch = fields["arch"], fields.get("patch_size")
    for candidate in (arch, f"{arch}_patch{patch}_224"):
        if candidate in ARCHS:
            return candidate
    raise BackboneLoadError(f"{path}: its args say arch={arch!r}, patch_size={patch!r}, which is not a "
                            f"supported backbone ({', '.join(ARCHS)})")


def backbone_state_dict(state: dict, origin: str | os.PathLike = "state dict") -> dict[str, torch.Tensor]:
    """Backbone tensors of any supported layout, with timm ``VisionTransformer`` key names.

    The one place prefixes are stripped: ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) from
    every key; then, for a DINO/CrIBo wrapper (keys ``backbone.*``), the ``backbone.`` prefix, the
    projection head ``head.*`` being ignored. A plain state dict with a classifier (``head.*``) is
    refused: cribo does not guess which keys to drop.
    """
    stripped = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise BackboneLoadError(f"{origin}: entry {key!r} is a {type(value).__name__}, not a tensor")
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    if any(k.startswith("backbone.") for k in stripped):
        other = sorted(k for k in stripped if not k.startswith(("backbone.", "head.")))
        if other:
            raise BackboneLoadError(f"{origin}: unexpected keys beside backbone.* and head.*: {_few(other)}")
        return {k.removeprefix("backbone."): v for k, v in stripped.items() if k.startswith("backbone.")}
    classifier = sorted(k for k in stripped if k.startswith("head."))
    if classifier:
        raise BackboneLoadError(
            f"{origin} has classifier weights ({_few(classifier)}): save the backbone from a model made "
            "with timm.create_model(..., num_classes=0), or delete the head.* keys yourself before "
            "saving; they are not dropped silently")
    return stripped


def _match_state(state: dict, vit: nn.Module, arch: str, origin: object,
                 resample_pos_embed: bool) -> dict[str, torch.Tensor]:
    """Check keys and shapes against ``vit`` exactly; optionally resample a square pos_embed grid."""
    expected = vit.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise BackboneLoadError(f"{origin}: keys do not match {arch}: missing ({len(missing)}): "
                                f"{_few(missing)}; unexpected ({len(unexpected)}): {_few(unexpected)}")
    pos, want = state["pos_embed"], expected["pos_embed"]
    if resample_pos_embed and pos.ndim == 3 and pos.shape[-1] == want.shape[-1] and pos.shape != want.shape:
        # trained at another resolution: same arch, other grid. The prefix tokens that carry a position
        # embedding (the class token unless no_embed_class, as in DINOv2-reg) are kept as they are.
        n_prefix = 0 if vit.no_embed_class else vit.num_prefix_tokens
        side = math.isqrt(pos.shape[1] - n_prefix)
        if side * side == pos.shape[1] - n_prefix:
            grid = list(vit.patch_embed.grid_size)
            state = {**state, "pos_embed": resample_abs_pos_embed(pos.float(), new_size=grid, old_size=[side, side],
                                                                  num_prefix_tokens=n_prefix)}
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise BackboneLoadError(f"{origin}: tensor shapes do not fit {arch} (file vs model): {_few(wrong)}; "
                                "are these weights for another arch?")
    return state


def _first_line(err: BaseException) -> str:
    return (str(err).splitlines() or [type(err).__name__])[0]


def _few(items: list[str]) -> str:
    return ", ".join(items[:_SHOW]) + (f", ... ({len(items) - _SHOW} more)" if len(items) > _SHOW else "")


# ------------------------------------------------------------------ export

def is_export(path: Path) -> bool:
    """True when ``path`` is a safetensors file written by :func:`export_backbone` (its header says so)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == EXPORT_FORMAT
    except (OSError, safetensors.SafetensorError):
        return False


def check_export_target(path: str | os.PathLike, *, label: str = "--out") -> None:
    """Refuse, before any work, an export ``path`` (or its ``.json``) that would overwrite a file
    this code did not write, or that is not writable."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise TargetError(f"{label} {path} must end in .safetensors (its .json goes beside it)")
    check_output_file(path, label=label)
    sidecar = path.with_suffix(".json")
    if path.exists() and not is_export(path):
        raise TargetError(f"{label} {path} exists and is not a backbone exported by this tool; choose another "
                          f"{label} (nothing was changed)")
    if sidecar.exists() and not path.exists():
        raise TargetError(f"{label} {path}: {sidecar} already exists without its export; move it or choose "
                          f"another {label} (nothing was changed)")


def export_backbone(vit: VisionTransformer | Backbone, arch: str, path: str | os.PathLike,
                    meta: dict | None = None, *, dtype: str = "fp32") -> dict:
    """Write ``path`` (safetensors, ``fp32`` or ``fp16``) and ``path.with_suffix('.json')``.

    The json holds format, arch, patch_size, embed_dim, dtype, sha256 of the safetensors file,
    timm_version, plus ``meta`` (whose keys must not collide). Both files are written atomically;
    ``load_backbone(weights=path)`` verifies the checksum and casts back to fp32. Returns the json dict.
    """
    if isinstance(vit, Backbone):
        if vit.arch != arch:
            raise ValueError(f"backbone is a {vit.arch}, not {arch}")
        vit = vit.vit
    spec, path = arch_spec(arch), Path(path)
    if dtype not in _EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {list(_EXPORT_DTYPES)}, got {dtype!r}")
    if path.suffix != ".safetensors":
        raise ValueError(f"export path must end in .safetensors, got {path}")
    info = {"format": EXPORT_FORMAT, "arch": arch, "patch_size": spec.patch_size,
            "embed_dim": spec.embed_dim, "dtype": dtype, "sha256": None, "timm_version": timm.__version__}
    clash = sorted(set(meta or {}) & set(info))
    if clash:
        raise ValueError(f"meta keys {clash} are reserved by the export format")
    reference = _empty_vit(arch)
    state = {k: v.detach().to("cpu", _EXPORT_DTYPES[dtype]).contiguous()
             for k, v in backbone_state_dict(vit.state_dict(), "export").items()}
    state = _match_state(state, reference, arch, f"export to {path}", resample_pos_embed=False)
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(state, tmp, metadata={"format": EXPORT_FORMAT, "arch": arch})
        info["sha256"] = file_sha256(tmp)
    info.update(meta or {})
    write_json(path.with_suffix(".json"), info)
    return info
