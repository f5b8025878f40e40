"""Which search structure a run uses: ``--index {flat,hnsw,ivf,ivfpq,torch}``.

- ``flat``, ``ivf``, ``hnsw``: FAISS :class:`index.store.SupportIndex` (exact / approximate; a copy
  of the support features in RAM).
- ``ivfpq``: :class:`index.reranked.RerankedIndex`, IVF-PQ codes in RAM, exact re-ranking from the
  memory-mapped features (full-scale support sets).
- ``torch``: :class:`index.torch_search.TorchExactIndex`, exact search in plain torch on ``device``.

All answer ``search(xq (nq, D), k) -> (D (nq, k), I (nq, k))`` over positions in ``rows`` and carry
``labels`` and ``ntotal``.
"""
from __future__ import annotations

import numpy as np
import torch

from index.reranked import RerankedIndex, RerankParams
from index.store import INDEX_KINDS, IndexParams, SupportIndex
from index.torch_search import TorchExactIndex

__all__ = ["SEARCH_KINDS", "build_search_index"]

SEARCH_KINDS = (*sorted(INDEX_KINDS), "ivfpq", "torch")  # what --index accepts


def build_search_index(features: np.ndarray, rows: np.ndarray, labels: np.ndarray, kind: str, *,
                       params: IndexParams, device: str | torch.device = "cpu"
                       ) -> SupportIndex | RerankedIndex | TorchExactIndex:
    """The ``kind`` index over ``features[rows]`` (``features (N, D)``, e.g. a memory-mapped cache;
    ``labels (len(rows),)``). Only ``ivfpq`` avoids reading all the rows into RAM at once."""
    if kind == "ivfpq":
        return RerankedIndex(features, rows, labels, RerankParams(nlist=params.nlist, nprobe=params.nprobe,
                                                                  train_size=params.train_size, seed=params.seed))
    if kind == "torch":
        return TorchExactIndex(features[rows], labels, device=device)
    if kind not in INDEX_KINDS:
        raise ValueError(f"unknown index kind {kind!r}: choose one of {SEARCH_KINDS}")
    return SupportIndex.build(features[rows], labels, kind, params=params)
