"""The app's example queries segmented as the Segment tab segments them, on one sheet: for each
example scene its image, its ground truth and the prediction (k-NN label transfer from the app's
default support index), with the example's patch mIoU; and the same numbers as JSON.

    python scripts/app_examples.py --out docs/app_examples.png                 # the built-in default
    python scripts/app_examples.py --backbone builtin --random-init --out /tmp/random.png

The backbone flags are ``app.py``'s. With no ``--index``, the built-in support scenes and index are
made (or reused) under ``--cache-dir`` exactly as ``python app.py`` makes them. ``pooled_miou`` in
the JSON is the mIoU over all the examples' patches together (``evaluate.py``'s number for these
scenes); ``mean_image_miou`` is the mean of the per-image values printed on the sheet.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file from any folder

from app import draw  # noqa: E402
from app.handlers import Handlers  # noqa: E402
from app.inputs import InputError, load_mask  # noqa: E402
from app.state import BUILTIN_SUPPORT_SCENES, DEFAULT_CACHE, AppConfig, AppState  # noqa: E402
from cribo.argtypes import non_negative_int, positive_int  # noqa: E402
from cribo.errors import CliParser, run_cli  # noqa: E402
from index.labels import patch_labels  # noqa: E402
from index.metrics import confusion_matrix, mean_iou  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = CliParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbone", default=None, help="as app.py (default: builtin)")
    init = p.add_mutually_exclusive_group()
    init.add_argument("--weights", default=None, help="as app.py")
    init.add_argument("--random-init", action="store_true", help="as app.py")
    p.add_argument("--init-seed", type=non_negative_int, default=0, help="seed of --random-init")
    p.add_argument("--index", default=None, help="as app.py (default: the built-in generated scenes)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="as app.py")
    p.add_argument("--support-scenes", type=positive_int, default=BUILTIN_SUPPORT_SCENES,
                   help="built-in support scenes (the app's: %(default)s)")
    p.add_argument("--num", type=positive_int, default=8, help="examples on the sheet (the app has 24)")
    p.add_argument("--k", type=positive_int, default=50)
    p.add_argument("--title", default=None, help="line above the sheet (default: the backbone)")
    p.add_argument("--out", type=Path, required=True, help="sheet PNG; the JSON is written beside it")
    a = p.parse_args(argv)
    a.backbone = a.backbone or (None if a.weights else "builtin")
    return a


def segment_examples(state: AppState, num: int, k: int) -> list[dict]:
    """Per example: ``image``, ``truth`` and ``prediction`` overlays (uint8 RGB), ``miou`` (patch level,
    %), and the example's patch ``labels`` / ``predictions`` for pooling."""
    handlers = Handlers(state)
    entry = state.index("")
    patch = int(state.backbone().patch_size)
    rows = []
    for image_path, mask_path in state.examples()[:num]:
        over, pred_png, _, _, _, _, _, details = handlers.segment(image_path, k=k, gt_mask=mask_path)
        pixels = np.asarray(Image.open(image_path).convert("RGB"))
        gt = load_mask(mask_path, size=pixels.shape[:2], num_classes=entry.num_classes)
        pred = np.asarray(Image.open(pred_png))  # class ids, painted per patch at the image's size
        rows.append({"name": Path(image_path).name, "image": pixels, "truth": draw.overlay(pixels, gt, entry.palette),
                     "prediction": over, "miou": details["miou_patch"],
                     "labels": patch_labels(gt, patch, entry.num_classes),
                     "predictions": patch_labels(pred, patch, entry.num_classes)})
    return rows


def pooled_miou(rows: list[dict], num_classes: int) -> float:
    """mIoU (%) over every example's labelled patches together (the protocol's aggregation)."""
    conf = sum(confusion_matrix(r["predictions"], r["labels"], num_classes) for r in rows)
    return 100 * mean_iou(conf)


def sheet(rows: list[dict], title: str, per_row: int = 2) -> Image.Image:
    """Rows of (image | truth | prediction) triples, ``per_row`` examples side by side."""
    h, w = rows[0]["image"].shape[:2]
    gap, cap, head = 6, 18, 26
    cell_w = 3 * w + 2 * gap
    n_rows = -(-len(rows) // per_row)
    out = Image.new("RGB", (per_row * cell_w + (per_row - 1) * 3 * gap, head + n_rows * (h + cap + gap)), "white")
    pen = ImageDraw.Draw(out)
    pen.text((4, 6), title, fill=(0, 0, 0))
    for i, r in enumerate(rows):
        x0 = (i % per_row) * (cell_w + 3 * gap)
        y0 = head + (i // per_row) * (h + cap + gap)
        for j, key in enumerate(("image", "truth", "prediction")):
            out.paste(Image.fromarray(r[key]), (x0 + j * (w + gap), y0 + cap))
        pen.text((x0, y0 + 3), f"{r['name']}: image | truth | prediction, mIoU {r['miou']:.1f}%", fill=(0, 0, 0))
    return out


def main(argv: list[str] | None = None) -> int:
    return run_cli(_main, argv)


def _main(argv: list[str]) -> int:
    a = parse_args(argv)
    config = AppConfig(backbone=a.backbone, weights=a.weights, random_init=a.random_init, seed=a.init_seed,
                       index=a.index, cache_dir=a.cache_dir, builtin_scenes=a.support_scenes)
    state = AppState(config)
    rows = segment_examples(state, a.num, a.k)
    if not rows:
        raise InputError(f"index {a.index}: no example queries (its dataset has no query split here); "
                         "use the built-in default or an index whose dataset is on this machine")
    backbone = state.backbone()
    entry = state.index("")
    title = a.title or (f"{a.weights or a.backbone}{' (random init)' if a.random_init else ''}: k = {a.k} "
                        f"nearest of {entry.index.ntotal:,} labelled support patches ({entry.source})")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    sheet(rows, title).save(a.out)
    result = {"backbone": backbone.identity, "k": a.k, "examples": [{"name": r["name"], "miou": r["miou"]} for r in rows],
              "mean_image_miou": float(np.mean([r["miou"] for r in rows])), "pooled_miou": pooled_miou(rows, entry.num_classes)}
    a.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: result[k] for k in ("mean_image_miou", "pooled_miou")} | {"out": str(a.out)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
