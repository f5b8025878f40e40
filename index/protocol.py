"""One row of the paper's Table 1: dense k-NN label transfer at every support ratio and seed.

:func:`run_protocol` implements eval-protocol.md (CrIBo section 4.1): one feature extraction per split
(cached, :mod:`index.features`), then for every ratio ``1/n`` and seed: select ``round(N/n)`` support
images (:func:`index.store.select_support`), index their *labelled* patches (:class:`SupportIndex`),
retrieve the ``k`` nearest support patches of every query patch, transfer labels
(:mod:`index.transfer`), and score one confusion matrix summed over the validation split
(:mod:`index.metrics`).

- level "patch" (default, the paper's): the labelled validation patches are searched and scored
  against their majority label.
- level "pixel": every validation patch is searched; its prediction is painted over its ``p x p``
  pixels, resized (nearest) to the original mask size and scored per pixel, void ignored. The
  pixel -> patch map of each image is computed once (the same ``resize_mask`` as
  :func:`index.labels.paint_patches`), so each run is one ``bincount``.
- vote "majority" (default): k-NN majority, ties to the class of the nearest tied neighbour.
  vote "soft": the Hummingbird weighting, ``softmax(cosine / 0.02)`` over the neighbours' patch class
  histograms, argmax per patch. This is the soft *vote* only; the rest stays the CrIBo protocol
  (resolution, k, scoring), it is not the full Hummingbird protocol.

Scores are percentages. ``std`` over seeds is the population standard deviation (``np.std``,
ddof = 0; recorded as ``std_ddof``). A ratio with one run (ratio 1) has std 0.

``timing`` (seconds): ``forward`` = time inside the backbone forward when the features were
extracted (``forward_cached`` says whether this call reused a cache, in which case the forward
happened in an earlier call), ``extract`` = wall time of the extraction calls in this run (decode,
resize and forward, or the cache load), then ``index_build``, ``search``, ``vote``, ``metric`` summed
over all runs, and ``total`` = wall time of :func:`run_protocol`.
"""
from __future__ import annotations

import datetime as _dt
import os
from dataclasses import asdict
import time
from typing import Any, Callable, Sequence

import faiss
import numpy as np
import torch
from tqdm.auto import tqdm

from cribo import dist
from cribo.contracts import BackboneProtocol, SegDatasetProtocol
from index.features import RESOLUTION_RULE, FeatureSet, extract_features
from index.labels import patch_class_histograms, resize_mask
from index.matching import METRICS, match_confusion
from index.metrics import SCORED_CLASSES, confusion_matrix, iou_per_class, mean_iou, pixel_accuracy
from index.report import log_event, write_reports
from index.search import SEARCH_KINDS, build_search_index
from index.sharded import ShardedIndex
from index.store import IndexParams, SupportIndex, check_index_target, check_k, select_support
from index.support_lists import SupportList
from index.transfer import SOFT_TEMPERATURE, VOTES, transfer_labels

__all__ = ["run_protocol", "score_index", "build_support_index", "backbone_meta", "VOTES", "LEVELS",
           "SOFT_TEMPERATURE"]

LEVELS = ("patch", "pixel")
QUERY_CHUNK = 16384  # query patches searched at a time: bounds the (chunk, k) results and the float32 copy


def backbone_meta(backbone: BackboneProtocol) -> dict[str, Any]:
    """JSON description of a backbone for index and results metadata."""
    return {"identity": backbone.identity, "source": getattr(backbone, "source", ""), "arch": backbone.arch,
            "patch_size": int(backbone.patch_size), "embed_dim": int(backbone.embed_dim)}


def _support_rows(fs: FeatureSet, support_ids: list[str]) -> np.ndarray:
    position = {image_id: i for i, image_id in enumerate(fs.ids)}
    return fs.rows_of([position[i] for i in support_ids], labelled_only=True)


