"""Locate the templates/ and units/ directories, from a wheel or from a source checkout."""

from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def data_dir(name: str) -> Path:
    """`templates` or `units`: inside the wheel under bootstrap/_data, else at the repository top."""
    for candidate in (_PKG / "_data" / name, _PKG.parent / name):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"vectorlay-node data directory {name!r} is missing from this installation")


def templates_dir() -> Path:
    return data_dir("templates")


def units_dir() -> Path:
    return data_dir("units")
