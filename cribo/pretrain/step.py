"""One CrIBo training step (section 3.2, appendix A.1): DINO-style self-distillation with objects.

Every tensor of the step carries the views on a leading axis of 2 (view 1, view 2): images
``(2, B, 3, S, S)``, coordinates ``(2, B, N, 2)``, tokens ``(2, B, N, D)``, assignments ``(2, B, N)``,
objects ``(2, B, K, D)``, logits ``(2, B, L)`` / ``(2, B, K, L)``. The networks see the views on the
batch axis (``flatten(0, 1)``, a free view) and their outputs are unflattened back.

    teacher (EMA, no grad):  views -> x_norm_clstoken (2, B, D), x_norm_patchtokens (2, B, N, D)
                              -> teacher_objects: joint-space clustering (fp32) -> assign (2, B, N),
                                 valid (B, K), objects c_t (2, B, K, D)                     Eq. 1
                              -> bank query nn(c_t) + cycle consistency, BEFORE the push   Eq. 2-4
                              -> push all-gathered c_t into the FIFO banks
                              -> head: global (2, B, L), objects (2, B, K, L), neighbours (2, B, K, L)
    student (DDP, grad):     views -> tokens -> objects from the TEACHER's assignment -> head
    loss (fp32):             L_cv^g + L_cv^o + L_ci^o (L_ci^o from ``ci_start_step`` on)    Eq. 11
    update:                  backward -> per-parameter clipping -> last layers frozen early ->
                             AdamW with lr / weight-decay schedules -> teacher EMA with the momentum
                             schedule.

The loop (:mod:`cribo.pretrain.loop`) owns the timer and passes it to :meth:`CrIBoTrainer.step`.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cribo import dist
from cribo.backbones import create_vit, named_outputs, registered_arch
from cribo.precision import DTYPES, autocast
from cribo.pretrain.bank import ObjectMemoryBank
from cribo.pretrain.checkpoint import CheckpointError
from cribo.pretrain.clustering import joint_space_clustering, object_representations, split_views, valid_objects
from cribo.pretrain.config import TrainConfig
from cribo.pretrain.heads import DINOHead
from cribo.pretrain.losses import DINOLoss, ObjectLoss, cross_image_loss
from cribo.pretrain.schedules import cosine_schedule, teacher_temp_schedule
from cribo.pretrain.timing import StepTimer, section

__all__ = ["CrIBoNet", "CrIBoTrainer", "Schedules", "TeacherObjects", "teacher_objects", "build_network",
           "param_groups", "clip_gradients_", "ema_update_"]


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
        """views (2, B, 3, S, S) -> x_norm_clstoken (2, B, D) and x_norm_patchtokens (2, B, N, D)."""
        out = named_outputs(self.backbone, views.flatten(0, 1))
        return out["x_norm_clstoken"].unflatten(0, views.shape[:2]), out["x_norm_patchtokens"].unflatten(0, views.shape[:2])

    def global_logits(self, cls: torch.Tensor) -> torch.Tensor:
        """cls (2, B, D) -> global logits (2, B, L)."""
        return self.head.forward_global(cls.flatten(0, 1)).unflatten(0, cls.shape[:2])

    def object_logits(self, objects: torch.Tensor) -> torch.Tensor:
        """objects (2, B, K, D) -> object logits (2, B, K, L)."""
        return self.head.forward_object(objects.flatten(0, 1)).unflatten(0, objects.shape[:2])

    def forward(self, views: torch.Tensor, assign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's whole pass (one call, so DDP sees it): views (2, B, 3, S, S); assign (2, B, N)
        the teacher's clusters of the same views.

        Returns global logits (2, B, L) and object logits (2, B, K, L) (rows of empty clusters are junk
        and are masked by the losses).
        """
        cls, patches = self.encode(views)
        objects = pool_objects(patches, assign, self.num_clusters)
        return self.global_logits(cls), self.object_logits(objects)


def pool_objects(patches: torch.Tensor, assign: torch.Tensor, K: int) -> torch.Tensor:
    """Object vectors c^k (Eq. 1): patches (2, B, N, D), assign (2, B, N) -> (2, B, K, D)."""
    return object_representations(patches.flatten(0, 1), assign.flatten(0, 1), K).unflatten(0, patches.shape[:2])


def build_network(config: TrainConfig, *, drop_path: float) -> CrIBoNet:
    """A ``CrIBoNet`` for ``config.arch`` (random init from the global torch RNG)."""
    vit = create_vit(config.arch, drop_path_rate=drop_path)
    head = DINOHead(vit.embed_dim, config.out_dim, hidden_dim=config.head_hidden_dim,
                    bottleneck_dim=config.head_bottleneck_dim, norm_last_layer=config.norm_last_layer)
    return CrIBoNet(vit, head, config.num_clusters)


