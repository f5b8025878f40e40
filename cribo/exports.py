"""Lazy re-exports for a package ``__init__`` (PEP 562): ``import cribo`` stays cheap (no torch, timm or
faiss) while ``cribo.load_backbone`` still works; each name is imported from its module on first use."""
from __future__ import annotations

import importlib
from typing import Any, Callable

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: dict[str, str]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package`` for ``exports`` (public name -> module that defines it)."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    return __getattr__
