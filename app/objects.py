"""What CrIBo learns from, live: joint-space clusters of two views and cross-image object matches.

Clusters (paper Sec. 3.2.1, App. B; Fig. 4): one image -> two augmented views
(:meth:`cribo.pretrain.transforms.TwoViewTransform.sample`, seeded) -> the backbone's patch tokens of both views
-> :func:`cribo.pretrain.step.teacher_objects`, the teacher side of the training step (joint-space
clustering, K clusters, positional weight lambda_pos -> per-view assignments; a cluster present in one
view only is dropped).

Matches (Sec. 3.2.2, Eq. 2-4; Fig. 5): object vectors (mean of the member tokens, from
``teacher_objects``) of the two views of support images are pushed into an
:class:`cribo.pretrain.bank.ObjectMemoryBank`; a query's objects are looked up with :meth:`ObjectMemoryBank.query`,
which returns each object's nearest bank slot and the cycle-consistency verdict of the pair.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from cribo.pretrain.bank import ObjectMemoryBank
from cribo.pretrain.step import teacher_objects
from cribo.pixels import denormalise
from cribo.pretrain.transforms import TwoViewTransform, TwoViews

VIEW_SIZE = 224

__all__ = ["ClusterResult", "cluster_images", "view_pixels", "ObjectBank", "build_bank", "Match", "match_objects"]


@dataclass
class ClusterResult:
    """Joint-space clustering of the two views of B images.

    views: the sampled :class:`TwoViews` per image. a1, a2: ``(B, N)`` long cluster of every patch of
    view 1 / view 2. valid: ``(B, K)`` bool, cluster present in both views. c1, c2: ``(B, K, D)``
    object vectors (mean of the raw tokens of each cluster, per view). grid: ``(h, w)`` of a view.
    """

    views: list[TwoViews]
    a1: torch.Tensor
    a2: torch.Tensor
    valid: torch.Tensor
    c1: torch.Tensor
    c2: torch.Tensor
    grid: tuple[int, int]
    K: int


@torch.inference_mode()
def cluster_images(backbone, images: list[Image.Image], *, K: int, lambda_pos: float, seed: int,
                   scale_min: float, photometric: bool = True, device: str | torch.device = "cpu",
                   batch_size: int = 16) -> ClusterResult:
    """Two seeded views of each image, their tokens, and the joint-space clustering (batched).

    Image ``b`` uses ``torch.Generator().manual_seed(seed + b)`` for its views and the clustering uses
    ``manual_seed(seed)``, so a result is reproducible from its arguments.
    """
    if not 0.05 <= scale_min <= 1.0:
        raise ValueError(f"crop scale {scale_min} must lie in [0.05, 1]")
    p = int(backbone.patch_size)
    transform = TwoViewTransform(VIEW_SIZE, scale=(scale_min, 1.0), patch_size=p, photometric=photometric)
    N = transform.num_patches
    if not 1 <= K <= 2 * N:
        raise ValueError(f"K={K} must lie in 1..{2 * N} (two views of {N} patches)")
    views = [transform.sample(img, generator=torch.Generator().manual_seed(seed + b))
             for b, img in enumerate(images)]
    x = torch.stack([t for v in views for t in (v.view1, v.view2)]).to(device)  # (2B, 3, S, S)
    tokens = torch.cat([backbone.forward_features(x[s:s + batch_size])["x_norm_patchtokens"].float()
                        for s in range(0, x.shape[0], batch_size)])  # (2B, N, D)
    B = len(views)
    patches = tokens.unflatten(0, (B, 2)).transpose(0, 1)  # (2, B, N, D): the views to the leading axis
    coords = torch.stack([torch.stack([v.coords1 for v in views]), torch.stack([v.coords2 for v in views])]).to(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    # The teacher side of the training step (cribo.pretrain.step.teacher_objects), on this backbone.
    assign, valid, objects = teacher_objects(patches, coords, K, lambda_pos, generator=gen)
    a1, a2, c1, c2 = assign[0], assign[1], objects[0], objects[1]
    g = VIEW_SIZE // p
    return ClusterResult(views, a1.cpu(), a2.cpu(), valid.cpu(), c1.cpu(), c2.cpu(), (g, g), K)


def view_pixels(view: torch.Tensor) -> np.ndarray:
    """A normalised view ``(3, S, S)`` -> ``(S, S, 3)`` uint8 for display."""
    return (denormalise(view).permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


@dataclass
class ObjectBank:
    """An :class:`ObjectMemoryBank` filled with the objects of some support images, plus what is needed
    to draw a matched slot: the clustering of those images and their ids (batch order)."""

    bank: ObjectMemoryBank
    clusters: ClusterResult
    ids: list[str]

    def image_of_position(self, position: int) -> tuple[int, int]:
        """A bank query's ``idx1`` entry -> (support image position in ``ids``, cluster k).

        ``BankQuery.idx1`` is the position ``i*K + k`` in the newest-first queue
        (:meth:`ObjectMemoryBank.ordered`); :func:`build_bank` fills the bank with one push, whose
        images are newest-first in batch order, so ``i`` is the image's position in ``ids``.
        """
        return divmod(int(position), self.bank.num_objects)


def build_bank(backbone, images: list[Image.Image], ids: list[str], *, K: int, lambda_pos: float, seed: int,
               scale_min: float, photometric: bool = True, device: str | torch.device = "cpu") -> ObjectBank:
    """Cluster the support images' two views and push their objects into a bank of ``len(images)``
    images (fp32 storage: this bank is small)."""
    if not images:
        raise ValueError("no support images for the object bank")
    res = cluster_images(backbone, images, K=K, lambda_pos=lambda_pos, seed=seed, scale_min=scale_min,
                         photometric=photometric, device=device)
    bank = ObjectMemoryBank(len(images), K, res.c1.shape[-1], dtype=torch.float32)
    bank.push(res.c1, res.c2, res.valid)
    return ObjectBank(bank, res, list(ids))


@dataclass
class Match:
    """Query object k of view 1 -> its nearest bank object (Eq. 2) and the cycle verdict (Eq. 4)."""

    k: int
    size: int  # patches of cluster k in the query's view 1
    image: int  # support image position in the bank's ids
    k_match: int  # cluster of the matched object in that image
    cosine: float
    cycle_consistent: bool


def match_objects(obank: ObjectBank, query: ClusterResult) -> list[Match]:
    """Nearest bank object of each valid object of the query's view 1 (query = one image, B = 1)."""
    q = obank.bank.query(query.c1, query.c2, query.valid)
    out = []
    counts = torch.bincount(query.a1[0], minlength=query.K)
    for k in torch.nonzero(query.valid[0]).flatten().tolist():
        position = int(q.idx1[0, k])
        if position < 0:
            continue
        image, kk = obank.image_of_position(position)
        target = obank.clusters.c1[image, kk]
        cos = torch.nn.functional.cosine_similarity(query.c1[0, k], target, dim=0)
        out.append(Match(k, int(counts[k]), image, kk, float(cos), bool(q.ok1[0, k])))
    return out
