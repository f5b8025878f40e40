"""The app's actions, one method per button: check the inputs, call the library, draw the results.

Each method takes what the UI components hold (file paths, numbers, strings) and returns what the
output components show (numpy images, file paths, HTML / Markdown strings, tables as lists of rows,
JSON-able dicts). Bad input raises :class:`app.inputs.InputError` or a library error with a clear
message; :func:`user_errors` turns those into ``gr.Error`` so the user sees the message and the
server keeps serving. No gradio layout here (see :mod:`app.ui`).
"""
from __future__ import annotations

import functools
import re
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

from app import draw
from app.inputs import InputError, LoadedImage, load_image, load_mask
from app.label import editor_mask, labelled_patches
from app.objects import build_bank, cluster_images, match_objects, view_pixels
from app.pipeline import VOTES, Segmentation, score, segment
from app.state import AppState, IndexEntry
from cribo.constants import VOID
from index.labels import paint_patches, resize_mask

__all__ = ["Handlers", "user_errors", "USER_ERRORS", "render_segmentation"]


def _user_error_types() -> tuple[type[BaseException], ...]:
    from cribo.errors import DataError

    # DataError is the base of every error the library writes for the user (InputError, DatasetError,
    # IndexLoadError, BackboneLoadError, FeatureCacheError, ...); ValueError covers the library's
    # argument checks (k larger than the index, unknown vote, ...).
    return (ValueError, DataError, FileNotFoundError)


USER_ERRORS = _user_error_types()


def user_errors(fn):
    """Re-raise the library's and the input checks' errors as ``gr.Error`` (shown to the user)."""
    import gradio as gr

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except USER_ERRORS as e:
            raise gr.Error(str(e)) from e

    return wrapper


def render_segmentation(img: LoadedImage, seg: Segmentation, entry: IndexEntry, mask_path: Path, patch_size: int):
    """The Segment tab's pictures: overlay, legend HTML and confidence map; writes the label mask PNG
    (class ids, at the uploaded file's size) to ``mask_path``."""
    over = draw.overlay(img.pixels, seg.mask, entry.palette)
    legend = draw.legend_html(entry.class_names, entry.palette, seg.mask, title="Predicted classes (share of pixels)")
    conf = draw.confidence_map(seg.share, seg.grid, img.pixels.shape[:2], img.pixels)
    out_mask = seg.mask
    if img.note:  # downscaled for processing: the patch predictions are painted once at the file's size
        out_mask = paint_patches(seg.pred, seg.grid, patch_size, img.original_size)
    draw.label_mask_png(out_mask, entry.palette, mask_path)
    return over, legend, conf


def _ms(seconds: float) -> str:
    return f"{1000 * seconds:.0f} ms"


def _safe_stem(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).stem)[:60] or "image"


