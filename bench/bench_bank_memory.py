"""Memory and query time of the object memory banks (ObjectMemoryBank) against the reference's layout.

    python bench/bench_bank_memory.py                   # CPU, paper size S=25k, K=32, ViT-S D=384
    python bench/bench_bank_memory.py --device cuda

Memory: our banks are allocated for real once (in --dtype, fp16 by default) and measured; the other
storage dtypes and the reference's layout (two fp32 queues + an fp32 normalised copy made at every
query, plus the full (Q, S*K) similarity matrix) are computed analytically from the same shapes.

Time: one query of a batch of --batch images (K objects each, --valid-frac of them valid) against the
FULL bank (on CUDA, or with --full-query), with the fp32 search and with the search in the storage
dtype, then one push of that batch. Baseline measured in the same run: the reference's query
(normalise a copy of the fp32 queue, one (Q, S*K) matmul, top-1) on a bank of --baseline-images images,
against ours on a bank of the same size. On CPU without --full-query the full-bank time is
extrapolated linearly from the baseline size (the search is a matmul linear in S).
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from cribo.pretrain.bank import ObjectMemoryBank
from cribo.io import write_json

GIB = 2**30
_DT = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def ours_bytes(S: int, K: int, D: int, itemsize: int) -> int:
    """Two raw banks + one fp32 inverse norm per slot and bank + one bool mask per slot."""
    return 2 * S * K * D * itemsize + 2 * S * K * 4 + S * K


def reference_bytes(S: int, K: int, D: int, Q: int) -> dict[str, int]:
    """The authors' layout: fp32 queue (2, S*K, D) on every GPU; each query normalises a full copy of the
    queue (F.normalize on centroids_queue[:, :n]) and materialises (Q, S*K) similarities per direction."""
    queues = 2 * S * K * D * 4
    return {"queues": queues, "normalised_copy": queues, "similarities": Q * S * K * 4}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def fill(bank: ObjectMemoryBank, images: int, valid_frac: float, g: torch.Generator, pool: int = 1000) -> None:
    """Fill with ``images`` images: a random pool of ``pool`` images pushed repeatedly, each time shifted
    by a random offset (drawing 2 x 25k x 32 x 384 normals would dominate the run on a small CPU)."""
    K, D, dev = bank.num_objects, bank.dim, bank.device
    c1 = torch.randn(pool, K, D, generator=g, device=dev)
    c2 = c1 + 0.3 * torch.randn(pool, K, D, generator=g, device=dev)
    valid = torch.rand(pool, K, generator=g, device=dev) < valid_frac
    for start in range(0, images, pool):
        n = min(pool, images - start)
        shift = torch.randn(1, 1, D, generator=g, device=dev)
        bank.push(c1[:n] + shift, c2[:n] + shift, valid[:n])


def reference_query(q1: torch.Tensor, q2: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """The reference's retrieval for the n valid objects q1, q2 (n, D) with an fp32 queue (2, S*K, D)."""
    qn = F.normalize(queue, p=2, dim=-1)  # full normalised copy, every step
    a1, a2 = F.normalize(q1, dim=-1), F.normalize(q2, dim=-1)
    i1 = (a1 @ qn[0].T).topk(k=1, dim=-1).indices[:, 0]
    i2 = (a2 @ qn[1].T).topk(k=1, dim=-1).indices[:, 0]
    back1 = (qn[1][i1] @ a2.T).topk(k=1, dim=-1).indices[:, 0]
    back2 = (qn[0][i2] @ a1.T).topk(k=1, dim=-1).indices[:, 0]
    ar = torch.arange(q1.shape[0], device=q1.device)
    return torch.stack([back1 == ar, back2 == ar])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=25_000, help="bank size S in images (paper: 25k)")
    ap.add_argument("--K", type=int, default=32, help="objects per image (clusters)")
    ap.add_argument("--dim", type=int, default=384, help="embedding dim D (ViT-S: 384)")
    ap.add_argument("--dtype", choices=sorted(_DT), default="float16", help="storage dtype of the allocated bank")
    ap.add_argument("--batch", type=int, default=32, help="images per query batch")
    ap.add_argument("--valid-frac", type=float, default=0.8, help="fraction of valid objects")
    ap.add_argument("--chunk-size", type=int, default=65536, help="ObjectMemoryBank chunk_size")
    ap.add_argument("--baseline-images", type=int, default=1000, help="bank size for the reference comparison")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    ap.add_argument("--full-query", action="store_true",
                    help="time the query against the full bank on CPU too (always on CUDA); minutes on a small CPU")
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    S, K, D, B = args.images, args.K, args.dim, args.batch
    Q = int(round(B * K * args.valid_frac))
    g = torch.Generator(device=device).manual_seed(0)
    out: dict = {"S": S, "K": K, "D": D, "batch": B, "device": str(device), "dtype": args.dtype,
                 "chunk_size": args.chunk_size, "threads": torch.get_num_threads()}

    # ---------------------------------------------------------------- memory
    print(f"Bank memory, S={S} images, K={K}, D={D} (two banks, M1 and M2)")
    rows = {name: ours_bytes(S, K, D, torch.tensor([], dtype=dt).element_size()) for name, dt in _DT.items()}
    ref = reference_bytes(S, K, D, Q)
    ref_total = ref["queues"] + ref["normalised_copy"]
    for name in ("float32", "float16", "bfloat16"):
        print(f"  ours {name:<9}  {rows[name] / GIB:6.3f} GiB   ({rows[name] / ref['queues']:.2f} x reference queues)")
    print(f"  reference fp32 queues           {ref['queues'] / GIB:6.3f} GiB resident")
    print(f"    + normalised copy per query   {ref['normalised_copy'] / GIB:6.3f} GiB  -> {ref_total / GIB:.3f} GiB")
    print(f"    + (Q={Q}, S*K) similarities   {ref['similarities'] / GIB:6.3f} GiB per direction")
    transient = args.chunk_size * D * 4 + Q * args.chunk_size * 4 + 2 * Q * Q * 4
    print(f"  ours: query transient with the fp32 search (fp32 copy of one chunk + its (Q, chunk) scores + "
          f"back-search), analytic: {transient / 2**20:.1f} MiB")
    out["memory_bytes_analytic"] = {**{f"ours_{k}": v for k, v in rows.items()},
                                    "reference_queues": ref["queues"], "reference_with_copy": ref_total,
                                    "reference_similarities_per_direction": ref["similarities"],
                                    "ours_query_transient": transient}

    t0 = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_alloc = torch.cuda.memory_allocated(device)
    bank = ObjectMemoryBank(S, K, D, dtype=_DT[args.dtype], device=device, chunk_size=args.chunk_size)
    measured = bank.memory_bytes()
    if device.type == "cuda":
        measured_alloc = torch.cuda.memory_allocated(device) - base_alloc
        print(f"  allocated for real ({args.dtype}): memory_bytes()={measured / GIB:.3f} GiB, "
              f"CUDA allocator {measured_alloc / GIB:.3f} GiB")
        out["cuda_allocated_bytes"] = measured_alloc
    else:
        print(f"  allocated for real ({args.dtype}): memory_bytes()={measured / GIB:.3f} GiB")
    out["memory_bytes_measured"] = measured
    assert measured == rows[args.dtype], "memory_bytes() disagrees with the analytic formula"
    fill(bank, S, args.valid_frac, g)
    sync(device)
    print(f"  filled {S} images in {time.perf_counter() - t0:.1f} s")

    # ---------------------------------------------------------------- full-bank query
    c1 = torch.randn(B, K, D, generator=g, device=device)
    c2 = c1 + 0.3 * torch.randn(B, K, D, generator=g, device=device)
    valid = torch.rand(B, K, generator=g, device=device) < args.valid_frac
    n_valid = int(valid.sum())
    out["valid_objects"] = n_valid
    # half-precision matmuls are slow on CPUs: the storage-dtype search is only timed on CUDA
    half = device.type == "cuda" and _DT[args.dtype] != torch.float32
    search = [torch.float32] + ([_DT[args.dtype]] if half else [])
    full_query = device.type == "cuda" or args.full_query
    if full_query:
        print(f"\nQuery of {B} images ({n_valid} valid objects) against the full bank ({S * K} slots, "
              "both directions, top-1 + cycle check):")
        for sd in search:
            bank.search_dtype = sd
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            tq = timed(lambda: bank.query(c1, c2, valid), device, args.repeats)
            name = str(sd).replace("torch.", "")
            extra = ""
            if device.type == "cuda":
                peak = torch.cuda.max_memory_allocated(device) - before
                extra = f", peak extra memory {peak / 2**20:.1f} MiB"
                out[f"query_full_peak_extra_bytes_search_{name}"] = peak
            print(f"  search_dtype={name:<9} {tq * 1e3:8.1f} ms ({tq * 1e3 / B:.2f} ms per image){extra}")
            out[f"query_full_s_search_{name}"] = tq
        bank.search_dtype = torch.float32
    t_push = timed(lambda: bank.push(c1, c2, valid), device, args.repeats)
    print(f"  push of {B} images: {t_push * 1e3:.2f} ms")
    out["push_s"] = t_push
    del bank

    # ---------------------------------------------------------------- baseline, same run
    Sb = args.baseline_images
    small = ObjectMemoryBank(Sb, K, D, dtype=_DT[args.dtype], device=device, chunk_size=args.chunk_size)
    fill(small, Sb, args.valid_frac, g)
    m1, m2, _ = small.ordered()
    queue = torch.stack([m1.reshape(-1, D), m2.reshape(-1, D)])
    q1, q2 = c1[valid].float(), c2[valid].float()
    t_ref = timed(lambda: reference_query(q1, q2, queue), device, args.repeats)
    print(f"\nBaseline at S={Sb} images ({Sb * K} slots), same batch: reference-style query (fp32 queue, "
          f"normalised copy, one matmul) {t_ref * 1e3:.1f} ms")
    out.update(baseline_images=Sb, baseline_reference_s=t_ref)
    if device.type == "cuda":  # the authors run it inside autocast(fp16) when training in fp16
        with torch.autocast("cuda", dtype=torch.float16):
            t_ref16 = timed(lambda: reference_query(q1, q2, queue), device, args.repeats)
        print(f"  reference-style query under autocast(float16): {t_ref16 * 1e3:.1f} ms")
        out["baseline_reference_autocast_fp16_s"] = t_ref16
    for sd in search:
        small.search_dtype = sd
        name = str(sd).replace("torch.", "")
        t_ours = timed(lambda: small.query(c1, c2, valid), device, args.repeats)
        print(f"  ours ({args.dtype} storage, search_dtype={name}): {t_ours * 1e3:.1f} ms, "
              f"ours/reference = {t_ours / t_ref:.2f}")
        out[f"baseline_ours_s_search_{name}"] = t_ours
        if not full_query and sd == torch.float32:
            print(f"  full-bank query ({S} images) extrapolated linearly from this size: "
                  f"{t_ours * S / Sb:.1f} s (run with --full-query to measure it)")
            out["query_full_s_extrapolated"] = t_ours * S / Sb
    if args.json:
        write_json(args.json, out)


if __name__ == "__main__":
    main()
