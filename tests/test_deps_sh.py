"""`make deps` (tests/deps.sh) on a machine that lacks what the tests need, and a test that meets a
missing program anyway: both say what to install and how, neither shows a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOBODY = ["/usr/bin/setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def test_deps_sh_as_an_ordinary_user_names_the_packages_and_the_command_in_one_line() -> None:
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:  # a directory uid 65534 may enter
        os.chmod(tmp, 0o755)
        bare = Path(tmp)  # a machine with bash and coreutils' id, and nothing the tests need
        for prog in ("bash", "id"):
            (bare / prog).symlink_to(f"/usr/bin/{prog}")
        res = subprocess.run(
            [*NOBODY, str(REPO / "tests/deps.sh"), "system"],
            env={"PATH": str(bare)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert res.returncode == 1 and res.stdout == ""
    [line] = res.stderr.splitlines()
    packages = line.removeprefix("tests/deps.sh: the tests need ").split(":")[0].split()
    assert {"python3-venv", "make", "golang-go", "nebula", "shellcheck", "curl", "gcc", "systemd"} <= set(
        packages
    )
    assert line.endswith(
        f": run 'sudo apt-get install {' '.join(packages)}' (or 'sudo make deps'), then re-run"
    )


@pytest.mark.slow
def test_a_test_that_runs_a_missing_program_fails_saying_what_to_install(tmp_path: Path) -> None:
    case = tmp_path / "test_case.py"
    case.write_text(
        "import subprocess\n\n\n"
        "def test_runs_a_tool():\n"
        "    subprocess.run(['vectorlay-no-such-tool', '--version'])\n"
    )
    res = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "tests.conftest", "-p", "no:cacheprovider", str(case)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert res.returncode == 1, res.stdout
    assert "vectorlay-no-such-tool: not installed on this machine, and this test runs it." in res.stdout
    assert "make deps" in res.stdout
    assert (
        "Traceback" not in res.stdout and "FileNotFoundError" not in res.stdout.split("short test summary")[0]
    )