# ---------------------------------------------------------------------------------------------------
# The teacher's objects: shared by the step and the app's Clusters / Matches tabs
# ---------------------------------------------------------------------------------------------------
class TeacherObjects(NamedTuple):
    """assign (2, B, N) long in [0, K); valid (B, K) bool, cluster present in both views; objects
    (2, B, K, D) fp32 mean of the member tokens (zero rows for absent clusters)."""

    assign: torch.Tensor
    valid: torch.Tensor
    objects: torch.Tensor


@torch.no_grad()
def teacher_objects(patches: torch.Tensor, coords: torch.Tensor, K: int, lambda_pos: float, *,
                    n_outer: int = 5, n_sinkhorn: int = 5, generator: torch.Generator | None = None,
                    mode: str = "paper", describe: torch.Tensor | None = None) -> TeacherObjects:
    """Joint-space clustering of both views' patch tokens and the objects it defines (Sec. 3.2.1).

    Args:
        patches: (2, B, N, D) teacher patch tokens (``x_norm_patchtokens``) of view 1 and view 2.
        coords: (2, B, N, 2) patch centres in original-image pixels.
        describe: (2, B, N, D) tokens the objects are pooled from (``--teacher-targets student-views``:
            the teacher's tokens of the student's views); None: ``patches``, which were clustered.
    """
    N = patches.shape[2]
    joint = joint_space_clustering(patches[0], patches[1], coords[0], coords[1], K, lambda_pos, n_outer=n_outer,
                                   n_sinkhorn=n_sinkhorn, generator=generator, mode=mode)  # (B, 2N)
    a1, a2 = split_views(joint, N)  # (B, N) each
    assign = joint.unflatten(1, (2, N)).transpose(0, 1)  # (2, B, N): the views to the leading axis
    pooled = patches if describe is None else describe
    return TeacherObjects(assign, valid_objects(a1, a2, K), pool_objects(pooled.float(), assign, K))


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
    cover all of it except the RNG states (see :func:`cribo.pretrain.loop.train`).

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
        self.patch_size = registered_arch(config.arch).patch_size
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
                                     dtype=DTYPES[config.bank_dtype], device=self.device)
        self.schedules = Schedules.from_config(config, self.global_batch)
        self.cluster_generator = torch.Generator(device=self.device)

    def autocast(self) -> Any:
        return autocast(self.config.precision, self.device)

    def ci_active(self, it: int) -> bool:
        return self.config.use_cross_image and it >= self.config.ci_start_step

    # -- one step ----------------------------------------------------------------------------------
    def step(self, batch: list[torch.Tensor], it: int, timer: StepTimer | None = None) -> dict[str, torch.Tensor]:
        """One full optimisation step: :meth:`forward` then :meth:`update`; returns the (detached)
        statistics of :meth:`forward`."""
        out = self.forward(batch, it, timer)
        if not torch.isfinite(out["loss"]):  # a sync point; DINO stops on a non-finite loss too
            raise FloatingPointError(
                f"loss is {out['loss'].item()} at step {it + 1} (global {out['loss_global'].item():.4g}, "
                f"object {out['loss_object'].item():.4g}, cross-image {out['loss_cross_image'].item():.4g}); "
                "lower --lr, raise --clip-grad strictness, or use --precision fp32/bf16")
        with section(timer, "backward_ema"):
            self.update(out["loss"], it)
        out["loss"] = out["loss"].detach()
        return out

    def forward(self, batch: list[torch.Tensor] | tuple[torch.Tensor, ...], it: int,
                timer: StepTimer | None = None) -> dict[str, torch.Tensor]:
        """Teacher, clustering, bank, student and the three losses for iteration ``it`` (0-based).

        Args:
            batch: (view1 (B,3,S,S), view2 (B,3,S,S), coords1 (B,N,2), coords2 (B,N,2)), optionally
                followed by the student's versions of the two views (B,3,S,S) each
                (``--student-augment``: same crops, other photometric changes); without them the
                student sees the teacher's views, as in CrIBo.

        Returns a dict of scalar tensors: ``loss`` (with graph), ``loss_global``, ``loss_object``,
        ``loss_cross_image``, ``bootstrap_ratio``, ``kept_clusters`` (detached). Pushes this step's
        teacher objects into the banks (after the query) and updates the loss centres.
        """
        c, K = self.config, self.config.num_clusters
        if len(batch) not in (4, 6):
            raise ValueError(f"a batch holds 4 tensors (views, coordinates) or 6 (plus the student's views), got {len(batch)}")
        v1, v2, pos1, pos2, *student_views = (t.to(self.device, non_blocking=True) for t in batch)
        views, coords = torch.stack([v1, v2]), torch.stack([pos1, pos2])  # (2, B, 3, S, S), (2, B, N, 2)
        s_views = torch.stack(student_views) if student_views else views  # (2, B, 3, S, S)
        B, N = coords.shape[1:3]
        if N != self.num_patches:
            raise ValueError(f"batch coordinates have {N} patches per view, the network makes {self.num_patches}")
        temp = float(self.schedules.teacher_temp[it])

        with torch.no_grad():
            with section(timer, "forward"), self.autocast():
                t_cls, t_patches = self.teacher.encode(views)  # (2, B, D), (2, B, N, D)
                t_target_patches = None
                if c.teacher_targets == "student-views" and student_views:  # clustered on the teacher's views,
                    t_cls, t_target_patches = self.teacher.encode(s_views)  # described from the student's
                t_global = self.teacher.global_logits(t_cls)  # (2, B, L)
            with section(timer, "clustering"):
                assign, valid, t_obj = teacher_objects(t_patches, coords, K, c.lambda_pos, n_outer=c.n_outer,
                                                       n_sinkhorn=c.n_sinkhorn, generator=self.cluster_generator,
                                                       mode=c.clustering, describe=t_target_patches)
                # assign (2, B, N), valid (B, K), t_obj (2, B, K, D)
            with section(timer, "object_proj"), self.autocast():
                t_obj_logits = self.teacher.object_logits(t_obj)  # (2, B, K, L)
            with section(timer, "nn_bank"):
                query = self.bank.query(t_obj[0], t_obj[1], valid) if self.ci_active(it) else None
                self.bank.push(dist.all_gather_cat(t_obj[0]), dist.all_gather_cat(t_obj[1]),
                               dist.all_gather_cat(valid))
            if query is not None:
                with section(timer, "object_proj"), self.autocast():
                    nn_logits = self.teacher.object_logits(torch.stack([query.nn1, query.nn2]))  # (2, B, K, L)

        with section(timer, "forward"):
            with self.autocast():
                s_global, s_obj_logits = self.student_ddp(s_views, assign)  # (2, B, L), (2, B, K, L)
            loss_global = self.dino_loss(*s_global, *t_global, temp)
            loss_object = self.object_loss(*s_obj_logits, *t_obj_logits, valid, temp)
            loss_ci = ratio = torch.zeros((), device=self.device)
            if query is not None:
                ci_out = cross_image_loss(*s_obj_logits, *nn_logits, query.ok1, query.ok2, temp,
                                          self.object_loss.center, c.student_temp, normalisation=c.ci_normalisation)
                loss_ci = ci_out.loss
                ratio = (ci_out.z1 + ci_out.z2).float() / (2 * K * B)
            loss = loss_global + loss_object + loss_ci  # Eq. 11
            # Centres follow the teacher outputs of this step, after they were used (DINO's order).
            self.dino_loss.update_center(*t_global)
            self.object_loss.update_center(*t_obj_logits, valid)
        return {"loss": loss, "loss_global": loss_global.detach(), "loss_object": loss_object.detach(),
                "loss_cross_image": loss_ci.detach(), "bootstrap_ratio": ratio,
                "kept_clusters": valid.sum(dim=1).float().mean()}

    def update(self, loss: torch.Tensor, it: int) -> None:
        """Backward, per-parameter clipping, frozen last layers, AdamW step, teacher EMA."""
        c = self.config
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

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                "dino_loss": self.dino_loss.state_dict(), "object_loss": self.object_loss.state_dict(),
                "bank": self.bank.state_dict()}

    def load_networks(self, state: dict[str, Any]) -> None:
        """Student, teacher and the two loss centres of a checkpoint (``--init-from``), strict; the
        optimiser, gradient scaler and memory bank keep their fresh state."""
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
        self.dino_loss.load_state_dict(state["dino_loss"])
        self.object_loss.load_state_dict(state["object_loss"])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Strict everywhere: any missing or unexpected entry raises."""
        self.load_networks(state)
        self.optimizer.load_state_dict(state["optimizer"])
        if (self.scaler is None) != (not state["scaler"]):
            raise CheckpointError("the checkpoint's gradient-scaler state does not match --precision")
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.bank.load_state_dict(state["bank"])
