"""The CPython builds of pyenv on this machine (and on CI's), for the tests that need a given Python."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def pyenv_python(version: str) -> Path | None:
    """The newest pyenv build of CPython `version` (e.g. 3.10.13 for "3.10"), or None."""
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = []
    for d in (root / "versions").glob(f"{version}.*"):
        patch = d.name.removeprefix(f"{version}.")
        if patch.isdigit() and (d / "bin/python3").is_file():
            found.append((int(patch), d / "bin/python3"))
    return max(found)[1] if found else None


def require_python(version: str) -> Path:
    """That interpreter; without it the test skips, except in CI (CI=true), where the same pyenv
    builds exist and a missing one would hide that the Python it stands for went untested."""
    python = pyenv_python(version)
    if python is None:
        message = f"no pyenv build of CPython {version} (pyenv install {version}): nothing tested with it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return python
