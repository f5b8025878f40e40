"""Latency of one Segment-tab request: a VOC-sized image against a support index of about 1M patches.

The support set: real patch features of voc-mini ``train_aug`` (all 311 images, ~218k labelled patches,
extracted once with :func:`index.features.extract_features` and cached), tiled to ``--patches`` rows;
every tile after the first gets Gaussian noise (std ``--noise`` per dimension) and is re-normalised, so
the rows are distinct but keep the real features' distribution (clusters, labels) rather than random
unit vectors, whose neighbourhoods are unlike real ones. The query is a voc-mini ``val`` image
(500x375 -> 496x368, 713 patches at p = 16).

Each request is timed as the app times it (:func:`app.pipeline.segment` then
:func:`app.handlers.render_segmentation`): forward, search, vote, drawing (mask painting, overlay,
legend, confidence map, mask PNG). Median of ``--repeats`` runs after one warm-up, per index kind.
The baseline is the backbone forward of the same image in the same run: ``total/forward`` says how
much a request costs beyond it (search, vote, drawing). ``cpu`` is the process CPU time of a request:
with ``--threads 1`` it is what the request costs on one free core even when other jobs share the CPU.

    python bench/bench_app_latency.py [--backbone builtin | --random-init] [--patches 1000000]
        [--kinds flat,ivf] [--repeats 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]

from app.draw import class_palette
from app.handlers import render_segmentation
from app.inputs import load_image
from app.pipeline import segment
from app.state import IndexEntry
from cribo.backbones import BUILTIN_WEIGHTS, load_backbone
from index.datasets import open_dataset
from index.features import extract_features, image_features
from index.store import IndexParams, SupportIndex

GOAL_S = 1.0


def tiled_support(fs, n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``(n, D)`` float32 unit rows and ``(n,)`` labels: the labelled real patches, tiled with noise."""
    keep = fs.labels >= 0
    base = np.asarray(fs.features[keep], np.float32)
    labels = fs.labels[keep]
    reps = -(-n // base.shape[0])
    rng = np.random.default_rng(seed)
    xb = np.empty((reps * base.shape[0], base.shape[1]), np.float32)
    for r in range(reps):
        block = base if r == 0 else base + rng.normal(0, noise, base.shape).astype(np.float32)
        xb[r * base.shape[0]:(r + 1) * base.shape[0]] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return xb[:n], np.tile(labels, reps)[:n]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--voc", type=Path, default=REPO.parent / "shared" / "data" / "voc-mini")
    p.add_argument("--backbone", default=None, help="default: builtin if its weights exist, else --random-init")
    p.add_argument("--random-init", action="store_true", help="vit_tiny_patch16_224, seed 0")
    p.add_argument("--patches", type=int, default=1_000_000)
    p.add_argument("--noise", type=float, default=0.02)
    p.add_argument("--kinds", default="flat,ivf", help="index kinds (hnsw builds for minutes on 2 cores)")
    p.add_argument("--nlist", type=int, default=1024, help="ivf lists (library default round(4 sqrt(n)) = 4000 "
                                                           "at 1M takes minutes to train on 2 cores)")
    p.add_argument("--nprobe", type=int, default=16, help="ivf lists visited per query")
    p.add_argument("--train-size", type=int, default=None, help="ivf k-means sample (default 64 * nlist)")
    p.add_argument("--threads", type=int, default=None, help="torch and faiss threads (default: theirs)")
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache-dir", type=Path, default=REPO / ".cache" / "features")
    a = p.parse_args(argv)

    if a.threads:
        torch.set_num_threads(a.threads)
        faiss.omp_set_num_threads(a.threads)
    if a.random_init or (a.backbone is None and not BUILTIN_WEIGHTS.is_file()):
        backbone = load_backbone("vit_tiny_patch16_224", random_init=True, seed=0)
    else:
        backbone = load_backbone(a.backbone or "builtin")
    print(f"backbone: {backbone.source}; torch threads {torch.get_num_threads()}, faiss threads "
          f"{faiss.omp_get_max_threads()}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other "
          "processes share the CPUs: compare wall times only with runs at a similar load)")
    train = open_dataset("voc", a.voc, "train_aug")
    val = open_dataset("voc", a.voc, "val")
    fs = extract_features(backbone, train, a.cache_dir, num_workers=0)
    t0 = time.perf_counter()
    xb, labels = tiled_support(fs, a.patches, a.noise)
    print(f"support: {fs.num_patches:,} real patches of {len(train)} images -> {xb.shape[0]:,} x {xb.shape[1]} "
          f"(tiled, noise std {a.noise}) in {time.perf_counter() - t0:.1f} s")
    names = val.class_names
    i = next(i for i in range(len(val)) if val.load_image(i).shape[:2] == (375, 500))
    img = load_image(str(val.image_paths[i]), max_side=1024, max_pixels=40_000_000)
    print(f"query: {val.ids[i]} {img.original_size[1]}x{img.original_size[0]}")

    image_features(backbone, img.pixels)  # warm-up
    fwd = statistics.median(_timed(lambda: image_features(backbone, img.pixels)) for _ in range(a.repeats))
    print(f"baseline: bare forward (tokens of one image) {1000 * fwd:.0f} ms\n")

    header = f"{'index':<6} {'build s':>8} {'forward':>9} {'search':>9} {'vote':>9} {'drawing':>9} {'total':>9} " \
             f"{'cpu':>9} {'total/forward':>13} {'recall@k':>8} {'same pred':>9} {'goal 1.0 s':>10}"
    print(header)
    print("-" * len(header))
    params = IndexParams(nlist=a.nlist, nprobe=a.nprobe, train_size=a.train_size, seed=0)
    xq, _ = image_features(backbone, img.pixels)
    exact_I = exact_pred = None
    with tempfile.TemporaryDirectory() as tmp:
        for kind in a.kinds.split(","):
            t0 = time.perf_counter()
            index = SupportIndex.build(xb, labels, kind, params=params)
            build_s = time.perf_counter() - t0
            entry = IndexEntry(index, f"bench-{kind}", list(names), class_palette(len(names)))
            runs = []
            for r in range(a.repeats + 1):
                c0, t0 = time.process_time(), time.perf_counter()
                seg = segment(backbone, index, img.pixels, k=a.k, num_classes=len(names))
                t1 = time.perf_counter()
                render_segmentation(img, seg, entry, Path(tmp) / f"{kind}_{r}.png", int(backbone.patch_size))
                t2, c2 = time.perf_counter(), time.process_time()
                if r:  # the first run warms up
                    runs.append({**seg.timings, "draw": seg.timings["paint"] + (t2 - t1), "total": t2 - t0,
                                 "cpu": c2 - c0})
            m = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            # against exact search (flat), for the same query tokens
            _, I = index.search(xq, a.k)
            if kind == "flat":
                exact_I, exact_pred = I, seg.pred
            recall = f"{_recall(I, exact_I):8.3f}" if exact_I is not None else f"{'n/a':>8}"
            same = f"{(seg.pred == exact_pred).mean():9.3f}" if exact_pred is not None else f"{'n/a':>9}"
            ok = "yes" if m["total"] <= GOAL_S else "NO"
            print(f"{kind:<6} {build_s:8.1f} {_ms(m['forward'])} {_ms(m['search'])} {_ms(m['vote'])} "
                  f"{_ms(m['draw'])} {_ms(m['total'])} {_ms(m['cpu'])} {m['total'] / m['forward']:13.1f} {recall} {same} "
                  f"{ok:>10}")
            del index, entry
    print(f"\n(ms, median of {a.repeats}; cpu = process CPU time of the request, all threads; ivf: nlist = "
          f"{a.nlist}, nprobe = {a.nprobe}; k = {a.k}; recall@k and 'same pred' (share of patches whose label "
          f"equals exact search's) against flat; load average at the end {os.getloadavg()[0]:.1f})")


def _recall(I: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of the exact k nearest neighbours found, per query."""
    return float(np.mean([np.intersect1d(a, b).size / b.size for a, b in zip(I, exact)]))


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:6.0f} ms"


if __name__ == "__main__":
    main()
