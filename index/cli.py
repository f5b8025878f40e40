"""Command-line arguments shared by ``build_index.py`` and ``evaluate.py`` (one definition each)."""
from __future__ import annotations

import argparse

import torch

from cribo.argtypes import DeprecatedFlag, non_negative_int, positive_int
from cribo.backbones import Backbone, load_backbone
from index.bounds import DEFAULT_MAX_SIDE
from index.datasets import KINDS
from index.hbird import AUGMENTS, PIXEL_STDS, UPSAMPLES, VOID_LABELS, HbirdOptions
from index.matching import METRICS
from index.metrics import SCORED_CLASSES


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=KINDS, help="dataset layout")
    p.add_argument("--root", required=True, help="dataset folder (VOC: holds JPEGImages/ or VOC2012/)")


def add_backbone_args(p: argparse.ArgumentParser, *, legacy_seed_flag: bool = False) -> None:
    """``--backbone``, ``--weights | --random-init`` and ``--init-seed`` (the random-init seed; every CLI
    spells it so). ``legacy_seed_flag``: also accept the old spelling ``--seed`` (deprecated)."""
    p.add_argument("--backbone", help="timm arch, 'builtin' or a preset (default: builtin, or the arch "
                                      "recorded in a self-describing --weights file)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", help="backbone weights file (export, state dict, CrIBo/DINO checkpoint)")
    w.add_argument("--random-init", action="store_true", help="freshly initialised --backbone (with --init-seed)")
    p.add_argument("--init-seed", dest="init_seed", metavar="SEED", type=non_negative_int, default=0,
                   help="seed of --random-init (default 0)")
    if legacy_seed_flag:
        p.add_argument("--seed", dest="init_seed", metavar="SEED", type=non_negative_int, action=DeprecatedFlag,
                       new_flag="--init-seed")


def add_extraction_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache-dir", default=".cache/features", help="feature cache root (default .cache/features)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="auto = bf16 where the device has bf16 arithmetic, else fp32")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per forward (default 16)")
    p.add_argument("--max-side", type=positive_int, default=None,
                   help=f"downscale images whose longer side exceeds this many pixels (default: refuse images "
                        f"above {DEFAULT_MAX_SIDE} px; the protocol runs them at native size)")
    p.add_argument("--workers", type=non_negative_int, default=2, help="image decoding processes (default 2)")


def backbone_from_args(args: argparse.Namespace) -> Backbone:
    """The backbone the arguments name; ``builtin`` when neither --backbone nor --weights is given."""
    name = args.backbone or (None if args.weights else "builtin")
    return load_backbone(name, args.weights, random_init=args.random_init, seed=args.init_seed,
                         device=args.device)


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """``--protocol``, ``--metric``, ``--score-classes`` and the Hummingbird options (docs/protocols.md)."""
    p.add_argument("--protocol", default="cribo", choices=("cribo", "hbird"),
                   help="cribo (default: eval-protocol.md) or hbird (open-hummingbird-eval v2.0.0's choices, "
                        "each overridable below; docs/protocols.md)")
    p.add_argument("--metric", default="identity", choices=METRICS,
                   help="identity (default: predictions scored as they are) or hungarian (open-hummingbird-eval's "
                        "one-to-one matching of predicted to ground-truth classes first)")
    p.add_argument("--score-classes", choices=SCORED_CLASSES,
                   help="mean over classes with a non-zero union (present; cribo default) or over all classes, "
                        "absent ones counting 0 (all; hbird default)")
    h = p.add_argument_group("Hummingbird options (with --protocol hbird; defaults = the peer's)")
    h.add_argument("--input-size", type=int, help="square side of memory crops and query images (default 224)")
    h.add_argument("--memory-passes", type=int, help="augmented passes over the support images (default 1)")
    h.add_argument("--memory-size", type=int, help="memory patches in all (default: every patch)")
    h.add_argument("--augment", choices=AUGMENTS, help="memory images: hbird random resized crop + colour jitter "
                                                       "(default) or none (square resize)")
    h.add_argument("--void-label", choices=VOID_LABELS, help="void pixels in the memory's patch distributions: "
                                                             "background = class 0 (default) or ignore")
    h.add_argument("--pixel-std", choices=tuple(PIXEL_STDS), help="normalisation std: hbird (0.229, 0.224, 0.255; "
                                                                  "default) or imagenet (0.225 for blue)")
    h.add_argument("--upsample", choices=UPSAMPLES, help="class-distribution upsampling before the argmax "
                                                         "(default bilinear)")


_HBIRD_FLAGS = ("input_size", "memory_passes", "memory_size", "augment", "void_label", "pixel_std", "upsample")


def hbird_options_from_args(args: argparse.Namespace) -> HbirdOptions | None:
    """The :class:`index.hbird.HbirdOptions` of the arguments (None with --protocol cribo, where giving
    any Hummingbird option is an error rather than ignored)."""
    given = {name: getattr(args, name) for name in _HBIRD_FLAGS if getattr(args, name) is not None}
    if args.protocol != "hbird":
        if given:
            flags = ", ".join("--" + name.replace("_", "-") for name in given)
            raise ValueError(f"{flags} only apply to --protocol hbird (the cribo protocol has no such choice)")
        return None
    return HbirdOptions(**given)
