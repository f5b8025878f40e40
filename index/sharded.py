"""The support index split across ``torchrun`` ranks: each rank searches its shard, top-k merged.

Under ``torchrun --nproc_per_node N evaluate.py ...`` (gloo on CPU, NCCL on GPU, any rendezvous
torchrun supports) rank ``r`` of ``W`` indexes the support rows ``[r n / W, (r + 1) n / W)`` only, so
the support memory is divided by ``W``; every rank searches every query patch in its shard, the
``(nq, k)`` results of all ranks are all-gathered and merged into the global top-k, identical on
every rank. The merge orders candidates by decreasing similarity, then increasing global id; one
process (``W = 1``) goes through the same merge, so ``W`` processes and one agree except where
two support patches are within float rounding of each other at the k-th place.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cribo import dist
from index.store import IndexParams
from index.search import build_search_index

__all__ = ["ShardedIndex", "merge_topk", "shard_bounds"]


def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of rank ``rank`` among ``world``: contiguous, sizes differing by at most one."""
    return rank * n // world, (rank + 1) * n // world


def merge_topk(D: np.ndarray, I: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Best ``k`` of candidate lists ``D, I (nq, m)`` (similarities, global ids; -1 = no candidate):
    by decreasing similarity, ties by increasing id, missing candidates last."""
    D = np.where(I < 0, -np.inf, D)
    by_id = np.argsort(I, axis=1, kind="stable")
    D, I = np.take_along_axis(D, by_id, axis=1), np.take_along_axis(I, by_id, axis=1)
    order = np.argsort(-D, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(D, order, axis=1).astype(np.float32), np.take_along_axis(I, order, axis=1)


class ShardedIndex:
    """This rank's shard of the support rows (an index of any kind) plus every support label.

    ``features (N, D)`` may be a memory-mapped cache: only this rank's rows ``rows[lo:hi]`` are read.
    ``search(xq, k)`` is collective: every rank must call it with the same queries.
    """

    def __init__(self, features: np.ndarray, rows: np.ndarray, labels: np.ndarray, kind: str, *,
                 params: IndexParams, device: str | torch.device = "cpu"):
        self.rank, self.world = dist.rank(), dist.world_size()
        self.lo, self.hi = shard_bounds(rows.size, self.rank, self.world)
        if self.hi <= self.lo:
            raise ValueError(f"{rows.size} support patches cannot be split over {self.world} ranks: rank "
                             f"{self.rank} gets none; use fewer processes (--nproc_per_node)")
        self.shard = build_search_index(features, rows[self.lo:self.hi], labels[self.lo:self.hi], kind,
                                        params=params, device=device)
        self.labels = np.asarray(labels, dtype=np.int64)  # (N,) all of them: the vote reads global ids
        self.kind = f"{kind} (sharded over {self.world} ranks)"
        self.comm_device = torch.device(device)  # NCCL gathers CUDA tensors, gloo CPU ones
        self.meta: dict[str, Any] = {}

    @property
    def ntotal(self) -> int:
        return int(self.labels.size)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(D (nq, k) float32, I (nq, k) int64)`` over all shards, merged (see :func:`merge_topk`)."""
        kk = min(k, self.shard.ntotal)
        D, I = self.shard.search(xq, kk)
        nq = xq.shape[0]
        Dk = np.full((nq, k), -np.inf, dtype=np.float32)
        Ik = np.full((nq, k), -1, dtype=np.int64)
        Dk[:, :kk], Ik[:, :kk] = D, np.where(I >= 0, I + self.lo, -1)
        D_all = dist.all_gather_cat(torch.from_numpy(Dk).to(self.comm_device)).cpu().numpy()  # (W * nq, k)
        I_all = dist.all_gather_cat(torch.from_numpy(Ik).to(self.comm_device)).cpu().numpy()
        D_all = D_all.reshape(self.world, nq, k).transpose(1, 0, 2).reshape(nq, self.world * k)
        I_all = I_all.reshape(self.world, nq, k).transpose(1, 0, 2).reshape(nq, self.world * k)
        return merge_topk(D_all, I_all, k)
