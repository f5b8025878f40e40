"""Mixed-precision policy shared by feature extraction, training and the app.

bf16 autocast only pays off where the hardware has bf16 arithmetic: CUDA GPUs with bf16 support, and
CPUs with AVX-512 BF16 or AMX. On other CPUs (e.g. AVX2-only) autocast to bf16 is several times
*slower* than fp32 (measured here: ViT-Ti/16 forward 48 ms/img fp32 vs 288 ms/img bf16), so
``"auto"`` picks fp32 there.
"""
from __future__ import annotations

import contextlib
from typing import ContextManager

import torch

#: The precisions a CLI accepts (``auto`` is resolved per device by :func:`resolve_precision`).
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: The concrete ones and their torch dtypes: autocast, feature banks, search matrices (``--bank-dtype``).
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def device_supports_bf16(device: torch.device | str) -> bool:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """Turn ``"auto"`` into a concrete precision for ``device``; validate the others."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    device = torch.device(device)
    if precision == "auto":
        return "bf16" if device_supports_bf16(device) else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision 'fp16' needs a CUDA device (it uses a gradient scaler); use bf16 or fp32 on CPU")
    return precision


def autocast(precision: str, device: torch.device | str) -> ContextManager:
    """Autocast context for a *resolved* precision (``fp32`` disables autocast)."""
    device = torch.device(device)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = DTYPES[precision]
    return torch.autocast(device.type, dtype=dtype)
