"""Exact resume: N steps in one go == N/2 steps, stop, resume == a crash between checkpoints, resume.

Bitwise on CPU: weights, teacher, optimiser, centres, banks and RNG states of the final checkpoints
are equal, and so are the log rows (timings and memory aside). The interrupted runs are separate
processes running ``train.py``, as a user would; the straight run goes through the same ``main``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

from cribo.pretrain.checkpoint import CheckpointError

REPO = Path(__file__).resolve().parents[1]
STEPS = 6  # 8 images / batch 2 = 4 steps per epoch: the runs cross an epoch boundary


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(1)
    for i in range(8):
        h, w = int(rng.integers(64, 96)), int(rng.integers(64, 96))
        img = np.empty((h, w, 3), dtype=np.uint8)
        img[:] = rng.integers(0, 256, 3)
        img[h // 4: 3 * h // 4, w // 4: 3 * w // 4] = rng.integers(0, 256, 3)
        Image.fromarray(img).save(root / f"{i}.png")
    return root


def argv(data: Path, out: Path, *extra: str) -> list[str]:
    return ["--data", str(data), "--arch", "vit_tiny_patch16_224", "--batch-size", "2", "--max-steps", str(STEPS),
            "--output-dir", str(out), "--img-size", "64", "--out-dim", "64", "--head-hidden-dim", "32",
            "--head-bottleneck-dim", "16", "-K", "4", "--bank-images", "8", "--precision", "fp32",
            "--num-workers", "0", "--log-every", "1", "--warmup-steps", "2", "--freeze-last-layer-steps", "1",
            "--ci-start-step", "2", "--teacher-temp-warmup-steps", "3", "--lr", "1e-3", "--no-progress", *extra]


def run_cli(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def train_main():
    spec = importlib.util.spec_from_file_location("train_cli", REPO / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def assert_same(a, b, where="checkpoint"):
    """Recursive bitwise equality of checkpoint contents."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        assert torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert set(a) == set(b), f"{where}: keys {sorted(set(a) ^ set(b))}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def final_state(out: Path) -> dict:
    state = torch.load(out / "checkpoint.pth", weights_only=True)
    assert state["step"] == STEPS
    return {k: state[k] for k in ("step", "identity", "student", "teacher", "optimizer", "scaler", "dino_loss",
                                  "object_loss", "bank", "rng")}


def log_rows(out: Path) -> list[dict]:
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "peak_mem_mb"} for r in rows]


def test_interrupted_runs_equal_the_straight_run_bitwise(tmp_path, data_dir, capsys):
    straight, stopped, crashed = tmp_path / "straight", tmp_path / "stopped", tmp_path / "crashed"
    main = train_main()
    assert main(argv(data_dir, straight)) == 0

    # Planned interruption: --stop-at 3 (mid-epoch), then the same command without it.
    first = run_cli(argv(data_dir, stopped, "--stop-at", "3"))
    assert first.returncode == 0, first.stderr
    assert torch.load(stopped / "checkpoint.pth", weights_only=True)["step"] == 3
    assert [r["step"] for r in log_rows(stopped)] == [1, 2, 3]
    second = run_cli(argv(data_dir, stopped, "--num-workers", "2"))  # workers do not change the samples
    assert second.returncode == 0, second.stderr

    # Crash after step 3 with the last checkpoint at step 2: the log's row 3 must be dropped and redone.
    first = run_cli(argv(data_dir, crashed, "--ckpt-every", "2", "--crash-at-step", "3"))
    assert first.returncode == 1, first.stderr
    assert torch.load(crashed / "checkpoint.pth", weights_only=True)["step"] == 2
    assert [r["step"] for r in log_rows(crashed)] == [1, 2, 3]
    assert main(argv(data_dir, crashed)) == 0  # the resume itself may run in this process

    reference = final_state(straight)
    assert reference["bank"]["filled"] == 8  # the banks really hold objects (bank of 8 images, 12 pushed)
    rows = log_rows(straight)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for out in (stopped, crashed):
        assert_same(reference, final_state(out), where=out.name)
        assert log_rows(out) == rows

    # A finished run started again does nothing and leaves the log as it is.
    assert main(argv(data_dir, straight)) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["start_step"] == STEPS
    assert log_rows(straight) == rows


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    main = train_main()
    assert main(argv(data_dir, out, "--stop-at", "1")) == 0
    assert main([*argv(data_dir, out), "--lr", "2e-3"]) == 1  # bad state: one line, exit 1
    assert re.search(r"^error: .*checkpoint.pth belongs to another run .*differing: lr", capsys.readouterr().err, re.M)
    with pytest.raises(CheckpointError, match="differing: max_steps"):  # --debug: the exception itself
        main([*argv(data_dir, out), "--max-steps", str(STEPS + 1), "--debug"])
    # what may change: logging, checkpoint cadence, workers
    assert main(argv(data_dir, out, "--stop-at", "2", "--log-every", "2", "--ckpt-every", "5")) == 0
    assert torch.load(out / "checkpoint.pth", weights_only=True)["step"] == 2


