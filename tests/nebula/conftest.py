from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest


def _require(program: str) -> str:
    path = shutil.which(program)
    if path is None:
        pytest.fail(f"{program} not found: these tests run the real nebula (apt-get install nebula)")
    return path


@pytest.fixture
def nebula_cert(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real `nebula-cert` in tmp_path."""
    exe = _require("nebula-cert")

    def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([exe, *args], cwd=tmp_path, capture_output=True, text=True, timeout=30)
        if check and proc.returncode != 0:
            raise AssertionError(f"nebula-cert {' '.join(args)} failed: {proc.stdout}{proc.stderr}")
        return proc

    return _run


@pytest.fixture
def nebula_test() -> Callable[[Path], subprocess.CompletedProcess[str]]:
    """`nebula -test -config PATH`: nebula loads the config, keys and certificates, then exits."""
    exe = _require("nebula")

    def _run(config: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [exe, "-test", "-config", str(config)], capture_output=True, text=True, timeout=30
        )

    return _run
