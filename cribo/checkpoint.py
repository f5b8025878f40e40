"""Training checkpoints: everything an exact resume needs, in a file ``torch.load(weights_only=True)`` reads.

``OUT/checkpoint.pth`` is a dict of tensors, dicts, lists, numbers and strings only (no pickled
objects), written atomically (a crash mid-write leaves the previous checkpoint intact):

    format            "cribo-train-v1"
    step              number of optimisation steps completed
    identity          TrainConfig.identity(...) of the run (resume refuses another identity)
    config            TrainConfig.to_dict() (resolved: every length in steps)
    world_size        processes of the run
    student, teacher  state dicts of the unwrapped networks ("backbone.*", "head.*")
    optimizer         AdamW state dict
    scaler            GradScaler state dict ({} when not used)
    dino_loss, object_loss   loss state dicts (the centres)
    bank              ObjectMemoryBank state dict (identical on every rank)
    rng               one entry per rank: torch CPU / CUDA / numpy / python / clustering generator
                      states as tensors and numbers

The data position needs no extra state: the sampler's permutation is a function of (seed, epoch) and
the per-sample augmentation seed a function of (seed, epoch, index), so ``step`` fixes where to resume.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cribo.errors import DataError
from cribo.io import atomic_path

FORMAT = "cribo-train-v1"
CHECKPOINT_NAME = "checkpoint.pth"


class CheckpointError(DataError, RuntimeError):
    """A checkpoint that cannot be used: unreadable, of another format, or of another run."""


# ---------------------------------------------------------------------------------------------------
# RNG states as plain tensors / numbers
# ---------------------------------------------------------------------------------------------------
def capture_rng(device: torch.device, generator: torch.Generator | None = None) -> dict[str, Any]:
    """This process's RNG states: torch CPU, CUDA (current device, if ``device`` is CUDA), numpy,
    python ``random``, and ``generator`` (the engine's clustering generator) if given."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "python": {"version": int(py_version), "state": torch.tensor(py_state, dtype=torch.int64),
                   "gauss": py_gauss},
    }
    if torch.device(device).type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(torch.device(device))
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict[str, Any], device: torch.device, generator: torch.Generator | None = None) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss"]))
    if torch.device(device).type == "cuda":
        if "cuda" not in state:
            raise CheckpointError("the checkpoint was written by a CPU run and holds no CUDA RNG state; "
                                  "resume it with --device cpu")
        torch.cuda.set_rng_state(state["cuda"], torch.device(device))
    if generator is not None:
        if "generator" not in state:
            raise CheckpointError("the checkpoint holds no clustering-generator state")
        generator.set_state(state["generator"])


# ---------------------------------------------------------------------------------------------------
# Save / load
# ---------------------------------------------------------------------------------------------------
def save_checkpoint(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """Write ``state`` (plus ``format``) to ``path`` atomically."""
    state = {"format": FORMAT, **state}
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint safely (``weights_only=True``) and check its format."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; train first (python train.py ... --output-dir {path.parent})")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, OSError, ValueError) as e:  # torch's unpickler raises these
        raise CheckpointError(f"{path}: cannot be read as a training checkpoint ({e}); delete it to start over") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: format {found!r}, expected {FORMAT!r} (a checkpoint written by cribo.engine)")
    return state


def check_identity(state: dict[str, Any], identity: str, config_dict_diff: list[str], path: str | os.PathLike) -> None:
    """Refuse to resume a checkpoint of another run.

    Args:
        state: the loaded checkpoint.
        identity: the identity of the run being started.
        config_dict_diff: names of the identity fields that differ (for the message).
        path: the checkpoint's path (for the message).
    """
    if state["identity"] == identity:
        return
    fields = ", ".join(config_dict_diff) if config_dict_diff else "world size or dataset size"
    raise CheckpointError(
        f"{path} belongs to another run (identity {state['identity']} != {identity}; differing: {fields}). "
        "Use the same arguments as the run that wrote it (only --stop-at, --log-every, --ckpt-every, "
        "--num-workers and --device may change), or another --output-dir.")
