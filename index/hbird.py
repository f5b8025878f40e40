"""The Hummingbird protocol (open-hummingbird-eval v2.0.0) beside CrIBo's: ``evaluate.py --protocol hbird``.

Every choice of that tool that differs from the CrIBo protocol (:mod:`index.protocol`) is a field of
:class:`HbirdOptions`; ``docs/protocols.md`` has the two side by side. Its defaults reproduce the peer:

- memory (support) images: ``memory_passes`` passes over the support images, each image through a
  random resized crop to ``input_size`` x ``input_size`` (area scale 0.5-2 of the image, aspect
  3/4-4/3, torchvision's 10-tries rule with the centre-crop fallback; image bilinear, mask nearest)
  and colour jitter (brightness, contrast, saturation, hue 0.1, each applied with p = 0.5)
  (``augment="hbird"``; ``"none"``: a plain square resize).
- pixel normalisation with std (0.229, 0.224, 0.255) (the peer's constant; ``pixel_std="imagenet"``
  gives 0.225 for blue).
- patch labels: the class distribution of each patch's pixels, void pixels counted as class 0
  (``void_label="background"``; ``"ignore"`` leaves them out and does not index void-only patches).
- memory size: every patch (``memory_size=None``), or ``memory_size // (images x passes)`` patches
  per image chosen by smallest ``sum of the image-level frequencies of the patch's classes x U(0,1)``
  (rare classes first).
- query images and masks resized to ``input_size`` x ``input_size`` (image bilinear antialiased, mask
  nearest); every patch searched (k = 30 by default), ``softmax(cos / 0.02)``-weighted sum of the
  neighbours' distributions, the ``(C, s, s)`` distributions upsampled bilinearly to the input size
  (``upsample``), argmax per pixel; scored per pixel at ``input_size``, void ignored.
- the metric (``--metric``: identity / hungarian) and the classes averaged (``--score-classes``:
  ``all`` for the peer, absent classes counting 0) are shared with the CrIBo protocol.

Randomness (crops, jitter, memory sampling) comes from ``numpy.random.default_rng((seed, pass))``:
runs are reproducible here, but not draw for draw equal to the peer's torch RNG stream.
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from tqdm.auto import tqdm

from cribo import dist
from cribo.contracts import BackboneProtocol, SegDatasetProtocol
from cribo.constants import IMAGENET_STD
from cribo.crops import resized_crop_box
from cribo.pixels import normalise
from cribo.precision import autocast, resolve_precision
from index.labels import patch_class_histograms
from index.protocol import (backbone_meta, check_run_arguments, dataset_meta, plan_runs, record_run,
                            run_support_ids, score_confusion, summarise_ratios)
from index.report import log_event, write_reports
from index.store import IndexParams, SupportIndex, check_k
from index.support_lists import SupportList
from index.search import build_search_index
from index.torch_search import TorchExactIndex
from index.transfer import SOFT_TEMPERATURE, soft_vote

__all__ = ["HbirdOptions", "HBIRD_STD", "AUGMENTS", "random_resized_crop_box", "memory_view",
           "sample_patches", "build_memory", "query_set", "score_queries", "run_hbird"]

HBIRD_STD = (0.229, 0.224, 0.255)  # open-hummingbird-eval's IMAGENET_STD (blue 0.255, not 0.225)
AUGMENTS = ("hbird", "none")
VOID_LABELS = ("background", "ignore")
UPSAMPLES = ("bilinear", "nearest")
PIXEL_STDS = {"hbird": HBIRD_STD, "imagenet": IMAGENET_STD}
CROP_SCALE = (0.5, 2.0)  # area fraction of the image (above 1 never fits: those tries fall back)
CROP_RATIO = (3 / 4, 4 / 3)
JITTER = 0.1  # brightness, contrast, saturation and hue ranges
JITTER_P = 0.5
_EMPTY_PATCH_SCORE = 1e6  # the peer's sentinel for patches without any class


@dataclass(frozen=True)
class HbirdOptions:
    """The Hummingbird choices (defaults = open-hummingbird-eval v2.0.0's ``hbird_evaluation``)."""

    input_size: int = 224
    memory_passes: int = 1
    augment: str = "hbird"
    memory_size: int | None = None
    void_label: str = "background"
    pixel_std: str = "hbird"
    upsample: str = "bilinear"
    temperature: float = SOFT_TEMPERATURE

    def check(self, patch_size: int) -> None:
        if self.input_size < patch_size or self.input_size % patch_size:
            raise ValueError(f"--input-size {self.input_size} must be a positive multiple of the backbone's patch "
                             f"size {patch_size} (e.g. {patch_size * max(1, round(224 / patch_size))})")
        if self.memory_passes < 1:
            raise ValueError(f"--memory-passes must be >= 1, got {self.memory_passes}")
        if self.memory_size is not None and self.memory_size < 1:
            raise ValueError(f"--memory-size must be >= 1, got {self.memory_size}")
        for name, value, allowed in (("augment", self.augment, AUGMENTS),
                                     ("void_label", self.void_label, VOID_LABELS),
                                     ("upsample", self.upsample, UPSAMPLES),
                                     ("pixel_std", self.pixel_std, tuple(PIXEL_STDS))):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}: choose one of {allowed}")

    def describe(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------- augmentation
def random_resized_crop_box(rng: np.random.Generator, height: int, width: int,
                            scale: tuple[float, float] = CROP_SCALE,
                            ratio: tuple[float, float] = CROP_RATIO) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a random crop, torchvision's ``RandomResizedCrop.get_params`` rule:
    10 tries of area ``U(scale) x H x W`` and log-uniform aspect in ``ratio``; the first that fits
    wins, else the centre crop of the whole image clamped to ``ratio``."""
    log_ratio = np.log(ratio)
    return resized_crop_box(height, width, ratio, area_fraction=lambda: rng.uniform(*scale),
                            aspect=lambda: float(np.exp(rng.uniform(*log_ratio))),
                            integer=lambda n: int(rng.integers(0, n)))


def _colour_jitter(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """``x (3, H, W)`` float in [0, 1]: brightness, contrast, saturation, hue, each with p = 0.5 (in that order)."""
    for adjust, low, high in ((TF.adjust_brightness, 1 - JITTER, 1 + JITTER),
                              (TF.adjust_contrast, 1 - JITTER, 1 + JITTER),
                              (TF.adjust_saturation, 1 - JITTER, 1 + JITTER),
                              (TF.adjust_hue, -JITTER, JITTER)):
        if rng.random() < JITTER_P:
            x = adjust(x, float(rng.uniform(low, high)))
    return x


def memory_view(image: np.ndarray, mask: np.ndarray, size: int, augment: str,
                rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """One memory image: ``image (H, W, 3) uint8``, ``mask (H, W) uint8`` -> ``(pixels (3, S, S) float
    in [0, 1], mask (S, S) uint8)``, randomly cropped and jittered (``augment="hbird"``) or resized."""
    H, W = mask.shape
    top, left, h, w = random_resized_crop_box(rng, H, W) if augment == "hbird" else (0, 0, H, W)
    box = (left, top, left + w, top + h)
    img = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR, box=box))
    lab = np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST, box=box))
    x = torch.from_numpy(img.copy()).permute(2, 0, 1).float().div_(255)
    if augment == "hbird":
        x = _colour_jitter(x, rng)
    return x, lab


def _normalise(x: torch.Tensor, pixel_std: str) -> torch.Tensor:
    """``x (B, 3, H, W)`` float in [0, 1] -> normalised model input."""
    return normalise(x, PIXEL_STDS[pixel_std])


def _forward(backbone: BackboneProtocol, x: torch.Tensor, precision: str, device: torch.device) -> torch.Tensor:
    """``x (B, 3, S, S)`` -> L2-normalised patch tokens ``(B, s*s, D)`` float32 on the CPU."""
    with torch.inference_mode(), autocast(precision, device):
        tokens = backbone.forward_features(x.to(device))["x_norm_patchtokens"]
    return F.normalize(tokens.float(), dim=-1).cpu()


# ---------------------------------------------------------------------------- memory
def _patch_distributions(mask: np.ndarray, p: int, num_classes: int, void: int, void_label: str) -> np.ndarray:
    """``(s*s, C)`` class fractions of every patch of ``mask (S, S)``; void as class 0 or left out."""
    if void_label == "background":
        mask = np.where(mask == void, 0, mask).astype(np.uint8)
    return patch_class_histograms(mask, p, num_classes, void)


def sample_patches(dists: np.ndarray, per_image: int, rng: np.random.Generator) -> np.ndarray:
    """Indices ``(B, per_image)`` of the patches kept per image from ``dists (B, N, C)``.

    The peer's rule: a patch scores the sum, over the classes present in it, of the number of the
    image's patches holding that class; non-empty patches' scores are multiplied by ``U(0, 1)``
    noise, empty ones score 1e6; the ``per_image`` smallest are kept (rare classes first).
    """
    presence = dists > 0  # (B, N, C)
    class_freq = presence.sum(axis=1).astype(np.float32)  # (B, C) patches holding each class
    score = np.einsum("bnc,bc->bn", presence.astype(np.float32), class_freq)  # (B, N)
    nonempty = presence.any(axis=2)
    score = np.where(nonempty, score * rng.random(score.shape, dtype=np.float32), _EMPTY_PATCH_SCORE)
    k = min(per_image, score.shape[1])
    return np.argsort(score, axis=1, kind="stable")[:, :k]


def _image_and_mask(dataset: SegDatasetProtocol, i: int) -> tuple[np.ndarray, np.ndarray]:
    image, mask = dataset.load_image(i), dataset.load_mask(i)
    if image.shape[:2] != mask.shape:
        raise ValueError(f"image {dataset.ids[i]!r} is {image.shape[0]}x{image.shape[1]} but its mask is "
                         f"{mask.shape[0]}x{mask.shape[1]}: fix the dataset (mask and image must match)")
    return image, mask


def build_memory(backbone: BackboneProtocol, dataset: SegDatasetProtocol, images: list[int], options: HbirdOptions, *, seed: int,
                 device: torch.device, precision: str, batch_size: int,
                 progress: bool = True) -> tuple[np.ndarray, np.ndarray, float]:
    """The support memory: ``features (M, D) float32`` (L2-normalised), ``distributions (M, C) float32``
    and the seconds spent in the backbone forward.

    ``memory_passes`` passes over ``images`` (dataset indices); pass ``j`` draws its crops and jitter from
    ``default_rng((seed, j))`` in image order.
    """
    p, C, S = int(backbone.patch_size), len(dataset.class_names), options.input_size
    per_image = None
    if options.memory_size is not None:
        per_image = max(1, options.memory_size // max(1, len(images) * options.memory_passes))
    feats, dists, forward_s = [], [], 0.0
    bar = tqdm(total=len(images) * options.memory_passes, desc="hbird memory", unit="img", disable=not progress)
    for j in range(options.memory_passes):
        rng = np.random.default_rng((seed, j))
        for s in range(0, len(images), batch_size):
            views = [memory_view(*_image_and_mask(dataset, i), S, options.augment, rng)
                     for i in images[s:s + batch_size]]
            x = _normalise(torch.stack([v[0] for v in views]), options.pixel_std)
            t0 = time.perf_counter()
            tokens = _forward(backbone, x, precision, device).numpy()  # (B, s*s, D)
            forward_s += time.perf_counter() - t0
            batch_dists = np.stack([_patch_distributions(v[1], p, C, dataset.void, options.void_label) for v in views])
            if per_image is not None:
                keep = sample_patches(batch_dists, per_image, rng)  # (B, K)
                tokens = np.take_along_axis(tokens, keep[:, :, None], axis=1)
                batch_dists = np.take_along_axis(batch_dists, keep[:, :, None], axis=1)
            tokens, batch_dists = tokens.reshape(-1, tokens.shape[-1]), batch_dists.reshape(-1, C)
            if options.void_label == "ignore":  # void-only patches carry no label: not indexed
                labelled = batch_dists.sum(axis=1) > 0
                tokens, batch_dists = tokens[labelled], batch_dists[labelled]
            feats.append(tokens)
            dists.append(batch_dists)
            bar.update(len(views))
    bar.close()
    return np.concatenate(feats), np.concatenate(dists), forward_s


# ---------------------------------------------------------------------------- queries
@dataclass
class QuerySet:
    """Query patches of a split at ``S x S``: ``features (n, s*s, D) float16`` (L2-normalised),
    ``masks (n, S, S) uint8`` (nearest-resized ground truth), ``grid`` = s, ``forward_seconds``."""

    features: np.ndarray
    masks: np.ndarray
    grid: int
    forward_seconds: float


def query_set(backbone: BackboneProtocol, dataset: SegDatasetProtocol, options: HbirdOptions, *, device: torch.device, precision: str,
              batch_size: int, progress: bool = True) -> QuerySet:
    """Every image of ``dataset`` resized to ``input_size`` squared, its patch tokens and resized mask."""
    S, n = options.input_size, len(dataset.ids)
    s = S // int(backbone.patch_size)
    feats = np.empty((n, s * s, int(backbone.embed_dim)), dtype=np.float16)
    masks = np.empty((n, S, S), dtype=np.uint8)
    forward_s = 0.0
    bar = tqdm(total=n, desc=f"hbird queries {dataset.split}", unit="img", disable=not progress)
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        xs = []
        for i in idx:
            image, mask = _image_and_mask(dataset, i)
            img = Image.fromarray(image).resize((S, S), Image.Resampling.BILINEAR)
            masks[i] = np.asarray(Image.fromarray(mask).resize((S, S), Image.Resampling.NEAREST))
            xs.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float().div_(255))
        t0 = time.perf_counter()
        feats[start:start + len(idx)] = _forward(backbone, _normalise(torch.stack(xs), options.pixel_std),
                                                 precision, device).numpy().astype(np.float16)
        forward_s += time.perf_counter() - t0
        bar.update(len(idx))
    bar.close()
    return QuerySet(feats, masks, s, forward_s)


def score_queries(index: SupportIndex | TorchExactIndex, memory_dists: np.ndarray, queries: QuerySet, k: int,
                  options: HbirdOptions, num_classes: int, void: int, *, images_per_chunk: int = 64,
                  progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, dict[str, float]]:
    """Pixel confusion ``(C, C)`` int64 of the queries against ``index`` and the time split
    (``search``, ``vote``, ``metric`` seconds): k-NN, softmax(cos / T) vote over the neighbours'
    distributions, ``upsample`` of the ``(C, s, s)`` maps to ``S x S``, argmax, bincount."""
    n, N, _ = queries.features.shape
    s, S, C = queries.grid, queries.masks.shape[1], num_classes
    conf = np.zeros(C * C, dtype=np.int64)
    tm = dict(search=0.0, vote=0.0, metric=0.0)
    for start in range(0, n, images_per_chunk):
        if progress is not None:
            progress(start)
        q = queries.features[start:start + images_per_chunk]  # (b, N, D)
        b = q.shape[0]
        t0 = time.perf_counter()
        D, I = index.search(q.reshape(b * N, -1), k)
        t1 = time.perf_counter()
        probs = soft_vote(D, I, memory_dists, options.temperature)  # (b*N, C)
        maps = torch.from_numpy(probs).view(b, s, s, C).permute(0, 3, 1, 2)  # (b, C, s, s)
        if options.upsample == "bilinear":
            maps = F.interpolate(maps, size=(S, S), mode="bilinear", align_corners=False)
        else:
            maps = F.interpolate(maps, size=(S, S), mode="nearest")
        pred = maps.argmax(dim=1).numpy()  # (b, S, S)
        t2 = time.perf_counter()
        gt = queries.masks[start:start + b]
        valid = gt != void
        conf += np.bincount(gt[valid].astype(np.int64) * C + pred[valid], minlength=C * C)
        t3 = time.perf_counter()
        tm["search"] += t1 - t0
        tm["vote"] += t2 - t1
        tm["metric"] += t3 - t2
    return conf.reshape(C, C), tm


def memory_index(feats: np.ndarray, dists: np.ndarray, kind: str, params: IndexParams,
                 device: torch.device) -> SupportIndex | TorchExactIndex:
    """The search index over the memory (:func:`index.torch_search.build_search_index`); its labels are
    the distributions' argmax (for the record: the vote reads the distributions)."""
    return build_search_index(feats, np.arange(len(feats)), dists.argmax(axis=1), kind, params=params, device=device)


def run_hbird(
    backbone: BackboneProtocol,
    train_ds: SegDatasetProtocol,
    val_ds: SegDatasetProtocol,
    *,
    options: HbirdOptions = HbirdOptions(),
    ratios: Sequence[int] = (1, 8, 64, 128),
    seeds: int = 5,
    support_lists: Sequence[SupportList] | None = None,
    k: int = 30,
    index_kind: str = "flat",
    index_params: IndexParams | None = None,
    metric: str = "identity",
    score_classes: str = "all",
    device: str | torch.device = "cpu",
    precision: str = "auto",
    batch_size: int = 16,
    out: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[..., None] | None = log_event,
) -> dict[str, Any]:
    """The Hummingbird protocol at every ratio and seed (or support list); results in
    :func:`index.protocol.run_protocol`'s layout, plus ``"protocol": "hbird"`` and ``"hbird"`` (the options).

    The queries are extracted once (``input_size`` squared); each run builds its memory from its
    support images (augmented, so never cached) and scores every query pixel at ``input_size``.
    """
    t_start = time.perf_counter()
    device = torch.device(device)
    options.check(int(backbone.patch_size))
    if dist.world_size() > 1:
        raise ValueError("--protocol hbird runs in one process: its memory is rebuilt per run; launch it with python, "
                         "not torchrun (the cribo protocol shards over ranks)")
    runs = plan_runs(ratios, seeds, support_lists)
    check_run_arguments(train_ds, val_ds, k=k, metric=metric, score_classes=score_classes)
    log = log or (lambda event, **fields: None)
    C = len(train_ds.class_names)
    resolved = resolve_precision(precision, device)
    backbone.to(device).eval()

    t0 = time.perf_counter()
    queries = query_set(backbone, val_ds, options, device=device, precision=resolved, batch_size=batch_size,
                        progress=progress)
    extract_s = time.perf_counter() - t0
    forward_s = queries.forward_seconds
    log("queries", images=len(val_ds.ids), patches=int(queries.features.shape[0] * queries.features.shape[1]),
        forward_s=round(forward_s, 3), extract_s=round(extract_s, 3))

    position = {image_id: i for i, image_id in enumerate(train_ds.ids)}
    tot = dict(memory=0.0, index_build=0.0, search=0.0, vote=0.0, metric=0.0)
    per_ratio: dict[str, dict[str, Any]] = {}
    bar = tqdm(runs, desc="runs", unit="run", disable=not progress)
    for r, seed, listed in bar:
        ids = run_support_ids(train_ds.ids, r, seed, listed)
        t0 = time.perf_counter()
        feats, dists, mem_forward_s = build_memory(backbone, train_ds, [position[i] for i in ids], options, seed=seed,
                                                   device=device, precision=resolved, batch_size=batch_size,
                                                   progress=progress)
        t1 = time.perf_counter()
        index = memory_index(feats, dists, index_kind, IndexParams.for_run(index_params, seed), device)
        check_k(k, index.ntotal)
        t2 = time.perf_counter()
        qbar = tqdm(total=len(val_ds.ids), desc=f"hbird search 1/{r} seed {seed}", unit="img", leave=False,
                    disable=not progress)
        conf, tm = score_queries(index, dists, queries, k, options, C, val_ds.void,
                                 progress=lambda done: qbar.update(done - qbar.n))
        qbar.update(len(val_ds.ids) - qbar.n)
        qbar.close()
        t3 = time.perf_counter()
        miou, acc, iou = score_confusion(conf, metric, score_classes)
        tm["metric"] += time.perf_counter() - t3
        tm.update(memory=t1 - t0 - mem_forward_s, index_build=t2 - t1)
        forward_s += mem_forward_s
        for key in tot:
            tot[key] += tm[key]
        record_run(per_ratio, r, seed=seed, ids=ids, conf=conf, scores=(miou, acc, iou), metric=metric,
                   score_classes=score_classes, num_support_patches=int(index.ntotal), listed=listed,
                   timing={key: tm[key] for key in tot})
        bar.set_postfix(ratio=f"1/{r}", seed=seed, miou=f"{miou:.1f}")
        log("run", ratio=r, seed=seed, **({} if listed is None else {"support_list": listed.name}),
            miou=round(miou, 3), pixel_accuracy=round(acc, 3), support_images=len(ids),
            memory_patches=int(index.ntotal), **{f"{key}_s": round(v, 3) for key, v in tm.items()})
    bar.close()

    results = {
        "ratios": per_ratio,
        "backbone": backbone_meta(backbone),
        "dataset": dataset_meta(train_ds, val_ds),
        "k": int(k), "index": index_kind, "index_params": asdict(index_params or IndexParams()),
        "vote": "soft", "level": "pixel", "protocol": "hbird", "hbird": options.describe(),
        "metric": metric, "score_classes": score_classes, "class_names": list(train_ds.class_names),
        "per_class_iou": summarise_ratios(per_ratio, C),
        "num_query_patches": int(queries.features.shape[0] * queries.features.shape[1]),
        "patch_size": int(backbone.patch_size), "resolution_rule": f"square-{options.input_size}",
        "precision": resolved, "device": str(device), "std_ddof": 0,
        "support_lists": [sl.describe() for sl in support_lists] if support_lists else None,
        "timing": {"forward": forward_s, "forward_cached": False, "extract": extract_s, **tot,
                   "total": time.perf_counter() - t_start},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"torch": torch.__version__, "faiss": faiss.__version__},
    }
    if out is not None:
        paths = write_reports(results, out)
        log("written", **{key: str(v) for key, v in paths.items()})
    return results
