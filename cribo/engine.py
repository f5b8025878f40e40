"""The CrIBo training loop (section 3.2, appendix A.1): DINO-style self-distillation with objects.

One step, for a batch of B images (two views each, N patches per view, K clusters):

    teacher (EMA, no grad):  both views -> [CLS] (2B, D) + patch tokens (2B, N, D)
                              -> joint-space clustering (fp32) -> assignment a1, a2 (B, N), valid (B, K)
                              -> object vectors c_t (2, B, K, D)                            Eq. 1
                              -> bank query nn(c_t) + cycle consistency, BEFORE the push   Eq. 2-4
                              -> push all-gathered c_t into the FIFO banks
                              -> head: global (2B, L), objects (2, B, K, L), neighbours (2, B, K, L)
    student (DDP, grad):     both views -> tokens -> objects from the TEACHER's assignment -> head
    loss (fp32):             L_cv^g + L_cv^o + L_ci^o (L_ci^o from ``ci_start_step`` on)    Eq. 11
    update:                  backward -> per-parameter clipping -> last layers frozen early ->
                             AdamW with lr / weight-decay schedules -> teacher EMA with the momentum
                             schedule.

Reproducibility. The run is a function of its config: seeds are fixed (``seed``; ``seed + rank`` for
the per-process streams), the sampler's permutation is a function of (seed, epoch), and every
sample's augmentation draws from its own generator seeded by (seed, epoch, index), so neither the
number of loader workers nor an interruption changes a single random number. A checkpoint holds every
remaining state (weights, optimiser, scaler, centres, banks, RNG states of every rank), so N steps in
one go and N/2 + N/2 steps with a resume in between are bitwise identical on CPU.

Step-time split (``time_*`` keys of the log, seconds per step, mean since the previous row): data,
forward (backbones, global heads, losses), clustering, nn_bank (query + gather + push), object_proj
(object pooling and object-head projections, teacher targets included), backward_ema. On CUDA every
section boundary synchronises the device, so the split is exact at the price of a little overlap.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import resource
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from cribo import dist
from cribo.backbones import ARCHS, Backbone, create_vit, export_backbone
from cribo.bank import ObjectMemoryBank
from cribo.checkpoint import (CHECKPOINT_NAME, CheckpointError, capture_rng, check_identity, has_checkpoint,
                              load_latest, remove_stale_checkpoint_temps, restore_rng, save_checkpoint)
from cribo.clustering import joint_space_clustering, object_representations, split_views, valid_objects
from cribo.config import TrainConfig
from cribo.data import build_pretraining_dataset
from cribo.dirswap import TargetError, check_writable
from cribo.heads import DINOHead
from cribo.io import atomic_path, write_json
from cribo.losses import DINOLoss, ObjectLoss, cross_image_loss
from cribo.precision import resolve_precision
from cribo.schedules import cosine_schedule, teacher_temp_schedule
from cribo.transforms import AUGMENTATIONS, TwoViewTransform
from index.datasets import open_dataset
from index.probe import RetrievalProbe

__all__ = ["TrainConfig", "CrIBoNet", "CrIBoTrainer", "StepTimer", "train", "export_teacher",
           "LOG_KEYS", "TIME_SPLITS", "LOG_NAME", "clip_gradients_", "ema_update_"]

LOG_NAME = "log.jsonl"
TIME_SPLITS = ("data", "forward", "clustering", "nn_bank", "object_proj", "backward_ema")
#: Every row of OUT/log.jsonl has exactly these keys (0 for a term that is not active yet).
LOG_KEYS = ("step", "epoch", "loss", "loss_global", "loss_object", "loss_cross_image", "bootstrap_ratio",
            "kept_clusters", "lr", "wd", "momentum", "teacher_temp",
            *(f"time_{s}" for s in TIME_SPLITS), "time_step", "peak_mem_mb")
_BANK_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------
class StepTimer:
    """Accumulates wall time per named section; ``mean()`` gives seconds per step since ``reset()``.

    On CUDA, entering and leaving a section synchronises the device (a CPU-GPU sync point), so the
    time of asynchronous kernels lands in the section that launched them.
    """

    def __init__(self, device: torch.device, sections: tuple[str, ...] = TIME_SPLITS):
        self.device, self.sections = torch.device(device), sections
        self.reset()

    def reset(self) -> None:
        self.totals: dict[str, float] = defaultdict(float)
        self.steps = 0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        if name not in self.sections:
            raise KeyError(f"StepTimer: unknown section {name!r}; known: {self.sections}")
        self._sync()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._sync()
            self.totals[name] += time.perf_counter() - t0

    def end_step(self) -> None:
        self.steps += 1

    def mean(self) -> dict[str, float]:
        n = max(self.steps, 1)
        return {name: self.totals[name] / n for name in self.sections}


def _section(timer: StepTimer | None, name: str) -> contextlib.AbstractContextManager:
    return timer.section(name) if timer is not None else contextlib.nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA ``max_memory_allocated`` or, on CPU, the resident-set peak."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


# ---------------------------------------------------------------------------------------------------
# Networks
# ---------------------------------------------------------------------------------------------------
class CrIBoNet(nn.Module):
    """Backbone + DINO head (shared MLP, global and object last layers): the student or the teacher.

    State dict keys: ``backbone.*`` (timm ViT names) and ``head.*``, as the reference's teacher.
    """

    def __init__(self, backbone: nn.Module, head: DINOHead, num_clusters: int):
        super().__init__()
        self.backbone, self.head, self.num_clusters = backbone, head, num_clusters

    def encode(self, views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """views (V, 3, S, S) -> [CLS] (V, D) and patch tokens (V, N, D), after the final norm."""
        x = self.backbone.forward_features(views)
        return x[:, 0], x[:, self.backbone.num_prefix_tokens:]

    def objects(self, patches: torch.Tensor, assign: torch.Tensor) -> torch.Tensor:
        """Object vectors c^k (Eq. 1): patches (V, N, D), assign (V, N) -> (V, K, D)."""
        return object_representations(patches, assign, self.num_clusters)

    def forward(self, views: torch.Tensor, assign: torch.Tensor,
                timer: StepTimer | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's whole pass (one call, so DDP sees it): views (2B, 3, S, S) stacked view 1 then
        view 2; assign (2B, N) the teacher's clusters of the same views.

        Returns global logits (2B, L) and object logits (2B, K, L) (rows of empty clusters are junk
        and are masked by the losses).
        """
        with _section(timer, "forward"):
            cls, patches = self.encode(views)
            global_logits = self.head.forward_global(cls)
        with _section(timer, "object_proj"):
            object_logits = self.head.forward_object(self.objects(patches, assign))
        return global_logits, object_logits


