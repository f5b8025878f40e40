"""The CrIBo training run: sampling, the loop, logging, checkpointing and export.

The step itself is :mod:`cribo.pretrain.step`; this module owns everything around it and the timer.

Reproducibility. The run is a function of its config: seeds are fixed (``seed``; ``seed + rank`` for
the per-process streams), the sampler's permutation is a function of (seed, epoch), and every
sample's augmentation draws from its own generator seeded by (seed, epoch, index), so neither the
number of loader workers nor an interruption changes a single random number. A checkpoint holds every
remaining state (weights, optimiser, scaler, centres, banks, RNG states of every rank), so N steps in
one go and N/2 + N/2 steps with a resume in between are bitwise identical on CPU.

Step-time split: the ``time_*`` keys of the log (:mod:`cribo.pretrain.timing`). On CUDA every
section boundary synchronises the device, so the split is exact at the price of a little overlap.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from cribo import dist
from cribo.backbones import Backbone, BackboneLoadError, create_vit, export_backbone, load_backbone, registered_arch
from cribo.dirswap import TargetError, check_writable
from cribo.io import atomic_path, write_json
from cribo.jsonl import JsonlError, read_jsonl
from cribo.precision import resolve_precision
from cribo.pretrain.checkpoint import (CHECKPOINT_NAME, CheckpointError, capture_rng, check_identity, has_checkpoint,
                                       load_checkpoint, load_latest, remove_stale_checkpoint_temps, restore_rng,
                                       save_checkpoint)
from cribo.pretrain.config import INIT_COMPATIBLE_FIELDS, TrainConfig
from cribo.pretrain.data import build_pretraining_dataset
from cribo.pretrain.step import CrIBoTrainer
from cribo.pretrain.timing import TIME_SPLITS, StepTimer, peak_memory_mb
from cribo.pretrain.transforms import AUGMENTATIONS, TwoViewTransform
from index.datasets import open_dataset
from index.probe import RetrievalProbe

__all__ = ["train", "export_teacher", "check_output_dir", "LOG_KEYS", "LOG_NAME", "ResumableSampler",
           "SeededSamples", "truncate_log"]

LOG_NAME = "log.jsonl"
#: Every row of OUT/log.jsonl has exactly these keys (0 for a term that is not active yet).
LOG_KEYS = ("step", "epoch", "loss", "loss_global", "loss_object", "loss_cross_image", "bootstrap_ratio",
            "kept_clusters", "lr", "wd", "momentum", "teacher_temp",
            *(f"time_{s}" for s in TIME_SPLITS), "time_step", "peak_mem_mb")


# ---------------------------------------------------------------------------------------------------
# Data: resumable sampling and per-sample seeded augmentations
# ---------------------------------------------------------------------------------------------------
def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of dataset item ``index`` in ``epoch`` (64 bits, well mixed)."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0])


class SeededSamples(Dataset):
    """Wraps a dataset whose items draw their randomness from the global torch RNG (the
    ``TwoViewTransform``): item ``(epoch, index)`` is computed with the global CPU RNG seeded by
    :func:`sample_seed` inside ``torch.random.fork_rng``, so it is a pure function of
    (seed, epoch, index), whatever the worker or the resume point, and the caller's RNG is untouched."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed(self.seed, epoch, index))
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (shuffle with seed + epoch, ``drop_last``) that yields ``(epoch, index)``
    keys for :class:`SeededSamples` and can start inside an epoch, after ``start`` samples of this rank."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_position(self, epoch: int, start: int) -> None:
        if not 0 <= start <= self.num_samples:
            raise ValueError(f"ResumableSampler: start {start} outside [0, {self.num_samples}]")
        self.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        indices = list(super().__iter__())[self.start:]
        return iter([(self.epoch, i) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


def _seed_worker(worker_id: int) -> None:
    """numpy / python ``random`` of a loader worker seeded from its torch seed (PyTorch's recipe)."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def build_dataset(config: TrainConfig, patch_size: int) -> Dataset:
    """The pretraining dataset of ``config.data`` with the two-view transform (cribo.pretrain.data)."""

    view1_aug, view2_aug = AUGMENTATIONS[config.augment]
    student_augs = AUGMENTATIONS[config.student_augment] if config.student_augment is not None else None
    transform = TwoViewTransform(config.img_size, scale=tuple(config.crop_scale), patch_size=patch_size,
                                 view1_aug=view1_aug, view2_aug=view2_aug, student_augs=student_augs,
                                 rotate=config.rotate)
    return build_pretraining_dataset(config.data, transform, split=config.data_split,
                                     skip_corrupt=config.skip_corrupt)


# ---------------------------------------------------------------------------------------------------
# Log file
# ---------------------------------------------------------------------------------------------------
def truncate_log(path: Path, step: int) -> int:
    """Keep the rows of ``path`` with ``row['step'] <= step`` (rewritten atomically); returns how many
    rows were kept. A torn last line (a crash mid-write) is dropped; a torn line elsewhere is an error."""
    if not path.exists():
        return 0
    try:
        rows = read_jsonl(path)
    except JsonlError as e:
        raise CheckpointError(f"{e}; fix or delete the log") from e
    kept = [line for line, row in rows if row["step"] <= step]
    with atomic_path(path) as tmp:
        tmp.write_text("".join(line + "\n" for line in kept))
    return len(kept)


def _sha256(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def state_fingerprint(trainer: "CrIBoTrainer") -> dict[str, Any]:
    """sha256 of each bank tensor (plus its counters), of the teacher's weights and of the loss centres.

    Debug aid (``--debug-bank-hash``): every rank must hold the same banks, teacher and centres.
    """
    out: dict[str, Any] = {}
    for key, value in trainer.bank.state_dict().items():
        out[f"bank.{key}"] = _sha256(value) if isinstance(value, torch.Tensor) else value
    teacher = hashlib.sha256()
    for name, value in trainer.teacher.state_dict().items():
        teacher.update(name.encode() + _sha256(value).encode())
    out["teacher"] = teacher.hexdigest()
    out["dino_center"] = _sha256(trainer.dino_loss.center)
    out["object_center"] = _sha256(trainer.object_loss.center)
    return out


# ---------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------
def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _gather_rng(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's RNG state, in rank order (one object all-gather; identity in one process)."""
    if dist.world_size() == 1:
        return [state]
    out: list[Any] = [None] * dist.world_size()
    torch.distributed.all_gather_object(out, state)
    return [{k: _to_cpu(v) for k, v in s.items()} for s in out]


def _to_cpu(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.cpu()
    if isinstance(v, dict):
        return {k: _to_cpu(x) for k, x in v.items()}
    return v


def train(config: TrainConfig, *, crash_at_step: int | None = None) -> dict[str, Any]:
    """Run (or resume) the training described by ``config``; returns a summary dict.

    Joins the ``torchrun`` process group when launched by it (gloo on CPU, NCCL on CUDA). Resumes
    automatically from ``OUT/checkpoint.pth`` when present (the run identity must match). Writes
    ``OUT/log.jsonl`` (every ``log_every`` steps and the last step), ``OUT/checkpoint.pth`` (every
    ``ckpt_every`` steps, at ``stop_at`` and at the end) and ``OUT/config.json``.

    Args:
        config: the run (unresolved epoch lengths are resolved against the dataset).
        crash_at_step: test hook: ``os._exit(1)`` right after step S (its log row and, if due, its
            checkpoint written), as a crash between checkpoints would.
    """
    started_group = not dist.is_initialized()
    rank, world, device = dist.init_distributed(config.device)
    try:
        return _run(config, rank, world, device, crash_at_step)
    finally:
        if started_group:
            dist.destroy()


def _resume(trainer: CrIBoTrainer, ckpt_path: Path, identity: str, rank: int, world: int,
            device: torch.device) -> tuple[int, Path | None]:
    """Restore ``trainer`` and this rank's RNG streams from ``ckpt_path`` when a checkpoint exists
    (its predecessor if it is damaged; the run identity must match). Returns (start step, file used)."""
    if rank == 0:
        remove_stale_checkpoint_temps(ckpt_path)  # left by a run killed mid-save
    if not has_checkpoint(ckpt_path):
        return 0, None
    state, resumed_from = load_latest(ckpt_path)  # checkpoint.pth, or its predecessor if damaged
    check_identity(state, identity, trainer.config.identity_diff(state["config"]), resumed_from)
    trainer.load_state_dict(state)
    if len(state["rng"]) != world:
        raise CheckpointError(f"{ckpt_path} holds RNG states of {len(state['rng'])} processes, this run has {world}")
    restore_rng(state["rng"][rank], device, trainer.cluster_generator)
    start = int(state["step"])
    if rank == 0:
        print(f"resuming from {resumed_from} (step {start})", file=sys.stderr)
    return start, resumed_from


def _init_from(trainer: CrIBoTrainer, path: str, is_main: bool) -> dict[str, Any]:
    """Load the networks of ``path`` into ``trainer`` (``--init-from``) and say where they came from:
    {path, identity, step, arch, kind}.

    ``path`` is a train.py checkpoint (a run directory means its checkpoint.pth, or the predecessor if
    that is damaged): student, teacher, heads and loss centres, kind "networks"; or a backbone
    (``builtin``, an exported ``.safetensors``): student and teacher backbones, the heads and centres
    fresh, kind "backbone" (step None: an export does not record it)."""
    if path == "builtin" or (Path(path).is_file() and Path(path).suffix == ".safetensors"):
        return _init_backbone(trainer, path, is_main)
    state = load_latest(Path(path) / CHECKPOINT_NAME)[0] if Path(path).is_dir() else load_checkpoint(path)
    theirs, mine = state["config"], trainer.config
    differ = [f"--{k.replace('_', '-')} {theirs.get(k)!r} there, {getattr(mine, k)!r} here"
              for k in INIT_COMPATIBLE_FIELDS if theirs.get(k) != getattr(mine, k)]
    if differ:
        raise CheckpointError(f"--init-from {path}: its networks do not fit this run ({'; '.join(differ)}); "
                              "pass the same network options as the run that wrote it")
    trainer.load_networks(state)
    origin = {"path": str(path), "identity": state["identity"], "step": int(state["step"]), "arch": theirs.get("arch"),
              "kind": "networks"}
    if is_main:
        print(f"initialised from {path} (run {origin['identity']}, step {origin['step']})", file=sys.stderr)
    return origin


def _init_backbone(trainer: CrIBoTrainer, path: str, is_main: bool) -> dict[str, Any]:
    """``--init-from`` a backbone: its weights into the student's and the teacher's backbones (strict)."""
    arch = trainer.config.arch
    try:
        if path == "builtin":
            backbone = load_backbone("builtin")
        else:  # an export names its arch in its .json sidecar; a plain state dict is read as this run's
            backbone = load_backbone(None if Path(path).with_suffix(".json").is_file() else arch, weights=path)
    except BackboneLoadError as err:
        raise CheckpointError(f"--init-from {path}: {err}") from err
    if backbone.arch != arch:
        raise CheckpointError(f"--init-from {path}: a {backbone.arch} backbone, this run trains {arch}; "
                              f"pass --arch {backbone.arch}")
    weights = backbone.vit.state_dict()
    trainer.student.backbone.load_state_dict(weights)
    trainer.teacher.backbone.load_state_dict(weights)
    origin = {"path": str(path), "identity": backbone.identity, "step": None, "arch": arch, "kind": "backbone"}
    if is_main:
        print(f"initialised the backbones from {path} ({backbone.identity[:12]}); heads and loss centres fresh",
              file=sys.stderr)
    return origin


def _run(config: TrainConfig, rank: int, world: int, device: torch.device,
         crash_at_step: int | None) -> dict[str, Any]:
    out_dir = Path(config.output_dir)
    if not config.output_dir:
        raise ValueError("TrainConfig.output_dir is empty: pass --output-dir OUT")
    ckpt_path, log_path = out_dir / CHECKPOINT_NAME, out_dir / LOG_NAME
    is_main = rank == 0

    _seed_everything(config.seed)
    dataset = build_dataset(config, registered_arch(config.arch).patch_size)
    global_batch = config.batch_size * world
    epoch_steps = len(dataset) // global_batch
    if epoch_steps == 0:
        raise ValueError(f"--data {config.data}: {len(dataset)} images, fewer than one global batch of "
                         f"{global_batch} (= --batch-size {config.batch_size} x {world} processes); "
                         "lower --batch-size or add images")
    config = dataclasses.replace(config.resolved(epoch_steps),
                                 precision=resolve_precision(config.precision, device))
    identity = config.identity(world_size=world, dataset_len=len(dataset))

    # Networks seeded identically on every rank (DDP would broadcast rank 0's weights anyway).
    _seed_everything(config.seed)
    trainer = CrIBoTrainer(config, device, world_size=world, ddp=world > 1)
    # Per-process streams (drop-path, clustering seeds) differ between ranks.
    _seed_everything(config.seed + rank)
    trainer.cluster_generator.manual_seed(config.seed + rank)

    start, resumed_from = _resume(trainer, ckpt_path, identity, rank, world, device)
    init = _init_from(trainer, config.init_from, is_main) if start == 0 and config.init_from else None
    if is_main:
        truncate_log(log_path, start)
        write_json(out_dir / "config.json", {"identity": identity, "world_size": world, "dataset_len": len(dataset),
                                             "epoch_steps": epoch_steps, "global_batch": global_batch,
                                             "config": config.to_dict()})
    dist.barrier()

    summary = {"output_dir": str(out_dir), "identity": identity, "start_step": start, "epoch_steps": epoch_steps,
               "max_steps": config.max_steps, "resumed_from": None if resumed_from is None else str(resumed_from)}
    if init is not None:
        summary["init_from"] = init
    end = config.stop_at if config.stop_at is not None else config.max_steps
    if start >= end:
        summary.update(step=start, stopped=start < config.max_steps)
        return summary

    seeded = SeededSamples(dataset, config.seed)
    sampler = ResumableSampler(seeded, num_replicas=world, rank=rank, seed=config.seed)
    loader = DataLoader(seeded, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
                        drop_last=True, pin_memory=device.type == "cuda", worker_init_fn=_seed_worker,
                        generator=torch.Generator().manual_seed(config.seed),
                        # Workers hold no state of their own (keys carry the epoch), so they can live
                        # across epochs; the sampler runs in this process and is repositioned per epoch.
                        persistent_workers=config.num_workers > 0)

    def save(step: int) -> None:
        rng = _gather_rng(capture_rng(device, trainer.cluster_generator))
        if is_main:
            save_checkpoint(ckpt_path, {"step": step, "identity": identity, "config": config.to_dict(),
                                        "world_size": world, "dataset_len": len(dataset), "rng": rng,
                                        **trainer.state_dict()})
        dist.barrier()

    log_file = open(log_path, "a") if is_main else None  # noqa: SIM115 (closed in finally)
    probe = build_probe(config) if is_main and config.eval_every else None

    def evaluate(step: int) -> None:
        """Learning curve: one row {step, eval_miou, eval_patch_nn, eval_seconds} (rank 0 evaluates)."""
        if probe is not None:
            with torch.random.fork_rng(devices=[]):  # the run's random streams stay untouched
                row = {"step": step, **probe(teacher_backbone(trainer, step))}
            log_file.write(json.dumps(row) + "\n")
            log_file.flush()
            tqdm.write(f"step {step}: eval mIoU {row['eval_miou']:.2f}, patch-NN {row['eval_patch_nn']:.3f} "
                       f"({row['eval_seconds']:.0f} s)", file=sys.stderr)
        dist.barrier()

    bar = tqdm(total=config.max_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=not (is_main and config.progress), file=sys.stderr)
    timer = StepTimer(device)
    step_t0 = time.perf_counter()
    step_time = 0.0
    it = start
    try:
        if start == 0 and config.eval_every:
            evaluate(0)
            step_t0 = time.perf_counter()  # evaluation time is not step time
        while it < end:
            epoch = it // epoch_steps
            sampler.set_position(epoch, (it % epoch_steps) * config.batch_size)
            batches = iter(loader)
            while it < end and it // epoch_steps == epoch:
                with timer.section("data"):
                    batch = next(batches)
                stats = trainer.step(batch, it, timer)
                timer.end_step()
                now = time.perf_counter()
                step_time += now - step_t0
                step_t0 = now
                it += 1
                bar.update(1)
                if it % config.log_every == 0 or it == config.max_steps:
                    row = _log_row(trainer, stats, it, epoch, timer, step_time)
                    if log_file is not None:
                        log_file.write(json.dumps(row) + "\n")
                        log_file.flush()
                    bar.set_postfix(loss=f"{row['loss']:.4f}", boot=f"{row['bootstrap_ratio']:.3f}")
                    timer.reset()
                    step_time = 0.0
                if config.eval_every and (it % config.eval_every == 0 or it == end):
                    evaluate(it)
                    step_t0 = time.perf_counter()
                if it % config.ckpt_every == 0 or it == end:
                    save(it)
                if crash_at_step is not None and it == crash_at_step:
                    if log_file is not None:
                        log_file.flush()
                    os._exit(1)
            del batches
    finally:
        bar.close()
        if log_file is not None:
            log_file.close()
    if config.debug_bank_hash:
        write_json(out_dir / f"bank_rank{rank}.json", state_fingerprint(trainer))
    summary.update(step=it, stopped=it < config.max_steps)
    return summary


def build_probe(config: TrainConfig) -> RetrievalProbe:
    """The learning-curve probe of ``config.eval_*``: first ``eval_support`` images of the support split,
    first ``eval_queries`` of the query split, k = 50, exact search, on the CPU in fp32."""
    support = open_dataset(config.eval_dataset, config.eval_data, config.eval_train_split)
    queries = open_dataset(config.eval_dataset, config.eval_data, config.eval_val_split)
    return RetrievalProbe(support, queries, num_support=config.eval_support, num_queries=config.eval_queries)


def teacher_backbone(trainer: "CrIBoTrainer", step: int) -> Backbone:
    """The teacher's ViT behind the named backbone contract (no copy: it shares the weights)."""
    return Backbone(trainer.teacher.backbone, trainer.config.arch, identity=f"teacher:step{step}",
                    source=f"{trainer.config.output_dir} teacher, step {step}")


def _log_row(trainer: CrIBoTrainer, stats: dict[str, torch.Tensor], step: int, epoch: int,
             timer: StepTimer, step_time: float) -> dict[str, Any]:
    """One log row: this step's statistics averaged over ranks, schedules, timings, peak memory."""
    names = ("loss", "loss_global", "loss_object", "loss_cross_image", "bootstrap_ratio", "kept_clusters")
    values = dist.all_reduce_mean(torch.stack([stats[n].float() for n in names])).tolist()  # one sync
    it = step - 1
    s = trainer.schedules
    row: dict[str, Any] = {"step": step, "epoch": epoch, **dict(zip(names, values)),
                           "lr": float(s.lr[it]), "wd": float(s.wd[it]), "momentum": float(s.momentum[it]),
                           "teacher_temp": float(s.teacher_temp[it])}
    n = max(timer.steps, 1)
    row.update({f"time_{k}": v for k, v in timer.mean().items()})
    row["time_step"] = step_time / n
    row["peak_mem_mb"] = peak_memory_mb(trainer.device)
    missing = set(LOG_KEYS) ^ set(row)
    if missing:
        raise AssertionError(f"log row keys differ from LOG_KEYS: {sorted(missing)}")
    return row


def check_output_dir(output_dir: str | os.PathLike) -> None:
    """Refuse, before any compute, an ``--output-dir`` that is a file, is not writable, or is a folder
    of someone else holding files a run writes (log.jsonl, config.json) without being a run folder
    (one with a checkpoint or a config.json of this code): those files would be overwritten."""
    out = Path(output_dir)
    check_writable(out, label="--output-dir")
    if not out.is_dir() or has_checkpoint(out / CHECKPOINT_NAME):
        return
    config = out / "config.json"
    try:
        ours = config.is_file() and "identity" in json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError):
        ours = False
    clash = [n for n in (LOG_NAME, "config.json") if (out / n).exists()]
    if clash and not ours:
        raise TargetError(f"--output-dir {out} holds {', '.join(clash)} not written by train.py; choose an "
                          "empty or new --output-dir (nothing was changed)")


# ---------------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------------
def export_teacher(output_dir: str | os.PathLike, path: str | os.PathLike | None = None, *,
                   dtype: str = "fp32") -> dict[str, Any]:
    """Export the teacher backbone of ``OUT/checkpoint.pth`` to ``OUT/backbone.safetensors`` (+ .json).

    The json is self-describing (arch, patch size, checksum) so ``load_backbone(weights=...)`` needs no
    name; it also records the training step, identity and configuration. Returns the json dict.
    """
    output_dir = Path(output_dir)
    state, used = load_latest(output_dir / CHECKPOINT_NAME)  # checkpoint.pth, or its predecessor if damaged
    config = TrainConfig.from_dict(state["config"])
    vit = create_vit(config.arch)
    prefix = "backbone."
    backbone_state = {k[len(prefix):]: v for k, v in state["teacher"].items() if k.startswith(prefix)}
    bad = [k for k, v in backbone_state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{used}: the teacher's {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} hold "
                              "non-finite values (NaN or inf): the run diverged; nothing was exported")
    vit.load_state_dict(backbone_state)
    path = Path(path) if path is not None else output_dir / "backbone.safetensors"
    meta = {"source": "cribo-train teacher", "step": int(state["step"]), "max_steps": config.max_steps,
            "identity": state["identity"], "img_size": config.img_size, "data": config.data,
            "train_config": config.to_dict(), "checkpoint": str(used)}
    return export_backbone(vit, config.arch, path, meta, dtype=dtype)