class Handlers:
    """Actions bound to one :class:`AppState`; output files go to a private temporary folder."""

    def __init__(self, state: AppState):
        self.state = state
        self._out = tempfile.TemporaryDirectory(prefix="cribo-app-")

    @property
    def out_dir(self) -> Path:
        return Path(self._out.name)

    def _new_dir(self) -> Path:
        d = self.out_dir / uuid.uuid4().hex[:12]
        d.mkdir()
        return d

    # ------------------------------------------------------------------ index choice
    def current(self, index_dir: str, labelled: IndexEntry | None) -> IndexEntry:
        """The chosen index, or this session's labelled copy of it when there is one."""
        entry = self.state.index(index_dir)
        if labelled is not None and labelled.source == entry.source:
            return labelled
        return entry

    def index_info(self, index_dir: str, labelled: IndexEntry | None = None) -> str:
        return self.current(index_dir, labelled).describe()

    # ------------------------------------------------------------------ Segment
    def segment(self, image, index_dir: str = "", k: int = 50, vote: str = "majority", gt_mask=None,
                labelled: IndexEntry | None = None):
        """-> overlay, mask PNG path, legend HTML, confidence map, scores Markdown, per-class rows,
        latency Markdown, details dict."""
        t_start = time.perf_counter()
        cfg = self.state.config
        if vote not in VOTES:
            raise InputError(f"vote must be one of {VOTES}, got {vote!r}")
        entry = self.current(index_dir, labelled)
        backbone = self.state.backbone()
        img = load_image(image, max_side=cfg.max_side, max_pixels=cfg.max_pixels, multiple=int(backbone.patch_size))
        gt = None
        if gt_mask is not None:
            gt = load_mask(gt_mask, size=img.original_size, num_classes=entry.num_classes)
        t_load = time.perf_counter() - t_start
        seg = segment(backbone, entry.index, img.pixels, k=int(k), vote=vote, num_classes=entry.num_classes,
                      device=cfg.device, precision=cfg.precision)
        t0 = time.perf_counter()
        mask_path = self._new_dir() / f"{_safe_stem(img.name)}_mask.png"
        over, legend, conf = render_segmentation(img, seg, entry, mask_path, int(backbone.patch_size))
        t_draw = time.perf_counter() - t0 + seg.timings["paint"]
        timings = {"load": t_load, "forward": seg.timings["forward"], "search": seg.timings["search"],
                   "vote": seg.timings["vote"], "drawing": t_draw}
        timings["total"] = time.perf_counter() - t_start
        latency = " · ".join(f"{name} {_ms(v)}" for name, v in timings.items())
        present = [int(c) for c in np.unique(seg.mask) if c != VOID]
        details = {"image": img.name, "size": list(img.original_size), "processed_size": list(seg.proc_size),
                   "grid": list(seg.grid), "k": int(k), "vote": vote, "index": entry.source,
                   "index_patches": int(entry.index.ntotal),
                   "classes_present": {str(c): entry.class_names[c] for c in present},
                   "mean_confidence": float(seg.share.mean()),
                   "timings_ms": {n: round(1000 * v, 1) for n, v in timings.items()}, "note": img.note}
        scores_md, rows = "", []
        if gt is not None:
            gt_proc = gt if not img.note else resize_mask(gt, img.pixels.shape[:2])
            sc = score(seg, gt_proc, patch_size=int(backbone.patch_size), num_classes=entry.num_classes)
            scores_md = (f"**mIoU {100 * sc.patch_miou:.1f}%** (patch level, the protocol's; "
                         f"{sc.scored_patches} labelled patches) · pixel-level mIoU {100 * sc.pixel_miou:.1f}% · "
                         f"pixel accuracy {100 * sc.pixel_accuracy:.1f}%")
            for c in np.nonzero(~np.isnan(sc.patch_iou) | ~np.isnan(sc.pixel_iou))[0]:
                rows.append([entry.class_names[c], int(c), _pct(sc.patch_iou[c]), _pct(sc.pixel_iou[c])])
            details.update(miou_patch=100 * sc.patch_miou, miou_pixel=100 * sc.pixel_miou,
                           pixel_accuracy=100 * sc.pixel_accuracy,
                           per_class_iou_patch={entry.class_names[c]: _pct(sc.patch_iou[c]) for c in
                                                np.nonzero(~np.isnan(sc.patch_iou))[0]})
        elif entry.added:
            scores_md = "_Using this session's labelled additions to the index._"
        if img.note:
            scores_md = f"_{img.note}_\n\n" + scores_md
        return over, str(mask_path), legend, conf, scores_md, rows, latency, details

    # ------------------------------------------------------------------ Clusters
    def clusters(self, image, seed: int = 0, scale_min: float = 0.25, K: int = 8, lambda_pos: float = 1.0,
                 photometric: bool = True):
        """-> view 1, view 2 (clusters drawn), original with both crops, summary Markdown, rows."""
        cfg = self.state.config
        img = load_image(image, max_side=cfg.max_side, max_pixels=cfg.max_pixels)
        backbone = self.state.backbone()
        t0 = time.perf_counter()
        res = cluster_images(backbone, [Image.fromarray(img.pixels)], K=int(K), lambda_pos=float(lambda_pos),
                             seed=int(seed), scale_min=float(scale_min), photometric=bool(photometric),
                             device=cfg.device)
        elapsed = time.perf_counter() - t0
        K = res.K
        colours = draw.cluster_palette(K)
        n1 = np.bincount(res.a1[0].numpy(), minlength=K)
        n2 = np.bincount(res.a2[0].numpy(), minlength=K)
        valid = res.valid[0].numpy()
        v = res.views[0]
        pics = []
        for view, a, n in ((v.view1, res.a1[0], n1), (v.view2, res.a2[0], n2)):
            dropped = (n > 0) & ~valid
            pics.append(draw.draw_clusters(view_pixels(view), a.numpy(), res.grid, colours, dropped))
        boxes = draw.draw_boxes(img.pixels, list(v.boxes), [(220, 40, 40), (40, 90, 220)],
                                ["view 1" + (" (flipped)" if v.flips[0] else ""),
                                 "view 2" + (" (flipped)" if v.flips[1] else "")])
        rows = []
        for k in range(K):
            status = "kept" if valid[k] else ("dropped: view 1 only" if n1[k] else
                                              "dropped: view 2 only" if n2[k] else "empty")
            rows.append([k, draw.colour_hex(colours[k]), int(n1[k]), int(n2[k]), status])
        dropped = [r for r in rows if r[4].startswith("dropped")]
        summary = (f"**{int(valid.sum())} of {K} clusters are objects** (present in both views); "
                   + (f"{len(dropped)} dropped, drawn hatched grey: "
                      + ", ".join(f"#{r[0]} ({r[4].split(': ')[1]}, {max(r[2], r[3])} patches)" for r in dropped)
                      if dropped else "none dropped")
                   + f". {res.a1.shape[1]} patches per view; clustering + forward {_ms(elapsed)}.")
        return pics[0], pics[1], boxes, summary, rows

    # ------------------------------------------------------------------ Matches
    def matches(self, image, index_dir: str = "", num_support: int = 16, K: int = 8, lambda_pos: float = 1.0,
                seed: int = 0, scale_min: float = 0.25):
        """-> one picture of all pairs (query object | its match, verdict band), rows, summary Markdown."""
        cfg = self.state.config
        img = load_image(image, max_side=cfg.max_side, max_pixels=cfg.max_pixels)
        entry = self.state.index(index_dir)
        backbone = self.state.backbone()
        num_support, K, seed = int(num_support), int(K), int(seed)
        if num_support < 1:
            raise InputError("support images for the bank: choose at least 1")
        t0 = time.perf_counter()
        key = (entry.source, num_support, K, float(lambda_pos), seed, float(scale_min))

        def build():
            dataset = self.state.support_dataset(entry)
            wanted = list(entry.index.meta.get("image_ids") or dataset.ids)[:num_support]
            position = {image_id: i for i, image_id in enumerate(dataset.ids)}
            missing = [i for i in wanted if i not in position]
            if missing:
                raise InputError(f"support images {missing[:3]} of index {entry.source} are not in its dataset "
                                 f"{dataset.root} split {dataset.split}: rebuild the index")
            pics = [Image.fromarray(dataset.load_image(position[i])) for i in wanted]
            return build_bank(backbone, pics, wanted, K=K, lambda_pos=float(lambda_pos), seed=seed + 1,
                              scale_min=float(scale_min), photometric=False, device=cfg.device)

        obank = self.state.bank(key, build)
        t_bank = time.perf_counter() - t0
        query = cluster_images(backbone, [Image.fromarray(img.pixels)], K=K, lambda_pos=float(lambda_pos),
                               seed=seed, scale_min=float(scale_min), photometric=False, device=cfg.device)
        found = match_objects(obank, query)
        colours = draw.cluster_palette(K)
        qview = view_pixels(query.views[0].view1)
        pairs, rows = [], []
        for m in found:
            left = draw.highlight_region(qview, (query.a1[0] == m.k).numpy(), query.grid, colours[m.k])
            sview = view_pixels(obank.clusters.views[m.image].view1)
            right = draw.highlight_region(sview, (obank.clusters.a1[m.image] == m.k_match).numpy(),
                                          obank.clusters.grid, colours[m.k])
            verdict = "cycle-consistent" if m.cycle_consistent else "not cycle-consistent"
            caption = f"#{m.k} -> {obank.ids[m.image]} #{m.k_match} · cos {m.cosine:.2f} · {verdict}"
            pairs.append((left, right, caption, m.cycle_consistent))
            rows.append([m.k, m.size, obank.ids[m.image], m.k_match, round(m.cosine, 3), m.cycle_consistent])
        n_ok = sum(m.cycle_consistent for m in found)
        summary = (f"**{len(found)} query objects** (view 1, present in both views), **{n_ok} cycle-consistent** "
                   f"pairs (kept by CrIBo's cross-image loss, Eq. 4). Bank: {len(obank.ids)} support images of "
                   f"{entry.source}, {int(obank.bank.counts().sum())} objects ({_ms(t_bank)}"
                   f"{', cached' if t_bank < 0.05 else ''}).")
        return draw.match_sheet(pairs), rows, summary

    # ------------------------------------------------------------------ Evaluate
    def evaluate(self, kind: str = "voc", root: str = "", split: str = "val", max_images: int = 0,
                 index_dir: str = "", k: int = 50, vote: str = "majority", labelled: IndexEntry | None = None,
                 progress=None):
        """-> summary Markdown, per-class rows, chart PNG path, [JSON, CSV] paths, results dict."""
        from index.datasets import FileSegDataset, open_dataset
        from index.protocol import score_index
        from index.report import format_timing, write_reports

        cfg = self.state.config
        if not str(root).strip():
            raise InputError("dataset root: give the folder of the query dataset (e.g. ../shared/data/voc-mini)")
        if not str(split).strip():
            raise InputError("split: give the query split (voc: val, ade20k: validation, folder: val)")
        entry = self.current(index_dir, labelled)
        dataset = open_dataset(kind, str(root).strip(), str(split).strip())
        if max_images and int(max_images) > 0:
            if not isinstance(dataset, FileSegDataset):
                raise InputError(f"'max images' below the split size works for file datasets only, not {dataset.kind}")
            dataset = dataset.head(int(max_images))
        report = progress or (lambda frac, desc: None)
        results = score_index(self.state.backbone(), entry.index, entry.class_names, dataset, k=int(k), vote=vote,
                              cache_dir=Path(cfg.cache_dir) / "features", device=cfg.device,
                              precision=cfg.precision, num_workers=cfg.num_workers,
                              progress=lambda f, d: report(f, desc=d))
        out = self._new_dir() / f"evaluate_{_safe_stem(kind)}_{_safe_stem(split)}.json"
        paths = write_reports(results, out)
        (ratio, run), = results["ratios"].items()
        per_class = results["per_class_iou"][ratio]
        rows = [[name, c, round(v, 2)] for c, (name, v) in enumerate(zip(results["class_names"], per_class))
                if v is not None]
        summary = (f"**mIoU {run['mean']:.2f}%** · pixel accuracy {run['pixel_accuracy_mean']:.1f}% on "
                   f"{results['num_query_patches']:,} labelled patches of {len(dataset.ids)} images "
                   f"({kind} `{dataset.split}`), index {entry.source} ({entry.index.ntotal:,} patches), k = {int(k)}, "
                   f"{vote} vote. Time: {format_timing(results)}.")
        files = [str(paths["json"]), str(paths["csv"])]
        chart = str(paths["png"]) if paths["png"].is_file() else None
        return summary, rows, chart, files, results

    # ------------------------------------------------------------------ Label
    def label(self, editor: dict | None, query, index_dir: str = "", k: int = 50, vote: str = "majority",
              labelled: IndexEntry | None = None):
        """-> before overlay, after overlay, summary Markdown, new session entry."""
        cfg = self.state.config
        entry = self.current(index_dir, labelled)
        image, mask = editor_mask(editor, entry.palette[: entry.num_classes])
        if max(image.shape[:2]) > cfg.max_side:
            raise InputError(f"label image is {image.shape[1]}x{image.shape[0]}: use one whose longer side is at "
                             f"most {cfg.max_side} px")
        backbone = self.state.backbone()
        xb, labels = labelled_patches(backbone, image, mask, entry.num_classes, device=cfg.device,
                                      precision=cfg.precision)
        updated = entry.with_added(xb, labels)
        summary = (f"Added **{len(labels)} labelled patches** from the painted image: "
                   + ", ".join(f"{entry.class_names[c]} {n}" for c, n in zip(*np.unique(labels, return_counts=True)))
                   + f". The index now holds {updated.index.ntotal:,} patches (this session only).")
        if query is None:
            return None, None, summary + " Give a query image to see its segmentation change.", updated
        img = load_image(query, max_side=cfg.max_side, max_pixels=cfg.max_pixels, multiple=int(backbone.patch_size),
                         what="query image")
        kw = dict(k=int(k), vote=vote, device=cfg.device, precision=cfg.precision)
        before = segment(backbone, entry.index, img.pixels, num_classes=entry.num_classes, **kw)
        after = segment(backbone, updated.index, img.pixels, num_classes=updated.num_classes, **kw)
        changed = int((before.pred != after.pred).sum())
        summary += f" The query's prediction changed on **{changed} of {before.pred.size} patches**."
        return (draw.overlay(img.pixels, before.mask, entry.palette),
                draw.overlay(img.pixels, after.mask, updated.palette), summary, updated)


def _pct(v: float) -> float | None:
    return None if np.isnan(v) else round(100.0 * float(v), 2)

