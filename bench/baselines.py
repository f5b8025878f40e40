"""Baselines for the learning curve: the Table-1 row of every floor and anchor, through one protocol.

Each row is :func:`index.protocol.run_protocol` (k = 50, majority vote, patch mIoU, exact search) on
the same support / query splits: raw patch pixels, the hand-made texture descriptor
(:mod:`index.descriptors`), the architecture at random init, and any number of trained weights
(``--weights NAME=FILE``: a CrIBo export, the supervised anchor of ``bench/train_supervised.py``, ...).
Prints a Markdown table (mean ± std over seeds) and writes it, with every run's results.json, under
``--out``.

    python bench/baselines.py --root data/synthetic --arch vit_tiny_convstem_patch16 \
        --weights cribo=runs/x/backbone.safetensors --weights supervised=runs/sup/backbone.safetensors \
        --out docs/results/baselines
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


from cribo.backbones import load_backbone
from index.datasets import open_dataset
from index.descriptors import PixelPatches, TextureDescriptor
from index.protocol import run_protocol


def _named(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--weights takes NAME=FILE, got {text!r}")
    return name, path


def cell(entry: dict) -> str:
    return f"{entry['mean']:.1f} ± {entry['std']:.1f}" if len(entry["miou"]) > 1 else f"{entry['mean']:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="folder")
    ap.add_argument("--root", required=True)
    ap.add_argument("--train-split", default="support")
    ap.add_argument("--val-split", default="val")
    ap.add_argument("--arch", default="vit_tiny_convstem_patch16", help="architecture of the random-init row")
    ap.add_argument("--weights", type=_named, action="append", default=[], metavar="NAME=FILE")
    ap.add_argument("--ratios", default="1,8,64,128")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--skip", default="", help="comma-separated rows to leave out: pixels,descriptor,random")
    ap.add_argument("--cache-dir", default=".cache/features")
    ap.add_argument("--out", default="results/baselines")
    args = ap.parse_args()

    train_ds = open_dataset(args.dataset, args.root, args.train_split)
    val_ds = open_dataset(args.dataset, args.root, args.val_split)
    ratios = [int(r) for r in args.ratios.split(",")]
    skip = set(filter(None, args.skip.split(",")))
    rows = []
    if "pixels" not in skip:
        rows.append(("raw pixels (16x16x3)", PixelPatches()))
    if "descriptor" not in skip:
        rows.append(("texture descriptor (colour + gradient + LBP, 68-d)", TextureDescriptor()))
    if "random" not in skip:
        rows.append((f"{args.arch}, random init (seed 0)", load_backbone(args.arch, random_init=True, seed=0)))
    rows += [(name, load_backbone(None, path)) for name, path in args.weights]

    out = Path(args.out)
    table = ["| features | " + " | ".join(f"1/{r}" for r in ratios) + " |", "|---" * (len(ratios) + 1) + "|"]
    for name, backbone in rows:
        slug = "".join(c if c.isalnum() else "-" for c in name.split(" (")[0].split(",")[0]).strip("-")
        res = run_protocol(backbone, train_ds, val_ds, ratios=ratios, seeds=args.seeds, k=50, precision="fp32",
                           cache_dir=args.cache_dir, out=out / slug / "results.json", log=None, num_workers=1)
        table.append(f"| {name} | " + " | ".join(cell(res["ratios"][str(r)]) for r in ratios) + " |")
        print(table[-1], flush=True)
    text = "\n".join(table) + "\n"
    (out / "baselines.md").write_text(text)
    print(text)
    print(json.dumps({"out": str(out / "baselines.md"), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
