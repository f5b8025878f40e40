"""CrIBo's three self-distillation losses (section 3.2.3), computed in fp32.

Notation: L prototypes, B images, K object slots per image. Teacher distributions are
``softmax((t - center) / teacher_temp)`` (DINO centring + sharpening, no gradient); student
log-distributions are ``log_softmax(s / student_temp)``; ``H(a, b) = -sum_l a_l log b_l``.

Normalisation (a choice, stated against the paper). The paper writes every term as a SUM of its
two symmetric cross-entropies (Eq. 6, 8, 10). DINO's 2-crop loss, and the authors' code for all three
terms, AVERAGE them (divide by 2). We divide all three terms by 2, so
``L_tot = L_cv^g + L_cv^o + L_ci^o`` equals the paper's Eq. 11 / 2 with the authors' relative weights
between the terms; the global factor 1/2 does not change the optimum (it halves the gradients, which
matters only against the clipping threshold, and matches the authors' code). Within each term:

* ``DINOLoss`` (L_cv^g, Eq. 10): ``(mean_b H(p1_t, p2_s) + mean_b H(p2_t, p1_s)) / 2``.
* ``ObjectLoss`` (L_cv^o, Eq. 6): the paper's 1/K becomes the mean over the VALID objects of the local
  batch (clusters present in both views), ``(sum_valid H(p1_t^k, p2_s^k) + H(p2_t^k, p1_s^k)) / (2 n_valid)``.
* ``cross_image_loss`` (L_ci^o, Eq. 8): each direction normalised by ITS OWN count of cycle-consistent
  pairs over the local batch, Z1 and Z2, as in the paper; a direction with Z = 0 contributes 0
  (``normalisation="paper"``, the default). The authors' code divides the second sum by Z1 as well
  and drops both when Z1 = 0 (main_cribo.py:602-611): ``normalisation="reference"`` reproduces it
  (``--ci-normalisation``; docs/fidelity.md gives the size of the difference).
  The retrieved-neighbour targets are centred with the OBJECT centre (as the authors' code does), and
  they do not update it: the object centre follows the cross-view teacher object outputs only.

Counts (n_valid, Z1, Z2) are those of the local batch of each process; DDP then averages the gradients
over processes, as in the authors' code. Inputs may be bf16/fp16 (autocast): they are cast to fp32.

Centres are EMA buffers (momentum 0.9) updated by an explicit ``update_center`` call after the loss,
with the mean over all ranks (one all_reduce of [sum, count]: a sync point on CUDA).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cribo import dist

#: ``cross_image_loss(normalisation=...)``: each direction by its own count (paper Eq. 8), or both by
#: Z1 and 0 when Z1 = 0 (the authors' code).
CI_NORMALISATIONS = ("paper", "reference")


def _teacher_probs(t: torch.Tensor, center: torch.Tensor, teacher_temp: float) -> torch.Tensor:
    """softmax((t - center) / teacher_temp) in fp32, detached. t (.., L), center (1, L)."""
    if teacher_temp <= 0:
        raise ValueError(f"teacher_temp must be > 0, got {teacher_temp}")
    return F.softmax((t.detach().float() - center.float()) / teacher_temp, dim=-1)


def _student_logprobs(s: torch.Tensor, student_temp: float) -> torch.Tensor:
    """log_softmax(s / student_temp) in fp32. s (.., L)."""
    if student_temp <= 0:
        raise ValueError(f"student_temp must be > 0, got {student_temp}")
    return F.log_softmax(s.float() / student_temp, dim=-1)


def _cross_entropy(p_t: torch.Tensor, logp_s: torch.Tensor) -> torch.Tensor:
    """H(p_t, p_s) = -sum_l p_t log p_s, over the last dim: (.., L) x (.., L) -> (..)."""
    return -(p_t * logp_s).sum(dim=-1)


def _check_same_shape(where: str, **tensors: torch.Tensor) -> torch.Size:
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"{where}: inputs must share one shape, got {shapes}")
    return next(iter(tensors.values())).shape


class _CenteredLoss(nn.Module):
    """Holds a (1, L) centre buffer and its EMA update from a (globally) averaged batch."""

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9):
        super().__init__()
        if out_dim <= 0:
            raise ValueError(f"{type(self).__name__}: out_dim must be > 0, got {out_dim}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"{type(self).__name__}: center_momentum must be in [0, 1], got {center_momentum}")
        if student_temp <= 0:
            raise ValueError(f"{type(self).__name__}: student_temp must be > 0, got {student_temp}")
        self.out_dim = out_dim
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def _ema_center(self, rows: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * mean(rows over all ranks). rows (n, L); no-op if none anywhere."""
        rows = rows.detach().float()
        if rows.shape[-1] != self.out_dim:
            raise ValueError(f"{type(self).__name__}.update_center: last dim {rows.shape[-1]} "
                             f"!= out_dim {self.out_dim}")
        stats = torch.cat([rows.sum(dim=0), rows.new_tensor([rows.shape[0]])])  # [sum (L), count]
        stats = dist.all_reduce_sum(stats)
        count = stats[-1]
        batch_center = (stats[:-1] / count.clamp_min(1.0)).unsqueeze(0)
        m = self.center_momentum
        # count == 0 on every rank (no valid object anywhere): keep the centre as is.
        new = self.center * m + batch_center * (1.0 - m)
        self.center.copy_(torch.where(count > 0, new, self.center))


