"""A compressed support index for full-scale support sets: IVF-PQ candidates, exact re-ranking.

``--index ivfpq``. At VOC train_aug 1/1 (about 7.5M support patches) or ADE20K training 1/1 (about
27M), the float16 features (5.8 GB / 21 GB at D = 384) stay in the memory-mapped feature cache on
disk; RAM holds only the product-quantised codes (``pq_m`` bytes per patch: 48 by default at
D = 384, 0.36 GB / 1.3 GB) and the IVF lists. A search takes the ``k x rerank`` best
candidates of the IVF-PQ index (``nprobe`` lists visited), reads their float16 rows from the memory
map and keeps the ``k`` best by exact inner product, ``query_chunk`` queries at a time (bounded
memory whatever the query count).

Cost (one thread; ``n`` support patches, D dimensions):

- build: k-means of ``nlist`` centroids on ``train_size`` sampled rows (``kmeans_iters`` passes),
  then every row is assigned to its list (``n x nlist x D`` multiply-adds with the flat coarse
  quantizer, the dominant term: ``nlist`` defaults to ``sqrt(n) / 2``, at most 4096, so that this
  stays minutes at 27M rows) and PQ-encoded. ``pq_bits = 4`` (default from 1M support patches on)
  is FAISS's fast-scan PQ (16 centroids per sub-quantiser, SIMD lookups: scanning is about 12x
  cheaper than 8-bit PQ at the same bytes per patch, 0.35 vs 4.4 ms per query at 1M patches,
  nprobe 16); ``pq_bits = 8`` is the classic IVF-PQ.
- search: ``nlist x D`` for the coarse quantizer, ``n x nprobe / nlist`` codes scanned, ``k x rerank``
  float16 rows read from the memory map and multiplied (exact), versus ``n x D`` for exact search.

Memory plan (RAM, D = 384, defaults): codes ``n x pq_m`` bytes + ids ``8 n`` bytes + the page cache
of the re-ranked rows (the OS evicts it under pressure) + per search call the positions and
similarities of its ``nq x k x rerank`` (query, candidate) pairs (16,384 x 200 pairs: ~0.35 GB) +
one re-ranking block (48 MB) + ``PAIR_CHUNK`` gathered float32 rows (100 MB). VOC 1/1: about 0.9 GB;
ADE20K 1/1: about 2 GB, far within 24 GB (measured: docs/scale.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
import torch

from index.store import check_k

__all__ = ["FAST_SCAN_MIN_ROWS", "RerankParams", "RerankedIndex", "default_ivfpq_nlist", "exact_rerank"]

_ADD_CHUNK = 65536  # rows converted to float32 and added at a time
MAX_DEFAULT_NLIST = 4096  # the flat coarse assignment costs n x nlist x D at build time
RERANK_BLOCK = 65536  # feature rows per step of the re-ranking pass (48 MB of float16 at D = 384)
DENSE_SPAN = 32  # a block whose wanted rows are at least 1 in DENSE_SPAN is read sequentially
PAIR_CHUNK = 65536  # (query, candidate) pairs multiplied at a time (100 MB of float32 at D = 384)
FAST_SCAN_MIN_ROWS = 1_000_000  # pq_bits=None: 4-bit fast-scan codes from this many support patches on


def default_ivfpq_nlist(n: int) -> int:
    """``round(sqrt(n) / 2)`` clamped to ``[1, min(4096, n // 39)]``: 1369 lists at 7.5M rows, 2598 at 27M.

    Fewer lists than ``index.store.default_nlist`` (``4 sqrt(n)``): the build's coarse assignment is
    ``n x nlist x D`` (8x less), and longer lists are cheap to scan with fast-scan PQ codes."""
    return max(1, min(int(round(math.sqrt(n) / 2)), MAX_DEFAULT_NLIST, n // 39))


@dataclass(frozen=True)
class RerankParams:
    """nlist: IVF lists (None: :func:`default_ivfpq_nlist`). pq_m: bytes of PQ code per patch (None:
    ``D / 8``, 48 at D = 384): ``pq_m`` 8-bit sub-quantisers or ``2 pq_m`` 4-bit ones, which must
    divide D. pq_bits: 4 (fast-scan PQ), 8 (classic PQ) or None: 4 from :data:`FAST_SCAN_MIN_ROWS`
    support patches on (where the code scan dominates the search), else 8 (better candidates at
    the same bytes, and the scan is cheap anyway). nprobe: lists visited. rerank: candidates per neighbour
    re-ranked exactly. train_size: k-means sample (None: ``min(n, 64 nlist)``). kmeans_iters: k-means
    passes over the sample. query_chunk: queries per step."""

    nlist: int | None = None
    pq_m: int | None = None
    nprobe: int = 32
    rerank: int = 4
    train_size: int | None = None
    query_chunk: int = 512
    seed: int = 0
    pq_bits: int | None = None
    kmeans_iters: int = 10


def exact_rerank(features: np.ndarray, rows: np.ndarray, cand: np.ndarray, q: np.ndarray, k: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` best of each query's candidates by exact inner product.

    ``features (N, D)`` (float16 memmap or array), ``rows (n,)`` support position -> feature row,
    ``cand (b, c)`` support positions (-1: none), ``q (b, D)`` float32. Returns ``(D (b, k) float32,
    I (b, k) int64)`` best first, ties broken by candidate order; ``-inf`` / ``-1`` where fewer than
    ``k`` candidates.

    The (query, candidate) pairs are visited in file order, ``RERANK_BLOCK`` feature rows at a time:
    where a block's wanted rows are dense (at least one per ``DENSE_SPAN`` rows) the span between
    the first and the last is read in one sequential copy, else the distinct rows are gathered. A
    support set larger than the page cache (ADE20K 1/1: 21 GB) is then read as one sequential pass
    per search call instead of ``b x c`` random reads; the memory is one block, ``PAIR_CHUNK`` gathered
    rows and the ``b x c`` pairs' positions and similarities."""
    b, c = cand.shape
    valid = cand >= 0
    frow = rows[np.where(valid, cand, 0)].ravel()  # feature row of every pair
    order = np.argsort(frow, kind="stable")
    srow = frow[order]
    qt = torch.from_numpy(np.ascontiguousarray(q, dtype=np.float32))
    sims = np.empty(b * c, dtype=np.float32)
    edges = np.searchsorted(srow, np.arange(0, int(features.shape[0]) + RERANK_BLOCK, RERANK_BLOCK))
    for p0, p1 in zip(edges[:-1], edges[1:]):
        if p0 == p1:
            continue
        rs = srow[p0:p1]
        lo, hi = int(rs[0]), int(rs[-1]) + 1
        distinct = np.unique(rs)
        if hi - lo <= DENSE_SPAN * distinct.size:  # dense: one sequential read of the span
            got, where = torch.from_numpy(np.array(features[lo:hi])), rs - lo  # a writable copy
        else:
            got, where = torch.from_numpy(np.ascontiguousarray(features[distinct])), np.searchsorted(distinct, rs)
        for s in range(p0, p1, PAIR_CHUNK):  # bounded float32 working set whatever the query count
            e = min(p1, s + PAIR_CHUNK)
            vecs = got[torch.from_numpy(where[s - p0:e - p0])].float()
            sims[order[s:e]] = (vecs * qt[torch.from_numpy(order[s:e] // c)]).sum(1).numpy()
    sims = np.where(valid, sims.reshape(b, c), -np.inf).astype(np.float32)
    kk = min(k, c)
    top = np.argsort(-sims, axis=1, kind="stable")[:, :kk]
    out_d = np.full((b, k), -np.inf, dtype=np.float32)
    out_i = np.full((b, k), -1, dtype=np.int64)
    out_d[:, :kk] = np.take_along_axis(sims, top, axis=1)
    out_i[:, :kk] = np.where(np.isfinite(out_d[:, :kk]), np.take_along_axis(cand, top, axis=1), -1)
    return out_d, out_i


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
        bits = params.pq_bits or (4 if n >= FAST_SCAN_MIN_ROWS else 8)
        if bits not in (4, 8):
            raise ValueError(f"pq_bits must be 4 (fast-scan PQ), 8 or None, got {params.pq_bits}")
        pq_m = params.pq_m or max(1, D // 8)
        if D % pq_m:
            raise ValueError(f"pq_m={pq_m} must divide the feature dimension {D} (e.g. {D // 8})")
        subq = pq_m * 8 // bits  # sub-quantisers
        if D % subq:
            raise ValueError(f"pq_m={pq_m} bytes of 4-bit codes are {subq} sub-quantisers, which must divide "
                             f"the feature dimension {D}: use pq_bits=8 or another pq_m")
        if params.rerank < 1 or params.query_chunk < 1 or params.kmeans_iters < 1:
            raise ValueError("rerank, query_chunk and kmeans_iters must be >= 1, got "
                             f"{params.rerank}, {params.query_chunk}, {params.kmeans_iters}")
        nlist = params.nlist or default_ivfpq_nlist(n)
        if n < 39 * nlist or n < 256:
            raise ValueError(f"{n} support patches are too few for IVF-PQ with {nlist} lists (needs >= 39 per "
                             "list and >= 256 for the PQ codebooks): use --index flat")
        self.features, self.rows, self.labels, self.params = features, rows, labels.astype(np.int64), params
        self.pq_m, self.pq_bits = pq_m, bits
        codes = f"PQ{subq}x4fs" if bits == 4 else f"PQ{subq}"
        self.index = faiss.index_factory(D, f"IVF{nlist},{codes}", faiss.METRIC_INNER_PRODUCT)
        self.index.cp.niter = params.kmeans_iters
        self.index.by_residual = True  # codes of x - centroid: fast-scan's factory default (False) halves recall
        if bits == 8:
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
        """RAM of the compressed index: PQ codes and ids in the inverted lists, plus the centroids and
        the PQ codebooks."""
        n, D = self.ntotal, int(self.features.shape[1])
        return n * (self.pq_m + 8) + self.index.nlist * D * 4 + (1 << self.pq_bits) * D * 4

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(D (nq, k) float32 exact similarities, I (nq, k) int64 support positions)``, best first."""
        check_k(k, self.ntotal)
        nq = xq.shape[0]
        kr = min(self.ntotal, k * self.params.rerank)
        xq = np.ascontiguousarray(xq, dtype=np.float32)
        cand = np.empty((nq, kr), dtype=np.int64)  # every candidate of the call, then one re-ranking pass
        for s in range(0, nq, self.params.query_chunk):
            _, cand[s:s + self.params.query_chunk] = self.index.search(xq[s:s + self.params.query_chunk], kr)
        return exact_rerank(self.features, self.rows, cand, xq, k)
