"""Wall time per named section of a training step, owned by the loop (or a benchmark) and handed to
:meth:`cribo.pretrain.step.CrIBoTrainer.step`; the networks' ``forward`` never sees it.

Sections (``TIME_SPLITS``, the ``time_*`` keys of the log, seconds per step): data, forward
(backbones, heads, losses), clustering (teacher clustering and object pooling), nn_bank (query +
gather + push), object_proj (the teacher's object-head projections), backward_ema. The student's
object projection runs inside the student's single (DDP) call and counts as forward.
"""
from __future__ import annotations

import contextlib
import resource
import time
from collections import defaultdict
from typing import Iterator

import torch

__all__ = ["TIME_SPLITS", "StepTimer", "section", "peak_memory_mb"]

TIME_SPLITS = ("data", "forward", "clustering", "nn_bank", "object_proj", "backward_ema")


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


def section(timer: StepTimer | None, name: str) -> contextlib.AbstractContextManager:
    """``timer.section(name)``, or nothing when no timer is given (tests, the app)."""
    return timer.section(name) if timer is not None else contextlib.nullcontext()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA ``max_memory_allocated`` or, on CPU, the resident-set peak."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