def test_checkpoint_loads_with_weights_only_and_exports(tmp_path, data_dir):
    out = tmp_path / "run"
    assert train_main()(argv(data_dir, out, "--stop-at", "1")) == 0
    state = torch.load(out / "checkpoint.pth", weights_only=True)  # no pickled objects anywhere
    assert state["format"] == "cribo-train-v1" and state["config"]["arch"] == "vit_tiny_patch16_224"
    assert set(state["teacher"]) == set(state["student"]) and all(k.startswith(("backbone.", "head."))
                                                                   for k in state["teacher"])
    assert train_main()(["export", "--output-dir", str(out)]) == 0
    info = json.loads((out / "backbone.json").read_text())
    assert info["step"] == 1 and info["arch"] == "vit_tiny_patch16_224"


def test_damaged_checkpoint_resumes_from_its_predecessor_and_says_so(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    main = train_main()
    assert main(argv(data_dir, out, "--stop-at", "1")) == 0
    assert main(argv(data_dir, out, "--stop-at", "2")) == 0
    ckpt = out / "checkpoint.pth"
    data = bytearray(ckpt.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped byte inside the tensor records
    ckpt.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(argv(data_dir, out, "--stop-at", "2")) == 0
    captured = capsys.readouterr()
    assert f"{ckpt}: " in captured.err and f"resuming from {out / 'checkpoint.prev.pth'} (step 1)" in captured.err
    summary = json.loads(captured.out.strip().splitlines()[-1])
    assert summary["start_step"] == 1 and summary["resumed_from"] == str(out / "checkpoint.prev.pth")
    assert summary["step"] == 2 and torch.load(ckpt, weights_only=True)["step"] == 2  # a good file again


def test_init_from_starts_a_new_recipe_from_another_runs_networks(tmp_path, data_dir, capsys):
    src, dst, fresh = tmp_path / "src", tmp_path / "dst", tmp_path / "fresh"
    main = train_main()
    assert main(argv(data_dir, src, "--stop-at", "2")) == 0
    capsys.readouterr()
    # The learning rate is 0 at step 0 (linear warm-up), so one step leaves the student as it started.
    assert main(argv(data_dir, dst, "--augment", "mild", "--stop-at", "1", "--init-from", str(src))) == 0
    out = capsys.readouterr()
    source, started = torch.load(src / "checkpoint.pth", weights_only=True), torch.load(dst / "checkpoint.pth", weights_only=True)
    assert json.loads(out.out.splitlines()[-1])["init_from"] == {"path": str(src), "identity": source["identity"],
                                                                 "step": 2, "arch": "vit_tiny_patch16_224",
                                                                 "kind": "networks"}
    assert f"initialised from {src} (run {source['identity']}, step 2)" in out.err
    assert_same(started["student"], source["student"], "student")
    assert main(argv(data_dir, fresh, "--augment", "mild", "--stop-at", "1")) == 0
    random_init = torch.load(fresh / "checkpoint.pth", weights_only=True)["student"]
    assert not torch.equal(random_init["backbone.pos_embed"], source["student"]["backbone.pos_embed"])
    # a new optimiser and bank: one step's worth, where the source had two
    steps = [max(int(s["step"]) for s in ckpt["optimizer"]["state"].values()) for ckpt in (started, source)]
    assert steps == [1, 2]
    assert (int(started["bank"]["pushed"]), int(source["bank"]["pushed"])) == (2, 4)  # batch 2 per step

    # A resume reads its own checkpoint, never the source again (which may be gone) ...
    shutil.rmtree(src)
    assert main(argv(data_dir, dst, "--augment", "mild", "--stop-at", "2", "--init-from", str(src))) == 0
    assert torch.load(dst / "checkpoint.pth", weights_only=True)["step"] == 2
    # ... and the source is part of the run's identity.
    capsys.readouterr()
    assert main(argv(data_dir, dst, "--augment", "mild", "--init-from", str(tmp_path / "other.pth"))) == 1
    assert "differing: init_from" in capsys.readouterr().err


def test_init_from_a_backbone_loads_both_backbones_and_leaves_the_heads_fresh(tmp_path, data_dir, capsys):
    src, dst, fresh = tmp_path / "src", tmp_path / "dst", tmp_path / "fresh"
    main = train_main()
    assert main(argv(data_dir, src, "--stop-at", "2")) == 0
    assert main(["export", "--output-dir", str(src), "--out", str(tmp_path / "b.safetensors")]) == 0
    teacher = torch.load(src / "checkpoint.pth", weights_only=True)["teacher"]
    capsys.readouterr()
    # lr 0 at step 0: after one step the student still holds what it was given
    assert main(argv(data_dir, dst, "--stop-at", "1", "--init-from", str(tmp_path / "b.safetensors"))) == 0
    out = capsys.readouterr()
    summary = json.loads(out.out.splitlines()[-1])["init_from"]
    assert summary["kind"] == "backbone" and summary["step"] is None and summary["arch"] == "vit_tiny_patch16_224"
    assert "heads and loss centres fresh" in out.err
    started = torch.load(dst / "checkpoint.pth", weights_only=True)
    assert main(argv(data_dir, fresh, "--stop-at", "1")) == 0
    random_init = torch.load(fresh / "checkpoint.pth", weights_only=True)
    for net in ("student", "teacher"):  # the teacher after one EMA update of equal weights: to rounding
        backbone = {k: v for k, v in started[net].items() if k.startswith("backbone.")}
        assert backbone and all(torch.allclose(v, teacher[k], rtol=1e-6, atol=1e-7) for k, v in backbone.items()), net
        # the heads are those of a fresh run with the same seed, not the source's
        heads = [k for k in started[net] if k.startswith("head.")]
        assert all(torch.equal(started[net][k], random_init[net][k]) for k in heads), net
        assert not all(torch.equal(started[net][k], teacher[k]) for k in heads), net

    # a plain safetensors state dict (no .json sidecar) is read as this run's arch
    plain = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({k.removeprefix("backbone."): v.contiguous() for k, v in teacher.items()
                                 if k.startswith("backbone.")}, plain)
    assert main(argv(data_dir, tmp_path / "plain", "--stop-at", "1", "--init-from", str(plain))) == 0
    student = torch.load(tmp_path / "plain" / "checkpoint.pth", weights_only=True)["student"]
    assert torch.equal(student["backbone.pos_embed"], teacher["backbone.pos_embed"])

    # another architecture is refused by name, before any step
    capsys.readouterr()
    assert main(argv(data_dir, tmp_path / "other", "--init-from", "builtin")) == 1
    err = capsys.readouterr().err
    assert ("--init-from builtin: a vit_mini_convstem_patch16 backbone, this run trains vit_tiny_patch16_224; "
            "pass --arch vit_mini_convstem_patch16") in err, err


def test_init_from_refuses_networks_of_another_shape(tmp_path, data_dir, capsys):
    src = tmp_path / "src"
    main = train_main()
    assert main(argv(data_dir, src, "--stop-at", "1")) == 0
    capsys.readouterr()
    dst = tmp_path / "dst"
    assert main([*argv(data_dir, dst, "--init-from", str(src / "checkpoint.pth")), "--out-dim", "32"]) == 1
    err = capsys.readouterr().err
    assert re.search(rf"^error: --init-from {re.escape(str(src / 'checkpoint.pth'))}: its networks do not fit this run "
                     r"\(--out-dim 64 there, 32 here\); pass the same network options", err, re.M), err
    assert main(argv(data_dir, dst, "--init-from", str(tmp_path / "missing.pth"))) == 1
    assert "missing.pth: no such checkpoint" in capsys.readouterr().err
