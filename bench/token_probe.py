"""Is the class in a backbone's patch tokens at all, and at which depth? k-NN and linear-probe patch
accuracy of every block's tokens on held-out generated scenes.

    PYTHONPATH=. python bench/token_probe.py --weights G=runs/G-export/backbone.safetensors \
        --random vit_mini_convstem_patch16 --support 150 --queries 100

Retrieval (k-NN majority vote) needs the class to be what dominates the cosine between tokens; a
linear probe only needs it to be linearly decodable. If the probe is far above k-NN, the class is in
the tokens but another factor (the instance, the colour) dominates the metric; if both are low, the
objective has not put the class into the tokens. Support: the first ``--support`` scenes of seed 1;
queries: the first ``--queries`` of seed 2 (the held-out splits' seeds). Every labelled 16x16 patch
(majority label, void ignored) of the support scenes is a support patch (ratio 1/1, all patches).
The linear probe: a softmax regression on standardised tokens, full-batch Adam (lr 1e-2, weight decay
1e-4, 300 steps, seed 0). Output: a markdown table, one row per backbone and depth.

``--grey`` shows every scene (support and queries) in grey (ITU-R 601 luma on all three channels):
what the tokens hold about the class without colour, i.e. from texture and shape alone (a network
made colour-invariant can lose on the coloured probe while gaining here). ``--final-only`` probes
the contract's ``x_norm_patchtokens`` only.
"""
from __future__ import annotations

import argparse

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cribo.backbones import Backbone, load_backbone
from cribo.pixels import normalise
from cribo.synthetic import CLASS_NAMES, generate_scene, image_seed
from index.labels import patch_labels
from index.transfer import knn_vote

K = 50  # the protocol's neighbours


def grey(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> the same shape, each channel the ITU-R 601 luma (PIL's ``convert("L")``)."""
    luma = np.asarray(Image.fromarray(image).convert("L"))
    return np.repeat(luma[..., None], 3, axis=-1)


def scenes(seed: int, n: int, *, grey_scenes: bool = False) -> tuple[list[np.ndarray], np.ndarray]:
    """The first ``n`` scenes of ``seed``: images (H, W, 3) uint8 (grey with ``grey_scenes``) and patch
    labels (n*h*w,), -1 = void."""
    pairs = [generate_scene(image_seed(seed, i)) for i in range(n)]
    labels = [patch_labels(m, 16, len(CLASS_NAMES)) for _, m in pairs]
    return [grey(im) if grey_scenes else im for im, _ in pairs], np.concatenate(labels)


def tokens_by_depth(backbone: Backbone, images: list[np.ndarray], batch: int = 25) -> dict[str, torch.Tensor]:
    """Patch tokens after every block (``block i``, prefix tokens dropped) and the contract's
    ``x_norm_patchtokens`` (``final``): each (N*h*w, D) fp32."""
    outs: dict[str, list[torch.Tensor]] = {}
    hooks = [blk.register_forward_hook(lambda _m, _i, o, k=k: outs.setdefault(f"block {k}", []).append(o))
             for k, blk in enumerate(backbone.vit.blocks)]
    try:
        with torch.no_grad():
            for s in range(0, len(images), batch):
                x = torch.from_numpy(np.stack(images[s:s + batch])).permute(0, 3, 1, 2).float() / 255
                outs.setdefault("final", []).append(backbone.forward_features(normalise(x))["x_norm_patchtokens"])
    finally:
        for h in hooks:
            h.remove()
    res = {}
    for name, chunks in outs.items():
        t = torch.cat(chunks)
        if name != "final":
            t = t[:, backbone.num_prefix_tokens:]
        res[name] = t.reshape(-1, t.shape[-1]).float()
    return res


def knn_accuracy(s: torch.Tensor, s_lab: np.ndarray, q: torch.Tensor, q_lab: np.ndarray) -> float:
    """Patch accuracy of the k = 50 cosine majority vote (exact search)."""
    index = faiss.IndexFlatIP(s.shape[1])
    index.add(np.ascontiguousarray(F.normalize(s, dim=-1).numpy()))
    _, nbr = index.search(np.ascontiguousarray(F.normalize(q, dim=-1).numpy()), K)
    pred, _ = knn_vote(nbr, s_lab, len(CLASS_NAMES))
    return float((pred == q_lab).mean())


def linear_accuracy(s: torch.Tensor, s_lab: np.ndarray, q: torch.Tensor, q_lab: np.ndarray) -> float:
    """Patch accuracy of a softmax regression fitted on the support tokens."""
    mu, sd = s.mean(0), s.std(0) + 1e-6
    s, q = (s - mu) / sd, (q - mu) / sd
    gen = torch.Generator().manual_seed(0)
    head = torch.nn.Linear(s.shape[1], len(CLASS_NAMES))
    with torch.no_grad():
        head.weight.normal_(0, 0.01, generator=gen)
        head.bias.zero_()
    opt = torch.optim.Adam(head.parameters(), lr=1e-2, weight_decay=1e-4)
    target = torch.from_numpy(s_lab)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(head(s), target).backward()
        opt.step()
    with torch.no_grad():
        return float((head(q).argmax(1).numpy() == q_lab).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--weights", action="append", default=[], metavar="NAME=FILE")
    ap.add_argument("--random", action="append", default=[], metavar="ARCH", help="an arch at random init (seed 0)")
    ap.add_argument("--support", type=int, default=150, help="support scenes (seed 1)")
    ap.add_argument("--queries", type=int, default=100, help="query scenes (seed 2)")
    ap.add_argument("--grey", action="store_true", help="every scene in grey: the class from texture and shape alone")
    ap.add_argument("--final-only", action="store_true", help="probe x_norm_patchtokens only, not every block")
    args = ap.parse_args()
    rows = [(f"{a}, random init", lambda a=a: load_backbone(a, random_init=True, seed=0)) for a in args.random]
    rows += [(name, lambda p=path: load_backbone(weights=p)) for name, _, path in (w.partition("=") for w in args.weights)]
    (s_img, s_lab), (q_img, q_lab) = (scenes(1, args.support, grey_scenes=args.grey),
                                      scenes(2, args.queries, grey_scenes=args.grey))
    s_keep, q_keep = s_lab >= 0, q_lab >= 0
    majority = float((q_lab[q_keep] == np.bincount(s_lab[s_keep]).argmax()).mean())
    print(f"{s_keep.sum()} support patches, {q_keep.sum()} query patches; "
          f"the most frequent support class alone scores {majority:.3f}\n")
    print(f"scenes: {'grey (texture and shape only)' if args.grey else 'in colour'}\n")
    print("| backbone | depth | k-NN accuracy | linear-probe accuracy |\n|---|---|---|---|")
    for name, load in rows:
        backbone = load()
        s_tok, q_tok = tokens_by_depth(backbone, s_img), tokens_by_depth(backbone, q_img)
        depths = ["final"] if args.final_only else sorted(s_tok, key=lambda d: (d == "final", int(d.split()[-1]) if d != "final" else 0))
        for depth in depths:
            s, q = s_tok[depth][torch.from_numpy(s_keep)], q_tok[depth][torch.from_numpy(q_keep)]
            knn = knn_accuracy(s, s_lab[s_keep], q, q_lab[q_keep])
            lin = linear_accuracy(s, s_lab[s_keep], q, q_lab[q_keep])
            print(f"| {name} | {depth} | {knn:.3f} | {lin:.3f} |", flush=True)


if __name__ == "__main__":
    main()
