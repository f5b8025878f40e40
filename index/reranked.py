"""A compressed support index for full-scale support sets: IVF-PQ candidates, exact re-ranking.

``--index ivfpq``. At VOC train_aug 1/1 (about 7.5M support patches) or ADE20K training 1/1 (about
27M), the float16 features (5.8 GB / 21 GB at D = 384) stay in the memory-mapped feature cache on
disk; RAM holds only the product-quantised codes (``pq_m`` bytes per patch: 48 by default, 0.36 GB /
1.3 GB) and the IVF lists. A search takes the ``k x rerank`` best candidates of the IVF-PQ index
(``nprobe`` lists visited), reads their float16 rows from the memory map and keeps the ``k`` best
by exact inner product, ``query_chunk`` queries at a time (bounded memory whatever the query count).

Memory plan (RAM, D = 384, defaults): codes ``n x pq_m`` bytes + ids ``8 n`` bytes + the page cache
of the re-ranked rows (the OS evicts it under pressure) + one query chunk of candidates
``query_chunk x k x rerank x D x 4`` bytes (512 x 50 x 4 x 384 x 4 = 157 MB). VOC 1/1: about 0.6 GB;
ADE20K 1/1: about 1.8 GB, far within 24 GB.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from index.store import check_k, default_nlist

__all__ = ["RerankParams", "RerankedIndex"]

_ADD_CHUNK = 65536  # rows converted to float32 and added at a time


@dataclass(frozen=True)
class RerankParams:
    """nlist: IVF lists (None: ``4 sqrt(n)``, at most ``n // 39``). pq_m: PQ sub-quantisers (bytes per
    patch; must divide D). nprobe: lists visited. rerank: candidates per neighbour re-ranked exactly.
    train_size: k-means sample (None: ``min(n, 64 nlist)``). query_chunk: queries per step."""

    nlist: int | None = None
    pq_m: int = 48
    nprobe: int = 32
    rerank: int = 4
    train_size: int | None = None
    query_chunk: int = 512
    seed: int = 0


class RerankedIndex:
    """IVF-PQ over ``features[rows]`` (``features (N, D)``, typically the read-only float16 memmap of a
    feature cache, never copied whole), with exact re-ranking from ``features``."""

    kind = "ivfpq"

    def __init__(self, features: np.ndarray, rows: np.ndarray, labels: np.ndarray,
                 params: RerankParams = RerankParams()):
        rows = np.asarray(rows, dtype=np.int64)
        labels = np.asarray(labels)
        if labels.shape != rows.shape:
            raise ValueError(f"labels must have shape {rows.shape} (one per support row), got {labels.shape}")
        n, D = rows.size, int(features.shape[1])
        if D % params.pq_m:
            raise ValueError(f"pq_m={params.pq_m} must divide the feature dimension {D} (e.g. {D // 8})")
        if params.rerank < 1 or params.query_chunk < 1:
            raise ValueError(f"rerank and query_chunk must be >= 1, got {params.rerank}, {params.query_chunk}")
        nlist = params.nlist or default_nlist(n)
        if n < 39 * nlist or n < 256:
            raise ValueError(f"{n} support patches are too few for IVF-PQ with {nlist} lists (needs >= 39 per "
                             "list and >= 256 for the PQ codebooks): use --index flat")
        self.features, self.rows, self.labels, self.params = features, rows, labels.astype(np.int64), params
        self.index = faiss.index_factory(D, f"IVF{nlist},PQ{params.pq_m}", faiss.METRIC_INNER_PRODUCT)
        self.index.do_polysemous_training = False  # Hamming filtering is unused here; its training costs minutes
        size = min(n, params.train_size or 64 * nlist)
        sample = np.sort(np.random.default_rng(params.seed).choice(n, size=size, replace=False))
        self.index.train(np.ascontiguousarray(features[rows[sample]], dtype=np.float32))
        for s in range(0, n, _ADD_CHUNK):
            self.index.add(np.ascontiguousarray(features[rows[s:s + _ADD_CHUNK]], dtype=np.float32))
        self.index.nprobe = params.nprobe
        self.meta: dict[str, Any] = {}

    @property
    def ntotal(self) -> int:
        return int(self.rows.size)

    def memory_bytes(self) -> int:
        """RAM of the compressed index: PQ codes and ids in the inverted lists, plus the centroids."""
        n, D = self.ntotal, int(self.features.shape[1])
        return n * (self.params.pq_m + 8) + self.index.nlist * D * 4 + 256 * D * 4

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(D (nq, k) float32 exact similarities, I (nq, k) int64 support positions)``, best first."""
        check_k(k, self.ntotal)
        nq = xq.shape[0]
        kr = min(self.ntotal, k * self.params.rerank)
        out_d = np.full((nq, k), -np.inf, dtype=np.float32)
        out_i = np.full((nq, k), -1, dtype=np.int64)
        for s in range(0, nq, self.params.query_chunk):
            q = np.ascontiguousarray(xq[s:s + self.params.query_chunk], dtype=np.float32)  # (b, D)
            _, cand = self.index.search(q, kr)  # (b, kr) support positions, -1 where fewer found
            valid = cand >= 0
            # each distinct candidate row read once, in file order (sequential-ish reads of the memmap),
            # converted to float32 by torch (numpy's float16 conversion is several times slower)
            wanted, inverse = np.unique(self.rows[np.where(valid, cand, 0)], return_inverse=True)
            vecs = torch.from_numpy(np.ascontiguousarray(self.features[wanted])).float().numpy()  # (m, D)
            sims = np.einsum("bkd,bd->bk", vecs[inverse.reshape(q.shape[0], kr)], q)  # (b, kr)
            sims = np.where(valid, sims, -np.inf)
            top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
            out_d[s:s + q.shape[0]] = np.take_along_axis(sims, top, axis=1)
            out_i[s:s + q.shape[0]] = np.where(np.isfinite(out_d[s:s + q.shape[0]]),
                                               np.take_along_axis(cand, top, axis=1), -1)
        return out_d, out_i
