"""Joint-space clustering: time per image and peak memory, ours (paper and reference modes) vs the
reference's approach.

Shapes of ViT-S/16 at 224 (N = 196 patches per view, 2N = 392 joint tokens, D = 384), batch 32,
K = 32 (ImageNet) and K = 64 (COCO), lambda_pos = 1, 5 outer x 5 Sinkhorn iterations. Tokens are
random; coordinates come from real RandomResizedCrop boxes of a 500x375 image, so the positional
cost sees the geometry of training.

BASELINE (clearly not our code path): a plain re-implementation, written here, of the reference's
positional cost, which materialises a (B, 2N, 2N, K) tensor (mask of "m is another member of k",
distances broadcast over K, min over m) in every outer iteration, with the same Sinkhorn, per-image
normalisation and update rules as ours, so that both produce the same assignments (checked).

``reference`` is OUR code in ``mode="reference"`` (``--clustering reference``: size-weighted column
marginals, batch-level cost range, the authors' fill and empty-cluster rules); its time against
``ours`` (paper mode) is the step-time effect of choosing it.

Each measurement runs in its own fresh process so that peak memory (``ru_maxrss``, which torch's
allocator does not hide from the OS) is not polluted by the others: reported as the growth of the
process's peak resident memory during the clustering calls, above the inputs.

    python bench/bench_clustering.py                 # K = 32 and 64, B = 32 (about a minute on 2 cores)
    python bench/bench_clustering.py --K 32 --threads 1
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time


import torch
import torch.nn.functional as F

from cribo.pretrain.clustering import joint_space_clustering
from cribo.pretrain.transforms import patch_centres, random_resized_crop_params


# ----------------------------------------------------------------------------------------- BASELINE
def baseline_positional_cost(dist: torch.Tensor, assign: torch.Tensor, K: int) -> torch.Tensor:
    """BASELINE: the reference's 2N x 2N x K positional cost. dist (B, M, M) (diagonal irrelevant),
    assign (B, M) in [-1, K). Returns (B, M, K), same definition as cribo.pretrain.clustering.positional_cost."""
    B, M, _ = dist.shape
    member = F.one_hot(assign.clamp_min(0), K).bool() & (assign >= 0)[..., None]  # (B, M, K)
    not_self = ~torch.eye(M, dtype=torch.bool, device=dist.device)  # (M, M)
    mask = member[:, None, :, :] & not_self[None, :, :, None]  # (B, M_n, M_m, K)
    masked = torch.where(mask, dist[..., None], float("inf"))  # (B, M, M, K) float
    nearest = masked.amin(dim=2)  # (B, M, K)
    defined = torch.isfinite(nearest)
    mean = torch.where(defined, nearest, 0.0).sum(dim=(1, 2)) / defined.sum(dim=(1, 2)).clamp_min(1)
    cost = torch.where(defined, nearest, mean[:, None, None])
    return cost / cost.amax(dim=(1, 2), keepdim=True)


@torch.no_grad()
def baseline_clustering(z1, z2, pos1, pos2, K, lambda_pos, n_outer=5, n_sinkhorn=5, eps=0.05, generator=None):
    """BASELINE: the same algorithm as cribo.pretrain.clustering.joint_space_clustering, but with the
    reference's (B, 2N, 2N, K) positional cost and plain full-matrix Sinkhorn normalisations."""
    z = F.normalize(torch.cat([z1, z2], dim=1).float(), dim=-1)
    B, M, D = z.shape
    seeds = torch.rand(B, M, generator=generator).topk(K, dim=1).indices
    centroids = z.gather(1, seeds[..., None].expand(B, K, D))
    assign = torch.full((B, M), -1, dtype=torch.long).scatter_(1, seeds, torch.arange(K).expand(B, K))
    pos = torch.cat([pos1, pos2], dim=1).float()
    dist = torch.cdist(pos, pos, compute_mode="donot_use_mm_for_euclid_dist")
    for _ in range(n_outer):
        cost = -z @ centroids.transpose(1, 2) + lambda_pos * baseline_positional_cost(dist, assign, K)
        lo, hi = cost.amin(dim=(1, 2), keepdim=True), cost.amax(dim=(1, 2), keepdim=True)
        Q = torch.exp(-(cost - lo) / (hi - lo) / eps)
        Q = Q / Q.sum(dim=(1, 2), keepdim=True)
        for _ in range(n_sinkhorn):
            Q = Q / Q.sum(dim=2, keepdim=True) / M  # rows first, columns last (the authors' order)
            Q = Q / Q.sum(dim=1, keepdim=True) / K
        assign = Q.argmax(dim=2)
        one_hot = F.one_hot(assign, K).float()
        sums = one_hot.transpose(1, 2) @ z
        counts = one_hot.sum(dim=1)
        centroids = torch.where(counts[..., None] > 0, F.normalize(sums, dim=-1), centroids)
    return assign


