"""Exact k-NN search in plain torch (chunked matmul + top-k): ``--index torch``.

For a GPU without ``faiss-gpu`` (no wheel on the package registry here), or any ``device`` torch
supports. :class:`TorchExactIndex` keeps the support features ``(n, D)`` on ``device`` and answers
``search(xq (nq, D), k) -> (D (nq, k) float32 similarities, I (nq, k) int64)``, both sorted by
decreasing inner product like ``faiss.IndexFlatIP``: queries go ``query_chunk`` rows at a time,
the support ``base_chunk`` rows at a time, each block's top-k merged into a running top-k, so the
``(query_chunk, base_chunk)`` similarity block bounds the memory whatever ``n``.

``dtype`` float32 (default) is exact up to float rounding; bfloat16 / float16 halve the memory and
run the matmul on tensor cores, at the price of ties and swaps among near-equal neighbours.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cribo.precision import DTYPES
from index.store import check_k

__all__ = ["TorchExactIndex"]

TORCH_KIND = "torch"
QUERY_CHUNK = 2048
BASE_CHUNK = 32768  # with QUERY_CHUNK: a 256 MiB float32 similarity block


class TorchExactIndex:
    """Support features on ``device`` plus their labels; exact inner-product search in torch."""

    kind = TORCH_KIND

    def __init__(self, xb: np.ndarray, labels: np.ndarray, *, device: str | torch.device = "cpu",
                 dtype: str = "fp32", query_chunk: int = QUERY_CHUNK, base_chunk: int = BASE_CHUNK):
        if xb.ndim != 2:
            raise ValueError(f"support features must be a 2-D array (n, D), got shape {xb.shape}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if query_chunk < 1 or base_chunk < 1:
            raise ValueError(f"query_chunk and base_chunk must be >= 1, got {query_chunk}, {base_chunk}")
        labels = np.asarray(labels)
        if labels.shape != (xb.shape[0],):
            raise ValueError(f"labels must have shape ({xb.shape[0]},), got {labels.shape}")
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        self.xb = torch.from_numpy(np.ascontiguousarray(xb)).to(self.device, self.dtype)  # (n, D)
        self.labels = labels.astype(np.int64)
        self.query_chunk, self.base_chunk = int(query_chunk), int(base_chunk)
        self.meta: dict[str, Any] = {}

    @property
    def ntotal(self) -> int:
        return int(self.xb.shape[0])

    @property
    def dim(self) -> int:
        return int(self.xb.shape[1])

    def __len__(self) -> int:
        return self.ntotal

    @torch.inference_mode()
    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """``(D (nq, k) float32, I (nq, k) int64)``, rows by decreasing similarity."""
        if xq.ndim != 2 or xq.shape[1] != self.dim:
            raise ValueError(f"queries must be (nq, {self.dim}), got shape {xq.shape}")
        check_k(k, self.ntotal)
        nq = xq.shape[0]
        out_d = np.empty((nq, k), dtype=np.float32)
        out_i = np.empty((nq, k), dtype=np.int64)
        for s in range(0, nq, self.query_chunk):
            q = torch.from_numpy(np.ascontiguousarray(xq[s:s + self.query_chunk])).to(self.device, self.dtype)
            best_d = torch.empty((q.shape[0], 0), device=self.device, dtype=torch.float32)
            best_i = torch.empty((q.shape[0], 0), device=self.device, dtype=torch.int64)
            for b in range(0, self.ntotal, self.base_chunk):
                sims = (q @ self.xb[b:b + self.base_chunk].T).float()  # (qc, bc)
                d, i = sims.topk(min(k, sims.shape[1]), dim=1)
                best_d, pos = torch.cat([best_d, d], dim=1).topk(min(k, best_d.shape[1] + d.shape[1]), dim=1)
                best_i = torch.cat([best_i, i + b], dim=1).gather(1, pos)
            out_d[s:s + q.shape[0]] = best_d.cpu().numpy()
            out_i[s:s + q.shape[0]] = best_i.cpu().numpy()
        return out_d, out_i
