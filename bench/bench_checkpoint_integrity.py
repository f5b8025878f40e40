"""What the checkpoint integrity costs: checksum, fsync and the kept predecessor vs a plain torch.save.

    python bench/bench_checkpoint_integrity.py              # a 256 MiB state (tensors of 4 MiB)
    python bench/bench_checkpoint_integrity.py --mib 1024

Times (best of --repeats, seconds): plain ``torch.save`` to a file, :func:`content_checksum` alone,
the full :func:`save_checkpoint` (checksum + write + fsync + hard link of the predecessor + rename +
directory fsync), plain ``torch.load(weights_only=True)`` and the verifying :func:`load_checkpoint`.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


from cribo.pretrain.checkpoint import content_checksum, load_checkpoint, save_checkpoint


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=256, help="state size in MiB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    a = p.parse_args()
    g = torch.Generator().manual_seed(0)
    n = a.mib // 4
    state = {"step": 1, "student": {f"w{i}": torch.randn(1024, 1024, generator=g) for i in range(n)}}
    with tempfile.TemporaryDirectory(dir=a.dir) as d:
        plain, ckpt = Path(d) / "plain.pth", Path(d) / "checkpoint.pth"
        out = {
            "mib": a.mib,
            "torch_save_s": best(lambda: torch.save(state, plain), a.repeats),
            "checksum_s": best(lambda: content_checksum(state), a.repeats),
            "save_checkpoint_s": best(lambda: save_checkpoint(ckpt, state), a.repeats),
            "torch_load_s": best(lambda: torch.load(plain, weights_only=True), a.repeats),
            "load_checkpoint_s": best(lambda: load_checkpoint(ckpt), a.repeats),
        }
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}))


if __name__ == "__main__":
    main()