class DINOLoss(_CenteredLoss):
    """Global cross-view loss L_cv^g (Eq. 10, averaged over the two directions) with DINO centring.

    Args:
        out_dim: L.
        student_temp: tau_s (0.1).
        center_momentum: EMA momentum of the centre (0.9).
    """

    def forward(self, s1: torch.Tensor, s2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor,
                teacher_temp: float) -> torch.Tensor:
        """Loss for student logits s1, s2 and teacher logits t1, t2 of views 1, 2, each (B, L).

        Returns ``(mean_b H(p1_t, p2_s) + mean_b H(p2_t, p1_s)) / 2`` (fp32 scalar). Does not touch the
        centre: call ``update_center(t1, t2)`` afterwards.
        """
        _check_same_shape("DINOLoss", s1=s1, s2=s2, t1=t1, t2=t2)
        if s1.dim() != 2 or s1.shape[1] != self.out_dim:
            raise ValueError(f"DINOLoss: inputs must be (B, {self.out_dim}), got {tuple(s1.shape)}")
        p1, p2 = (_teacher_probs(t, self.center, teacher_temp) for t in (t1, t2))
        l1, l2 = (_student_logprobs(s, self.student_temp) for s in (s1, s2))
        return 0.5 * (_cross_entropy(p1, l2).mean() + _cross_entropy(p2, l1).mean())

    @torch.no_grad()
    def update_center(self, t1: torch.Tensor, t2: torch.Tensor) -> None:
        """EMA of the centre with the mean teacher output of both views over all ranks. t1, t2 (B, L)."""
        self._ema_center(torch.cat([t1, t2]))


