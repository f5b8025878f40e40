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

VOC-LIKE 1/128 FROM CACHED FEATURES (``--from-caches TRAIN VAL``): voc-mini at 1/128 keeps 2 of its
311 training images, so its search is far cheaper per query than full VOC's (83 of 10,582). This
mode takes the two feature caches an earlier run wrote (no extraction), draws ``--support-images``
(83 = VOC train_aug / 128) training images per seed, and times, in CPU seconds of this one thread,
index build, search, vote (majority, k) and metric over every labelled validation patch, against
the CPU seconds of the bare forward of ``--forward-images`` validation images at the protocol
resolution (same backbone and precision as the caches). Printed: the ratio (search + vote + metric)
/ forward of the cached run itself and scaled to VOC (1,449 val + 83 support images forwarded, the
search cost per val image as measured):

    python bench/bench_eval_overhead.py --from-caches CACHE/<train key> CACHE/<val key> --seeds 1
    python bench/bench_eval_overhead.py --from-caches ... --index ivfpq --pq-bits 4
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import faiss
import numpy as np
import torch

from bench_feature_throughput import bare_forward_seconds, preload_batches, subset, warm_up
from cribo.backbones import load_backbone
from cribo.precision import resolve_precision
from index.datasets import open_dataset
from index.metrics import confusion_matrix, mean_iou
from index.protocol import _predict, run_protocol
from index.reranked import RerankedIndex, RerankParams
from index.search import build_search_index
from index.store import IndexParams


def _cache(path: Path) -> tuple[np.ndarray, np.ndarray, dict]:
    meta = json.loads((path / "meta.json").read_text())
    return np.load(path / "features.npy", mmap_mode="r"), np.load(path / "labels.npy").astype(np.int64), meta


def from_caches(args: argparse.Namespace) -> None:
    """The VOC-like 1/128 overhead from two cached feature sets (module docstring)."""
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    (ftr, ltr, mtr), (fva, lva, mva) = _cache(args.from_caches[0]), _cache(args.from_caches[1])
    name = mtr["backbone"].split(":")
    if name[0] != "random" or mva["backbone"] != mtr["backbone"]:
        raise SystemExit(f"--from-caches needs two caches of one random-init backbone, got {mtr['backbone']!r}, "
                         f"{mva['backbone']!r}")
    backbone = load_backbone(name[1], random_init=True, seed=int(name[2].removeprefix("seed")), device="cpu")
    precision = mva["precision"]
    val = subset(open_dataset("voc", args.root, "val"), args.forward_images)
    batches = preload_batches(backbone, val, args.batch_size)
    warm_up(backbone, batches, "cpu", precision)
    c0 = time.process_time()
    bare_forward_seconds(backbone, batches, "cpu", precision)
    fwd_per_image = (time.process_time() - c0) / len(val.ids)
    del batches, backbone

    C = len(mtr["class_names"])
    otr = np.asarray(mtr["offsets"], np.int64)
    qrows = np.nonzero(lva >= 0)[0]
    gt = lva[qrows]
    cpu = dict(index_build=0.0, search_vote=0.0, metric=0.0)
    wall = dict(search=0.0, vote=0.0)
    mious, support_patches = [], []
    for seed in range(args.seeds):
        images = np.sort(np.random.default_rng(seed).choice(len(otr) - 1, args.support_images, replace=False))
        rows = np.concatenate([np.arange(otr[i], otr[i + 1]) for i in images])
        rows = rows[ltr[rows] >= 0]
        support_patches.append(int(rows.size))
        c0 = time.process_time()
        if args.index == "ivfpq":
            index = RerankedIndex(ftr, rows, ltr[rows], RerankParams(nprobe=args.nprobe, pq_bits=args.pq_bits,
                                                                     seed=seed))
        else:
            index = build_search_index(ftr, rows, ltr[rows], args.index,
                                       params=IndexParams(seed=seed, nprobe=args.nprobe, ef_search=args.ef_search))
        c1 = time.process_time()
        pred, search_s, vote_s = _predict(index, fva, qrows, args.k, C, "majority")
        c2 = time.process_time()
        mious.append(100 * mean_iou(confusion_matrix(pred, gt, C)))
        c3 = time.process_time()
        cpu["index_build"] += c1 - c0
        cpu["search_vote"] += c2 - c1
        cpu["metric"] += c3 - c2
        wall["search"] += search_s
        wall["vote"] += vote_s
    n_val = len(mva["offsets"]) - 1
    per_run = {key: v / args.seeds for key, v in cpu.items()}
    svm = per_run["search_vote"] + per_run["metric"]
    own = svm / (fwd_per_image * (n_val + args.support_images))
    voc = svm / n_val * args.voc_val_images / (fwd_per_image * (args.voc_val_images + args.support_images))
    print(json.dumps({
        "bench": "eval_overhead_from_caches", "backbone": mtr["backbone"], "precision": precision,
        "index": args.index, "pq_bits": args.pq_bits if args.index == "ivfpq" else None, "nprobe": args.nprobe,
        "ef_search": args.ef_search, "k": args.k,
        "seeds": args.seeds, "support_images": args.support_images, "support_patches": support_patches,
        "val_images": n_val, "query_patches": int(qrows.size),
        "forward_cpu_s_per_image": round(fwd_per_image, 3), "forward_images_timed": len(val.ids),
        "cpu_s_per_run": {key: round(v, 2) for key, v in per_run.items()},
        "wall_s_per_run": {key: round(v / args.seeds, 2) for key, v in wall.items()},
        "miou_mean": round(float(np.mean(mious)), 2),
        "overhead_own": round(own, 4), "overhead_voc_scaled": round(voc, 4), "goal": "<= 0.25",
    }))
    print(f"search + vote + metric = {100 * voc:.0f}% of the forward at VOC-like 1/128 ({args.index}; "
          f"{100 * own:.0f}% for {n_val} val images) -- goal <= 25%")


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
    p.add_argument("--from-caches", nargs=2, type=Path, metavar=("TRAIN_CACHE", "VAL_CACHE"),
                   help="VOC-like 1/128 from two cached feature sets (see the module docstring)")
    p.add_argument("--support-images", type=int, default=83, help="--from-caches: 10,582 / 128")
    p.add_argument("--voc-val-images", type=int, default=1449, help="--from-caches: VOC val size")
    p.add_argument("--forward-images", type=int, default=16, help="--from-caches: val images forwarded")
    p.add_argument("--index", default="flat", help="--from-caches: flat, ivf, hnsw or ivfpq")
    p.add_argument("--nprobe", type=int, default=32, help="--from-caches --index ivf / ivfpq")
    p.add_argument("--ef-search", type=int, default=128, help="--from-caches --index hnsw")
    p.add_argument("--pq-bits", type=int, default=None, choices=(4, 8), help="--from-caches --index ivfpq")
    args = p.parse_args()
    if args.from_caches:
        return from_caches(args)

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
