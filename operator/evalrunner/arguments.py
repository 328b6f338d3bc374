"""Value types for the CLI's options, so argparse refuses a bad value (exit 2, naming the option).

Without them `--limit -1` reached the database and `--deadline-grace nan` the
run's deadline arithmetic, each ending in a traceback.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def whole_number(minimum: int, maximum: int | None = None) -> Callable[[str], int]:
    """An integer option within [minimum, maximum]."""
    wanted = f"a whole number of at least {minimum}" if maximum is None else f"a whole number from {minimum} to {maximum}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum or (maximum is not None and value > maximum):
            raise argparse.ArgumentTypeError(f"must be {wanted}, not {text!r}")
        return value

    return parse


def number(unit: str, minimum: float = 0) -> Callable[[str], float]:
    """A finite float option of `unit` (seconds, days), at least `minimum`: no nan, no inf."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or value < minimum:
            least = "0" if minimum == 0 else f"{minimum:g}"
            raise argparse.ArgumentTypeError(f"must be a number of {unit}, {least} or more, not {text!r}")
        return value

    return parse


SECONDS = number("seconds")
PORT = whole_number(0, 65535)
