"""The CPython builds of pyenv on this machine (and on CI's), for the tests that need a given Python."""

from __future__ import annotations

import os
import subprocess
import sys
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


# The pip that `python3 -m venv` puts into a venv on the release whose python3 each CPython stands for
# (its python3-pip-whl): Ubuntu 22.04, Debian 12, Ubuntu 24.04, Debian 13.
RELEASE_PIP = {"3.10": "22.0.2", "3.11": "23.0.1", "3.12": "24.0", "3.13": "25.1.1"}


def release_pip(version: str, cache: Path) -> Path:
    """The wheel of the pip of the release whose python3 is CPython `version`: from PyPI once, then
    from `cache`."""
    pip = RELEASE_PIP[version]
    wheel = cache / "release-pips" / f"pip-{pip}-py3-none-any.whl"
    if not wheel.exists():
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             "--dest", str(wheel.parent), f"pip=={pip}"],
            check=True,
        )  # fmt: skip
    return wheel
