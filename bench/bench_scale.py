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
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import faiss  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from index.metrics import confusion_matrix, mean_iou  # noqa: E402
from index.reranked import RerankedIndex, RerankParams  # noqa: E402
from index.sharded import merge_topk  # noqa: E402
from index.transfer import knn_vote  # noqa: E402

EXACT_CHUNK = 1 << 20  # support rows per exact-search step


def tiled_support(train: Path, n: int, noise: float, work: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(features (n, D) float16 memmap, labels (n,))``: labelled train rows tiled with noise.

    The tiles are written once under ``work`` (``support_<n>.npy`` + ``.json`` naming the source,
    noise and seed) and reused by later runs with the same arguments."""
    feats = np.load(train / "features.npy", mmap_mode="r")
    labels = np.load(train / "labels.npy").astype(np.int64)
    keep = np.nonzero(labels >= 0)[0]
    lab = labels[keep]
    out_labels = np.resize(lab, n)  # row s + j of every tile is source row j
    work.mkdir(parents=True, exist_ok=True)
    path, tag = work / f"support_{n}.npy", work / f"support_{n}.json"
    recipe = {"train": str(train.resolve()), "n": n, "noise": noise, "seed": seed, "source_rows": int(keep.size)}
    if path.exists() and tag.exists() and json.loads(tag.read_text()) == recipe:
        return np.load(path, mmap_mode="r"), out_labels
    tag.unlink(missing_ok=True)
    src = np.asarray(feats[keep], np.float32)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, src.shape[1]))
    rng = np.random.default_rng(seed)
    for s in range(0, n, src.shape[0]):
        m = min(src.shape[0], n - s)
        x = src[:m] + (noise * rng.standard_normal((m, src.shape[1]), dtype=np.float32) if s else 0.0)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    tag.write_text(json.dumps(recipe))
    return np.load(path, mmap_mode="r"), out_labels


def exact_search(features: np.ndarray, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Exact top-k streamed over support chunks (flat inner product per chunk, merged).

    Returns ``(D, I, read seconds, compute seconds, compute CPU seconds)``: reading + float32
    conversion of the float16 chunks, and the inner products + top-k (+ merge)."""
    D = np.full((xq.shape[0], 0), -np.inf, np.float32)
    I = np.full((xq.shape[0], 0), -1, np.int64)
    read_s = compute_s = compute_cpu = 0.0
    for s in range(0, features.shape[0], EXACT_CHUNK):
        t0 = time.perf_counter()
        chunk = torch.from_numpy(np.ascontiguousarray(features[s:s + EXACT_CHUNK])).float().numpy()
        t1, c1 = time.perf_counter(), time.process_time()
        flat = faiss.IndexFlatIP(features.shape[1])
        flat.add(chunk)
        d, i = flat.search(xq, k)
        D, I = merge_topk(np.concatenate([D, d], 1), np.concatenate([I, i + s], 1), k)
        del flat, chunk
        read_s, compute_s = read_s + t1 - t0, compute_s + time.perf_counter() - t1
        compute_cpu += time.process_time() - c1
    return D, I, read_s, compute_s, compute_cpu


_ANON_PEAK = [0.0]


def peak_rss_mb() -> float:
    """Peak resident set (ru_maxrss): it counts the memory-mapped feature pages the process touched,
    which the kernel can drop at any time."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def anon_rss_mb() -> float:
    """The largest anonymous resident memory (RssAnon: heap, index, buffers; not the file-backed
    memmap pages) seen so far (sampled every 0.2 s by :func:`watch_anon_rss`)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            _ANON_PEAK[0] = max(_ANON_PEAK[0], int(line.split()[1]) / 1024)
    return round(_ANON_PEAK[0], 1)


def watch_anon_rss() -> None:
    def loop() -> None:
        while True:
            anon_rss_mb()
            time.sleep(0.2)
    threading.Thread(target=loop, daemon=True).start()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train-cache", type=Path, required=True, help="feature cache dir of the support split")
    p.add_argument("--val-cache", type=Path, required=True, help="feature cache dir of the query split")
    p.add_argument("--support-patches", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=10_000, help="query patches searched with ivfpq (timing)")
    p.add_argument("--exact-queries", type=int, default=2_000,
                   help="the first N of them also searched exactly (recall, mIoU difference, exact timing)")
    p.add_argument("--noise", type=float, default=0.05)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--nlist", type=int, default=None, help="None: index.reranked.default_ivfpq_nlist(n)")
    p.add_argument("--nprobe", default="32", help="lists visited; a comma-separated list gives one line each")
    p.add_argument("--pq-m", type=int, default=None, help="bytes of code per patch (None: D / 8)")
    p.add_argument("--pq-bits", type=int, default=None, choices=(4, 8), help="None: 4 (fast-scan) from 1M patches on")
    p.add_argument("--rerank", type=int, default=4)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--work", type=Path, default=Path("/tmp/cribo-scale"))
    args = p.parse_args()
    faiss.omp_set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    nprobes = [int(v) for v in args.nprobe.split(",")]
    watch_anon_rss()
    if args.exact_queries > args.queries:
        p.error("--exact-queries must be <= --queries")

    t0 = time.perf_counter()
    support, labels = tiled_support(args.train_cache, args.support_patches, args.noise, args.work, 0)
    tile_s = time.perf_counter() - t0
    vf = np.load(args.val_cache / "features.npy", mmap_mode="r")
    vl = np.load(args.val_cache / "labels.npy").astype(np.int64)
    qrows = np.random.default_rng(1).choice(np.nonzero(vl >= 0)[0], args.queries, replace=False)
    xq, gt = np.asarray(vf[np.sort(qrows)], np.float32)[np.argsort(np.argsort(qrows))], vl[qrows]
    C = int(max(labels.max(), gt.max())) + 1
    ne = args.exact_queries
    print(f"support {support.shape} float16 memmap ({tile_s:.0f} s to tile or open); {args.queries} queries, "
          f"{ne} of them exact", file=sys.stderr, flush=True)

    t0, c0 = time.perf_counter(), time.process_time()
    index = RerankedIndex(support, np.arange(support.shape[0]), labels,
                          RerankParams(nlist=args.nlist, pq_m=args.pq_m, pq_bits=args.pq_bits, nprobe=nprobes[0],
                                       rerank=args.rerank, train_size=args.train_size))
    build_s, build_cpu = time.perf_counter() - t0, time.process_time() - c0
    anon_rss_mb()
    print(f"ivfpq built in {build_s:.0f} s (nlist {index.index.nlist}, {index.pq_m} bytes, {index.pq_bits}-bit "
          f"codes)", file=sys.stderr, flush=True)
    runs = []
    for nprobe in nprobes:
        index.index.nprobe = nprobe
        t0, c0 = time.perf_counter(), time.process_time()
        _, I = index.search(xq, args.k)
        runs.append((nprobe, I, time.perf_counter() - t0, time.process_time() - c0))
        anon_rss_mb()
        print(f"nprobe {nprobe}: {1000 * runs[-1][2] / args.queries:.2f} ms/query", file=sys.stderr, flush=True)
    rss_ivfpq, anon_ivfpq = peak_rss_mb(), anon_rss_mb()
    t0 = time.perf_counter()
    _, I_ref, read_s, compute_s, compute_cpu = exact_search(support, xq[:ne], args.k)
    exact_s = time.perf_counter() - t0

    miou_exact = 100 * mean_iou(confusion_matrix(knn_vote(I_ref, labels, C)[0], gt[:ne], C))
    for nprobe, I, search_s, search_cpu in runs:
        ms, cpu_ms = 1000 * search_s / args.queries, 1000 * search_cpu / args.queries
        recall = float(np.mean([np.intersect1d(a, b).size / args.k for a, b in zip(I[:ne], I_ref)]))
        miou = 100 * mean_iou(confusion_matrix(knn_vote(I[:ne], labels, C)[0], gt[:ne], C))
        print(json.dumps({
            "support_patches": int(support.shape[0]), "dim": int(support.shape[1]), "queries": args.queries,
            "exact_queries": ne, "k": args.k, "nlist": index.index.nlist, "nprobe": nprobe, "pq_m": index.pq_m,
            "pq_bits": index.pq_bits, "rerank": args.rerank, "threads": args.threads, "tile_s": round(tile_s, 1),
            "build_s": round(build_s, 1), "build_cpu_s": round(build_cpu, 1), "search_ms_per_query": round(ms, 3),
            "exact_ms_per_query": round(1000 * exact_s / ne, 3),
            "exact_compute_ms_per_query": round(1000 * compute_s / ne, 3),
            "exact_read_s": round(read_s, 1),
            "search_cpu_ms_per_query": round(cpu_ms, 3),
            "exact_compute_cpu_ms_per_query": round(1000 * compute_cpu / ne, 3),
            "speedup_vs_exact_compute": round(1000 * compute_s / ne / ms, 1),
            "speedup_cpu": round(1000 * compute_cpu / ne / cpu_ms, 1),
            "speedup_vs_exact_streamed": round(1000 * exact_s / ne / ms, 1),
            f"recall@{args.k}": round(recall, 4), "miou_ivfpq": round(miou, 2), "miou_exact": round(miou_exact, 2),
            "delta_miou": round(miou - miou_exact, 2),
            "index_ram_mb": round(index.memory_bytes() / 2**20, 1),
            "features_on_disk_mb": round(support.nbytes / 2**20, 1),
            "peak_rss_mb_ivfpq": rss_ivfpq, "anon_rss_mb_ivfpq": anon_ivfpq, "peak_rss_mb": peak_rss_mb(),
        }), flush=True)


if __name__ == "__main__":
    main()
