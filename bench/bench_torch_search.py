#!/usr/bin/env python
"""Exact search: plain torch (``--index torch``, chunked matmul + top-k) against faiss ``IndexFlatIP``.

    python bench/bench_torch_search.py --support 200000 --queries 20000 --dim 384 --k 50 --threads 1
    python bench/bench_torch_search.py --device cuda --dtype bf16      # on a GPU without faiss-gpu

Random unit vectors (search time does not depend on the content). Prints the seconds of each,
the agreement of the neighbour lists (fraction of identical ids at equal rank, recall@k) and the
largest similarity difference.
"""
from __future__ import annotations

import argparse
import json
import time


import faiss
import numpy as np
import torch

from index.torch_search import TorchExactIndex


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--support", type=int, default=200_000)
    p.add_argument("--queries", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--k", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((args.support, args.dim), dtype=np.float32)
    xb /= np.linalg.norm(xb, axis=1, keepdims=True)
    xq = xb[rng.choice(args.support, args.queries, replace=False)] + 0.05 * rng.standard_normal(
        (args.queries, args.dim), dtype=np.float32)
    xq /= np.linalg.norm(xq, axis=1, keepdims=True)

    ref = faiss.IndexFlatIP(args.dim)
    ref.add(xb)
    t0 = time.perf_counter()
    D_ref, I_ref = ref.search(xq, args.k)
    faiss_s = time.perf_counter() - t0

    index = TorchExactIndex(xb, np.zeros(args.support, np.int64), device=args.device, dtype=args.dtype)
    t0 = time.perf_counter()
    D, I = index.search(xq, args.k)
    torch_s = time.perf_counter() - t0

    recall = np.mean([np.intersect1d(a, b).size / args.k for a, b in zip(I, I_ref)])
    print(json.dumps({"support": args.support, "queries": args.queries, "dim": args.dim, "k": args.k,
                      "threads": args.threads, "device": args.device, "dtype": args.dtype,
                      "faiss_flat_s": round(faiss_s, 2), "torch_s": round(torch_s, 2),
                      "same_rank_ids": round(float(np.mean(I == I_ref)), 4),
                      f"recall@{args.k}": round(float(recall), 4),
                      "max_abs_sim_diff": float(np.abs(D - D_ref).max())}))


if __name__ == "__main__":
    main()
