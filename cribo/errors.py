"""One error path for every entry point: a user error prints one line ``error: ...`` and exits non-zero.

Every CLI (``train.py``, ``train.py export|plot``, ``build_index.py``, ``evaluate.py``, ``app.py``,
``python -m cribo.synthetic``) parses with :class:`CliParser` and runs its body through :func:`run_cli`:

- :class:`UsageError` (bad arguments, including every argparse error): exit :data:`EXIT_USAGE` (2).
- :class:`DataError` (bad data or state: a corrupt image, a damaged checkpoint, an output path that
  holds someone else's files): exit :data:`EXIT_DATA` (1). The library's own error classes
  (``DatasetError``, ``CheckpointError``, ``IndexLoadError``, ...) derive from it.
- ``OSError`` (a read-only folder, a file where a folder is expected, a full disk): exit 1, the
  path and the reason.
- ``ValueError`` raised by argument checks in the library: exit 2.

No traceback is printed unless ``--debug`` is given or ``CRIBO_DEBUG=1`` is set; anything else (a
bug) propagates with its traceback. An error raised inside a DataLoader worker reaches the main
process re-wrapped by torch ("Caught DatasetError in DataLoader worker process 0 ... Original
Traceback ..."); :func:`user_message` recovers the original one-line message.
"""
from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import Callable, Sequence, TextIO

EXIT_DATA = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
DEBUG_FLAG = "--debug"
DEBUG_ENV = "CRIBO_DEBUG"
#: what ``torch.load(weights_only=True)`` raises on a damaged or foreign file (random bytes also give
#: IndexError / KeyError from its unpickler): catch these around the load only, never around more.
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, LookupError)
#: torch's warning for a file that is not a torch pickle at all (random bytes): noise before our message
TORCH_PROTOCOL_WARNING = r"Detected pickle protocol"
_WORKER_PREFIX = "Caught "
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class UserError(Exception):
    """An error the user can fix; its message names the file or argument and the fix.

    ``exit_code`` (keyword) overrides the class's status for one instance, e.g. a dataset error
    that is really a wrong ``--root``.
    """

    exit_code = EXIT_DATA

    def __init__(self, *args: object, exit_code: int | None = None):
        super().__init__(*args)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(UserError):
    """Bad command-line arguments (exit 2)."""

    exit_code = EXIT_USAGE


class DataError(UserError):
    """Bad input data or on-disk state (exit 1)."""

    exit_code = EXIT_DATA


class CliParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors raise :class:`UsageError` (one line, exit 2) instead
    of printing the usage block, and which accepts ``--debug`` (tracebacks, also ``CRIBO_DEBUG=1``)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.add_argument(DEBUG_FLAG, action="store_true",
                          help=f"print the full traceback of an error (also {DEBUG_ENV}=1)")

    def error(self, message: str):  # argparse's hook; never returns
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def debug_requested(argv: Sequence[str]) -> bool:
    """``--debug`` among the arguments, or ``CRIBO_DEBUG=1`` in the environment."""
    return DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") == "1"


def user_message(exc: BaseException) -> str:
    """The one-line message of ``exc``; for an error re-raised from a DataLoader worker, the original.

    torch re-raises a worker's exception as the same class with the message ``Caught X in DataLoader
    worker process N.\\nOriginal Traceback (most recent call last):\\n ... \\nmodule.X: message``.
    """
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    if text.startswith(_WORKER_PREFIX) and _WORKER_TRACEBACK in text:
        name = type(exc).__name__
        lines = text.splitlines()
        for i in range(len(lines) - 1, -1, -1):
            head, sep, rest = lines[i].partition(": ")
            if sep and (head == name or head.endswith("." + name)):
                return " ".join([rest, *lines[i + 1:]]).strip()
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return text.strip()


def exit_code(exc: BaseException) -> int:
    """The exit status of a handled error (see the module docstring)."""
    if isinstance(exc, UserError):
        return exc.exit_code
    if isinstance(exc, ValueError):
        return EXIT_USAGE
    return EXIT_DATA


def run_cli(body: Callable[[list[str]], int], argv: Sequence[str] | None = None, *,
            stderr: TextIO | None = None) -> int:
    """Run ``body(argv)`` (argv defaults to ``sys.argv[1:]``); turn user errors into one line and an
    exit status. With ``--debug`` / ``CRIBO_DEBUG=1`` the error propagates with its traceback."""
    argv = list(sys.argv[1:] if argv is None else argv)
    stderr = stderr or sys.stderr
    debug = debug_requested(argv)
    try:
        return body(argv)
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=stderr)
        return EXIT_INTERRUPTED
    except (UserError, ValueError, OSError) as e:
        if debug:
            raise
        print(f"error: {user_message(e)}", file=stderr)
        return exit_code(e)
