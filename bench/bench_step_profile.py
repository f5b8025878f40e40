"""Step-time profile of CrIBo training, in the format of the paper's Table 9.

    python bench/bench_step_profile.py                         # ViT-S/16 at 224, batch 16 and 32, CPU
    python bench/bench_step_profile.py --device cuda --batch-sizes 64 128

Times full optimisation steps of :class:`cribo.pretrain.step.CrIBoTrainer` (the training code itself, not a
copy) on in-memory random views, after ``--warmup`` steps, with the banks FULL (``--bank-images``
images of random objects pushed first), so the nearest-neighbour search scans a paper-sized queue.
Data loading is excluded (Table 9 has no data row). The CrIBo-specific share is
(clustering + nn/bank + object projections) / step, against the rest of the same steps; goal <= 8 %
(paper: 13 % for ViT-B/16, K = 12, batch 128 per GPU).

``--precision auto`` is bf16 where the hardware has bf16 arithmetic (CUDA, AVX-512-BF16/AMX CPUs)
and fp32 elsewhere: bf16 autocast is several times slower than fp32 on AVX2-only CPUs
(cribo/precision.py).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


from cribo.precision import resolve_precision
from cribo.pretrain.config import TrainConfig
from cribo.pretrain.step import CrIBoTrainer
from cribo.pretrain.timing import TIME_SPLITS, StepTimer, peak_memory_mb

ROWS = (  # (label, Table 9 operation, timer sections)
    ("Forward pass", "f_t + f_s + global heads + h_s(.) (+ losses)", ("forward",)),
    ("Clustering", "Q* = C(.) + object pooling", ("clustering",)),
    ("NN retrieval", "nn(.) + update(M_i)", ("nn_bank",)),
    ("Object projections", "h_t(.) (h_s(.) runs inside the student's one call)", ("object_proj",)),
    ("Weights update", "backprop. + EMA", ("backward_ema",)),
)
CRIBO_SPECIFIC = ("clustering", "nn_bank", "object_proj")


def synthetic_batch(B: int, img_size: int, patch: int, g: torch.Generator) -> list[torch.Tensor]:
    """Random views and the patch centres of two overlapping crops of a 2x larger image."""
    side = img_size // patch
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    grid = torch.stack([xs, ys], -1).reshape(-1, 2).float() * patch + patch / 2
    return [torch.randn(B, 3, img_size, img_size, generator=g), torch.randn(B, 3, img_size, img_size, generator=g),
            (grid * 1.5).expand(B, -1, -1).clone(), (grid * 1.2 + 40).expand(B, -1, -1).clone()]


@torch.no_grad()
def fill_bank(trainer: CrIBoTrainer, g: torch.Generator, chunk: int = 1024) -> None:
    bank, K = trainer.bank, trainer.config.num_clusters
    D = bank.dim
    for start in range(0, bank.size, chunk):
        n = min(chunk, bank.size - start)
        c1 = torch.randn(n, K, D, generator=g).to(trainer.device)
        c2 = torch.randn(n, K, D, generator=g).to(trainer.device)
        bank.push(c1, c2, torch.ones(n, K, dtype=torch.bool, device=trainer.device))


def profile(args: argparse.Namespace, batch_size: int, precision: str) -> dict:
    device = torch.device(args.device)
    total = args.warmup + args.steps
    config = TrainConfig(data="synthetic", output_dir="unused", arch=args.arch, batch_size=batch_size,
                         max_steps=total, img_size=args.img_size, out_dim=args.out_dim,
                         num_clusters=args.num_clusters, bank_images=args.bank_images, bank_dtype=args.bank_dtype,
                         precision=precision, device=args.device, warmup_steps=0, freeze_last_layer_steps=0,
                         ci_start_step=0, teacher_temp_warmup_steps=1).resolved(epoch_steps=total)
    torch.manual_seed(0)
    trainer = CrIBoTrainer(config, device)
    g = torch.Generator().manual_seed(0)
    fill_bank(trainer, g)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    batches = [synthetic_batch(batch_size, args.img_size, trainer.patch_size, g) for _ in range(2)]
    walls = []
    timer = StepTimer(device)
    for it in range(total):
        if it == args.warmup:
            timer.reset()
        t0 = time.perf_counter()
        stats = trainer.step(batches[it % 2], it, timer)
        timer.end_step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        walls.append(time.perf_counter() - t0)
        print(f"  batch {batch_size} step {it + 1}/{total}: {walls[-1] * 1e3:.0f} ms"
              f"{' (warm-up)' if it < args.warmup else ''}, loss {stats['loss'].item():.3f}", flush=True)
    means = timer.mean()
    step = sum(means[s] for s in TIME_SPLITS)
    return {"batch_size": batch_size, "precision": precision, "ms": {s: means[s] * 1e3 for s in TIME_SPLITS},
            "step_ms": step * 1e3, "wall_step_ms": sum(walls[args.warmup:]) / args.steps * 1e3,
            "cribo_share": sum(means[s] for s in CRIBO_SPECIFIC) / step,
            "clustering_ms_per_image": means["clustering"] * 1e3 / batch_size,
            "bank_gib": trainer.bank.memory_bytes() / 2**30, "peak_mem_mb": peak_memory_mb(device),
            "bootstrap_ratio": float(stats["bootstrap_ratio"])}


def table(r: dict, args: argparse.Namespace) -> str:
    lines = [f"### {args.arch} at {args.img_size}, batch {r['batch_size']} per process, K={args.num_clusters}, "
             f"L={args.out_dim}, S={args.bank_images} ({args.bank_dtype}), {r['precision']}, {args.device}",
             "", "| Description | Operation | ms per iteration | % |", "| --- | --- | ---: | ---: |"]
    for label, op, sections in ROWS:
        ms = sum(r["ms"][s] for s in sections)
        lines.append(f"| {label} | {op} | {ms:.1f} | {100 * ms / r['step_ms']:.1f} |")
    lines.append(f"| *total* | | {r['step_ms']:.1f} | 100 |")
    lines += ["", f"CrIBo-specific share (clustering + nn/bank + object projections): "
                  f"**{100 * r['cribo_share']:.1f} %** (goal <= 8 %, paper 13 %); clustering "
                  f"{r['clustering_ms_per_image']:.2f} ms per image (goal <= 5); bank {r['bank_gib']:.2f} GiB; "
                  f"peak memory {r['peak_mem_mb']:.0f} MB"]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32])
    p.add_argument("-K", "--num-clusters", type=int, default=32)
    p.add_argument("--out-dim", type=int, default=65536)
    p.add_argument("--bank-images", type=int, default=25000)
    p.add_argument("--bank-dtype", default="fp16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = resolve_precision(args.precision, args.device)
    results = []
    for b in args.batch_sizes:
        r = profile(args, b, precision)
        results.append(r)
        print(table(r, args), "\n", flush=True)
    if args.json:
        from cribo.io import write_json  # noqa: PLC0415
        write_json(args.json, {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                               "device_name": torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
                               else "cpu", "results": results})


if __name__ == "__main__":
    main()