class ObjectLoss(_CenteredLoss):
    """Cross-view object loss L_cv^o (Eq. 6): matched objects c_1^k <-> c_2^k, valid ones only.

    Args:
        out_dim: L.
        student_temp: tau_s (0.1).
        center_momentum: EMA momentum of the object centre (0.9).
    """

    def forward(self, s1: torch.Tensor, s2: torch.Tensor, t1: torch.Tensor, t2: torch.Tensor,
                valid: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Loss for object logits s1, s2 (student), t1, t2 (teacher), each (B, K, L); valid (B, K) bool.

        Returns ``sum_valid (H(p1_t^k, p2_s^k) + H(p2_t^k, p1_s^k)) / (2 n_valid)``; 0 (still attached to
        the graph) when no object is valid. Entries at invalid slots are never read, so they may hold
        anything (even NaN).
        """
        shape = _check_same_shape("ObjectLoss", s1=s1, s2=s2, t1=t1, t2=t2)
        if len(shape) != 3 or shape[2] != self.out_dim:
            raise ValueError(f"ObjectLoss: inputs must be (B, K, {self.out_dim}), got {tuple(shape)}")
        if valid.shape != shape[:2] or valid.dtype != torch.bool:
            raise ValueError(f"ObjectLoss: valid must be a bool tensor of shape {tuple(shape[:2])}, "
                             f"got {valid.dtype} {tuple(valid.shape)}")
        p1, p2 = (_teacher_probs(t[valid], self.center, teacher_temp) for t in (t1, t2))
        l1, l2 = (_student_logprobs(s[valid], self.student_temp) for s in (s1, s2))
        n = p1.shape[0]
        total = _cross_entropy(p1, l2).sum() + _cross_entropy(p2, l1).sum()
        return total / (2 * max(n, 1))

    @torch.no_grad()
    def update_center(self, t1: torch.Tensor, t2: torch.Tensor, valid: torch.Tensor) -> None:
        """EMA of the object centre with the mean teacher output over the valid objects of both views,
        over all ranks. t1, t2 (B, K, L); valid (B, K) bool. Unchanged if no rank has a valid object."""
        if valid.dtype != torch.bool or valid.shape != t1.shape[:2] or t1.shape != t2.shape:
            raise ValueError(f"ObjectLoss.update_center: t1, t2 (B, K, L) and valid (B, K) bool expected, got "
                             f"{tuple(t1.shape)}, {tuple(t2.shape)}, {valid.dtype} {tuple(valid.shape)}")
        self._ema_center(torch.cat([t1[valid], t2[valid]]))


class CrossImageLoss(NamedTuple):
    """Result of ``cross_image_loss``: the fp32 scalar loss and the pair counts (long scalars).

    ``z1 + z2`` over ``2 * K * B`` is the bootstrap ratio. The counts are tensors so that reading them
    (``.item()``, a sync point on CUDA) is the caller's choice.
    """

    loss: torch.Tensor
    z1: torch.Tensor
    z2: torch.Tensor


def cross_image_loss(student_s1: torch.Tensor, student_s2: torch.Tensor, teacher_nn1: torch.Tensor,
                     teacher_nn2: torch.Tensor, ok1: torch.Tensor, ok2: torch.Tensor, teacher_temp: float,
                     center: torch.Tensor, student_temp: float, normalisation: str = "paper") -> CrossImageLoss:
    """Cross-image object loss L_ci^o (Eq. 8), each direction normalised by its own count, / 2.

        L = ( (1/Z1) sum_{b,k: ok1} H(p~_{1,t}^k, p_{2,s}^k) + (1/Z2) sum_{b,k: ok2} H(p~_{2,t}^k, p_{1,s}^k) ) / 2

    ``normalisation="reference"``: ``L = (S1 + S2) / Z1 / 2`` with S1, S2 the two sums above, and 0 when
    Z1 = 0 (the authors' code).

    with ``p~_{i,t}^k = softmax((h_t(nn(c_{i,t}^k)) - center) / teacher_temp)`` (Eq. 7), Z1 = sum ok1 and
    Z2 = sum ok2 over the local batch; a direction with Z = 0 contributes 0. See the module docstring for
    the /2 and the centre.

    Args:
        student_s1, student_s2: student object logits of views 1 and 2, (B, K, L).
        teacher_nn1: teacher object-head logits of nn(c_1^k, M1) (the M1 neighbour), (B, K, L).
        teacher_nn2: teacher object-head logits of nn(c_2^k, M2), (B, K, L).
        ok1, ok2: cycle-consistency masks O(c_1^k), O(c_2^k) (Eq. 4), (B, K) bool. Entries of the logits
            where the mask is False are never read.
        teacher_temp: tau_t.
        center: the object centre, (1, L) (``ObjectLoss.center``).
        student_temp: tau_s.
        normalisation: ``"paper"`` or ``"reference"`` (:data:`CI_NORMALISATIONS`).

    Returns:
        CrossImageLoss(loss, z1, z2).
    """
    if normalisation not in CI_NORMALISATIONS:
        raise ValueError(f"cross_image_loss: normalisation {normalisation!r} is unknown: choose one of "
                         f"{', '.join(CI_NORMALISATIONS)}")
    shape = _check_same_shape("cross_image_loss", student_s1=student_s1, student_s2=student_s2,
                              teacher_nn1=teacher_nn1, teacher_nn2=teacher_nn2)
    if len(shape) != 3:
        raise ValueError(f"cross_image_loss: logits must be (B, K, L), got {tuple(shape)}")
    for name, m in (("ok1", ok1), ("ok2", ok2)):
        if m.dtype != torch.bool or m.shape != shape[:2]:
            raise ValueError(f"cross_image_loss: {name} must be a bool tensor of shape {tuple(shape[:2])}, "
                             f"got {m.dtype} {tuple(m.shape)}")
    if center.shape != (1, shape[2]):
        raise ValueError(f"cross_image_loss: center must be (1, {shape[2]}), got {tuple(center.shape)}")

    def direction_sum(teacher_nn: torch.Tensor, student: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
        p = _teacher_probs(teacher_nn[ok], center, teacher_temp)
        logp = _student_logprobs(student[ok], student_temp)
        return _cross_entropy(p, logp).sum()

    # Direction 1: the M1 neighbour of c_1^k is the target of the student's c_2^k (and symmetrically).
    s1, s2 = direction_sum(teacher_nn1, student_s2, ok1), direction_sum(teacher_nn2, student_s1, ok2)
    z1, z2 = ok1.sum(), ok2.sum()
    if normalisation == "paper":
        loss = 0.5 * (s1 / z1.clamp_min(1) + s2 / z2.clamp_min(1))
    else:  # both sums by Z1; s2 is dropped too when Z1 = 0 (no host sync: a masked product)
        loss = 0.5 * (s1 + s2) / z1.clamp_min(1) * (z1 > 0)
    return CrossImageLoss(loss, z1, z2)