def build_support_index(
    backbone: BackboneProtocol,
    dataset: SegDatasetProtocol,
    *,
    ratio: int = 1,
    seed: int = 0,
    kind: str = "flat",
    cache_dir: str | os.PathLike = ".cache/features",
    device: str = "cpu",
    precision: str = "auto",
    params: IndexParams | None = None,
    out: str | os.PathLike | None = None,
    batch_size: int = 16,
    num_workers: int = 2,
    progress: bool = True,
) -> SupportIndex:
    """The support index of ``dataset`` at ratio 1/``ratio`` and ``seed`` (build_index.py).

    Extracts (or reuses) the split's features, keeps the labelled patches of the selected images and
    indexes them with their labels; metadata records backbone, dataset, split, ratio, seed, image ids,
    class names, patch size and resolution rule. Saved to ``out`` when given.
    """
    if out is not None:
        check_index_target(out)  # before any compute: never destroy what this tool did not write
    fs = extract_features(backbone, dataset, cache_dir, precision=precision, device=device,
                          batch_size=batch_size, num_workers=num_workers, progress=progress)
    ids = select_support(fs.ids, ratio, seed)
    rows = _support_rows(fs, ids)
    meta = {
        "backbone": backbone_meta(backbone),
        "dataset": {**dataset.describe(), "fingerprint": dataset.fingerprint()},
        "split": dataset.split, "ratio": int(ratio), "seed": int(seed) if ratio > 1 else 0,
        "image_ids": ids, "class_names": list(dataset.class_names), "patch_size": int(backbone.patch_size),
        "resolution_rule": RESOLUTION_RULE, "precision": fs.meta["precision"], "feature_cache": fs.meta["key"],
    }
    index = SupportIndex.build(fs.features[rows], fs.labels[rows], kind, meta=meta,
                               params=params or IndexParams(seed=seed))
    if out is not None:
        index.save(out)
    return index


