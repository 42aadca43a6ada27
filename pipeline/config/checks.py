"""The value checks every params section uses, each failing with one ``PipelineError`` line
that names the key and what is allowed, and the bounds beyond which a value is a typo.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Any

from pipeline.errors import PipelineError

# Beyond these a value is a typo, and would exhaust memory before anything says so
MAX_IMAGE_SIZE = 4096  # pixels a side


MAX_SAMPLES = 1_000_000  # calibration images


MAX_LEVELS = 10_001  # grid points per layer


DISTORTION_KINDS = ("mean", "max")  # per-sample mean / worst-case curves (see distortion.py)


def fail(key: str, value: Any, allowed: str) -> PipelineError:
    return PipelineError(f"{key} = {value!r} is not allowed; allowed: {allowed}")


def check_choice(key: str, value: str, choices: Collection[str]) -> None:
    if value not in choices:
        raise fail(key, value, ", ".join(sorted(choices)))


def check_range(key: str, value: float, lo: float, hi: float, *, hi_open: bool = False) -> None:
    ok = math.isfinite(value) and lo <= value and (value < hi if hi_open else value <= hi)
    if not ok:
        raise fail(key, value, f"a number in [{lo}, {hi}{')' if hi_open else ']'}")


def check_positive(key: str, value: int | float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise fail(key, value, "a positive number")
