"""Approximate (IVF, HNSW; fp16 storage) vs exact (flat) search on >= 1M real patch features.

Goal: |delta mIoU| <= 0.3 points with >= 10x faster search. BASELINE: ``flat`` (IndexFlatIP, exact),
built and searched in this run on the same support vectors and queries.

Where the vectors come from (printed with the figures):
- support = the labelled patch features of voc-mini's train_aug split (real features of real
  images, from ``extract_features``), plus the first ``--val-to-support`` fraction of the val images;
- ``--tile T`` > 1 stacks T copies of that support, copy t > 0 with Gaussian noise of norm ``--noise``
  added and the rows re-normalised (same labels), to reach the 1M scale from few images;
- queries = ``--queries`` labelled val patches drawn with a fixed seed from the val images not in the
  support. mIoU here is the patch-level mIoU of those queries (k-NN majority vote, k = 50).

Recall@k = |approximate top-k ∩ exact top-k| / k averaged over queries. Speed-up = exact search time /
approximate search time (builds are reported separately: an index is built once, searched often).

    # CPU (2 cores): ViT-S/16, 311 train images tiled x5 ~ 1.0M vectors, 5k queries
    python bench/bench_approx_vs_exact.py --tile 5 --queries 5000
    # GPU machine: ViT-S/8 gives ~2,850 real patches per image: train + half of val ~ 1.3M, no tiling
    python bench/bench_approx_vs_exact.py --backbone vit_small_patch8_224 --val-to-support 0.5 --queries 20000
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np
import torch

from bench_feature_throughput import subset
from cribo.backbones import load_backbone
from index.datasets import open_dataset
from index.features import extract_features
from index.metrics import confusion_matrix, mean_iou
from index.store import IndexParams, SupportIndex
from index.transfer import knn_vote

CHUNK = 8192


def timed_search(index: SupportIndex, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    D, I = np.empty((len(xq), k), np.float32), np.empty((len(xq), k), np.int64)
    t0 = time.perf_counter()
    for s in range(0, len(xq), CHUNK):
        D[s:s + CHUNK], I[s:s + CHUNK] = index.search(xq[s:s + CHUNK], k)
    return D, I, time.perf_counter() - t0


def recall_at_k(I: np.ndarray, I_ref: np.ndarray) -> float:
    """Mean fraction of the exact top-k ids found by the approximate search (vectorised in chunks)."""
    k = I_ref.shape[1]
    found = np.zeros(len(I_ref))
    for s in range(0, len(I_ref), CHUNK):  # (n, k, k) equality in chunks
        found[s:s + CHUNK] = (I[s:s + CHUNK, :, None] == I_ref[s:s + CHUNK, None, :]).any(axis=1).sum(axis=1)
    return float(found.mean() / k)


def miou(I: np.ndarray, labels: np.ndarray, gt: np.ndarray, num_classes: int) -> float:
    pred, _ = knn_vote(I, labels, num_classes)
    return 100.0 * mean_iou(confusion_matrix(pred, gt, num_classes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "voc-mini"))
    p.add_argument("--backbone", default="vit_small_patch16_224")
    p.add_argument("--weights", help="weights file (default: random init, seed 0)")
    p.add_argument("--cache-dir", default=str(REPO / ".cache" / "features"))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tile", type=int, default=1, help="stack T noisy copies of the support")
    p.add_argument("--noise", type=float, default=0.05, help="norm of the noise added to copies t > 0")
    p.add_argument("--val-to-support", type=float, default=0.0, help="fraction of val images moved to the support")
    p.add_argument("--images", type=int, default=0, help="first N images of each split (0: all; for a smoke run)")
    p.add_argument("--queries", type=int, default=5000)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--nprobe", default="8,16,32,64")
    p.add_argument("--ef", default="64,128,256")
    args = p.parse_args()

    if args.weights:
        backbone = load_backbone(args.backbone, args.weights, device=args.device)
    else:
        backbone = load_backbone(args.backbone, random_init=True, seed=0, device=args.device)
    train, val = open_dataset("voc", args.root, "train_aug"), open_dataset("voc", args.root, "val")
    if args.images:
        train, val = subset(train, args.images), subset(val, args.images)
    C = len(train.class_names)
    fs_tr = extract_features(backbone, train, args.cache_dir, device=args.device, progress=True)
    fs_va = extract_features(backbone, val, args.cache_dir, device=args.device, progress=True)

    n_moved = int(round(args.val_to_support * len(val.ids)))
    rows_tr = fs_tr.rows_of(np.arange(len(train.ids)), labelled_only=True)
    rows_mv = fs_va.rows_of(np.arange(n_moved), labelled_only=True)
    xb = np.concatenate([fs_tr.features[rows_tr], fs_va.features[rows_mv]]).astype(np.float32)
    yb = np.concatenate([fs_tr.labels[rows_tr], fs_va.labels[rows_mv]])
    real = len(xb)
    if args.tile > 1:
        rng = np.random.default_rng(0)
        copies = [xb]
        for _ in range(args.tile - 1):
            noise = rng.standard_normal(xb.shape, dtype=np.float32) * (args.noise / np.sqrt(xb.shape[1]))
            x = xb + noise
            copies.append(x / np.linalg.norm(x, axis=1, keepdims=True))
        xb, yb = np.concatenate(copies), np.tile(yb, args.tile)
    q_rows = fs_va.rows_of(np.arange(n_moved, len(val.ids)), labelled_only=True)
    q_rows = np.sort(np.random.default_rng(1).choice(q_rows, size=min(args.queries, len(q_rows)), replace=False))
    xq, gt = fs_va.features[q_rows].astype(np.float32), fs_va.labels[q_rows]
    source = (f"{real} real labelled patch features ({len(train.ids)} train_aug + {n_moved} val images, "
              f"{args.backbone} {'random init' if not args.weights else args.weights}) "
              f"x {args.tile} copies (noise norm {args.noise} on copies > 0) = {len(xb)} support vectors; "
              f"{len(xq)} queries from the other {len(val.ids) - n_moved} val images")
    print(json.dumps({"bench": "approx_vs_exact", "source": source, "threads": torch.get_num_threads()}), flush=True)

    rows = []
    t0 = time.perf_counter()
    exact = SupportIndex.build(xb, yb, "flat")
    build_exact = time.perf_counter() - t0
    _, I_ref, t_exact = timed_search(exact, xq, args.k)
    miou_exact = miou(I_ref, yb, gt, C)
    rows.append(dict(kind="flat", param="-", build_s=build_exact, search_s=t_exact, recall=1.0, miou=miou_exact))
    print(json.dumps({**rows[-1], "support": len(xb)}), flush=True)
    del exact

    for kind, name, values in (("ivf", "nprobe", args.nprobe), ("hnsw", "efSearch", args.ef)):
        t0 = time.perf_counter()
        index = SupportIndex.build(xb, yb, kind, params=IndexParams())
        build = time.perf_counter() - t0
        for v in (int(x) for x in values.split(",")):
            index.set_search_params(**({"nprobe": v} if kind == "ivf" else {"ef_search": v}))
            _, I, t = timed_search(index, xq, args.k)
            rows.append(dict(kind=kind, param=f"{name}={v}", build_s=build, search_s=t,
                             recall=recall_at_k(I, I_ref), miou=miou(I, yb, gt, C)))
            print(json.dumps(rows[-1]), flush=True)
        del index

    print(f"\n{source}\nk = {args.k}; exact mIoU {miou_exact:.2f}\n")
    print(f"{'index':<8} {'param':<13} {'build s':>8} {'search s':>9} {'speed-up':>9} {'recall@k':>9} {'dmIoU':>7}")
    for r in rows:
        print(f"{r['kind']:<8} {r['param']:<13} {r['build_s']:8.1f} {r['search_s']:9.2f} "
              f"{t_exact / r['search_s']:8.1f}x {r['recall']:9.4f} {r['miou'] - miou_exact:+7.2f}")
    print("\ngoal: |dmIoU| <= 0.3 with >= 10x speed-up")


if __name__ == "__main__":
    main()
