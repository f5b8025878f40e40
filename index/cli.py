"""Command-line arguments shared by ``build_index.py`` and ``evaluate.py`` (one definition each)."""
from __future__ import annotations

import argparse

import torch

from cribo.argtypes import non_negative_int, positive_int
from cribo.backbones import Backbone, load_backbone
from index.bounds import DEFAULT_MAX_SIDE
from index.datasets import KINDS


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, choices=KINDS, help="dataset layout")
    p.add_argument("--root", required=True, help="dataset folder (VOC: holds JPEGImages/ or VOC2012/)")


def add_backbone_args(p: argparse.ArgumentParser, seed_flag: str) -> None:
    """``--backbone``, ``--weights | --random-init`` and the random-init seed under ``seed_flag``."""
    p.add_argument("--backbone", help="timm arch, 'builtin' or a preset (default: builtin, or the arch "
                                      "recorded in a self-describing --weights file)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", help="backbone weights file (export, state dict, CrIBo/DINO checkpoint)")
    w.add_argument("--random-init", action="store_true", help=f"freshly initialised --backbone (with {seed_flag})")
    p.add_argument(seed_flag, dest="init_seed", metavar="SEED", type=non_negative_int, default=0,
                   help="seed of --random-init (default 0)")


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
