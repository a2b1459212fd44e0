"""Which kill points the crash harness walks: all of them (`make test`, and a plain `pytest`), or a
fixed sample (`make check`, `--kill-points=sample`).

The sample is the same on every run, so a failure it finds is found again by the same command: the
first and the last point, the first point of each kind (write, link, sync, run, remove, enroll: each
kind is a different way of leaving a half-done tree), and points spread evenly between them.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest

OPTION = "--kill-points"
CHOICES = ("all", "sample")


def add_option(parser: pytest.Parser) -> None:
    parser.addoption(
        OPTION,
        choices=CHOICES,
        default="all",
        help="crash harness: kill the install at every kill point (all, the default: make test) "
        "or at a fixed sample of them (sample: make check)",
    )


def walk_all(config: pytest.Config) -> bool:
    value: str = config.getoption(OPTION)
    return value == "all"


def sample(points: Sequence[str], spread: int) -> list[int]:
    """1-based indices of the points to kill at: the first, the last, the first of each kind (the
    word before the first space), and `spread` points evenly spaced over the whole run."""
    n = len(points)
    if n <= spread + 2:
        return list(range(1, n + 1))
    chosen = {1, n}
    seen: set[str] = set()
    for k, point in enumerate(points, start=1):
        kind = point.split(" ", 1)[0]
        if kind not in seen:
            seen.add(kind)
            chosen.add(k)
    step = (n - 1) / (spread + 1)
    chosen.update(1 + round(step * i) for i in range(1, spread + 1))
    return sorted(chosen)
