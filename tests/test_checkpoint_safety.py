"""Training checkpoints prove their integrity: checksum verified on load, one predecessor kept, stale
temporary files removed, a kill at every write boundary of a save leaves a usable checkpoint, and
export refuses non-finite weights."""
from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import pytest
import torch

import train
from cribo.backbones import create_vit
from cribo.pretrain.checkpoint import (CHECKSUM_KEY, SAVE_BOUNDARIES, CheckpointError, content_checksum, load_checkpoint,
                              load_latest, previous_path, save_checkpoint)
from cribo.pretrain.config import TrainConfig
from cribo.pretrain.loop import export_teacher

KILLED = 77
MARK = 1234.5  # a float32 whose bytes are easy to find in the file


def state(step: int) -> dict:
    return {"step": step, "weights": torch.full((64,), MARK), "bias": torch.arange(5, dtype=torch.float32) * step,
            "opt": {"state": {0: {"exp_avg": torch.ones(3)}}, "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99),
                                                                                  "params": [0], "fused": None}]},
            "name": "x", "rng": [{"numpy": {"pos": 3, "gauss": 0.5}}]}


def flip_tensor_bytes(path) -> None:
    data = bytearray(path.read_bytes())
    at = bytes(data).index(torch.full((64,), MARK).numpy().tobytes())
    data[at + 10] ^= 0x40
    path.write_bytes(bytes(data))


def test_checksum_covers_every_value():
    base = content_checksum(state(1))
    assert content_checksum(state(1)) == base
    changed = state(1)
    changed["opt"]["param_groups"][0]["betas"] = (0.9, 0.98)
    assert content_checksum(changed) != base
    changed = state(1)
    changed["weights"][7] = 0.0
    assert content_checksum(changed) != base
    assert content_checksum({"a": 1}) != content_checksum({"a": 1.0}) != content_checksum({"a": True})
    with pytest.raises(TypeError, match="set cannot be checksummed"):
        content_checksum({"a": {1, 2}})


def test_save_keeps_one_predecessor_and_load_verifies(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, state(1))
    assert not previous_path(path).exists()
    save_checkpoint(path, state(2))
    save_checkpoint(path, state(3))
    assert load_checkpoint(path)["step"] == 3 and load_checkpoint(previous_path(path))["step"] == 2
    assert CHECKSUM_KEY not in load_checkpoint(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pth", "checkpoint.pth"]


def test_flipped_byte_is_refused_and_the_predecessor_used(tmp_path, capsys):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, state(1))
    save_checkpoint(path, state(2))
    flip_tensor_bytes(path)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: checksum mismatch, the file is damaged"):
        load_checkpoint(path)
    loaded, used = load_latest(path)
    assert used == previous_path(path) and loaded["step"] == 1
    err = capsys.readouterr().err
    assert "checkpoint.pth: checksum mismatch" in err and "checkpoint.prev.pth (step 1)" in err
    flip_tensor_bytes(previous_path(path))
    with pytest.raises(CheckpointError, match="both checkpoints are unusable"):
        load_latest(path)


@pytest.mark.parametrize("content", [random.Random(0).randbytes(4096), b"", b"PK\x03\x04 truncated zip"],
                         ids=["random", "empty", "zip"])
def test_unreadable_checkpoint_is_named_without_torch_advice(tmp_path, content):
    path = tmp_path / "checkpoint.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(path))}: damaged or not a training checkpoint") as e:
        load_checkpoint(path)
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)


def test_any_random_bytes_are_refused_as_damaged(tmp_path, capsys):
    """torch's unpickler fails on random bytes in many ways (UnpicklingError, IndexError, KeyError,
    UnicodeDecodeError, ...): every one is the same one-line refusal, with no torch warning."""
    path = tmp_path / "checkpoint.pth"
    rng = random.Random(1)
    for _ in range(400):
        path.write_bytes(rng.randbytes(rng.randrange(1, 512)))
        with pytest.raises(CheckpointError, match="damaged or not a training checkpoint"):
            load_checkpoint(path)
    assert capsys.readouterr().err == ""


def test_truncated_checkpoint_is_refused(tmp_path):
    path = tmp_path / "checkpoint.pth"
    save_checkpoint(path, state(1))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged or not a training checkpoint"):
        load_checkpoint(path)


