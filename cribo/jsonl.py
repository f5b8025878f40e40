"""JSON-lines files appended by a process that may be killed mid-write (training logs, eval logs).

One reader: blank lines are skipped; a torn LAST line (the writer died mid-line) is dropped; an
unreadable line anywhere else is an error naming the file and the line.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["JsonlError", "read_jsonl"]


class JsonlError(ValueError):
    """Line ``line`` (1-based) of ``path``, not the last, is not JSON; ``reason`` says why."""

    def __init__(self, path: Path, line: int, reason: str):
        super().__init__(f"{path}: line {line} is not JSON ({reason})")
        self.path, self.line, self.reason = path, line, reason


def read_jsonl(path: str | os.PathLike) -> list[tuple[str, dict]]:
    """``(line, row)`` for every non-blank line of ``path`` (the raw line, so that a caller can write it
    back unchanged), a torn last line dropped. Raises :class:`JsonlError` for any other unreadable
    line."""
    path = Path(path)
    lines = path.read_text().splitlines()
    out = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            out.append((line, json.loads(line)))
        except json.JSONDecodeError as e:
            if n == len(lines) - 1:
                break
            raise JsonlError(path, n + 1, str(e)) from e
    return out