def build_network(config: TrainConfig, *, drop_path: float) -> CrIBoNet:
    """A ``CrIBoNet`` for ``config.arch`` (random init from the global torch RNG)."""
    vit = create_vit(config.arch, drop_path_rate=drop_path)
    head = DINOHead(vit.embed_dim, config.out_dim, hidden_dim=config.head_hidden_dim,
                    bottleneck_dim=config.head_bottleneck_dim, norm_last_layer=config.norm_last_layer)
    return CrIBoNet(vit, head, config.num_clusters)


def arch_patch_size(arch: str) -> int:
    if arch not in ARCHS:
        raise ValueError(f"--arch {arch!r} is not supported; choose one of {', '.join(ARCHS)}")
    return ARCHS[arch].patch_size


# ---------------------------------------------------------------------------------------------------
# Optimisation helpers
# ---------------------------------------------------------------------------------------------------
def param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """DINO's groups: weight decay on weights; none on biases and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [{"params": decay, "apply_wd": True}, {"params": no_decay, "apply_wd": False, "weight_decay": 0.0}]


@torch.no_grad()
def clip_gradients_(params: list[nn.Parameter], clip: float) -> torch.Tensor:
    """Clip every parameter's gradient to norm ``clip`` separately (DINO's ``clip_gradients``):
    ``g <- g * min(1, clip / (||g|| + 1e-6))``. Returns the norms before clipping (one per gradient)."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads))
    coefs = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefs.unbind()))
    return norms


