"""Are a backbone's patch tokens about the class or about the image? Mean cosine similarities on held-out
generated scenes, by pair of patches: same class in another image, another class in the same image, ...

    python bench/token_similarity.py --weights C=runs/C-export/backbone.safetensors \
        --random vit_tiny_convstem_patch16 --scenes 40

Retrieval transfers a label when a query patch's nearest support patches (always in other images) have
its class, so "same class, other image" has to beat "other class, other image" by a margin that
survives the nearest-neighbour tails. The script also checks whether the tokens follow each scene's
lighting and sensor noise rather than its content: the cosine between the tokens of a scene rendered
with its own lighting / noise and with another scene's (same content, same positions), and how much the
tokens depend on the content's orientation: the cosine between each patch's token and the same patch's
token in the scene turned a quarter (``np.rot90``, exact; the token grid is turned back) or mirrored
left-right (the views' flip, which CrIBo trains for). Tokens that stay near 1 under both while "same
class, other image" stays far below describe the instance (its colour, its texture's scale and phase)
rather than the class: views that only turn or mirror the image cannot teach more.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

from cribo.backbones import load_backbone
from cribo.constants import VOID
from cribo.pixels import normalise
from cribo.synthetic import image_seed, render, sample_scene

PATCH = 16


def tokens(backbone, images: list[np.ndarray]) -> torch.Tensor:
    """(N, H, W, 3) uint8-range float images -> L2-normalised patch tokens (N, P, D)."""
    x = torch.from_numpy(np.ascontiguousarray(np.stack(images))).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        t = backbone.forward_features(normalise(x))["x_norm_patchtokens"]
    return torch.nn.functional.normalize(t, dim=-1)


def patch_labels(mask: np.ndarray) -> np.ndarray:
    """(H, W) class ids -> (P,) majority class per 16x16 patch, -1 where the majority is void."""
    h, w = mask.shape[0] // PATCH, mask.shape[1] // PATCH
    blocks = mask.reshape(h, PATCH, w, PATCH).transpose(0, 2, 1, 3).reshape(h * w, PATCH * PATCH)
    lab = np.array([np.bincount(b, minlength=256).argmax() for b in blocks])
    return np.where(lab == VOID, -1, lab)


def similarities(backbone, scenes) -> dict[str, float]:
    images = [render(s)[0] for s in scenes]
    swapped = [np.clip(render(s, post=False)[0] * o.light[..., None] + o.noise, 0, 255)
               for s, o in zip(scenes, scenes[1:] + scenes[:1])]  # each scene lit as the next one
    t = tokens(backbone, images)  # (N, P, D)
    labels = torch.from_numpy(np.concatenate([patch_labels(render(s, post=False)[1]) for s in scenes]))
    image = torch.arange(len(scenes)).repeat_interleave(t.shape[1])
    keep = labels >= 0
    flat, labels, image = t.reshape(-1, t.shape[-1])[keep], labels[keep], image[keep]
    cos = flat @ flat.T
    same_class, same_image = labels[:, None] == labels[None], image[:, None] == image[None]
    off_diag = ~torch.eye(len(flat), dtype=torch.bool)
    mean = lambda m: cos[m & off_diag].mean().item()  # noqa: E731
    return {"same class, other image": mean(same_class & ~same_image),
            "other class, other image": mean(~same_class & ~same_image),
            "other class, same image": mean(~same_class & same_image),
            "same class, same image": mean(same_class & same_image),
            "own vs another's lighting": (t * tokens(backbone, swapped)).sum(-1).mean().item(),
            "own vs turned 90°": (t * _turned_back(tokens(backbone, [np.rot90(im) for im in images]),
                                               images[0].shape[0] // PATCH)).sum(-1).mean().item(),
            "own vs mirrored": (t * _mirrored_back(tokens(backbone, [im[:, ::-1] for im in images]),
                                                   images[0].shape[1] // PATCH)).sum(-1).mean().item()}


def _turned_back(t: torch.Tensor, h: int) -> torch.Tensor:
    """Tokens (N, P, D) of scenes turned a quarter anticlockwise (``np.rot90``) -> the token of each
    patch of the unturned scene, row-major (N, P, D)."""
    n, p, d = t.shape
    return torch.rot90(t.reshape(n, p // h, h, d), -1, (1, 2)).reshape(n, p, d)


def _mirrored_back(t: torch.Tensor, w: int) -> torch.Tensor:
    """Tokens (N, P, D) of scenes mirrored left-right -> the token of each patch of the unmirrored scene."""
    n, p, d = t.shape
    return torch.flip(t.reshape(n, p // w, w, d), (2,)).reshape(n, p, d)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", action="append", default=[], metavar="NAME=FILE")
    ap.add_argument("--random", action="append", default=[], metavar="ARCH", help="an arch at random init (seed 0)")
    ap.add_argument("--scenes", type=int, default=40, help="held-out scenes (seed 2, as the val split)")
    args = ap.parse_args()
    rows = [(f"{a}, random init", load_backbone(a, random_init=True, seed=0)) for a in args.random]
    rows += [(name, load_backbone(weights=path)) for name, _, path in (w.partition("=") for w in args.weights)]
    scenes = [sample_scene(image_seed(2, i)) for i in range(args.scenes)]
    header = None
    for name, backbone in rows:
        sims = similarities(backbone, scenes)
        if header is None:
            header = list(sims)
            print("| backbone | " + " | ".join(header) + " |\n" + "|---" * (len(header) + 1) + "|")
        print(f"| {name} | " + " | ".join(f"{sims[k]:.3f}" for k in header) + " |", flush=True)


if __name__ == "__main__":
    main()
