"""Distributed helpers that fall back to one process.

Every helper works without an initialised process group (``rank() == 0``, ``world_size() == 1``,
collectives are identities), so the same training code runs under ``python train.py`` and under
``torchrun``. Backend: gloo on CPU, NCCL on CUDA.

Collectives here are blocking CPU-GPU sync points on CUDA (NCCL); callers should group what they
gather (e.g. one ``all_reduce`` of ``[sum, count]`` instead of two).
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

# torchrun's contract: these variables describe the process; ``WORLD_SIZE`` absent means one process.
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank of this process (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def init_distributed(device: str | torch.device) -> tuple[int, int, torch.device]:
    """Join the ``torchrun`` process group if launched by it; otherwise stay a single process.

    Reads the launcher's ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``.
    Without ``WORLD_SIZE`` (plain ``python``), or with ``WORLD_SIZE=1``, no group is created.

    Args:
        device: "cpu", "cuda" or "cuda:i". On CUDA each process uses ``cuda:LOCAL_RANK`` (an explicit
            index is only honoured in a single process) and the NCCL backend; on CPU, gloo.

    Returns:
        (rank, world_size, device) where ``device`` is the torch.device this process must use.
    """
    device = torch.device(device)
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"init_distributed: device={device!s} is not supported; use 'cpu' or 'cuda'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("init_distributed: device='cuda' requested but CUDA is not available; pass device='cpu'")
    if is_initialized():
        backend = dist.get_backend()
        expected = "nccl" if device.type == "cuda" else "gloo"
        if backend != expected:
            raise RuntimeError(
                f"init_distributed: a process group with backend {backend!r} already exists, but "
                f"device={device!s} needs {expected!r}")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", torch.cuda.current_device())))
        return rank(), world_size(), device

    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) == 1:
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)
        return 0, 1, device

    missing = [v for v in _TORCHRUN_VARS if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"init_distributed: WORLD_SIZE={os.environ['WORLD_SIZE']} is set but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not; launch with `torchrun --nproc_per_node=N train.py ...` "
            "(it sets all of them)")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(
                f"init_distributed: LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA "
                "device(s) are visible; use --nproc_per_node <= the number of GPUs")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl", init_method="env://", device_id=device)
    else:
        dist.init_process_group(backend="gloo", init_method="env://")
    return rank(), world_size(), device


def destroy() -> None:
    """Tear the process group down (no-op in a single process)."""
    if is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, in rank order.

    Every rank must pass a tensor of the same shape and dtype (pad first, and gather a validity mask
    alongside). No gradient flows through the result. Identity (no copy) in one process.

    Args:
        t: (n, ...) tensor.

    Returns:
        (world_size * n, ...) tensor; rows ``r*n:(r+1)*n`` come from rank r.
    """
    ws = world_size()
    if ws == 1:
        return t
    t = t.contiguous()
    out = torch.empty((ws * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
    if dist.get_backend() == "nccl":
        dist.all_gather_into_tensor(out, t)
    else:  # gloo has no all_gather_into_tensor
        dist.all_gather(list(out.chunk(ws, dim=0)), t)
    return out


@torch.no_grad()
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor; ``t`` is left untouched). Identity in one process."""
    if world_size() == 1:
        return t.clone()
    out = t.detach().clone().contiguous()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


@torch.no_grad()
def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor; floating point only). Identity in one process."""
    if not t.is_floating_point():
        raise TypeError(f"all_reduce_mean: needs a floating-point tensor, got {t.dtype}; use all_reduce_sum")
    return all_reduce_sum(t) / world_size()


def barrier() -> None:
    """Wait for every rank (no-op in one process)."""
    if is_initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (pickles: only for objects we created)."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]