# ------------------------------------------------------------------------------------------ harness
def make_inputs(B: int, N: int, D: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = torch.randn(B, N, D, generator=g), torch.randn(B, N, D, generator=g)
    img, p = 224, 16
    if N != (img // p) ** 2:
        raise SystemExit(f"--tokens must be 2 * (224/16)^2 = 392, got 2N = {2 * N}")
    coords = [
        torch.stack([patch_centres(random_resized_crop_params(375, 500, (0.25, 1.0), generator=g),
                                   bool(torch.rand(1, generator=g) < 0.5), img, p) for _ in range(B)])
        for _ in range(2)
    ]
    return z1, z2, coords[0], coords[1]


def measure(method: str, B: int, N: int, D: int, K: int, repeats: int, warmup: int) -> dict:
    """Run in a fresh process: time per call and growth of peak RSS during the calls."""
    z1, z2, pos1, pos2 = make_inputs(B, N, D)
    if method == "baseline":
        fn = baseline_clustering
    else:
        fn = functools.partial(joint_space_clustering, mode="paper" if method == "ours" else "reference")
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for _ in range(warmup):
        fn(z1, z2, pos1, pos2, K, 1.0, generator=torch.Generator().manual_seed(0))
    times, cpu_times = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        assign = fn(z1, z2, pos1, pos2, K, 1.0, generator=torch.Generator().manual_seed(0))
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "K": K, "B": B, "ms_per_image": 1000 * min(times) / B,
            "ms_per_image_median": 1000 * sorted(times)[len(times) // 2] / B,
            "cpu_ms_per_image": 1000 * min(cpu_times) / B,
            "peak_mib": (rss1 - rss0) / 1024, "assign": assign.tolist()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=392, help="2N, joint tokens per image")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--K", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of ours (best reported)")
    ap.add_argument("--baseline-repeats", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--methods", nargs="+", choices=("ours", "reference", "baseline"),
                    default=["ours", "reference", "baseline"], help="ours = paper mode, reference = reference mode")
    ap.add_argument("--_one", nargs=2, metavar=("METHOD", "K"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    B, N, D = args.batch, args.tokens // 2, args.dim

    if args._one:  # child process
        method, K = args._one[0], int(args._one[1])
        fast = method != "baseline"
        reps = args.repeats if fast else args.baseline_repeats
        print(json.dumps(measure(method, B, N, D, K, reps, warmup=1 if fast else 0)))
        return

    print(f"joint-space clustering, B={B}, 2N={2 * N}, D={D}, lambda_pos=1, 5x5 iterations; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    print("ms/image: best wall-clock time of the repeats / B; cpu ms/image: CPU time of this process (all"
          " threads) / B, which other jobs on the machine inflate less than wall-clock time")
    print(f"{'K':>4} {'method':<9} {'ms/image':>9} {'(median)':>9} {'cpu ms/image':>13} {'peak MiB':>9}")
    for K in args.K:
        results = {}
        for method in args.methods:
            cmd = [sys.executable, __file__, "--batch", str(B), "--tokens", str(2 * N), "--dim", str(D),
                   "--repeats", str(args.repeats), "--baseline-repeats", str(args.baseline_repeats),
                   "--_one", method, str(K)]
            if args.threads is not None:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            results[method] = r
            print(f"{K:>4} {method:<9} {r['ms_per_image']:>9.2f} {r['ms_per_image_median']:>9.2f} "
                  f"{r['cpu_ms_per_image']:>13.2f} {r['peak_mib']:>9.0f}")
        ours, base, ref = (results.get(m) for m in ("ours", "baseline", "reference"))
        if ours and ref:
            r, o = ref["cpu_ms_per_image"], ours["cpu_ms_per_image"]
            print(f"{K:>4} ratio     reference/paper mode CPU time {r / o:.2f}x ({r - o:+.2f} ms per image)")
        if not (ours and base):
            continue
        same = torch.tensor(ours["assign"]).eq(torch.tensor(base["assign"])).float().mean().item()
        print(f"{K:>4} ratio     baseline/ours time {base['ms_per_image'] / ours['ms_per_image']:.1f}x, "
              f"memory {base['peak_mib'] / max(ours['peak_mib'], 1):.0f}x; identical assignments: "
              f"{100 * same:.2f}% of tokens")


if __name__ == "__main__":
    main()
