"""Feature extraction throughput vs the bare backbone forward on the same batches (goal >= 90%).

BASELINE: the images of the subset are decoded, resized to the protocol resolution and grouped into
the same same-size batches as ``extract_features`` uses *before* the clock starts; the baseline is
then only ``normalise -> backbone.forward_features`` over those in-memory batches. The measured path
is the whole ``index.features.extract_features`` into a fresh cache directory: mask pass, image
decoding and resizing (DataLoader workers), forward, L2 normalisation, float16 memmap writes, meta.
Both run after one untimed warm-up forward per batch shape, in this process, on the same images.

    python bench/bench_feature_throughput.py --root ../shared/data/voc-mini --images 48
    python bench/bench_feature_throughput.py --backbone vit_small_patch16_224 --device cuda --images 632
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

import numpy as np
import torch

from cribo.backbones import load_backbone
from cribo.precision import autocast, resolve_precision
from index.datasets import FileSegDataset, open_dataset
from cribo.constants import IMAGENET_MEAN, IMAGENET_STD
from index.features import extract_features, size_batches
from index.labels import protocol_size, resize_image


def subset(ds: FileSegDataset, n: int) -> FileSegDataset:
    """The first ``n`` images of a file dataset, as a dataset of its own (a distinct cache entry)."""
    n = min(n, len(ds.ids))
    return FileSegDataset(kind=ds.kind, name=ds.name, root=ds.root, split=ds.split, ids=ds.ids[:n],
                          class_names=ds.class_names, image_paths=ds.image_paths[:n], mask_paths=ds.mask_paths[:n],
                          lut=ds.lut)


def preload_batches(backbone, dataset, batch_size: int) -> list[torch.Tensor]:
    """Decoded, protocol-resized uint8 batches ``(B, 3, H', W')`` grouped exactly as extract_features does."""
    images = [dataset.load_image(i) for i in range(len(dataset.ids))]
    sizes = np.array([protocol_size(*im.shape[:2], backbone.patch_size) for im in images])
    return [torch.stack([torch.tensor(resize_image(images[i], tuple(sizes[i]))).permute(2, 0, 1) for i in b])
            for b in size_batches(sizes, batch_size)]


def bare_forward_seconds(backbone, batches: list[torch.Tensor], device: str, precision: str) -> float:
    """Wall time of normalise + forward_features over in-memory batches (the baseline)."""
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    backbone.eval()
    with torch.inference_mode():
        t0 = time.perf_counter()
        for x in batches:
            x = (x.to(device).float().div_(255) - mean) / std
            with autocast(precision, device):
                backbone.forward_features(x)["x_norm_patchtokens"].float()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0


def warm_up(backbone, batches: list[torch.Tensor], device: str, precision: str) -> None:
    """One untimed forward per distinct batch shape ``(B, 3, H', W')``, so that neither measurement
    pays first-call costs (cuBLAS / SDPA kernel selection on CUDA, oneDNN primitive creation on CPU:
    both per input shape, batch size included)."""
    seen = set()
    with torch.inference_mode(), autocast(precision, device):
        for x in batches:
            if tuple(x.shape) not in seen:
                seen.add(tuple(x.shape))
                backbone.forward_features(x.to(device).float())
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default=str(REPO.parent / "shared" / "data" / "voc-mini"))
    p.add_argument("--split", default="val")
    p.add_argument("--backbone", default="vit_small_patch16_224")
    p.add_argument("--images", type=int, default=48, help="first N images of the split")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="auto")
    args = p.parse_args()

    precision = resolve_precision(args.precision, args.device)
    backbone = load_backbone(args.backbone, random_init=True, seed=0, device=args.device)
    ds = subset(open_dataset("voc", args.root, args.split), args.images)
    batches = preload_batches(backbone, ds, args.batch_size)
    warm_up(backbone, batches, args.device, precision)
    bare = bare_forward_seconds(backbone, batches, args.device, precision)
    with tempfile.TemporaryDirectory() as cache:
        t0 = time.perf_counter()
        fs = extract_features(backbone, ds, cache, precision=precision, device=args.device,
                              batch_size=args.batch_size, num_workers=args.workers, progress=False)
        full = time.perf_counter() - t0
        inner_forward = fs.meta["forward_seconds"]
    n = len(ds.ids)
    figures = {
        "bench": "feature_throughput", "backbone": args.backbone, "device": args.device, "precision": precision,
        "images": n, "batches": len(batches), "patches": int(fs.offsets[-1]), "threads": torch.get_num_threads(),
        "workers": args.workers, "bare_forward_s": round(bare, 3), "extract_s": round(full, 3),
        "extract_forward_s": round(inner_forward, 3),
        "bare_img_per_s": round(n / bare, 3), "extract_img_per_s": round(n / full, 3),
        "throughput_ratio": round(bare / full, 4), "goal": ">= 0.90",
    }
    print(json.dumps(figures))
    print(f"extraction {n / full:.2f} img/s vs bare forward {n / bare:.2f} img/s: "
          f"{100 * bare / full:.1f}% of the bare forward (goal >= 90%)")


if __name__ == "__main__":
    main()
