#!/usr/bin/env python
"""Full-scale support sets on one machine: ``--index ivfpq`` (IVF-PQ + exact re-ranking from a memmap)
against streamed exact search, on real voc-mini features tiled to VOC / ADE20K size.

    python evaluate.py --dataset voc --root ../shared/data/voc-mini --backbone vit_small_patch14_reg4_dinov2 \
        --random-init --ratios 128 --seeds 1 --cache-dir /tmp/cache          # makes the two feature caches
    python bench/bench_scale.py --train-cache /tmp/cache/<train key> --val-cache /tmp/cache/<val key> \
        --support-patches 7500000 --work /tmp/scale      # VOC train_aug 1/1 size; 27000000 for ADE20K

The labelled support patches of the train cache are tiled to ``--support-patches`` rows, each copy
with Gaussian noise (``--noise``, then re-normalised, so neighbours are not exact duplicates), into a
float16 memmap under ``--work`` (outside the repository). ``--queries`` labelled val patches are
searched. Prints one JSON line: build seconds, search seconds per query, peak RSS, the index's
RAM, recall@k against exact search (streamed over support chunks) and the patch-level majority-vote
mIoU of both (and their difference).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import faiss  # noqa: E402
import numpy as np  # noqa: E402

from index.metrics import confusion_matrix, mean_iou  # noqa: E402
from index.reranked import RerankedIndex, RerankParams  # noqa: E402
from index.sharded import merge_topk  # noqa: E402
from index.transfer import knn_vote  # noqa: E402

EXACT_CHUNK = 1 << 20  # support rows per exact-search step


def tiled_support(train: Path, n: int, noise: float, work: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(features (n, D) float16 memmap, labels (n,))``: labelled train rows tiled with noise."""
    feats = np.load(train / "features.npy", mmap_mode="r")
    labels = np.load(train / "labels.npy").astype(np.int64)
    keep = np.nonzero(labels >= 0)[0]
    src, lab = np.asarray(feats[keep], np.float32), labels[keep]
    work.mkdir(parents=True, exist_ok=True)
    out = np.lib.format.open_memmap(work / f"support_{n}.npy", mode="w+", dtype=np.float16, shape=(n, src.shape[1]))
    rng = np.random.default_rng(seed)
    out_labels = np.empty(n, np.int64)
    for s in range(0, n, src.shape[0]):
        m = min(src.shape[0], n - s)
        x = src[:m] + (noise * rng.standard_normal((m, src.shape[1]), dtype=np.float32) if s else 0.0)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        out_labels[s:s + m] = lab[:m]
    out.flush()
    return np.load(work / f"support_{n}.npy", mmap_mode="r"), out_labels


def exact_search(features: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k streamed over support chunks (flat inner product per chunk, merged)."""
    D = np.full((xq.shape[0], 0), -np.inf, np.float32)
    I = np.full((xq.shape[0], 0), -1, np.int64)
    for s in range(0, features.shape[0], EXACT_CHUNK):
        flat = faiss.IndexFlatIP(features.shape[1])
        flat.add(np.asarray(features[s:s + EXACT_CHUNK], np.float32))
        d, i = flat.search(xq, k)
        D, I = merge_topk(np.concatenate([D, d], 1), np.concatenate([I, i + s], 1), k)
    return D, I


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-cache", type=Path, required=True, help="feature cache dir of the support split")
    p.add_argument("--val-cache", type=Path, required=True, help="feature cache dir of the query split")
    p.add_argument("--support-patches", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=20_000)
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--nlist", type=int, default=None)
    p.add_argument("--nprobe", type=int, default=32)
    p.add_argument("--pq-m", type=int, default=48)
    p.add_argument("--rerank", type=int, default=4)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/cribo-scale"))
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)

    t0 = time.perf_counter()
    support, labels = tiled_support(args.train_cache, args.support_patches, args.noise, args.work, 0)
    tile_s = time.perf_counter() - t0
    vf = np.load(args.val_cache / "features.npy", mmap_mode="r")
    vl = np.load(args.val_cache / "labels.npy").astype(np.int64)
    qrows = np.sort(np.random.default_rng(1).choice(np.nonzero(vl >= 0)[0], args.queries, replace=False))
    xq, gt = np.asarray(vf[qrows], np.float32), vl[qrows]
    C = int(max(labels.max(), gt.max())) + 1

    t0 = time.perf_counter()
    index = RerankedIndex(support, np.arange(support.shape[0]), labels,
                          RerankParams(nlist=args.nlist, pq_m=args.pq_m, nprobe=args.nprobe, rerank=args.rerank,
                                       train_size=args.train_size))
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, I = index.search(xq, args.k)
    search_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, I_ref = exact_search(support, xq, args.k)
    exact_s = time.perf_counter() - t0

    recall = float(np.mean([np.intersect1d(a, b).size / args.k for a, b in zip(I, I_ref)]))
    miou = {name: 100 * mean_iou(confusion_matrix(knn_vote(ids, labels, C)[0], gt, C))
            for name, ids in (("ivfpq", I), ("exact", I_ref))}
    print(json.dumps({
        "support_patches": int(support.shape[0]), "dim": int(support.shape[1]), "queries": args.queries,
        "k": args.k, "nlist": index.index.nlist, "nprobe": args.nprobe, "pq_m": args.pq_m, "rerank": args.rerank,
        "threads": args.threads, "tile_s": round(tile_s, 1), "build_s": round(build_s, 1),
        "search_ms_per_query": round(1000 * search_s / args.queries, 3),
        "exact_ms_per_query": round(1000 * exact_s / args.queries, 3), "speedup": round(exact_s / search_s, 1),
        f"recall@{args.k}": round(recall, 4), "miou_ivfpq": round(miou["ivfpq"], 2),
        "miou_exact": round(miou["exact"], 2), "delta_miou": round(miou["ivfpq"] - miou["exact"], 2),
        "index_ram_mb": round(index.memory_bytes() / 2**20, 1),
        "features_on_disk_mb": round(support.nbytes / 2**20, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }))


if __name__ == "__main__":
    main()
