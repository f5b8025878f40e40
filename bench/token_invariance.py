"""What dominates the cosine between a backbone's patch tokens: the view, the instance or the class?

    PYTHONPATH=. python bench/token_invariance.py --random vit_mini_convstem_patch16 \
        --weights builtin=cribo/weights/builtin.safetensors --scenes 40

On the first ``--scenes`` held-out query scenes (seed 2), every token of a scene is compared, by
cosine of the contract's ``x_norm_patchtokens``, with

- the same patch in the scene turned a quarter (``torch.rot90``, exact: the 16x16 token grid is
  turned back before comparing): how much the token depends on the content's orientation;
- the same patch in the scene mirrored left-right (the views' flip, which CrIBo trains for);
- every patch of the same class in the other scenes, and every patch of another class in them.

Retrieval by k-NN needs "same class, other scene" well above "other class, other scene". When the
turned and mirrored copies stay near 1 while "same class, other scene" stays far below, the tokens
describe the instance (its colour, its texture's scale and phase) rather than the class, and views
that only turn or mirror the image cannot teach more. Labels: majority label of each 16x16 patch,
void patches left out of the class means.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F

from cribo.backbones import Backbone, load_backbone
from cribo.pixels import normalise
from cribo.synthetic import CLASS_NAMES, generate_scene, image_seed
from index.labels import patch_labels

PATCH = 16


def similarities(backbone: Backbone, n_scenes: int) -> dict[str, float]:
    """Mean cosines: turned a quarter, mirrored, same class / other class in another scene."""
    tokens, labels, turned, mirrored = [], [], [], []
    for i in range(n_scenes):
        image, mask = generate_scene(image_seed(2, i))
        x = normalise(torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255)  # (1, 3, H, W)
        h, w = x.shape[2] // PATCH, x.shape[3] // PATCH
        with torch.no_grad():
            t = backbone(torch.cat([x, torch.rot90(x, 1, (2, 3)), torch.flip(x, (3,))]))["x_norm_patchtokens"]
        t = F.normalize(t.float(), dim=-1)
        plain = t[0].reshape(h, w, -1)
        back_turned = torch.rot90(t[1].reshape(w, h, -1), -1, (0, 1))  # (h, w, D), patch (r, c) again
        back_mirrored = torch.flip(t[2].reshape(h, w, -1), (1,))
        turned.append((plain * back_turned).sum(-1).flatten())
        mirrored.append((plain * back_mirrored).sum(-1).flatten())
        tokens.append(plain.reshape(h * w, -1))
        labels.append(patch_labels(mask, PATCH, len(CLASS_NAMES)))
    tok, lab = torch.cat(tokens), np.concatenate(labels)
    scene = np.repeat(np.arange(n_scenes), len(labels[0]))
    cos = (tok @ tok.T).numpy()
    other_scene = scene[:, None] != scene[None]
    labelled = (lab[:, None] >= 0) & (lab[None] >= 0)
    same = lab[:, None] == lab[None]
    return {"turned": float(torch.cat(turned).mean()), "mirrored": float(torch.cat(mirrored).mean()),
            "same class": float(cos[other_scene & labelled & same].mean()),
            "other class": float(cos[other_scene & labelled & ~same].mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", action="append", default=[], metavar="NAME=FILE")
    ap.add_argument("--random", action="append", default=[], metavar="ARCH", help="an arch at random init (seed 0)")
    ap.add_argument("--scenes", type=int, default=40, help="held-out query scenes (seed 2)")
    args = ap.parse_args()
    rows = [(f"{a}, random init", lambda a=a: load_backbone(a, random_init=True, seed=0)) for a in args.random]
    rows += [(name, lambda p=path: load_backbone(weights=p)) for name, _, path in (w.partition("=") for w in args.weights)]
    print(f"mean cosine between patch tokens, {args.scenes} held-out scenes\n")
    print("| backbone | same patch, scene turned 90° | same patch, scene mirrored "
          "| same class, other scene | other class, other scene |\n|---|---|---|---|---|")
    for name, load in rows:
        s = similarities(load(), args.scenes)
        print(f"| {name} | {s['turned']:.3f} | {s['mirrored']:.3f} | {s['same class']:.3f} | {s['other class']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
