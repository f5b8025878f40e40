"""Two-process data parallelism on CPU (gloo), launched as a user would: ``torchrun --standalone``.

Each rank pushes the all-gathered objects of the whole global batch, so the banks must stay
identical on every rank (as must the teacher and the loss centres, which DDP and the centre all-reduce
keep in sync). ``--debug-bank-hash`` makes every rank write OUT/bank_rank{r}.json with sha256
fingerprints of that state.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def test_two_gloo_processes_keep_identical_banks(tmp_path):
    data = tmp_path / "images"
    data.mkdir()
    rng = np.random.default_rng(2)
    for i in range(8):
        img = np.empty((80, 72, 3), dtype=np.uint8)
        img[:] = rng.integers(0, 256, 3)
        img[20:60, 10:50] = rng.integers(0, 256, 3)
        Image.fromarray(img).save(data / f"{i}.png")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py"), "--data", str(data), "--arch", "vit_tiny_patch16_224", "--batch-size", "2",
           "--max-steps", "3", "--output-dir", str(out), "--img-size", "64", "--out-dim", "64",
           "--head-hidden-dim", "32", "--head-bottleneck-dim", "16", "-K", "4", "--bank-images", "16",
           "--precision", "fp32", "--num-workers", "0", "--log-every", "1", "--warmup-steps", "1",
           "--ci-start-step", "1", "--freeze-last-layer-steps", "0", "--device", "cpu", "--no-progress",
           "--debug-bank-hash"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    ranks = [json.loads((out / f"bank_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    # 3 steps x global batch 4 = 12 images pushed, every rank holding all of them
    assert ranks[0]["bank.filled"] == 12 and ranks[0]["bank.pushed"] == 12
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["step"] == 3 and state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(state["rng"][0]["torch"], state["rng"][1]["torch"])  # per-rank streams differ
    config = json.loads((out / "config.json").read_text())
    assert config["global_batch"] == 4 and config["epoch_steps"] == 2
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]  # rank 0 writes the log, once per step
