"""Diagnostic: how often is a patch's nearest patch in *another* image of the same class?

A quick label-free-training health check that needs no index and no sub-sampling: the first
``--num-images`` images of a labelled split, their patch features at the protocol resolution
(:func:`index.features.image_features`), and for every labelled patch its top-1 cosine neighbour among
the patches of the other images (FAISS, exact). Printed: the same-class rate of that neighbour, and the
same-position rate (neighbour at the same grid cell, a sign that features encode position rather than
content). ``--pixels`` swaps the backbone for raw patch pixels (16x16x3, centred, L2-normalised): the
floor any learned feature should beat.

    python bench/probe_patch_nn.py --dataset folder --root data/synthetic --split val \
        [--backbone builtin [--random-init] | --weights runs/x/checkpoint.pth | --pixels]
"""
from __future__ import annotations

import argparse
import json

import faiss
import numpy as np


from index.cli import add_backbone_args, add_data_args, backbone_from_args
from index.datasets import open_dataset
from index.features import image_features
from index.labels import patch_labels, protocol_size, resize_image, resize_mask


def pixel_tokens(image: np.ndarray, p: int) -> np.ndarray:
    """``image (H, W, 3) uint8`` -> ``(h*w, p*p*3)`` raw patch pixels at the protocol size."""
    h, w = protocol_size(image.shape[0], image.shape[1], p)
    x = resize_image(image, (h, w)).astype(np.float32) / 255
    return x.reshape(h // p, p, w // p, p, 3).transpose(0, 2, 1, 3, 4).reshape((h // p) * (w // p), -1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_args(ap)
    ap.add_argument("--split", default="val")
    ap.add_argument("--num-images", type=int, default=60)
    add_backbone_args(ap)
    ap.add_argument("--pixels", action="store_true", help="raw patch pixels instead of a backbone")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    ds = open_dataset(args.dataset, args.root, args.split)
    n = min(args.num_images, len(ds))
    backbone = None if args.pixels else backbone_from_args(args)
    p = 16 if backbone is None else int(backbone.patch_size)
    feats, labels, image_of, cell = [], [], [], []
    for i in range(n):
        image, mask = ds.load_image(i), ds.load_mask(i)
        size = protocol_size(image.shape[0], image.shape[1], p)
        if backbone is None:
            tokens = pixel_tokens(image, p)
        else:
            tokens, _ = image_features(backbone, image, device=args.device, precision="fp32")
        labels.append(patch_labels(resize_mask(mask, size), p, ds.num_classes))
        feats.append(tokens)
        image_of.append(np.full(len(tokens), i))
        cell.append(np.arange(len(tokens)))
    x = np.concatenate(feats).astype(np.float32)  # (P, D); backbone tokens are already L2-normalised
    if backbone is None:
        x -= x.mean(0)
        x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-8
    lab, img, pos = (np.concatenate(a) for a in (labels, image_of, cell))

    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    k = max(len(f) for f in feats) + 1  # enough to always reach a patch of another image
    _, nbr = index.search(x, k)  # (P, k)
    other = img[nbr] != img[:, None]
    first = nbr[np.arange(len(x)), other.argmax(1)]  # top-1 neighbour outside the patch's own image
    scored = lab >= 0
    print(json.dumps({
        "backbone": "pixels" if backbone is None else backbone.source,
        "images": n, "patches": int(scored.sum()),
        "same_class_top1": round(float((lab[first] == lab)[scored].mean()), 4),
        "same_position_top1": round(float((pos[first] == pos)[scored].mean()), 4),
    }))


if __name__ == "__main__":
    main()
