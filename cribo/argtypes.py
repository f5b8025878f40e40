"""argparse ``type=`` callables for numeric options: the message names the range (argparse adds the flag).

    p.add_argument("--seed", type=non_negative_int)   # error: argument --seed: must be an integer >= 0, got '-1'
"""
from __future__ import annotations

import argparse
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
