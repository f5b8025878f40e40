"""The supervised anchor: the same backbone trained WITH labels for a given wall time.

A label-free method should be judged against what the architecture learns from the labels themselves
in the same compute. This trains ``--arch`` from scratch with a per-patch linear classifier and
cross-entropy on the majority label of every patch (void-only patches ignored), on random crops at the
scene's native scale (``--img-size`` pixels, no resize, horizontal flip), AdamW with a linear warm-up,
for ``--minutes`` of wall time (or ``--max-steps``), then exports the backbone
(``OUT/backbone.safetensors``, loadable with ``--weights``) and logs JSON lines to ``OUT/log.jsonl``.

    python bench/train_supervised.py --root data/synthetic --split train --arch vit_tiny_convstem_patch16 \
        --minutes 60 --out runs/supervised
    python bench/baselines.py --root data/synthetic --weights supervised=runs/supervised/backbone.safetensors
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


from cribo.backbones import Backbone, create_vit, export_backbone
from cribo.precision import autocast, resolve_precision
from index.datasets import open_dataset
from index.features import normalise_pixels
from index.labels import patch_labels


class PatchCrops(Dataset):
    """Random ``size`` x ``size`` crops (native scale, random flip) and their majority patch labels."""

    def __init__(self, dataset, size: int, patch_size: int, seed: int):
        self.ds, self.size, self.p, self.seed = dataset, size, patch_size, seed

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key: tuple[int, int]):
        epoch, i = key
        rng = np.random.default_rng([self.seed, epoch, i])
        image, mask = self.ds.load_image(i), self.ds.load_mask(i)
        y = int(rng.integers(0, image.shape[0] - self.size + 1))
        x = int(rng.integers(0, image.shape[1] - self.size + 1))
        image, mask = image[y:y + self.size, x:x + self.size], mask[y:y + self.size, x:x + self.size]
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        labels = patch_labels(np.ascontiguousarray(mask), self.p, self.ds.num_classes)
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1), torch.from_numpy(labels)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", default="folder")
    ap.add_argument("--root", required=True)
    ap.add_argument("--split", default="train")
    ap.add_argument("--arch", default="vit_tiny_convstem_patch16")
    ap.add_argument("--img-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-steps", type=int, default=50)
    ap.add_argument("--minutes", type=float, default=30.0, help="wall-time budget")
    ap.add_argument("--max-steps", type=int, default=10**9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    device = torch.device("cpu")
    precision = resolve_precision(args.precision, device)
    ds = open_dataset(args.dataset, args.root, args.split)
    vit = create_vit(args.arch)
    backbone = Backbone(vit, args.arch, identity="supervised", source="bench/train_supervised.py")
    classifier = torch.nn.Linear(backbone.embed_dim, ds.num_classes)
    params = list(vit.parameters()) + list(classifier.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    crops = PatchCrops(ds, args.img_size, backbone.patch_size, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "w")  # noqa: SIM115 (closed below)
    t0, step, epoch = time.perf_counter(), 0, 0
    while step < args.max_steps and time.perf_counter() - t0 < 60 * args.minutes:
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(args.seed + epoch)).tolist()
        loader = DataLoader(crops, batch_size=args.batch_size, sampler=[(epoch, i) for i in order], num_workers=1,
                            drop_last=True)
        for pixels, labels in loader:  # (B, 3, S, S) uint8, (B, N) int64
            lr = args.lr * min(1.0, (step + 1) / args.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            with autocast(precision, device):
                tokens = backbone.forward_features(normalise_pixels(pixels))["x_norm_patchtokens"]  # (B, N, D)
                logits = classifier(tokens)  # (B, N, C)
            loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            if step % 10 == 0:
                valid = labels >= 0
                acc = float((logits.argmax(-1) == labels)[valid].float().mean())
                row = {"step": step, "epoch": epoch, "loss": float(loss), "patch_acc": acc, "lr": lr,
                       "minutes": (time.perf_counter() - t0) / 60}
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(json.dumps(row), flush=True)
            if step >= args.max_steps or time.perf_counter() - t0 >= 60 * args.minutes:
                break
        epoch += 1
    log.close()
    info = export_backbone(vit, args.arch, out / "backbone.safetensors",
                           {"source": "bench/train_supervised.py", "step": step, "minutes": args.minutes,
                            "images_seen": step * args.batch_size})
    print(json.dumps({"steps": step, "images_seen": step * args.batch_size, "sha256": info["sha256"]}))


if __name__ == "__main__":
    main()
