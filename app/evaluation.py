"""Batch mIoU of a support index on a query split (the Evaluate tab).

:func:`index.protocol.run_protocol` builds its own support indices from a training split (every ratio
and seed). The app evaluates the index the user has chosen instead (the built-in one, a directory from
``build_index.py``, or one extended by in-context labelling), with the same steps and library calls:
query features from :func:`index.features.extract_features` (cached), the labelled query patches
searched in the index, :func:`index.transfer.knn_vote` (or the soft vote), one patch-level confusion
matrix over the split (:mod:`index.metrics`), and the result dict in ``run_protocol``'s layout so that
:func:`index.report.write_reports` writes the JSON, CSV, Markdown and per-class chart. For an index
built by ``build_support_index`` at ratio 1/n and seed s, the mIoU equals ``run_protocol``'s run of
ratio n and seed s (tested).
"""
from __future__ import annotations

import datetime as _dt
import time
from typing import Callable

import numpy as np

from app.pipeline import transfer_labels
from index.features import extract_features
from index.metrics import confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from index.protocol import QUERY_CHUNK, backbone_meta
from index.transfer import check_k

__all__ = ["evaluate_index", "subset"]


def subset(dataset, n: int):
    """The first ``n`` images of a file-based split (same class names and masks), for a quick run."""
    from index.datasets import FileSegDataset

    if n >= len(dataset.ids):
        return dataset
    if not isinstance(dataset, FileSegDataset):
        raise ValueError(f"'max images' below the split size works for file datasets only, not {dataset.kind}")
    return FileSegDataset(kind=dataset.kind, name=dataset.name, root=dataset.root, split=dataset.split,
                          ids=dataset.ids[:n], class_names=dataset.class_names,
                          image_paths=dataset.image_paths[:n], mask_paths=dataset.mask_paths[:n], lut=dataset.lut)


def evaluate_index(backbone, index, class_names: list[str], dataset, *, k: int = 50, vote: str = "majority",
                   cache_dir, device: str = "cpu", precision: str = "auto", num_workers: int = 0,
                   progress: Callable[[float, str], None] | None = None) -> dict:
    """Patch-level mIoU (percent) of ``index`` on every labelled patch of ``dataset``.

    Returns a results dict in :func:`index.protocol.run_protocol`'s layout with one "ratio" entry (the
    index's ratio, one run with its seed), plus ``index_source`` details.
    """
    t_start = time.perf_counter()
    C = len(class_names)
    if list(dataset.class_names) != list(class_names):
        raise ValueError(f"the query split {dataset.split!r} of {dataset.root} has other classes "
                         f"({len(dataset.class_names)}) than the support index ({C}): evaluate an index on "
                         "a split of the dataset it was built from")
    check_k(k, index.ntotal)
    progress = progress or (lambda frac, desc: None)
    progress(0.0, "features")
    t0 = time.perf_counter()
    fs = extract_features(backbone, dataset, cache_dir, precision=precision, device=device,
                          num_workers=num_workers, progress=True)
    extract_s = time.perf_counter() - t0
    qrows = np.nonzero(fs.labels >= 0)[0]
    if qrows.size == 0:
        raise ValueError(f"query split {dataset.split!r} has no labelled patch to score")
    gt = fs.labels[qrows]
    pred = np.empty(qrows.size, np.int64)
    search_s = vote_s = 0.0
    for s in range(0, qrows.size, QUERY_CHUNK):
        progress(s / qrows.size, f"search + vote ({s:,} / {qrows.size:,} patches)")
        t0 = time.perf_counter()
        D, I = index.search(fs.features[qrows[s:s + QUERY_CHUNK]], k)
        t1 = time.perf_counter()
        pred[s:s + QUERY_CHUNK], _ = transfer_labels(index, D, I, C, vote)
        vote_s += time.perf_counter() - t1
        search_s += t1 - t0
    t0 = time.perf_counter()
    conf = confusion_matrix(pred, gt, C)
    miou, acc, iou = 100.0 * mean_iou(conf), 100.0 * pixel_accuracy(conf), 100.0 * iou_per_class(conf)
    metric_s = time.perf_counter() - t0
    per_class = [None if np.isnan(v) else float(v) for v in iou]
    meta = index.meta
    ratio = str(int(meta.get("ratio", 1)))
    run = {"miou": [miou], "seeds": [int(meta.get("seed", 0))], "support_ids": [list(meta.get("image_ids", []))],
           "pixel_accuracy": [acc], "per_class_iou": [per_class],
           "num_support_images": len(meta.get("image_ids", [])), "num_support_patches": [int(index.ntotal)],
           "mean": miou, "std": 0.0, "pixel_accuracy_mean": acc,
           "timing": {"search": search_s, "vote": vote_s, "metric": metric_s}}
    progress(1.0, "done")
    return {
        "ratios": {ratio: run},
        "backbone": backbone_meta(backbone),
        "dataset": {"kind": dataset.kind, "name": getattr(dataset, "name", dataset.kind), "root": str(dataset.root),
                    "train_split": meta.get("split", "?"), "val_split": dataset.split,
                    "num_train_images": len(meta.get("image_ids", [])), "num_val_images": len(dataset.ids),
                    "val_fingerprint": dataset.fingerprint()},
        "index_source": {"kind": index.kind, "ntotal": int(index.ntotal), "dataset": meta.get("dataset", {}),
                         "ratio": meta.get("ratio"), "seed": meta.get("seed")},
        "k": int(k), "index": index.kind, "vote": vote, "level": "patch", "class_names": list(class_names),
        "per_class_iou": {ratio: per_class}, "num_query_patches": int(qrows.size),
        "patch_size": int(backbone.patch_size), "precision": fs.meta["precision"], "std_ddof": 0,
        "timing": {"forward": fs.meta["forward_seconds"], "forward_cached": bool(fs.meta["cached"]),
                   "extract": extract_s, "search": search_s, "vote": vote_s, "metric": metric_s,
                   "total": time.perf_counter() - t_start},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
