"""argparse ``type=`` callables that check a number's range where it enters, so a bad value is
one ``usage:`` line naming the option (exit 2), never a hang or a traceback later on.
Standard library only (``synth`` uses it in the vLLM environment)."""

from __future__ import annotations

import argparse
import math


def int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def float_in(low: float, high: float = math.inf, *, low_open: bool = False):
    """A finite number in [low, high] (or (low, high] with ``low_open``)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            left = "(" if low_open else "["
            right = "]" if math.isfinite(high) else ")"
            raise argparse.ArgumentTypeError(f"must be in {left}{low}, {high}{right}, got {text}")
        return value

    parse.__name__ = "number"
    return parse
