"""Are CrIBo's positives of the same class? The training step's objects, cross-view pairs and bank
neighbours, scored against the generated scenes' masks.

    PYTHONPATH=. python bench/positive_purity.py --root data/synthetic --random vit_mini_convstem_patch16 \
        --weights builtin=cribo/weights/builtin.safetensors --img-size 160 --crop-scale 0.25 0.6

For each backbone (taken as the teacher), training-split scenes go through the step's own pieces:
the views of ``--augment`` (``TwoViewTransform``), joint-space clustering (``teacher_objects``) and the
paired FIFO banks with their cycle-consistency check (``ObjectMemoryBank``), K and S as in a run.
Every patch of a view gets the class under its centre in the scene's mask; an object's class is the
majority class of its member patches. Reported, over the batches after the bank is full:

- ``purity``: the share of an object's (non-void) patches that have its class (1: the cluster is
  one class);
- ``views agree``: object k has the same class in view 1 and view 2 (what L_cv^o pairs);
- ``nn same class``: the bank's nearest object (view 1 -> M1, the target of the student's view-2
  object) has the query object's class (what L_ci^o pairs), over all valid objects, and ``cycle``:
  the same among those that pass the cycle-consistency check (the pairs L_ci^o actually uses);
- ``chance``: the same rate if the neighbour were a random object of the bank (sum over classes of
  the query's class share times the bank's);
- ``nn in the same image``: the neighbour is the query image's own object from an earlier pass. A
  bank of more images than the split minus the measured batches holds the measured scenes themselves
  (as a run's bank does once S exceeds the training set): those neighbours are the same instance, and
  their class agreement says nothing about the features.

A label-free objective can only learn the class from cross-image pairs; this says how many of them
carry it, for the features a run has, and for features that hold the class (the supervised anchor).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from cribo.backbones import load_backbone
from cribo.constants import VOID
from cribo.pretrain.bank import ObjectMemoryBank
from cribo.pretrain.step import teacher_objects
from cribo.pretrain.transforms import AUGMENTATIONS, TwoViewTransform


def view_labels(mask: np.ndarray, coords: torch.Tensor) -> torch.Tensor:
    """Class under each patch centre: mask (H, W) uint8, coords (N, 2) (x, y) -> (N,) long, -1 for void."""
    h, w = mask.shape
    x = coords[:, 0].floor().long().clamp(0, w - 1).numpy()
    y = coords[:, 1].floor().long().clamp(0, h - 1).numpy()
    lab = torch.from_numpy(mask[y, x].astype(np.int64))
    return torch.where(lab == VOID, -1, lab)


def object_classes(labels: torch.Tensor, assign: torch.Tensor, K: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """labels, assign (B, N) -> majority class (B, K) (-1 for clusters with no labelled patch) and
    purity (B, K) (share of the cluster's labelled patches with that class; 0 where none)."""
    B = labels.shape[0]
    counts = torch.zeros(B, K, num_classes + 1)
    counts.index_put_((torch.arange(B).unsqueeze(1).expand_as(assign), assign, labels.clamp_min(-1) + 1),
                      torch.ones_like(assign, dtype=torch.float), accumulate=True)
    counts = counts[..., 1:]  # drop the void column
    total = counts.sum(-1)
    best, cls = counts.max(-1)
    return torch.where(total > 0, cls, -1), torch.where(total > 0, best / total.clamp_min(1), 0.0)


def measure(backbone, files: list[tuple[Path, Path]], transform: TwoViewTransform, *, K: int, bank_images: int,
            batch_size: int, measure_batches: int, num_classes: int, seed: int, lambda_pos: float,
            grey: bool = False) -> dict:
    gen = torch.Generator().manual_seed(seed)
    cgen = torch.Generator().manual_seed(seed + 1)
    bank = None
    queue1: list[torch.Tensor] = []  # per pushed batch, newest first: (n, K) classes of the view-1 objects
    queue_ids: list[torch.Tensor] = []  # per pushed batch, newest first: (n,) image index
    fill_batches = -(-bank_images // batch_size)
    stats = {k: [] for k in ("purity", "views_agree", "nn_same", "cycle_same", "chance", "kept", "ratio", "nn_self")}
    order = torch.randperm(len(files), generator=gen)
    total = fill_batches + measure_batches
    for b in tqdm(range(total), desc="batches", leave=False):
        idx = order[(torch.arange(batch_size) + b * batch_size) % len(files)]
        views, coords, labels = [[], []], [[], []], [[], []]
        for i in idx.tolist():
            img_path, mask_path = files[i]
            img = Image.open(img_path).convert("L" if grey else "RGB").convert("RGB")
            tv = transform.sample(img, gen)
            mask = np.asarray(Image.open(mask_path))
            for v, (x, c) in enumerate(((tv.view1, tv.coords1), (tv.view2, tv.coords2))):
                views[v].append(x)
                coords[v].append(c)
                labels[v].append(view_labels(mask, c))
        x = torch.stack([torch.stack(v) for v in views])  # (2, B, 3, S, S)
        pos = torch.stack([torch.stack(c) for c in coords])  # (2, B, N, 2)
        lab = torch.stack([torch.stack(l) for l in labels])  # (2, B, N)
        with torch.no_grad():
            patches = backbone.forward_features(x.flatten(0, 1))["x_norm_patchtokens"]  # (2B, N, D)
        patches = patches.unflatten(0, (2, -1)).float()
        obj = teacher_objects(patches, pos, K, lambda_pos, generator=cgen)
        if bank is None:
            bank = ObjectMemoryBank(bank_images, K, patches.shape[-1], dtype=torch.float32)
        cls1, pur1 = object_classes(lab[0], obj.assign[0], K, num_classes)
        cls2, pur2 = object_classes(lab[1], obj.assign[1], K, num_classes)
        if b >= fill_batches:  # the bank is full: measure
            q = bank.query(obj.objects[0], obj.objects[1], obj.valid)
            bank_cls = torch.cat(queue1)[: bank_images].reshape(-1)  # newest-first rows, as idx1 counts them
            v = obj.valid & (cls1 >= 0)
            nn_cls = bank_cls[q.idx1.clamp_min(0)]
            bank_ids = torch.cat(queue_ids)[: bank_images].repeat_interleave(K)  # (rows,)
            nn_self = bank_ids[q.idx1.clamp_min(0)] == idx.unsqueeze(1)  # the neighbour is this image's own object
            stats["nn_self"].append(nn_self[v].float())
            same = (nn_cls == cls1) & (q.idx1 >= 0)
            stats["purity"].append(torch.cat([pur1[obj.valid], pur2[obj.valid]]))
            stats["views_agree"].append((cls1 == cls2)[v].float())
            stats["nn_same"].append(same[v].float())
            stats["cycle_same"].append(same[v & q.ok1].float())
            bank_valid = bank_cls[bank_cls >= 0]
            p_bank = torch.bincount(bank_valid, minlength=num_classes).float() / max(len(bank_valid), 1)
            stats["chance"].append(p_bank[cls1[v]])
            stats["kept"].append(obj.valid.sum(1).float())
            stats["ratio"].append(q.ok1[obj.valid].float())
        bank.push(obj.objects[0], obj.objects[1], obj.valid)
        queue1.insert(0, torch.where(obj.valid, cls1, -1))
        queue_ids.insert(0, idx)
        del queue1[fill_batches + 1:], queue_ids[fill_batches + 1:]
    return {k: round(torch.cat(v).mean().item(), 4) for k, v in stats.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="data/synthetic", help="generated scenes (images/train, masks/train, classes.txt)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--weights", action="append", default=[], metavar="NAME=FILE")
    ap.add_argument("--random", action="append", default=[], metavar="ARCH", help="an arch at random init (seed 0)")
    ap.add_argument("--img-size", type=int, default=160)
    ap.add_argument("--crop-scale", type=float, nargs=2, default=(0.25, 0.6))
    ap.add_argument("--augment", default="mild", choices=sorted(AUGMENTATIONS))
    ap.add_argument("-K", "--num-clusters", type=int, default=16)
    ap.add_argument("--lambda-pos", type=float, default=1.0)
    ap.add_argument("--bank-images", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--measure-batches", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grey", action="store_true", help="turn every scene grey before its views are drawn")
    ap.add_argument("--out", help="also write the rows as JSON lines here")
    args = ap.parse_args()
    root = Path(args.root)
    num_classes = len((root / "classes.txt").read_text().split())
    images = sorted((root / "images" / args.split).glob("*.png"))
    files = [(p, root / "masks" / args.split / p.name) for p in images]
    missing = [m for _, m in files if not m.exists()]
    if not files or missing:
        raise SystemExit(f"{root}: need images/{args.split}/*.png with masks/{args.split}/ beside them "
                         f"({len(files)} images, {len(missing)} masks missing); make them with python -m cribo.synthetic")
    v1, v2 = AUGMENTATIONS[args.augment]
    transform = TwoViewTransform(args.img_size, scale=tuple(args.crop_scale), patch_size=16, view1_aug=v1, view2_aug=v2)
    rows = [(f"{a}, random init", lambda a=a: load_backbone(a, random_init=True, seed=0)) for a in args.random]
    rows += [(name, lambda p=path: load_backbone(weights=p)) for name, _, path in (w.partition("=") for w in args.weights)]
    keys = ("kept", "purity", "views_agree", "nn_same", "cycle_same", "chance", "ratio", "nn_self")
    print("| backbone | kept objects | purity | views agree | nn same class | cycle-consistent nn same class | chance "
          "| cycle ratio | nn in the same image |")
    print("|---" * (len(keys) + 1) + "|")
    for name, make in rows:
        backbone = make().eval()
        res = measure(backbone, files, transform, K=args.num_clusters, bank_images=args.bank_images,
                      batch_size=args.batch_size, measure_batches=args.measure_batches, num_classes=num_classes,
                      seed=args.seed, lambda_pos=args.lambda_pos, grey=args.grey)
        print(f"| {name} | " + " | ".join(f"{res[k]:.3f}" if k != "kept" else f"{res[k]:.1f}" for k in keys) + " |",
              flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps({"backbone": name, **res}) + "\n")


if __name__ == "__main__":
    main()