@torch.no_grad()
def ema_update_(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    t = list(teacher.parameters())
    s = [p.detach() for p in student.parameters()]
    if len(t) != len(s):
        raise ValueError(f"ema_update_: teacher has {len(t)} parameters, student {len(s)}")
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


@dataclasses.dataclass(frozen=True)
class Schedules:
    """Per-step values, index with the 0-based iteration ``it``."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray

    @classmethod
    def from_config(cls, c: TrainConfig, global_batch: int) -> "Schedules":
        return cls(
            lr=cosine_schedule(c.lr * global_batch / 256.0, c.min_lr, c.max_steps, warmup_steps=c.warmup_steps),
            wd=cosine_schedule(c.weight_decay, c.weight_decay_end, c.max_steps),
            momentum=cosine_schedule(c.momentum_teacher, 1.0, c.max_steps),
            teacher_temp=teacher_temp_schedule(c.warmup_teacher_temp, c.teacher_temp,
                                               c.teacher_temp_warmup_steps, c.max_steps),
        )


# ---------------------------------------------------------------------------------------------------
# The trainer: networks, optimiser, losses, bank, and one step
# ---------------------------------------------------------------------------------------------------
class CrIBoTrainer:
    """Holds every piece of training state and performs steps; ``state_dict`` / ``load_state_dict``
    cover all of it except the RNG states (see :func:`train`).

    Args:
        config: a resolved ``TrainConfig`` (``config.resolved(epoch_steps)``).
        device: where everything lives.
        world_size: processes; the global batch is ``config.batch_size * world_size``.
        ddp: wrap the student in DistributedDataParallel (needs an initialised process group).
    """

    def __init__(self, config: TrainConfig, device: torch.device, world_size: int = 1, ddp: bool = False):
        if not config.is_resolved:
            raise ValueError("CrIBoTrainer: resolve the config first (config.resolved(epoch_steps))")
        if config.precision == "auto":
            raise ValueError("CrIBoTrainer: resolve precision 'auto' first (cribo.precision.resolve_precision)")
        if config.precision == "fp16" and torch.device(device).type != "cuda":
            raise ValueError("precision 'fp16' needs a CUDA device (it uses a gradient scaler); "
                             "use --precision bf16 or fp32 on CPU")
        self.config, self.device = config, torch.device(device)
        self.global_batch = config.batch_size * world_size
        self.student = build_network(config, drop_path=config.drop_path).to(self.device)
        self.teacher = build_network(config, drop_path=0.0).to(self.device)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.teacher.train(False)
        self.patch_size = arch_patch_size(config.arch)
        if config.img_size % self.patch_size:
            raise ValueError(f"--img-size {config.img_size} is not a multiple of the patch size "
                             f"{self.patch_size} of {config.arch}")
        self.num_patches = (config.img_size // self.patch_size) ** 2
        if not 1 <= config.num_clusters <= 2 * self.num_patches:
            raise ValueError(f"-K {config.num_clusters} must be in [1, 2N] = [1, {2 * self.num_patches}] "
                             f"for {self.num_patches} patches per view")
        self.student_ddp: nn.Module = self.student
        if ddp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.student_ddp = DistributedDataParallel(self.student, device_ids=ids)
        self.optimizer = torch.optim.AdamW(param_groups(self.student))
        self.scaler = torch.amp.GradScaler("cuda") if config.precision == "fp16" else None
        self.dino_loss = DINOLoss(config.out_dim, config.student_temp, config.center_momentum).to(self.device)
        self.object_loss = ObjectLoss(config.out_dim, config.student_temp, config.center_momentum).to(self.device)
        self.bank = ObjectMemoryBank(config.bank_images, config.num_clusters, self.student.backbone.embed_dim,
                                     dtype=_BANK_DTYPES[config.bank_dtype], device=self.device)
        self.schedules = Schedules.from_config(config, self.global_batch)
        self.cluster_generator = torch.Generator(device=self.device)
        self.timer = StepTimer(self.device)

    # -- precision -------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.config.precision == "bf16" else torch.float16
        return torch.autocast(self.device.type, dtype=dtype)

    def ci_active(self, it: int) -> bool:
        return self.config.use_cross_image and it >= self.config.ci_start_step

    # -- one step ----------------------------------------------------------------------------------
    def forward(self, batch: list[torch.Tensor] | tuple[torch.Tensor, ...], it: int) -> dict[str, torch.Tensor]:
        """Teacher, clustering, bank, student and the three losses for iteration ``it`` (0-based).

        Args:
            batch: (view1 (B,3,S,S), view2 (B,3,S,S), coords1 (B,N,2), coords2 (B,N,2)).

        Returns a dict of scalar tensors: ``loss`` (with graph), ``loss_global``, ``loss_object``,
        ``loss_cross_image``, ``bootstrap_ratio``, ``kept_clusters`` (detached). Pushes this step's
        teacher objects into the banks (after the query) and updates the loss centres.
        """
        c, timer, K = self.config, self.timer, self.config.num_clusters
        v1, v2, pos1, pos2 = (t.to(self.device, non_blocking=True) for t in batch)
        B, N = v1.shape[0], pos1.shape[1]
        if N != self.num_patches:
            raise ValueError(f"batch coordinates have {N} patches per view, the network makes {self.num_patches}")
        views = torch.cat([v1, v2])  # (2B, 3, S, S): view 1 of every image, then view 2
        temp = float(self.schedules.teacher_temp[it])
        ci = self.ci_active(it)

        with torch.no_grad():
            with _section(timer, "forward"), self.autocast():
                t_cls, t_patches = self.teacher.encode(views)  # (2B, D), (2B, N, D)
                t_global = self.teacher.head.forward_global(t_cls)  # (2B, L)
            with _section(timer, "clustering"):
                assign = joint_space_clustering(t_patches[:B], t_patches[B:], pos1, pos2, K, c.lambda_pos,
                                                n_outer=c.n_outer, n_sinkhorn=c.n_sinkhorn,
                                                generator=self.cluster_generator, mode=c.clustering)  # (B, 2N)
                a1, a2 = split_views(assign, N)
                valid = valid_objects(a1, a2, K)  # (B, K)
                assign_views = torch.cat([a1, a2])  # (2B, N), rows aligned with `views`
            with _section(timer, "object_proj"):
                t_obj = self.teacher.objects(t_patches.float(), assign_views)  # (2B, K, D) fp32
                with self.autocast():
                    t_obj_logits = self.teacher.head.forward_object(t_obj)  # (2B, K, L)
            with _section(timer, "nn_bank"):
                query = self.bank.query(t_obj[:B], t_obj[B:], valid) if ci else None
                self.bank.push(dist.all_gather_cat(t_obj[:B]), dist.all_gather_cat(t_obj[B:]),
                               dist.all_gather_cat(valid))
            if query is not None:
                with _section(timer, "object_proj"), self.autocast():
                    nn_logits = self.teacher.head.forward_object(torch.cat([query.nn1, query.nn2]))  # (2B, K, L)

        with self.autocast():
            s_global, s_obj_logits = self.student_ddp(views, assign_views, timer=timer)

        with _section(timer, "forward"):
            loss_global = self.dino_loss(s_global[:B], s_global[B:], t_global[:B], t_global[B:], temp)
            loss_object = self.object_loss(s_obj_logits[:B], s_obj_logits[B:], t_obj_logits[:B],
                                           t_obj_logits[B:], valid, temp)
            zero = torch.zeros((), device=self.device)
            loss_ci, ratio = zero, zero
            if query is not None:
                ci_out = cross_image_loss(s_obj_logits[:B], s_obj_logits[B:], nn_logits[:B], nn_logits[B:],
                                          query.ok1, query.ok2, temp, self.object_loss.center, c.student_temp,
                                          normalisation=c.ci_normalisation)
                loss_ci = ci_out.loss
                ratio = (ci_out.z1 + ci_out.z2).float() / (2 * K * B)
            loss = loss_global + loss_object + loss_ci  # Eq. 11
            # Centres follow the teacher outputs of this step, after they were used (DINO's order).
            self.dino_loss.update_center(t_global[:B], t_global[B:])
            self.object_loss.update_center(t_obj_logits[:B], t_obj_logits[B:], valid)
        return {"loss": loss, "loss_global": loss_global.detach(), "loss_object": loss_object.detach(),
                "loss_cross_image": loss_ci.detach(), "bootstrap_ratio": ratio,
                "kept_clusters": valid.sum(dim=1).float().mean()}

    def backward_and_update(self, loss: torch.Tensor, it: int) -> None:
        """Backward, per-parameter clipping, frozen last layers, AdamW step, teacher EMA."""
        c = self.config
        with _section(self.timer, "backward_ema"):
            for group in self.optimizer.param_groups:
                group["lr"] = float(self.schedules.lr[it])
                if group["apply_wd"]:
                    group["weight_decay"] = float(self.schedules.wd[it])
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.scale(loss).backward()
                self.scaler.unscale_(self.optimizer)
            else:
                loss.backward()
            if c.clip_grad > 0:
                clip_gradients_(list(self.student.parameters()), c.clip_grad)
            if it < c.freeze_last_layer_steps:
                self.student.head.cancel_last_layer_gradients()
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            ema_update_(self.teacher, self.student, float(self.schedules.momentum[it]))

    def step(self, batch: list[torch.Tensor], it: int) -> dict[str, torch.Tensor]:
        """One full optimisation step; returns the (detached) statistics of :meth:`forward`."""
        out = self.forward(batch, it)
        if not torch.isfinite(out["loss"]):  # a sync point; DINO stops on a non-finite loss too
            raise FloatingPointError(
                f"loss is {out['loss'].item()} at step {it + 1} (global {out['loss_global'].item():.4g}, "
                f"object {out['loss_object'].item():.4g}, cross-image {out['loss_cross_image'].item():.4g}); "
                "lower --lr, raise --clip-grad strictness, or use --precision fp32/bf16")
        self.backward_and_update(out["loss"], it)
        out["loss"] = out["loss"].detach()
        return out

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "dino_loss": self.dino_loss.state_dict(), "object_loss": self.object_loss.state_dict(),
                "bank": self.bank.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Strict everywhere: any missing or unexpected entry raises."""
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.optimizer.load_state_dict(state["optimizer"])
        if (self.scaler is None) != (not state["scaler"]):
            raise CheckpointError("the checkpoint's gradient-scaler state does not match --precision")
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.dino_loss.load_state_dict(state["dino_loss"])
        self.object_loss.load_state_dict(state["object_loss"])
        self.bank.load_state_dict(state["bank"])


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
    """The pretraining dataset of ``config.data`` with the two-view transform (cribo.data)."""

    view1_aug, view2_aug = AUGMENTATIONS[config.augment]
    transform = TwoViewTransform(config.img_size, scale=tuple(config.crop_scale), patch_size=patch_size,
                                 view1_aug=view1_aug, view2_aug=view2_aug)
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
    lines = path.read_text().splitlines()
    kept = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if n == len(lines) - 1:
                break
            raise CheckpointError(f"{path}: line {n + 1} is not JSON ({e}); fix or delete the log") from e
        if row["step"] <= step:
            kept.append(line)
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


def _run(config: TrainConfig, rank: int, world: int, device: torch.device,
         crash_at_step: int | None) -> dict[str, Any]:
    out_dir = Path(config.output_dir)
    if not config.output_dir:
        raise ValueError("TrainConfig.output_dir is empty: pass --output-dir OUT")
    ckpt_path, log_path = out_dir / CHECKPOINT_NAME, out_dir / LOG_NAME
    is_main = rank == 0

    _seed_everything(config.seed)
    dataset = build_dataset(config, arch_patch_size(config.arch))
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

    start, resumed_from = 0, None
    if is_main:
        remove_stale_checkpoint_temps(ckpt_path)  # left by a run killed mid-save
    if has_checkpoint(ckpt_path):
        state, resumed_from = load_latest(ckpt_path)  # checkpoint.pth, or its predecessor if damaged
        check_identity(state, identity, config.identity_diff(state["config"]), resumed_from)
        trainer.load_state_dict(state)
        if len(state["rng"]) != world:
            raise CheckpointError(f"{ckpt_path} holds RNG states of {len(state['rng'])} processes, this run has {world}")
        restore_rng(state["rng"][rank], device, trainer.cluster_generator)
        start = int(state["step"])
        del state
        if is_main:
            print(f"resuming from {resumed_from} (step {start})", file=sys.stderr)
    if is_main:
        truncate_log(log_path, start)
        write_json(out_dir / "config.json", {"identity": identity, "world_size": world, "dataset_len": len(dataset),
                                             "epoch_steps": epoch_steps, "global_batch": global_batch,
                                             "config": config.to_dict()})
    dist.barrier()

    summary = {"output_dir": str(out_dir), "identity": identity, "start_step": start, "epoch_steps": epoch_steps,
               "max_steps": config.max_steps, "resumed_from": None if resumed_from is None else str(resumed_from)}
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
    timer = trainer.timer
    timer.reset()
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
                stats = trainer.step(batch, it)
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
