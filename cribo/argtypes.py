"""argparse helpers: ``type=`` callables for numeric options (the message names the range; argparse adds
the flag) and :class:`DeprecatedFlag` for old spellings of a flag.

    p.add_argument("--seed", type=non_negative_int)   # error: argument --seed: must be an integer >= 0, got '-1'
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable


def _int_at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be an integer >= {low}, got {text!r}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


non_negative_int = _int_at_least(0)
positive_int = _int_at_least(1)


class DeprecatedFlag(argparse.Action):
    """An old spelling of a flag kept for scripts: stores into the new flag's ``dest`` and says on
    stderr that the spelling is deprecated. ``p.add_argument("--seed", dest="init_seed",
    action=DeprecatedFlag, new_flag="--init-seed", type=non_negative_int)``."""

    def __init__(self, option_strings: list[str], dest: str, new_flag: str, **kwargs):
        kwargs.setdefault("help", f"deprecated spelling of {new_flag}")
        super().__init__(option_strings, dest, **kwargs)
        self.new_flag = new_flag

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values,
                 option_string: str | None = None) -> None:
        print(f"{parser.prog}: {option_string} is deprecated, use {self.new_flag} (same meaning)", file=sys.stderr)
        setattr(namespace, self.dest, values)