def test_checkpoint_without_checksum_loads_with_a_warning(tmp_path, capsys):
    path = tmp_path / "checkpoint.pth"
    torch.save({"format": "cribo-train-v1", **state(4)}, path)
    assert load_checkpoint(path)["step"] == 4
    assert "has no checksum (written by an earlier version)" in capsys.readouterr().err


def test_stale_temporary_files_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "checkpoint.pth"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()
    for name in (".checkpoint.pth.abc123.tmp", f".checkpoint.prev.pth.{dead}_ff.tmp", f".checkpoint.pth.{os.getpid()}_a.tmp"):
        (tmp_path / name).write_bytes(b"x" * 100)
    alive = tmp_path / f".checkpoint.pth.{os.getppid()}_ab.tmp"  # a writer that is still running
    alive.write_bytes(b"x")
    (tmp_path / "notes.tmp").write_text("mine")
    save_checkpoint(path, state(1))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["checkpoint.pth", "notes.tmp", alive.name])


def kill_at(boundary: str):
    def hook(name: str) -> None:
        if name == boundary:
            os._exit(KILLED)
    return hook


@pytest.mark.parametrize("boundary", SAVE_BOUNDARIES)
@pytest.mark.parametrize("existing", [1, 2], ids=["no-predecessor", "with-predecessor"])
def test_kill_at_every_write_boundary_leaves_a_usable_checkpoint(tmp_path, boundary, existing):
    path = tmp_path / "checkpoint.pth"
    for step in range(1, existing + 1):
        save_checkpoint(path, state(step))
    new = state(existing + 1)
    pid = os.fork()
    if pid == 0:
        try:
            save_checkpoint(path, new, on_boundary=kill_at(boundary))
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == KILLED

    loaded, used = load_latest(path)  # checkpoint.pth is always there and intact: no fallback needed
    assert used == path and loaded["step"] == (existing + 1 if boundary == "replaced" else existing)
    assert torch.equal(loaded["bias"], state(loaded["step"])["bias"])
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == (0 if boundary == "replaced" else 1)  # the killed save's complete temp file
    assert all(re.fullmatch(r"\.checkpoint\.pth\.\d+_[0-9a-f]+\.tmp", n) for n in leftovers)
    save_checkpoint(path, state(10))  # the next save cleans up and keeps one predecessor
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pth", "checkpoint.pth"]
    assert load_checkpoint(previous_path(path))["step"] == loaded["step"]


# ----------------------------------------------------------------------------------- export
def teacher_checkpoint(out, *, poison: bool) -> None:
    config = TrainConfig(data="d", arch="vit_tiny_patch16_224", batch_size=2, max_steps=4, output_dir=str(out))
    weights = {f"backbone.{k}": v for k, v in create_vit("vit_tiny_patch16_224").state_dict().items()}
    if poison:
        weights["backbone.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
        weights["backbone.norm.bias"][3] = float("inf")
    save_checkpoint(out / "checkpoint.pth", {"step": 4, "identity": "abc", "config": config.to_dict(),
                                             "teacher": weights})


def test_export_refuses_non_finite_weights(tmp_path, capsys):
    teacher_checkpoint(tmp_path, poison=True)
    with pytest.raises(CheckpointError, match=r"blocks.0.attn.qkv.weight, norm.bias hold non-finite values"):
        export_teacher(tmp_path)
    assert train.main(["export", "--output-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "non-finite" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pth"]  # nothing exported


def test_export_says_which_checkpoint_it_used(tmp_path, capsys):
    teacher_checkpoint(tmp_path, poison=False)
    teacher_checkpoint(tmp_path, poison=False)  # now with a predecessor
    flip = tmp_path / "checkpoint.pth"
    data = bytearray(flip.read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the tensor records
    flip.write_bytes(bytes(data))
    assert train.main(["export", "--output-dir", str(tmp_path)]) == 0
    out, err = capsys.readouterr()
    assert "checkpoint.pth: " in err and "using the previous checkpoint" in err
    assert out.strip().endswith(f'"checkpoint": "{previous_path(flip)}"}}')
