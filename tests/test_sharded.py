"""The support index sharded over torchrun ranks: the top-k merge, and 2 gloo processes equal to one."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers_data import make_folder_dataset
from index.sharded import ShardedIndex, merge_topk, shard_bounds
from index.store import IndexParams

REPO = Path(__file__).resolve().parents[1]


def test_shard_bounds_cover_every_row_once():
    for n, world in [(10, 3), (7, 7), (100, 4), (5, 2)]:
        bounds = [shard_bounds(n, r, world) for r in range(world)]
        assert bounds[0][0] == 0 and bounds[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
        assert max(hi - lo for lo, hi in bounds) - min(hi - lo for lo, hi in bounds) <= 1


def test_merge_orders_by_similarity_then_id_missing_last():
    D = np.array([[0.5, 0.9, 0.7, 0.9, 0.0]], np.float32)
    I = np.array([[4, 8, 2, 3, -1]])
    Dm, Im = merge_topk(D, I, 4)
    assert Im.tolist() == [[3, 8, 2, 4]] and Dm[0].tolist() == pytest.approx([0.9, 0.9, 0.7, 0.5])
    assert merge_topk(D, I, 5)[1].tolist() == [[3, 8, 2, 4, -1]]


def test_one_process_shard_is_the_whole_index():
    rng = np.random.default_rng(0)
    xb = rng.standard_normal((40, 8)).astype(np.float32)
    rows = np.arange(5, 40)
    index = ShardedIndex(xb, rows, np.arange(35) % 3, "flat", params=IndexParams())
    D, I = index.search(xb[rows[:4]], 3)
    assert I[:, 0].tolist() == [0, 1, 2, 3] and index.ntotal == 35


def test_two_gloo_processes_equal_one(tmp_path):
    root = make_folder_dataset(tmp_path / "ds", {"train": 6, "val": 3})
    common = ["--dataset", "folder", "--root", str(root), "--backbone", "vit_tiny_patch16_224", "--random-init",
              "--ratios", "1,2", "--seeds", "2", "--k", "5", "--workers", "0", "--device", "cpu",
              "--precision", "fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, str(REPO / "evaluate.py"), *common, "--cache-dir", str(tmp_path / "c1"),
                          "--out", str(tmp_path / "one" / "results.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(REPO / "evaluate.py"), *common, "--cache-dir", str(tmp_path / "c2"),
                          "--out", str(tmp_path / "two" / "results.json")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "results.json").read_text())
    b = json.loads((tmp_path / "two" / "results.json").read_text())
    assert (a["world_size"], b["world_size"]) == (1, 2)
    for r in ("1", "2"):
        assert a["ratios"][r]["miou"] == b["ratios"][r]["miou"]
        assert a["ratios"][r]["per_class_iou"] == b["ratios"][r]["per_class_iou"]
    # the features split over the ranks are the features of one process, row for row
    (c1,) = [p for p in (tmp_path / "c1").iterdir() if p.name == Path(a["feature_caches"][0]).name]
    (c2,) = [p for p in (tmp_path / "c2").iterdir() if p.name == Path(b["feature_caches"][0]).name]
    np.testing.assert_array_equal(np.load(c1 / "features.npy"), np.load(c2 / "features.npy"))
    assert two.stdout.count("mIoU (%) mean") == 1  # rank 0 prints the table
