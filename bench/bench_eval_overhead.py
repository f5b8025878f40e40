"""Evaluation overhead beyond the backbone forward: the protocol at 1/128, exact search (goal <= 25%).

BASELINE: the bare backbone forward (normalise + ``forward_features``) over the support and query
images, decoded, resized and batched in memory before the clock starts (see
bench_feature_throughput.py). The measured path is one whole ``run_protocol`` call at ratio 1/128,
5 seeds, k = 50, flat (exact) index, into a fresh feature cache: extraction of both splits
(decoding, forward, caching), support selection, index builds, search, vote, metric and the reports.
Overhead = (protocol wall time - bare forward) / bare forward. Random-init ViT-S/16 by default: the
weights do not change the cost.

    python bench/bench_eval_overhead.py --root ../shared/data/voc-mini              # all 311 + 321 images
    python bench/bench_eval_overhead.py --images 64                                  # a quick look on a busy CPU
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import torch

from bench_feature_throughput import bare_forward_seconds, preload_batches, subset, warm_up
from cribo.backbones import load_backbone
from cribo.precision import resolve_precision
from index.datasets import open_dataset
from index.protocol import run_protocol


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "voc-mini"))
    p.add_argument("--backbone", default="vit_small_patch16_224")
    p.add_argument("--images", type=int, default=0, help="first N images of each split (0: all)")
    p.add_argument("--ratio", type=int, default=128)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto")
    args = p.parse_args()

    precision = resolve_precision(args.precision, args.device)
    backbone = load_backbone(args.backbone, random_init=True, seed=0, device=args.device)
    train, val = open_dataset("voc", args.root, "train_aug"), open_dataset("voc", args.root, "val")
    if args.images:
        train, val = subset(train, args.images), subset(val, args.images)
    batches = [b for ds in (train, val) for b in preload_batches(backbone, ds, args.batch_size)]
    warm_up(backbone, batches, args.device, precision)
    bare = bare_forward_seconds(backbone, batches, args.device, precision)
    del batches
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        res = run_protocol(backbone, train, val, ratios=(args.ratio,), seeds=args.seeds, k=args.k,
                           index_kind="flat", cache_dir=Path(tmp) / "cache", device=args.device,
                           precision=precision, batch_size=args.batch_size, num_workers=args.workers,
                           out=Path(tmp) / "results.json", progress=False, log=None)
        wall = time.perf_counter() - t0
    t = res["timing"]
    figures = {
        "bench": "eval_overhead", "backbone": args.backbone, "device": args.device, "precision": precision,
        "threads": torch.get_num_threads(), "ratio": args.ratio, "seeds": args.seeds, "k": args.k,
        "train_images": len(train.ids), "val_images": len(val.ids), "query_patches": res["num_query_patches"],
        "bare_forward_s": round(bare, 3), "protocol_s": round(wall, 3),
        "split_s": {key: round(t[key], 3) for key in ("forward", "extract", "index_build", "search", "vote", "metric")},
        "overhead": round((wall - bare) / bare, 4), "goal": "<= 0.25",
        "miou_mean": round(res["ratios"][str(args.ratio)]["mean"], 3),
    }
    print(json.dumps(figures))
    print(f"protocol 1/{args.ratio} x {args.seeds} seeds: {wall:.1f} s vs bare forward {bare:.1f} s -> "
          f"overhead {100 * (wall - bare) / bare:.1f}% (goal <= 25%)")


if __name__ == "__main__":
    main()
