"""Per-iteration schedules as precomputed arrays (index with the global step).

``cosine_schedule`` reproduces DINO's ``cosine_scheduler`` (utils.py) with steps instead of
epochs x iterations: a linear warm-up of ``warmup_steps`` values from ``warmup_start`` to ``base``
(both ends included, ``np.linspace``), then ``final + (base - final) * (1 + cos(pi * i / n)) / 2`` for
``i = 0 .. n-1``, ``n = total_steps - warmup_steps``. As in DINO the last value is close to, not
exactly, ``final``. Used for the learning rate (warm-up then cosine to min_lr), the weight decay
(0.04 -> 0.4) and the teacher EMA momentum (0.996 -> 1).
"""
from __future__ import annotations

import numpy as np


def _check_steps(name: str, total_steps: int, warmup_steps: int) -> None:
    if int(total_steps) != total_steps or total_steps <= 0:
        raise ValueError(f"{name}: total_steps must be a positive integer, got {total_steps!r}")
    if int(warmup_steps) != warmup_steps or warmup_steps < 0:
        raise ValueError(f"{name}: warmup_steps must be a non-negative integer, got {warmup_steps!r}")


def cosine_schedule(base: float, final: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Linear warm-up then half-cosine from ``base`` to ``final``, one value per iteration.

    Args:
        base: value reached at the end of the warm-up (at step ``warmup_steps - 1``) and where the
            cosine starts (step ``warmup_steps``).
        final: value the cosine tends to.
        total_steps: length of the run; the returned array has this length.
        warmup_steps: number of warm-up steps (``<= total_steps``).
        warmup_start: value at step 0 when ``warmup_steps > 0``.

    Returns:
        float64 array of shape (total_steps,).
    """
    _check_steps("cosine_schedule", total_steps, warmup_steps)
    if warmup_steps > total_steps:
        raise ValueError(f"cosine_schedule: warmup_steps={warmup_steps} exceeds total_steps={total_steps}; "
                         "shorten the warm-up or lengthen the run")
    warmup = np.linspace(warmup_start, base, warmup_steps)
    n = total_steps - warmup_steps
    i = np.arange(n)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(np.pi * i / max(n, 1)))
    return np.concatenate((warmup, cosine)).astype(np.float64)


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_steps: int, total_steps: int) -> np.ndarray:
    """Teacher temperature: linear from ``warmup_temp`` to ``temp`` over ``warmup_steps``, then constant.

    DINO's schedule per iteration: ``np.linspace(warmup_temp, temp, warmup_steps)`` (``temp`` reached at
    step ``warmup_steps - 1``) followed by ``temp``. When the warm-up is longer than the run (short runs
    with an epoch-based warm-up), the ramp keeps its slope and is cut at ``total_steps``: the run ends
    before reaching ``temp``.

    Returns:
        float64 array of shape (total_steps,).
    """
    _check_steps("teacher_temp_schedule", total_steps, warmup_steps)
    if warmup_temp <= 0 or temp <= 0:
        raise ValueError(f"teacher_temp_schedule: temperatures must be > 0, got warmup_temp={warmup_temp}, temp={temp}")
    ramp = np.linspace(warmup_temp, temp, warmup_steps)
    rest = np.full(max(total_steps - warmup_steps, 0), temp, dtype=np.float64)
    return np.concatenate((ramp, rest))[:total_steps].astype(np.float64)
