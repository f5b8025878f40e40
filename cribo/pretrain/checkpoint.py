"""Training checkpoints: everything an exact resume needs, in a file ``torch.load(weights_only=True)`` reads.

``OUT/checkpoint.pth`` is a dict of tensors, dicts, lists, numbers and strings only (no pickled
objects), written atomically (a crash mid-write leaves the previous checkpoint intact):

    format            "cribo-train-v1"
    checksum          sha256 of everything else (:func:`content_checksum`), verified on load
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

Integrity: ``OUT/checkpoint.prev.pth`` keeps the predecessor (a hard link made before the new file
replaces ``checkpoint.pth``, so ``checkpoint.pth`` exists at every instant). :func:`load_latest`
verifies the checksum and falls back to the predecessor when ``checkpoint.pth`` is damaged, saying
so; a flipped byte costs ``ckpt_every`` steps, not the run. Temporary files of a killed save
(``.checkpoint.pth.*.tmp``) are removed by the next save. Save steps are followed by named write
boundaries (:data:`SAVE_BOUNDARIES`) where the fault-injection tests kill the process.

The data position needs no extra state: the sampler's permutation is a function of (seed, epoch) and
the per-sample augmentation seed a function of (seed, epoch, index), so ``step`` fixes where to resume.
"""
from __future__ import annotations

import hashlib
import os
import random
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from cribo.errors import TORCH_LOAD_ERRORS, TORCH_PROTOCOL_WARNING, DataError
from cribo.io import fsync_path, remove_stale_temps

FORMAT = "cribo-train-v1"
CHECKPOINT_NAME = "checkpoint.pth"
PREVIOUS_NAME = "checkpoint.prev.pth"
CHECKSUM_KEY = "checksum"
SAVE_BOUNDARIES = ("written", "kept-previous", "replaced")


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
def content_checksum(state: Any) -> str:
    """sha256 of a checkpoint's content: every tensor's dtype, shape and bytes, every number, string
    and container, in a canonical order (dict keys sorted), independent of the pickle layout."""
    h = hashlib.sha256()
    _feed(h, state)
    return h.hexdigest()


def _feed(h: "hashlib._Hash", v: Any) -> None:
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    elif isinstance(v, dict):
        h.update(b"D%d" % len(v))
        for k in sorted(v, key=repr):
            _feed(h, k)
            _feed(h, v[k])
    elif isinstance(v, (list, tuple)):
        h.update(b"L%d" % len(v) if isinstance(v, list) else b"U%d" % len(v))
        for x in v:
            _feed(h, x)
    elif isinstance(v, str):
        b = v.encode()
        h.update(b"S%d:" % len(b) + b)
    elif isinstance(v, bool) or v is None:
        h.update(b"B" + repr(v).encode())
    elif isinstance(v, int):
        h.update(b"I" + str(v).encode())
    elif isinstance(v, float):
        h.update(b"F" + v.hex().encode())
    else:
        raise TypeError(f"checkpoint value of type {type(v).__name__} cannot be checksummed; store tensors, "
                        "numbers, strings, lists and dicts only")


def previous_path(path: str | os.PathLike) -> Path:
    """Where the predecessor of checkpoint ``path`` is kept (``OUT/checkpoint.prev.pth``)."""
    path = Path(path)
    return path.with_name(PREVIOUS_NAME if path.name == CHECKPOINT_NAME else f"{path.stem}.prev{path.suffix}")


def _no_hook(name: str) -> None:
    return None


def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], *,
                    on_boundary: Callable[[str], None] = _no_hook) -> None:
    """Write ``state`` (plus ``format`` and ``checksum``) to ``path`` atomically; keep the file it
    replaces as :func:`previous_path`. ``on_boundary(name)`` is called after each step
    (:data:`SAVE_BOUNDARIES`): the fault-injection hook."""
    path = Path(path)
    prev = previous_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_checkpoint_temps(path)
    state = {"format": FORMAT, **state}
    state[CHECKSUM_KEY] = content_checksum(state)
    tmp = path.with_name(f".{path.name}.{os.getpid()}_{os.urandom(4).hex()}.tmp")
    prev_tmp = prev.with_name(f".{prev.name}.{os.getpid()}_{os.urandom(4).hex()}.tmp")
    try:
        torch.save(state, tmp)
        fsync_path(tmp)
        on_boundary("written")
        if path.exists():
            os.link(path, prev_tmp)  # the predecessor, without a moment where path is missing
            os.replace(prev_tmp, prev)
            fsync_path(path.parent)
        on_boundary("kept-previous")
        os.replace(tmp, path)
        fsync_path(path.parent)
        on_boundary("replaced")
    finally:
        for t in (tmp, prev_tmp):
            if t.exists():
                t.unlink()


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a training checkpoint safely (``weights_only=True``), check its format and its checksum.

    A checkpoint written before checksums existed is accepted with a warning on stderr.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint; train first (python train.py ... --output-dir {path.parent})")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=TORCH_PROTOCOL_WARNING)
            state = torch.load(path, map_location=map_location, weights_only=True)
    except (*TORCH_LOAD_ERRORS, OSError) as e:
        raise CheckpointError(f"{path}: damaged or not a training checkpoint ({_first_line(e)}); "
                              f"delete it to use {previous_path(path).name} or to start over") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: format {found!r}, expected {FORMAT!r} (a checkpoint written by cribo.pretrain.loop)")
    stored = state.pop(CHECKSUM_KEY, None)
    if stored is None:
        print(f"warning: {path} has no checksum (written by an earlier version); its integrity is not verified",
              file=sys.stderr)
    elif content_checksum(state) != stored:
        raise CheckpointError(f"{path}: checksum mismatch, the file is damaged; delete it to use "
                              f"{previous_path(path).name} or to start over")
    return state


def load_latest(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[dict[str, Any], Path]:
    """The newest intact checkpoint: ``path``, else its predecessor (a warning on stderr names the
    damaged file and the one used). Raises :class:`CheckpointError` when neither is usable."""
    path = Path(path)
    prev = previous_path(path)
    if not path.is_file() and not prev.is_file():
        return load_checkpoint(path, map_location), path  # the "no such checkpoint" message
    try:
        return load_checkpoint(path, map_location), path
    except CheckpointError as e:
        if not prev.is_file():
            raise
        try:
            state = load_checkpoint(prev, map_location)
        except CheckpointError as e_prev:
            raise CheckpointError(f"both checkpoints are unusable: {e}; and {e_prev}") from e_prev
        print(f"warning: {e}; using the previous checkpoint {prev} (step {state.get('step')})", file=sys.stderr)
        return state, prev


def remove_stale_checkpoint_temps(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed save of ``path`` (or of its predecessor) left behind."""
    return remove_stale_temps(path) + remove_stale_temps(previous_path(path))


def has_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` or its predecessor exists (a run to resume)."""
    return Path(path).is_file() or previous_path(path).is_file()


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
