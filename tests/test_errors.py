"""The one error path of every entry point (cribo.errors): one line, exit status, --debug, workers."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.data import DataLoader, Dataset

from cribo.errors import (EXIT_DATA, EXIT_INTERRUPTED, EXIT_USAGE, CliParser, DataError, UsageError, run_cli,
                          user_message)
from index.datasets import DatasetError

REPO = Path(__file__).resolve().parents[1]


class Broken(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        raise DatasetError(f"/data/img{i}.png: cannot decode image; remove it from the split")


def test_worker_error_is_unwrapped_to_its_original_message():
    with pytest.raises(DatasetError) as e:
        next(iter(DataLoader(Broken(), num_workers=1)))
    assert str(e.value).startswith("Caught DatasetError in DataLoader worker process 0")  # torch's wrapping
    assert user_message(e.value) == "/data/img0.png: cannot decode image; remove it from the split"


def test_messages_of_other_errors():
    assert user_message(FileNotFoundError(2, "No such file or directory", "/x/y")) == "/x/y: No such file or directory"
    assert user_message(KeyError("no such key")) == "no such key"
    assert user_message(ValueError("  plain \n")) == "plain"


def body_raising(exc: BaseException):
    def body(argv: list[str]) -> int:
        CliParser(prog="tool").parse_args(argv)
        raise exc
    return body


@pytest.mark.parametrize("exc,code", [
    (UsageError("--k must be >= 1"), EXIT_USAGE), (DataError("a.png is corrupt"), EXIT_DATA),
    (DatasetError("root missing", exit_code=EXIT_USAGE), EXIT_USAGE), (ValueError("k > ntotal"), EXIT_USAGE),
    (PermissionError(13, "Permission denied", "/ro/out"), EXIT_DATA), (KeyboardInterrupt(), EXIT_INTERRUPTED),
])
def test_exit_status_and_one_line(exc, code, monkeypatch):
    monkeypatch.delenv("CRIBO_DEBUG", raising=False)
    err = io.StringIO()
    assert run_cli(body_raising(exc), [], stderr=err) == code
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")


def test_argparse_errors_are_one_line_usage_errors(monkeypatch):
    monkeypatch.delenv("CRIBO_DEBUG", raising=False)
    err = io.StringIO()
    assert run_cli(body_raising(AssertionError("unreached")), ["--nope"], stderr=err) == EXIT_USAGE
    assert err.getvalue() == "error: tool: unrecognized arguments: --nope (see tool --help)\n"


def test_debug_flag_and_environment_reraise(monkeypatch):
    monkeypatch.delenv("CRIBO_DEBUG", raising=False)
    with pytest.raises(DataError, match="corrupt"):
        run_cli(body_raising(DataError("corrupt")), ["--debug"])
    monkeypatch.setenv("CRIBO_DEBUG", "1")
    with pytest.raises(DataError, match="corrupt"):
        run_cli(body_raising(DataError("corrupt")), [])


def test_bugs_are_not_swallowed(monkeypatch):
    monkeypatch.delenv("CRIBO_DEBUG", raising=False)
    with pytest.raises(ZeroDivisionError):
        run_cli(body_raising(ZeroDivisionError("bug")), [])


def test_cli_process_traceback_only_with_debug(tmp_path):
    """The real exit path: one line without CRIBO_DEBUG, the traceback with it."""
    args = [sys.executable, str(REPO / "train.py"), "export", "--output-dir", str(tmp_path)]
    quiet = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert quiet.returncode == 1 and quiet.stderr.count("\n") == 1 and "Traceback" not in quiet.stderr
    assert quiet.stderr.startswith(f"error: {tmp_path / 'checkpoint.pth'}: no such checkpoint")
    loud = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CRIBO_DEBUG": "1"})
    assert loud.returncode == 1 and "Traceback" in loud.stderr and "CheckpointError" in loud.stderr