def _pixel_pairs(val_ds: SegDatasetProtocol, fs: FeatureSet, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse pixel counts of (query patch row, ground-truth class) for the pixel-level score.

    For each image, the pixel -> patch map is the nearest resize of the patch grid to the original
    mask size (row and column indices resized with :func:`resize_mask`, exactly how
    :func:`index.labels.paint_patches` moves a patch's prediction to pixels). Returns
    ``rows (m,)`` global patch rows, ``gt (m,)`` class ids and ``count (m,)`` pixels, void left out,
    so that the pixel confusion of a prediction ``pred (P,)`` is
    ``bincount(gt * C + pred[rows], weights=count)``.
    """
    p = int(fs.meta["patch_size"])
    C = num_classes
    out_rows, out_gt, out_cnt = [], [], []
    for i in range(len(fs)):
        h, w = (int(v) for v in fs.grids[i])
        if max(h, w) > 256:
            raise ValueError(f"image {fs.ids[i]!r} has a {h}x{w} patch grid: the pixel level supports grids "
                             "up to 256x256; use --level patch")
        mask = val_ds.load_mask(i)
        H, W = mask.shape
        if (H, W) != tuple(fs.sizes[i]):
            raise ValueError(f"mask of {fs.ids[i]!r} is {H}x{W}, the cached features say {tuple(fs.sizes[i])}")
        r = np.repeat(np.arange(h, dtype=np.uint8), p)[:, None].repeat(w * p, axis=1)
        c = np.repeat(np.arange(w, dtype=np.uint8), p)[None, :].repeat(h * p, axis=0)
        patch = resize_mask(r, (H, W)).astype(np.int64) * w + resize_mask(c, (H, W))
        valid = mask != val_ds.void
        counts = np.bincount(patch[valid] * C + mask[valid], minlength=h * w * C)
        nz = np.nonzero(counts)[0]
        out_rows.append(fs.offsets[i] + nz // C)
        out_gt.append(nz % C)
        out_cnt.append(counts[nz])
    return np.concatenate(out_rows), np.concatenate(out_gt), np.concatenate(out_cnt)


def _support_histograms(train_ds: SegDatasetProtocol, fs: FeatureSet, images: np.ndarray, num_classes: int,
                        memo: dict[int, np.ndarray]) -> np.ndarray:
    """``(m, C)`` float32 class histograms of the labelled patches of ``images`` (soft vote)."""
    p = int(fs.meta["patch_size"])
    out = []
    for i in images.tolist():
        if i not in memo:
            h, w = (int(v) for v in fs.grids[i])
            mask = resize_mask(train_ds.load_mask(i), (h * p, w * p))
            hist = patch_class_histograms(mask, p, num_classes, train_ds.void)
            memo[i] = hist[fs.labels[fs.image_rows(i)] >= 0]
        out.append(memo[i])
    return np.concatenate(out)


def _percent(x: float) -> float:
    return 100.0 * float(x)


def score_confusion(conf: np.ndarray, metric: str = "identity",
                    score_classes: str = "present") -> tuple[float, float, np.ndarray]:
    """``(mIoU %, pixel accuracy %, per-class IoU % (C,) with NaN for empty unions)`` of ``conf (C, C)``
    after the ``metric``'s matching (:mod:`index.matching`), the mean over ``score_classes``."""
    conf, _ = match_confusion(conf, metric)
    return (_percent(mean_iou(conf, score_classes)), _percent(pixel_accuracy(conf)),
            100.0 * iou_per_class(conf))


def dataset_meta(train_ds: SegDatasetProtocol, val_ds: SegDatasetProtocol) -> dict[str, Any]:
    """The ``dataset`` entry of a results dict: kind, name, root, splits, sizes, fingerprints."""
    return {"kind": train_ds.kind, "name": getattr(train_ds, "name", train_ds.kind), "root": str(train_ds.root),
            "train_split": train_ds.split, "val_split": val_ds.split, "num_train_images": len(train_ds.ids),
            "num_val_images": len(val_ds.ids), "train_fingerprint": train_ds.fingerprint(),
            "val_fingerprint": val_ds.fingerprint()}


def check_run_arguments(train_ds: SegDatasetProtocol, val_ds: SegDatasetProtocol, *, k: int, metric: str, score_classes: str) -> None:
    """The checks both protocols make before any work: metric, scored classes, k, one label set."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: choose one of {METRICS}")
    if score_classes not in SCORED_CLASSES:
        raise ValueError(f"unknown score_classes {score_classes!r}: choose one of {SCORED_CLASSES}")
    check_k(k, np.iinfo(np.int64).max)
    if list(train_ds.class_names) != list(val_ds.class_names):
        raise ValueError(f"support split {train_ds.split!r} and query split {val_ds.split!r} have different "
                         "class names: both must come from the same dataset")


def record_run(per_ratio: dict[str, dict[str, Any]], ratio: int, *, seed: int, ids: list[str], conf: np.ndarray,
               scores: tuple[float, float, np.ndarray], metric: str, score_classes: str,
               num_support_patches: int, listed: SupportList | None, timing: dict[str, float]) -> None:
    """Append one run (ratio, seed) to its ratio's entry of ``per_ratio`` (created on first use): the
    ``scores`` of :func:`score_confusion`, the unmatched mIoU beside a matched one, the support ids and
    list, and the run's ``timing`` added to the ratio's. Shared by both protocols."""
    miou, acc, iou = scores
    e = per_ratio.setdefault(str(ratio), {"miou": [], "seeds": [], "support_ids": [], "pixel_accuracy": [],
                                          "per_class_iou": [], "num_support_images": len(ids),
                                          "num_support_patches": [], "timing": dict.fromkeys(timing, 0.0)})
    e["miou"].append(miou)
    if metric != "identity":  # the unmatched score beside it, for comparison
        e.setdefault("miou_identity", []).append(score_confusion(conf, "identity", score_classes)[0])
    e["seeds"].append(seed)
    e["support_ids"].append(ids)
    e["pixel_accuracy"].append(acc)
    e["per_class_iou"].append(_nan_to_none(iou))
    e["num_support_patches"].append(num_support_patches)
    if listed is not None:
        e.setdefault("support_lists", []).append(listed.name)
    for key in timing:
        e["timing"][key] += timing[key]


def summarise_ratios(per_ratio: dict[str, dict[str, Any]], num_classes: int) -> dict[str, list[float | None]]:
    """Adds ``mean``, ``std`` (ddof 0) and ``pixel_accuracy_mean`` to every ratio entry of ``per_ratio``;
    returns the per-class IoU averaged over each ratio's seeds (NaN-aware, None where never present)."""
    per_class_mean: dict[str, list[float | None]] = {}
    for key, e in per_ratio.items():
        e["mean"] = float(np.mean(e["miou"]))
        e["std"] = float(np.std(e["miou"]))  # population std (ddof = 0), see the module docstring
        e["pixel_accuracy_mean"] = float(np.mean(e["pixel_accuracy"]))
        table = np.array([[np.nan if v is None else v for v in row] for row in e["per_class_iou"]])
        present = ~np.isnan(table)
        sums = np.where(present, table, 0.0).sum(axis=0)
        n_present = present.sum(axis=0)
        per_class_mean[key] = _nan_to_none(np.divide(sums, n_present, out=np.full(num_classes, np.nan),
                                                     where=n_present > 0))
    return per_class_mean


def _nan_to_none(values: np.ndarray) -> list[float | None]:
    return [None if np.isnan(v) else float(v) for v in values]


def _predict(index: SupportIndex, features: np.ndarray, rows: np.ndarray, k: int, num_classes: int, vote: str,
             support_hist: np.ndarray | None = None,
             progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, float, float]:
    """Label the query patches ``features[rows]`` (``features (N, D)``, e.g. a memory-mapped cache) by
    k-NN transfer from ``index``, ``QUERY_CHUNK`` rows at a time (so the float copy stays bounded).
    Returns ``pred (len(rows),)`` int64 and the seconds spent in search and in the vote."""
    pred = np.empty(rows.size, dtype=np.int64)
    search_s = vote_s = 0.0
    for s in range(0, rows.size, QUERY_CHUNK):
        if progress is not None:
            progress(s)
        t0 = time.perf_counter()
        D, I = index.search(features[rows[s:s + QUERY_CHUNK]], k)
        t1 = time.perf_counter()
        pred[s:s + QUERY_CHUNK], _ = transfer_labels(D, I, index.labels, num_classes, vote, support_hist)
        vote_s += time.perf_counter() - t1
        search_s += t1 - t0
    return pred, search_s, vote_s


def plan_runs(ratios: Sequence[int], seeds: int,
              support_lists: Sequence[SupportList] | None = None) -> list[tuple[int, int, SupportList | None]]:
    """``[(ratio, seed, list or None)]``: every ratio ``n > 1`` with seeds ``0..seeds-1`` and ratio 1
    once, or one run per support list (under its ratio and seed) when lists are given."""
    if support_lists:
        pairs = [(sl.ratio, sl.seed) for sl in support_lists]
        if len(set(pairs)) != len(pairs):
            raise ValueError(f"support lists {[sl.name for sl in support_lists]} repeat a (ratio, seed) pair "
                             f"{pairs}: give each list of one folder its own seed")
        return [(sl.ratio, sl.seed, sl) for sl in support_lists]
    ratios = [int(r) for r in ratios]
    if not ratios or any(r < 1 for r in ratios) or len(set(ratios)) != len(ratios):
        raise ValueError(f"ratios must be distinct integers >= 1, got {ratios}")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    return [(r, s, None) for r in ratios for s in (range(seeds) if r > 1 else [0])]


def run_support_ids(split_ids: Sequence[str], ratio: int, seed: int, listed: SupportList | None) -> list[str]:
    """The support ids of one run: the seeded draw (:func:`select_support`), or the list's ids in
    dataset order."""
    if listed is None:
        return select_support(split_ids, ratio, seed)
    keep = set(listed.ids)
    return [i for i in split_ids if i in keep]


def run_protocol(
    backbone: BackboneProtocol,
    train_ds: SegDatasetProtocol,
    val_ds: SegDatasetProtocol,
    *,
    ratios: Sequence[int] = (1, 8, 64, 128),
    seeds: int = 5,
    k: int = 50,
    index_kind: str = "flat",
    index_params: IndexParams | None = None,
    vote: str = "majority",
    level: str = "patch",
    cache_dir: str | os.PathLike = ".cache/features",
    device: str = "cpu",
    precision: str = "auto",
    batch_size: int = 16,
    num_workers: int = 2,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[..., None] | None = log_event,
    support_lists: Sequence[SupportList] | None = None,
    metric: str = "identity",
    score_classes: str = "present",
) -> dict[str, Any]:
    """Run the retrieval protocol; return (and, with ``out``, write) the results dict.

    Args:
        backbone: a :class:`cribo.backbones.Backbone`.
        train_ds, val_ds: support and query :class:`index.datasets.SegDataset` with the same classes.
        ratios: support ratios ``n`` (1/n of the support images). seeds: runs per ratio ``n > 1``
            (seeds ``0..seeds-1``); ratio 1 runs once with seed 0.
        k: neighbours per query patch. index_kind: one of :data:`index.search.SEARCH_KINDS`.
        index_params: knobs of the approximate kinds (nlist, nprobe, ...); its ``seed`` is replaced by
            each run's seed (the IVF training sample is drawn per run, as with the defaults).
        vote: "majority" | "soft". level: "patch" | "pixel".
        out: results.json path; the CSV, Markdown and PNG reports go next to it.
        log: called as ``log(event, **fields)`` for JSON-lines progress records (None: silent).
        support_lists: explicit support subsets (:func:`index.support_lists.read_support_lists`); when
            given they replace ``ratios`` x ``seeds``: one run per list, under the list's ratio and seed,
            and each ratio entry names its lists (``"support_lists": [names]``).
        metric: "identity" (predictions scored as they are) or "hungarian" (open-hummingbird-eval's
            one-to-one matching of predicted to ground-truth classes first, :mod:`index.matching`).
        score_classes: "present" (mean over classes with a non-zero union) or "all" (over all C).

    Returns:
        ``{"ratios": {"8": {"miou": [per seed, %], "mean", "std", "support_ids": [[ids], ...],
        "seeds", "pixel_accuracy", "pixel_accuracy_mean", "per_class_iou": [[per class, %] per seed],
        "num_support_images", "num_support_patches", "timing"}, ...}, "backbone", "dataset", "k", ...,
        "per_class_iou": {"8": [mean over seeds per class, %]}, "class_names", "timing"}``.
    """
    t_start = time.perf_counter()
    runs = plan_runs(ratios, seeds, support_lists)
    if vote not in VOTES:
        raise ValueError(f"unknown vote {vote!r}: choose one of {VOTES}")
    if level not in LEVELS:
        raise ValueError(f"unknown level {level!r}: choose one of {LEVELS}")
    if index_kind not in SEARCH_KINDS:
        raise ValueError(f"unknown index kind {index_kind!r}: choose one of {SEARCH_KINDS}")
    check_run_arguments(train_ds, val_ds, k=k, metric=metric, score_classes=score_classes)
    if not dist.is_main():  # under torchrun every rank computes, rank 0 reports
        progress, log, out = False, None, None
    log = log or (lambda event, **fields: None)
    C = len(train_ds.class_names)
    extract_kw = dict(precision=precision, device=device, batch_size=batch_size, num_workers=num_workers,
                      progress=progress)

    t0 = time.perf_counter()
    fs_tr = extract_features(backbone, train_ds, cache_dir, **extract_kw)
    fs_va = extract_features(backbone, val_ds, cache_dir, **extract_kw)
    extract_s = time.perf_counter() - t0
    forward_s = fs_tr.meta["forward_seconds"] + fs_va.meta["forward_seconds"]
    log("features", train_patches=fs_tr.num_patches, val_patches=fs_va.num_patches, dim=fs_tr.dim,
        forward_s=round(forward_s, 3), extract_s=round(extract_s, 3),
        cached=[fs_tr.meta["cached"], fs_va.meta["cached"]])

    if level == "patch":
        qrows = np.nonzero(fs_va.labels >= 0)[0]
        gt = fs_va.labels[qrows]
        pairs = None
    else:
        qrows = np.arange(fs_va.num_patches)
        t0 = time.perf_counter()
        pairs = _pixel_pairs(val_ds, fs_va, C)
        pixel_prep_s = time.perf_counter() - t0
    if qrows.size == 0:
        raise ValueError(f"query split {val_ds.split!r} has no labelled patch to score")

    tot = dict(index_build=0.0, search=0.0, vote=0.0, metric=0.0)
    if level == "pixel":
        tot["metric"] += pixel_prep_s
    per_ratio: dict[str, dict[str, Any]] = {}
    hist_memo: dict[int, np.ndarray] = {}
    position = {image_id: i for i, image_id in enumerate(fs_tr.ids)}
    bar = tqdm(runs, desc="runs", unit="run", disable=not progress)
    for r, seed, listed in bar:
        tm = dict(index_build=0.0, search=0.0, vote=0.0, metric=0.0)
        ids = run_support_ids(fs_tr.ids, r, seed, listed)
        images = np.asarray([position[i] for i in ids], dtype=np.int64)
        t0 = time.perf_counter()
        rows = fs_tr.rows_of(images, labelled_only=True)
        params = IndexParams.for_run(index_params, seed)
        if dist.world_size() > 1:  # torchrun: this rank indexes its shard, results merged (index.sharded)
            index = ShardedIndex(fs_tr.features, rows, fs_tr.labels[rows], index_kind, params=params, device=device)
        else:
            index = build_search_index(fs_tr.features, rows, fs_tr.labels[rows], index_kind, params=params,
                                       device=device)
        hist = _support_histograms(train_ds, fs_tr, images, C, hist_memo) if vote == "soft" else None
        tm["index_build"] += time.perf_counter() - t0
        check_k(k, index.ntotal)
        qbar = tqdm(total=int(qrows.size), desc=f"search 1/{r} seed {seed}", unit="patch", unit_scale=True,
                    leave=False, disable=not progress)  # the long phase of a run: its own rate and ETA
        pred, tm["search"], tm["vote"] = _predict(index, fs_va.features, qrows, k, C, vote, hist,
                                                  progress=lambda done: qbar.update(done - qbar.n))
        qbar.update(qrows.size - qbar.n)
        qbar.close()
        t0 = time.perf_counter()
        if pairs is None:
            conf = confusion_matrix(pred, gt, C)
        else:
            prow, pgt, pcount = pairs
            conf = np.bincount(pgt * C + pred[prow], weights=pcount, minlength=C * C).reshape(C, C).astype(np.int64)
        miou, acc, iou = score_confusion(conf, metric, score_classes)
        tm["metric"] += time.perf_counter() - t0
        for key in tot:
            tot[key] += tm[key]

        record_run(per_ratio, r, seed=seed, ids=ids, conf=conf, scores=(miou, acc, iou), metric=metric,
                   score_classes=score_classes, num_support_patches=int(rows.size), listed=listed, timing=tm)
        bar.set_postfix(ratio=f"1/{r}", seed=seed, miou=f"{miou:.1f}")
        log("run", ratio=r, seed=seed, **({} if listed is None else {"support_list": listed.name}),
            miou=round(miou, 3), pixel_accuracy=round(acc, 3),
            support_images=len(ids), support_patches=int(rows.size),
            **{f"{key}_s": round(v, 3) for key, v in tm.items()})
    bar.close()

    per_class_mean = summarise_ratios(per_ratio, C)

    results = {
        "ratios": per_ratio,
        "backbone": backbone_meta(backbone),
        "dataset": dataset_meta(train_ds, val_ds),
        "k": int(k), "index": index_kind, "index_params": asdict(index_params or IndexParams()),
        "vote": vote, "level": level, "protocol": "cribo", "metric": metric, "score_classes": score_classes,
        "class_names": list(train_ds.class_names),
        "per_class_iou": per_class_mean, "num_query_patches": int(qrows.size),
        "num_train_patches": fs_tr.num_patches, "num_val_patches": fs_va.num_patches,
        "patch_size": int(backbone.patch_size), "resolution_rule": RESOLUTION_RULE,
        "precision": fs_tr.meta["precision"], "device": str(device), "std_ddof": 0,
        "world_size": dist.world_size(), "feature_caches": [str(fs_tr.path), str(fs_va.path)],
        "support_lists": [sl.describe() for sl in support_lists] if support_lists else None,
        "timing": {"forward": forward_s, "forward_cached": bool(fs_tr.meta["cached"] and fs_va.meta["cached"]),
                   "extract": extract_s, **tot, "total": time.perf_counter() - t_start},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "faiss": faiss.__version__},
    }
    if out is not None:
        paths = write_reports(results, out)
        log("written", **{key: str(v) for key, v in paths.items()})
    return results


def score_index(backbone: BackboneProtocol, index: SupportIndex, class_names: Sequence[str], dataset: SegDatasetProtocol, *, k: int = 50,
                vote: str = "majority", cache_dir: str | os.PathLike = ".cache/features", device: str = "cpu",
                precision: str = "auto", num_workers: int = 2,
                progress: Callable[[float, str], None] | None = None) -> dict[str, Any]:
    """Patch-level mIoU (percent) of a given support ``index`` on every labelled patch of ``dataset``.

    :func:`run_protocol` builds its own indices from a training split (every ratio and seed); this
    scores one index as it is (one from ``build_index.py``, the app's built-in one, or one extended by
    in-context labelling), with the same steps: cached query features, search, vote, one confusion
    matrix over the split. For an index built by :func:`build_support_index` at ratio 1/n and seed s
    the mIoU equals ``run_protocol``'s run of ratio n and seed s. Returns a results dict in
    ``run_protocol``'s layout with one "ratio" entry (the index's, one run with its seed) plus
    ``index_source``; ``index.report.write_reports`` writes it. ``progress(fraction, text)`` is called
    as the work advances.
    """
    t_start = time.perf_counter()
    C = len(class_names)
    if list(dataset.class_names) != list(class_names):
        raise ValueError(f"the query split {dataset.split!r} of {dataset.root} has other classes "
                         f"({len(dataset.class_names)}) than the support index ({C}): evaluate an index on "
                         "a split of the dataset it was built from")
    check_k(k, index.ntotal)
    progress = progress or (lambda fraction, text: None)
    progress(0.0, "features")
    t0 = time.perf_counter()
    fs = extract_features(backbone, dataset, cache_dir, precision=precision, device=device,
                          num_workers=num_workers, progress=True)
    extract_s = time.perf_counter() - t0
    qrows = np.nonzero(fs.labels >= 0)[0]
    if qrows.size == 0:
        raise ValueError(f"query split {dataset.split!r} has no labelled patch to score")
    gt = fs.labels[qrows]
    pred, search_s, vote_s = _predict(
        index, fs.features, qrows, k, C, vote,
        progress=lambda s: progress(s / qrows.size, f"search + vote ({s:,} / {qrows.size:,} patches)"))
    t0 = time.perf_counter()
    conf = confusion_matrix(pred, gt, C)
    miou, acc = _percent(mean_iou(conf)), _percent(pixel_accuracy(conf))
    per_class = _nan_to_none(100.0 * iou_per_class(conf))
    metric_s = time.perf_counter() - t0
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
        "patch_size": int(backbone.patch_size), "resolution_rule": RESOLUTION_RULE,
        "precision": fs.meta["precision"], "std_ddof": 0,
        "timing": {"forward": fs.meta["forward_seconds"], "forward_cached": bool(fs.meta["cached"]),
                   "extract": extract_s, "search": search_s, "vote": vote_s, "metric": metric_s,
                   "total": time.perf_counter() - t_start},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
