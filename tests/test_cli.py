"""evaluate.py and build_index.py as a user runs them (subprocess), on a tiny folder dataset."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import build_index
import evaluate
from helpers_data import make_folder_dataset
from index.store import SupportIndex

REPO = Path(__file__).resolve().parents[1]
BACKBONE = ["--backbone", "vit_tiny_patch16_224", "--random-init"]


def cli(script: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=240)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder_dataset(tmp_path_factory.mktemp("cli") / "ds", {"train": 8, "val": 3})


def test_evaluate_writes_results_and_prints_the_table(data, tmp_path):
    out = tmp_path / "run" / "results.json"
    proc = cli("evaluate.py", "--dataset", "folder", "--root", str(data), *BACKBONE, "--ratios", "1,4",
               "--seeds", "2", "--k", "5", "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
               "--workers", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(out.read_text())
    assert sorted(res["ratios"]) == ["1", "4"]
    assert len(res["ratios"]["4"]["miou"]) == 2 and len(res["ratios"]["1"]["miou"]) == 1
    assert res["dataset"]["train_split"] == "train" and res["dataset"]["val_split"] == "val"  # folder defaults
    assert res["backbone"]["identity"] == "random:vit_tiny_patch16_224:seed0"
    events = [json.loads(line)["event"] for line in proc.stdout.splitlines() if line.startswith("{")]
    assert events == ["features", "run", "run", "run", "written"]
    e = res["ratios"]["4"]
    assert re.search(rf"^1/4 +\| {e['mean']:.1f} ± {e['std']:.1f} +\| 2 *$", proc.stdout, re.MULTILINE)
    assert "time split: forward" in proc.stdout
    assert (tmp_path / "run" / "results.csv").is_file() and (tmp_path / "run" / "results_per_class_iou.png").is_file()


def test_evaluate_takes_the_ivf_knobs(data, tmp_path):
    out = tmp_path / "ivf" / "results.json"
    code = evaluate.main(["--dataset", "folder", "--root", str(data), *BACKBONE, "--ratios", "1", "--k", "5",
                          "--index", "ivf", "--nlist", "3", "--nprobe", "2", "--out", str(out),
                          "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--device", "cpu"])
    assert code == 0
    params = json.loads(out.read_text())["index_params"]
    assert (params["nlist"], params["nprobe"]) == (3, 2)
    assert evaluate.main(["--dataset", "folder", "--root", str(data), "--nprobe", "0"]) == 2


def test_build_index_writes_a_loadable_index(data, tmp_path):
    out = tmp_path / "idx"
    proc = cli("build_index.py", "--dataset", "folder", "--root", str(data), "--split", "train", *BACKBONE,
               "--ratio", "2", "--seed", "1", "--index", "hnsw", "--out", str(out),
               "--cache-dir", str(tmp_path / "cache"), "--workers", "0", "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    index = SupportIndex.load(out)
    assert summary["ntotal"] == index.ntotal > 0 and index.kind == "hnsw"
    assert index.meta["ratio"] == 2 and index.meta["seed"] == 1 and len(index.meta["image_ids"]) == 4
    D, I = index.search(np.eye(1, index.dim, dtype=np.float32), 3)
    assert I.shape == (1, 3) and (I >= 0).all()


def test_missing_root_is_a_usage_error():
    proc = cli("evaluate.py", "--dataset", "voc")
    assert proc.returncode == 2 and "the following arguments are required: --root" in proc.stderr
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1  # one line


def test_argument_errors_in_process(tmp_path, capsys):
    """The same entry points called in-process (no interpreter start-up per case)."""
    code = build_index.main(["--dataset", "voc", "--out", "x"])
    assert code == 2 and "the following arguments are required: --root" in capsys.readouterr().err
    code = evaluate.main(["--dataset", "folder", "--root", str(tmp_path / "absent"), *BACKBONE,
                          "--cache-dir", str(tmp_path / "cache")])
    assert code == 2 and "does not exist: check --root" in capsys.readouterr().err
    code = build_index.main(["--dataset", "voc", "--root", str(tmp_path), "--out", str(tmp_path / "i"), *BACKBONE])
    assert code == 1 and "no JPEGImages/" in capsys.readouterr().err  # bad data: exit 1
    code = evaluate.main(["--dataset", "folder", "--root", str(tmp_path), "--ratios", "1,eight"])
    assert code == 2 and "--ratios must be comma-separated integers" in capsys.readouterr().err
    code = evaluate.main(["--dataset", "folder", "--root", str(tmp_path), "--weights", "w.pt", "--random-init"])
    assert code == 2 and "not allowed with argument" in capsys.readouterr().err
    code = evaluate.main(["--dataset", "folder", "--root", str(tmp_path), "--backbone", "vit_huge_patch99"])
    assert code == 2 and "unknown backbone 'vit_huge_patch99'" in capsys.readouterr().err
